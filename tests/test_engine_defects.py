"""Issue 14's engine defects, each with the test that failed before its fix (entries 13, 16, 26 ...)."""

from __future__ import annotations

import threading

import pytest

import gpuctx
from gpuctx import GB

TIMEOUT = 10


def _live_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("gpuctx-")}


# ----------------------------------------------------------------------------- 16: waiting on one's own model
def test_a_body_waiting_for_a_queued_task_of_its_own_model_gets_a_clear_error(fresh, gate):
    gpuctx.model("m", vram="1GB")(object)
    release = gate()
    holder: dict = {}

    @gpuctx.gpu_task(model="m")
    def first():
        release.wait(TIMEOUT)
        return holder["second"].result(TIMEOUT)   # queued behind us, on our model: it would never start

    @gpuctx.gpu_task(model="m")
    def second():
        return 2

    t1 = first()
    holder["second"] = t2 = second()
    release.set()
    err = t1.exception(TIMEOUT)
    assert isinstance(err, gpuctx.WaitDeadlock)
    assert f"Task #{t2.id}" in str(err) and "'m'" in str(err)
    assert t2.result(TIMEOUT) == 2                  # the other one still runs


def test_a_session_waiting_for_a_task_of_its_model_gets_the_error_too(fresh):
    gpuctx.model("m", vram="1GB")(object)
    with gpuctx.context_session("m"):
        t = gpuctx.gpu_task(model="m")(lambda: 1)()
        with pytest.raises(gpuctx.WaitDeadlock, match="needs model 'm'"):
            t.result(TIMEOUT)
    assert t.result(TIMEOUT) == 1


def test_waiting_for_another_models_task_inside_a_body_is_fine(fresh):
    other = gpuctx.gpu_task(model="b", vram="1GB")(lambda: "b")
    outer = gpuctx.gpu_task(model="a", vram="1GB")(lambda: other().result(TIMEOUT))
    assert outer().result(TIMEOUT) == "b"


# ----------------------------------------------------------------------------- 13: shutdown holes
def test_shutdown_without_waiting_lets_queued_work_finish_then_unloads_and_stops_every_thread(fresh, gate):
    release, running, unloaded = gate(), threading.Event(), []
    gpuctx.model("m", vram="1GB", unload=unloaded.append)(lambda: "M")
    hold = gpuctx.gpu_task(model="m")(lambda: (running.set(), release.wait(TIMEOUT)))
    later = gpuctx.gpu_task(model="m")(lambda: "later")
    h, t = hold(), later()
    assert running.wait(TIMEOUT)
    sched = gpuctx.scheduler()
    sched.shutdown(wait=False)
    assert not t.done()                             # queued work is not dropped ...
    release.set()
    assert t.result(TIMEOUT) == "later" and h.result(TIMEOUT)
    for th in [th for th in threading.enumerate() if th.name.startswith("gpuctx-")]:
        th.join(TIMEOUT)                            # ... and then every worker ends
    assert not _live_threads()
    assert unloaded == ["M"] and sched.slot("m").state == "absent"


def test_shutdown_without_waiting_during_a_load_unloads_that_model_once_it_is_loaded(fresh, gate):
    release, loading, unloaded = gate(), threading.Event(), []

    @gpuctx.model("m", vram="1GB", unload=unloaded.append)
    def load():
        loading.set()
        release.wait(TIMEOUT)
        return "M"

    t = gpuctx.gpu_task(model="m")(lambda: 1)()
    assert loading.wait(TIMEOUT)
    sched = gpuctx.scheduler()
    sched.shutdown(wait=False)
    release.set()
    assert t.result(TIMEOUT) == 1
    for th in [th for th in threading.enumerate() if th.name.startswith("gpuctx-")]:
        th.join(TIMEOUT)
    assert unloaded == ["M"] and sched.committed() == 0


