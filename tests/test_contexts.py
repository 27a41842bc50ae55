"""Contexts, QoS tiers, admission, pressure handlers, overflow policies, batching, CPU routing."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

import gpuctx
from gpuctx import GB, QoS, TaskState

TIMEOUT = 10


def loader_for(name, log):
    def load():
        log.append(("load", name))
        return {"name": name}

    return load


def register(name, vram, log, **kw):
    gpuctx.model(name, vram=vram, unload=lambda o, _n=name: log.append(("unload", _n)), **kw)(loader_for(name, log))
    return gpuctx.gpu_task(model=name, name=f"use_{name}")(lambda: gpuctx.current_model()["name"])


# ----------------------------------------------------------------------------- contexts API
def test_create_context_and_usage(fresh):
    ctx = gpuctx.create_context("llm", max_vram=4 * GB, qos=QoS.GUARANTEED)
    usage = gpuctx.get_context_usage(ctx)
    assert (usage.used, usage.max, usage.base) == (0, 4 * GB, 4 * GB)
    assert gpuctx.get_available_vram() == 6 * GB   # the guarantee is held from creation
    assert gpuctx.get_context_usage("llm").max == 4 * GB


def test_guaranteed_admission_fails_with_numbers(fresh):
    gpuctx.create_context("a", max_vram="6GB", qos="guaranteed")
    with pytest.raises(gpuctx.AdmissionError, match=r"cannot reserve 5 GB.*free 4 GB"):
        gpuctx.create_context("b", max_vram="5GB", qos=QoS.GUARANTEED)
    # nothing was lost: a is still reserved, b does not exist as a context
    assert gpuctx.get_available_vram() == 4 * GB
    gpuctx.create_context("b", max_vram="4GB", qos=QoS.GUARANTEED)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(qos="PLATINUM"), "qos='PLATINUM'"),
        (dict(max_vram="2GB", base_vram="3GB"), "base_vram=3 GB is larger than max_vram=2 GB"),
        (dict(max_vram="20GB"), "larger than the whole budget"),
        (dict(qos=QoS.GUARANTEED), "needs max_vram"),
        (dict(max_vram="1GB", qos=QoS.BEST_EFFORT, base_vram="1GB"), "reserves nothing"),
        (dict(max_vram="1XB"), "max_vram='1XB'"),
        (dict(max_queue=-1), "max_queue=-1"),
        (dict(overflow="panic"), "overflow='panic'"),
    ],
)
def test_bad_context_arguments(fresh, kwargs, message):
    with pytest.raises(gpuctx.ConfigError, match=message):
        gpuctx.create_context("x", **kwargs)
    assert gpuctx.get_available_vram() == 10 * GB


def test_model_larger_than_its_context_max_is_refused(fresh):
    gpuctx.create_context("tts", max_vram="2GB")
    with pytest.raises(gpuctx.BudgetError, match="max_vram=2 GB"):
        gpuctx.model("tts", vram="3GB")(lambda: 1)


# ----------------------------------------------------------------------------- tiers under contention
def test_best_effort_is_evicted_before_a_burstable_burst(fresh):
    gpuctx.configure(budget="6GB")
    log: list = []
    gpuctx.create_context("bg", max_vram="3GB", qos=QoS.BEST_EFFORT)
    gpuctx.create_context("tts", max_vram="3GB", base_vram="1GB", qos=QoS.BURSTABLE)
    use_bg = register("bg", "2GB", log)
    use_tts = register("tts", "3GB", log)          # bursts 2 GB above its base
    use_new = register("new", "2GB", log)
    use_bg().result(TIMEOUT)
    use_tts().result(TIMEOUT)
    assert gpuctx.scheduler().committed() == 5 * GB
    use_new().result(TIMEOUT)
    assert ("unload", "bg") in log and ("unload", "tts") not in log


def test_burstable_burst_is_reclaimed_but_base_stays(fresh):
    gpuctx.configure(budget="6GB")
    log: list = []
    gpuctx.create_context("tts", max_vram="4GB", base_vram="1GB", qos=QoS.BURSTABLE)
    use_tts = register("tts", "4GB", log)
    use_other = register("other", "5GB", log)
    use_tts().result(TIMEOUT)
    use_other().result(TIMEOUT)                     # needs tts's burst back
    assert ("unload", "tts") in log
    s = gpuctx.scheduler()
    assert s._ledger.reserved["tts"] == 1 * GB       # the base is still held
    assert gpuctx.get_available_vram() == 0


def test_guaranteed_is_never_evicted_by_lower_tiers(fresh):
    gpuctx.configure(budget="6GB")
    log: list = []
    gpuctx.create_context("asr", max_vram="3GB", qos=QoS.GUARANTEED)
    use_asr = register("asr", "3GB", log)
    use_a = register("a", "3GB", log)
    use_b = register("b", "3GB", log)
    use_asr().result(TIMEOUT)
    for _ in range(3):
        use_a().result(TIMEOUT)
        use_b().result(TIMEOUT)
    assert ("unload", "asr") not in log
    assert log.count(("load", "asr")) == 1


def test_best_effort_cannot_evict_higher_tiers_and_waits(fresh, gate):
    gpuctx.configure(budget="4GB")
    log: list = []
    gpuctx.create_context("bg", max_vram="3GB", qos=QoS.BEST_EFFORT)
    use_main = register("main", "3GB", log)
    use_bg = register("bg", "3GB", log)
    use_main().result(TIMEOUT)
    # main is idle and resident; a best-effort request must not push it out
    assert gpuctx.explain("bg").startswith("waits")
    assert not gpuctx.admit("bg")
    t = use_bg()
    with pytest.raises(FutureTimeout):
        t.result(0.2)
    assert ("unload", "main") not in log
    gpuctx.evict("main")                      # room appears: the best-effort task runs
    assert t.result(TIMEOUT) == "bg"


def test_explain_says_why(fresh):
    gpuctx.configure(budget="4GB")
    log: list = []
    register("a", "3GB", log)().result(TIMEOUT)
    assert gpuctx.explain("b", "1GB").startswith("admitted now")
    assert gpuctx.explain("b", "2GB").startswith("admitted after evicting a")
    assert gpuctx.explain("b", "5GB").startswith("rejected")
    assert gpuctx.admit("b", "1GB")


# ----------------------------------------------------------------------------- pressure handlers
@pytest.mark.parametrize("decision", [True, False])
def test_pressure_handler_decides_wait_or_fail(fresh, gate, decision):
    gpuctx.configure(budget="4GB")
    seen = []
    release = gate()
    running = threading.Event()

    @gpuctx.on_memory_pressure
    def handler(ctx, requested, available):
        seen.append((ctx.name, requested, available))
        return decision

    @gpuctx.gpu_task(model="big", vram="3GB")
    def hold():
        running.set()
        release.wait(TIMEOUT)

    @gpuctx.gpu_task(model="other", vram="2GB")
    def other():
        return "ran"

    h = hold()
    assert running.wait(TIMEOUT)
    if decision:
        t = other()
        release.set()
        assert t.result(TIMEOUT) == "ran"
    else:
        with pytest.raises(gpuctx.BudgetError, match="refused 2 GB for 'other'"):
            other()
        release.set()
    h.result(TIMEOUT)
    assert seen == [("other", 2 * GB, 1 * GB)]


def test_pressure_handler_must_be_callable(fresh):
    with pytest.raises(gpuctx.ConfigError, match="expected a callable"):
        gpuctx.on_memory_pressure(42)


# ----------------------------------------------------------------------------- queues and overflow
def _held_model(gate, max_queue, overflow):
    release = gate()
    running = threading.Event()
    gpuctx.create_context("q", max_queue=max_queue, overflow=overflow)

    @gpuctx.gpu_task(model="q")
    def hold():
        running.set()
        release.wait(TIMEOUT)

    @gpuctx.gpu_task(model="q")
    def job(i):
        return i

    h = hold()
    assert running.wait(TIMEOUT)
    return release, h, job


def test_overflow_reject_fails_the_newest(fresh, gate):
    release, h, job = _held_model(gate, 2, "reject")
    a, b = job(1), job(2)
    assert not gpuctx.status().healthy            # 2/2 is above 80%
    with pytest.raises(gpuctx.Overloaded, match=r"full \(2/2"):
        job(3)
    release.set()
    assert gpuctx.gather(h, a, b, timeout=TIMEOUT) == [None, 1, 2]
    assert gpuctx.status().healthy


def test_overflow_drop_oldest_fails_the_oldest(fresh, gate):
    release, h, job = _held_model(gate, 2, "drop_oldest")
    a, b = job(1), job(2)
    c = job(3)
    with pytest.raises(gpuctx.Overloaded, match="dropped"):
        a.result(TIMEOUT)
    release.set()
    assert gpuctx.gather(b, c, timeout=TIMEOUT) == [2, 3]


def test_overflow_block_waits_with_timeout_and_try_submit_never_blocks(fresh, gate):
    release, h, job = _held_model(gate, 1, "block")
    a = job(1)
    with pytest.raises(gpuctx.Overloaded, match="try_submit never waits"):
        job.try_submit(2)
    s = gpuctx.scheduler()
    spec = job.__gpuctx_spec__
    with pytest.raises(gpuctx.Overloaded, match="stayed full"):
        s.submit(spec, (3,), {}, timeout=0.05)
    # a blocked caller goes on as soon as there is room
    out = []
    th = threading.Thread(target=lambda: out.append(job(4)))
    th.start()
    release.set()
    th.join(TIMEOUT)
    assert out and out[0].result(TIMEOUT) == 4 and a.result(TIMEOUT) == 1


def test_bad_queue_arguments(fresh):
    with pytest.raises(gpuctx.ConfigError, match="max_queue=0"):
        gpuctx.gpu_task(model="m", max_queue=0)
    with pytest.raises(gpuctx.ConfigError, match="overflow='later'"):
        gpuctx.model("m", vram="1GB", overflow="later")(lambda: 1)


# ----------------------------------------------------------------------------- priority lanes and batching
def test_batches_form_up_to_batch_size(fresh, gate):
    release = gate()
    running = threading.Event()
    sizes = []

    @gpuctx.gpu_task(model="clap")
    def hold():
        running.set()
        release.wait(TIMEOUT)

    @gpuctx.gpu_task(model="clap", batch_size=4)
    def embed(texts):
        sizes.append(len(texts))
        return [t.upper() for t in texts]

    hold()
    assert running.wait(TIMEOUT)
    ts = [embed(f"t{i}") for i in range(10)]
    release.set()
    assert gpuctx.gather(*ts, timeout=TIMEOUT) == [f"T{i}" for i in range(10)]
    assert sizes == [4, 4, 2]


def test_batch_wait_collects_calls_arriving_within_the_window(fresh):
    sizes = []

    @gpuctx.gpu_task(model="clap", batch_size=3, batch_wait="2s")
    def embed(xs):
        sizes.append(len(xs))
        return xs

    # submit from one thread quickly; the window (2 s) is far longer than submitting takes,
    # and the batch closes as soon as it is full, so this does not wait 2 s.
    ts = [embed(i) for i in range(3)]
    assert gpuctx.gather(*ts, timeout=TIMEOUT) == [0, 1, 2]
    assert sizes == [3]


def test_latency_critical_calls_skip_the_batch_window(fresh):
    sizes = []

    @gpuctx.gpu_task(model="clap", batch_size=8, batch_wait="30s")
    def embed(xs):
        sizes.append(len(xs))
        return xs

    t = embed.options(priority=10)("now")
    assert t.result(TIMEOUT) == "now"     # would wait 30 s for a full batch otherwise
    assert sizes == [1]


def test_batch_function_returning_wrong_length_fails_every_task(fresh, gate):
    release = gate()
    running = threading.Event()

    @gpuctx.gpu_task(model="clap")
    def hold():
        running.set()
        release.wait(TIMEOUT)

    @gpuctx.gpu_task(model="clap", batch_size=3)
    def bad(xs):
        return xs[:-1]

    hold()
    assert running.wait(TIMEOUT)
    ts = [bad(i) for i in range(3)]
    release.set()
    for t in ts:
        with pytest.raises(gpuctx.BatchError, match="batched over 3 inputs but returned list of length 2"):
            t.result(TIMEOUT)
    # the model keeps working for a batch function that keeps the contract
    @gpuctx.gpu_task(model="clap", batch_size=3)
    def good(xs):
        return [x * 2 for x in xs]

    assert good(21).result(TIMEOUT) == 42


def test_batched_function_must_take_one_argument(fresh):
    with pytest.raises(gpuctx.ConfigError, match="exactly one required argument"):
        @gpuctx.gpu_task(model="m", batch_size=4)
        def two(a, b):
            return a


# ----------------------------------------------------------------------------- sessions
def test_context_session_sync(fresh):
    log: list = []
    gpuctx.model("llm", vram="2GB")(loader_for("llm", log))
    session = gpuctx.context_session("llm")
    with session as obj:
        assert obj == {"name": "llm"}
        assert gpuctx.current_model() is obj
        assert gpuctx.scheduler().slot("llm").busy   # protected from eviction
        with pytest.raises(gpuctx.ConfigError, match="in use"):
            gpuctx.evict("llm")
    assert session.task.state is TaskState.DONE
    with pytest.raises(gpuctx.ConfigError, match="outside a gpu_task"):
        gpuctx.current_model()


def test_context_session_async_runs_concurrently(fresh):
    log: list = []
    ctx_a = gpuctx.create_context("llm", max_vram="3GB")
    ctx_b = gpuctx.create_context("tts", max_vram="3GB")
    gpuctx.model("llm", vram="2GB")(loader_for("llm", log))
    gpuctx.model("tts", vram="2GB")(loader_for("tts", log))

    async def run(ctx, other_started, mine_started):
        async with gpuctx.context_session(ctx) as obj:
            mine_started.set()
            await asyncio.wait_for(other_started.wait(), TIMEOUT)
            return obj["name"], gpuctx.current_model()["name"]

    async def main():
        ea, eb = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(run(ctx_a, eb, ea), run(ctx_b, ea, eb))

    assert asyncio.run(main()) == [("llm", "llm"), ("tts", "tts")]


def test_session_of_a_failing_model_raises_instead_of_hanging(fresh):
    @gpuctx.model("broken", vram="1GB")
    def load():
        raise OSError("no weights")

    with pytest.raises(gpuctx.ModelLoadError):
        with gpuctx.context_session("broken"):
            pass


# ----------------------------------------------------------------------------- CPU routing
def test_device_cpu_runs_outside_the_budget(fresh):
    @gpuctx.gpu_task(model="m", vram="9GB", device="cpu")
    def on_cpu():
        return gpuctx.current_device()

    @gpuctx.gpu_task(model="n", vram="9GB")
    def on_gpu():
        return gpuctx.current_device()

    a, b = on_cpu(), on_gpu()
    assert gpuctx.gather(a, b, timeout=TIMEOUT) == ["cpu", "cpu"]   # CpuDevice is "cpu" too
    assert a.device == "cpu"


def test_fallback_cpu_when_the_model_can_never_fit(fresh):
    @gpuctx.gpu_task(model="huge", vram="50GB", fallback="cpu")
    def big():
        return gpuctx.current_model()

    t = big()
    assert t.result(TIMEOUT) is None and t.device == "cpu"


def test_cpu_routed_tasks_still_honour_dependencies(fresh):
    @gpuctx.gpu_task(model="m")
    def first():
        return 20

    @gpuctx.gpu_task(model="m", device="cpu")
    def second(x):
        return x + 1

    assert second(first()).result(TIMEOUT) == 21


# ----------------------------------------------------------------------------- issue 14: entries 4, 6, 8
def test_a_pressure_handler_that_calls_gpuctx_does_not_deadlock(fresh, gate):
    gpuctx.configure(budget="4GB")
    release, running, seen = gate(), threading.Event(), []

    @gpuctx.on_memory_pressure
    def handler(ctx, requested, available):
        seen.append((gpuctx.get_available_vram(), gpuctx.status().budget))   # back into gpuctx
        return False

    h = gpuctx.gpu_task(model="big", vram="3GB")(lambda: (running.set(), release.wait(TIMEOUT)))()
    assert running.wait(TIMEOUT)
    with pytest.raises(gpuctx.BudgetError, match="refused 2 GB for 'other'"):
        gpuctx.gpu_task(model="other", vram="2GB")(lambda: 1)()
    assert seen == [(1 * GB, 4 * GB)]
    assert [r.name for r in gpuctx.status().models if r.name == "other" and r.queued] == []   # nothing kept
    release.set()
    h.result(TIMEOUT)


def test_a_session_made_but_never_entered_holds_nothing(fresh):
    gpuctx.model("m", vram="1GB")(object)
    s = gpuctx.context_session("m")
    del s
    assert gpuctx.gpu_task(model="m")(lambda: "ran")().result(TIMEOUT) == "ran"
    assert gpuctx.scheduler().tasks() == []
    gpuctx.shutdown()   # returns: nothing waits for an unentered session


@pytest.mark.parametrize("kwargs, match", [
    (dict(priority="x"), r"context_session\('m', priority='x'\): expected an int"),
    (dict(after=5), r"context_session\('m', after=5\): expected a list of gpuctx.Task"),
    (dict(after=[5]), r"item 0 is 5; expected a gpuctx.Task"),
])
def test_bad_session_arguments_are_refused_and_leave_nothing_behind(fresh, kwargs, match):
    gpuctx.model("m", vram="1GB")(object)
    with pytest.raises(gpuctx.ConfigError, match=match):
        gpuctx.context_session("m", **kwargs)
    assert gpuctx.scheduler().tasks() == []
    gpuctx.shutdown()