def test_shutdown_from_a_body_or_a_done_callback_does_not_hang(fresh):
    gpuctx.model("m", vram="1GB")(object)
    sched = gpuctx.scheduler()
    stopped = threading.Event()

    @gpuctx.gpu_task(model="m")
    def body():
        sched.shutdown()                            # cannot wait for itself: returns at once
        return "after"

    assert body().result(TIMEOUT) == "after"
    for th in [th for th in threading.enumerate() if th.name.startswith("gpuctx-")]:
        th.join(TIMEOUT)
    assert sched.closed and not _live_threads()

    gpuctx.reset()
    gpuctx.configure(device="cpu", budget="10GB", safety_factor=1.0)
    t = gpuctx.gpu_task(model="n", vram="1GB")(lambda: 1)()
    t.add_done_callback(lambda _: (gpuctx.shutdown(), stopped.set()))
    assert t.result(TIMEOUT) == 1 and stopped.wait(TIMEOUT)


# ----------------------------------------------------------------------------- 26: small contract gaps
def test_cancelling_a_cancelled_task_returns_true_as_a_future_does(fresh, gate):
    release = gate()
    hold = gpuctx.gpu_task(model="m", vram="1GB")(lambda: release.wait(TIMEOUT))()
    t = gpuctx.gpu_task(model="m", vram="1GB")(lambda: 1)()
    assert t.cancel() and t.cancel()
    release.set()
    hold.result(TIMEOUT)


# ----------------------------------------------------------------------------- 18: an explicit budget
def test_an_explicit_budget_means_what_it_says():
    gpuctx.reset()
    try:
        gpuctx.configure(device="cpu", budget="8GB")          # safety_factor left at its 0.9 default
        assert gpuctx.scheduler().budget == 8 * GB
        assert gpuctx.gpu_task(model="big", vram="8GB")(lambda: "fits")().result(TIMEOUT) == "fits"
        assert "declared" in gpuctx.scheduler().budget_source()
    finally:
        gpuctx.reset()


# ----------------------------------------------------------------------------- 12: an idle pinned model
def test_a_task_that_can_only_fit_by_evicting_a_pinned_model_is_refused_at_submit(fresh):
    gpuctx.configure(budget="8GB")
    gpuctx.model("p", vram="5GB", pin=True)(object)
    gpuctx.gpu_task(model="p")(lambda: 1)().result(TIMEOUT)   # P resident, idle, pinned
    gpuctx.model("q", vram="5GB")(object)
    with pytest.raises(gpuctx.BudgetError, match=r"pinned 'p' holds 5 GB; largest possible 3 GB \(unpin"):
        gpuctx.gpu_task(model="q")(lambda: 2)()
    assert gpuctx.scheduler().tasks() == []


# ----------------------------------------------------------------------------- 7: validate first, then mutate
def test_a_refused_model_registration_changes_nothing(fresh):
    with pytest.raises(gpuctx.BudgetError, match="needs 90 GB but can never fit"):
        gpuctx.model("x", vram="90GB")(object)
    gpuctx.model("x", vram="1GB")(object)                 # not "declared with two sizes"
    with pytest.raises(gpuctx.ConfigError, match="max_queue=0"):
        gpuctx.model("y", vram="1GB", max_queue=0)(lambda: "loaded")
    assert "y" not in {r.name for r in gpuctx.status().models}


def test_a_refused_context_keeps_no_reservation_and_no_name(fresh):
    with pytest.raises(gpuctx.ConfigError, match="max_queue=0"):
        gpuctx.create_context("g", qos="GUARANTEED", max_vram="2GB", max_queue=0)
    assert gpuctx.get_available_vram() == 10 * GB
    gpuctx.create_context("g", qos="GUARANTEED", max_vram="2GB")   # the name is free
    assert gpuctx.get_available_vram() == 8 * GB


def test_a_refused_task_does_not_fix_its_labels_size(fresh):
    with pytest.raises(gpuctx.BudgetError):
        gpuctx.gpu_task(model="g", vram="90GB")(lambda: 1)()
    assert gpuctx.gpu_task(model="g", vram="1GB")(lambda: 2)().result(TIMEOUT) == 2


# ----------------------------------------------------------------------------- 17: admission reclaims idle memory
def test_a_reservation_evicts_idle_best_effort_and_burst_memory_to_be_admitted(fresh):
    gpuctx.create_context("guar", qos="GUARANTEED", max_vram="4GB")
    gpuctx.create_context("burst", qos="BURSTABLE", base_vram="1GB", max_vram="3GB")
    gpuctx.create_context("best", qos="BEST_EFFORT")
    for name, size in (("guar", "4GB"), ("burst", "3GB"), ("best", "3GB")):
        gpuctx.model(name, vram=size)(object)
        gpuctx.gpu_task(model=name)(lambda: 1)().result(TIMEOUT)
    assert gpuctx.get_available_vram() == 0
    gpuctx.create_context("new", qos="BURSTABLE", base_vram="1GB", max_vram="3GB")
    states = {r.name: r.state for r in gpuctx.status().models}
    assert states["guar"] == "resident" and states["best"] == "absent"
    assert gpuctx.get_context_usage("new").base == 1 * GB
    reasons = [e.reason for e in gpuctx.scheduler().trace.events if e.kind == "evict"]
    assert "room for context 'new''s reservation" in reasons


# ----------------------------------------------------------------------------- 19: registering again
def test_registering_a_model_again_replaces_the_loaded_object_with_a_note(fresh):
    gpuctx.model("m", vram="1GB")(lambda: "old")
    use = gpuctx.gpu_task(model="m")(lambda: gpuctx.current_model())
    assert use().result(TIMEOUT) == "old"
    with pytest.warns(RuntimeWarning, match=r"registered again \(size 1 GB -> 2 GB, a new loader\)"):
        gpuctx.model("m", vram="2GB")(lambda: "new")
    assert use().result(TIMEOUT) == "new"
    assert gpuctx.scheduler().slot("m").size == 2 * GB


# ----------------------------------------------------------------------------- 26: the rest of the contract gaps
def test_gpu_task_on_things_that_are_not_plain_functions(fresh):
    import functools

    with pytest.raises(gpuctx.ConfigError, match=r"gpu_task\(model='m'\)\(5\): expected a function"):
        gpuctx.gpu_task(model="m", vram="1GB")(5)
    add = gpuctx.gpu_task(model="m", vram="1GB")(functools.partial(lambda a, b: a + b, 1))
    assert add(2).result(TIMEOUT) == 3

    def gen():
        yield 1

    with pytest.raises(gpuctx.ConfigError, match="'gen' is a generator function"):
        gpuctx.gpu_task(model="m", vram="1GB")(gen)


def test_a_cuda_device_without_a_gpu_is_refused_by_configure_itself(fresh):
    from gpuctx.device import cuda

    if cuda.cuda_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(gpuctx.ConfigError, match="device='cuda'"):
        gpuctx.configure(device="cuda")
    assert gpuctx.scheduler().device.name == "cpu"


def test_a_call_after_shutdown_names_itself(fresh):
    job = gpuctx.gpu_task(model="m", vram="1GB")(lambda: 1)
    gpuctx.shutdown()
    with pytest.raises(gpuctx.SchedulerClosed, match=r"^<lambda>\(\): the gpuctx scheduler was shut down"):
        job()


def test_a_blocking_queue_has_a_public_timeout(fresh, gate):
    release = gate()
    job = gpuctx.gpu_task(model="q", vram="1GB", max_queue=1, overflow="block")(lambda: release.wait(TIMEOUT))
    first, second = job(), job()          # one running, one queued: the queue is full
    with pytest.raises(gpuctx.Overloaded, match="stayed full"):
        job.options(timeout="50ms")()
    release.set()
    assert first.result(TIMEOUT) and second.result(TIMEOUT)


def test_queue_limits_outlive_a_shutdown_and_a_new_configure(fresh):
    gpuctx.gpu_task(model="q", vram="1GB", max_queue=3)(lambda: 1)
    gpuctx.shutdown()
    gpuctx.configure(budget="10GB")
    assert gpuctx.scheduler().slot("q").max_queue == 3


# ----------------------------------------------------------------------------- 11: finished results kept by a queued task
def test_an_older_queued_task_does_not_keep_finished_results_alive(fresh, gate):
    import gc
    import weakref

    class Result:
        pass

    start, finish, last_running = gate(), gate(), threading.Event()
    refs: list = []
    gpuctx.model("m", vram="1GB")(object)

    @gpuctx.gpu_task(model="m")
    def make(i):
        if i == 199:
            last_running.set()
            finish.wait(TIMEOUT)
        r = Result()
        refs.append(weakref.ref(r))
        return r

    h = gpuctx.gpu_task(model="m")(lambda: start.wait(TIMEOUT))()
    low = make.options(priority=0)(-1)                  # queued first, runs last
    high = [make.options(priority=5)(i) for i in range(200)]
    start.set()
    assert last_running.wait(TIMEOUT)                   # 199 done, the last one running, low still queued
    assert low.state is gpuctx.TaskState.QUEUED
    del high
    gc.collect()
    assert len(refs) == 199 and all(r() is None for r in refs)
    finish.set()
    assert isinstance(low.result(TIMEOUT), Result) and h.result(TIMEOUT)


# ----------------------------------------------------------------------------- 1: the mixed-size stress that livelocked
def test_ten_thousand_mixed_size_tasks_all_finish_within_the_budget(fresh):
    import random

    gpuctx.configure(budget="8GB")
    rng = random.Random(1)
    sizes = {"a": "2.5GB", "b": "2.5GB", "c": "2GB", "d": "4GB", "e": "2.5GB", "f": "1GB"}
    fns = {}
    for name, size in sizes.items():
        gpuctx.model(name, vram=size, priority=rng.randint(0, 9))(object)
        fns[name] = gpuctx.gpu_task(model=name)(lambda i: i)
    names = list(sizes)
    tasks = [fns[rng.choice(names)].options(priority=rng.randint(0, 9))(i) for i in range(10_000)]
    done, pending = gpuctx.wait(tasks, timeout=120)
    assert not pending and [t.result(0) for t in tasks[:5]] == [0, 1, 2, 3, 4]
    stats = gpuctx.stats()
    assert stats["tasks"] == 10_000 and stats["failed"] == 0
    assert stats["peak_vram"] <= 8 * GB


# ----------------------------------------------------------------------------- 2: errors along a dependency chain
def test_a_long_chains_errors_stay_small_and_name_the_root_cause(fresh, gate):
    release = gate()
    hold = gpuctx.gpu_task(model="h", vram="1GB")(lambda: release.wait(TIMEOUT))()

    @gpuctx.gpu_task(model="m", vram="1GB")
    def boom(_):
        raise ValueError("the root cause")

    step = gpuctx.gpu_task(model="m", vram="1GB")(lambda x: x)
    head = boom(hold)
    t = head
    chain = []
    for _ in range(1000):
        t = step(t)
        chain.append(t)
    release.set()
    err = chain[-1].exception(TIMEOUT)
    assert isinstance(err, gpuctx.DependencyError)
    assert len(str(err)) < 400 and "ValueError: the root cause" in str(err) and "1000 links away" in str(err)
    assert isinstance(err.__cause__, ValueError)           # the root error itself is chained


def test_cancelling_the_head_of_a_ten_thousand_link_chain_is_quick_and_resolves_every_future(fresh, gate):
    import time as _time

    release = gate()
    hold = gpuctx.gpu_task(model="h", vram="1GB")(lambda: release.wait(TIMEOUT))()
    step = gpuctx.gpu_task(model="m", vram="1GB")(lambda x: x)
    head = step(hold)
    t, chain = head, []
    for _ in range(10_000):
        t = step(t)
        chain.append(t)
    t0 = _time.perf_counter()
    assert head.cancel()
    took = _time.perf_counter() - t0
    assert all(c.done() for c in chain) and len(str(chain[-1].exception(0))) < 400
    assert took < 5.0   # 6.6 s and 4.1 GB before; a generous bound, the point is that it ends
    release.set()
    hold.result(TIMEOUT)


# ----------------------------------------------------------------------------- 3: BaseException during delivery
def test_a_done_callback_raising_system_exit_does_not_strand_the_other_futures(fresh, gate):
    release = gate()
    hold = gpuctx.gpu_task(model="h", vram="1GB")(lambda: release.wait(TIMEOUT))()
    step = gpuctx.gpu_task(model="m", vram="1GB")(lambda x: x)
    head = step(hold)
    dependents = [step(head) for _ in range(5)]

    def bad(_):
        raise SystemExit("callback says exit")

    head.add_done_callback(bad)               # runs first: the head is resolved before its dependents
    with pytest.raises(SystemExit):
        head.cancel()                          # the callback's SystemExit reaches the caller ...
    for d in dependents:                       # ... after every future was resolved
        assert isinstance(d.exception(TIMEOUT), gpuctx.DependencyError)
    release.set()
    hold.result(TIMEOUT)
