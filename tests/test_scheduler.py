"""Semantics of the live scheduler on the CPU device (no sleeps: events and futures)."""

from __future__ import annotations

import asyncio
import threading
import warnings

import pytest

import gpuctx
from gpuctx import TaskState

TIMEOUT = 10


def make_model(name, vram="1GB", log=None, obj=None, **kw):
    """Register a model whose loader logs ('load', name) and returns ``obj`` (default: a dict)."""
    log = log if log is not None else []

    @gpuctx.model(name, vram=vram, unload=lambda o: log.append(("unload", name)), **kw)
    def load():
        log.append(("load", name))
        return obj if obj is not None else {"name": name}

    return log


def test_task_returns_at_once_and_runs_with_the_model(fresh):
    make_model("whisper")

    @gpuctx.gpu_task(model="whisper")
    def transcribe(clip):
        return f"{gpuctx.current_model()['name']}:{clip}"

    t = transcribe("a")
    assert isinstance(t, gpuctx.Task)
    assert t.result(TIMEOUT) == "whisper:a"
    assert t.state is TaskState.DONE
    assert t.wait_time is not None and t.run_time is not None


def test_task_argument_is_a_dependency_and_passes_its_result(fresh):
    make_model("whisper", vram="4.5GB")
    make_model("qwen3", vram="1.5GB")

    @gpuctx.gpu_task(model="whisper")
    def transcribe(clip):
        return clip.upper()

    @gpuctx.gpu_task(model="qwen3", after=[transcribe])
    def summarize(text, suffix="!"):
        return text + suffix

    t = transcribe("hello")
    s = summarize(t, suffix="?")
    assert gpuctx.gather(t, s, timeout=TIMEOUT) == ["HELLO", "HELLO?"]
    done, not_done = gpuctx.wait([s], timeout=TIMEOUT)
    assert done == {s} and not not_done
    assert s.started_at >= t.ended_at


def test_tasks_nested_in_lists_and_dicts_are_dependencies(fresh):
    @gpuctx.gpu_task(model="m")
    def f(x):
        return x * 2

    @gpuctx.gpu_task(model="m")
    def total(xs, extra):
        return sum(xs) + extra["k"]

    parts = [f(i) for i in range(4)]
    assert total(parts, {"k": f(10)}).result(TIMEOUT) == 12 + 20


def test_after_a_function_orders_after_its_earlier_calls(fresh, gate):
    order = []
    release = gate()

    @gpuctx.gpu_task(model="a", vram="1GB")
    def first(i):
        release.wait(TIMEOUT)
        order.append(("first", i))

    @gpuctx.gpu_task(model="b", vram="1GB", after=[first])
    def second():
        order.append(("second",))

    ts = [first(i) for i in range(3)]
    s = second()
    release.set()
    s.result(TIMEOUT)
    assert order[-1] == ("second",) and len(order) == 4
    assert all(t.done() for t in ts)


def test_await_a_task(fresh):
    @gpuctx.gpu_task(model="m")
    def f(x):
        return x + 1

    async def main():
        return await f(1)

    assert asyncio.run(main()) == 2


def test_async_function_bodies_run(fresh):
    @gpuctx.gpu_task(model="m")
    async def f(x):
        await asyncio.sleep(0)
        return x * 3

    assert f(2).result(TIMEOUT) == 6


def test_failed_dependency_fails_dependents_without_running_them(fresh):
    ran = []

    @gpuctx.gpu_task(model="m")
    def boom():
        raise ValueError("bad clip")

    @gpuctx.gpu_task(model="m")
    def after(x):
        ran.append(x)

    b = boom()
    a = after(b)
    c = after(a)
    with pytest.raises(gpuctx.DependencyError, match="boom") as info:
        a.result(TIMEOUT)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(gpuctx.DependencyError):
        c.result(TIMEOUT)
    assert ran == []
    assert b.state is TaskState.FAILED and a.state is TaskState.FAILED
    # submitting against an already failed task fails at once too
    with pytest.raises(gpuctx.DependencyError):
        after(b).result(TIMEOUT)


def test_exception_in_a_task_fails_only_that_task(fresh):
    @gpuctx.gpu_task(model="m")
    def f(x):
        if x == 2:
            raise RuntimeError("only me")
        return x

    ts = [f(i) for i in range(5)]
    gpuctx.wait(ts, timeout=TIMEOUT)
    assert [t.state for t in ts].count(TaskState.FAILED) == 1
    assert [t.result() for t in ts if t.state is TaskState.DONE] == [0, 1, 3, 4]


def test_cancel_a_queued_task_fails_its_dependents(fresh, gate):
    release = gate()

    @gpuctx.gpu_task(model="m")
    def block():
        release.wait(TIMEOUT)

    @gpuctx.gpu_task(model="m")
    def work(x=None):
        return 1

    b = block()
    w = work()
    d = work(w)
    assert w.cancel()
    release.set()
    b.result(TIMEOUT)
    assert w.cancelled() and w.state is TaskState.CANCELLED
    with pytest.raises(gpuctx.DependencyError, match="cancelled"):
        d.result(TIMEOUT)
    assert not b.cancel()  # finished tasks cannot be cancelled


def test_loader_error_fails_waiting_tasks_frees_memory_and_others_go_on(fresh):
    @gpuctx.model("broken", vram="3GB")
    def load_broken():
        raise OSError("weights not found")

    make_model("fine", vram="3GB")

    @gpuctx.gpu_task(model="broken")
    def use_broken():
        return "never"

    @gpuctx.gpu_task(model="fine")
    def use_fine():
        return "ok"

    b = use_broken()
    with pytest.raises(gpuctx.ModelLoadError, match="weights not found") as info:
        b.result(TIMEOUT)
    assert isinstance(info.value.__cause__, OSError)
    assert use_fine().result(TIMEOUT) == "ok"
    s = gpuctx.scheduler()
    assert s._ledger.used.get("broken", 0) == 0
    assert s.slot("broken").state == "absent"


def test_unloader_error_warns_and_the_model_is_dropped(fresh):
    gpuctx.configure(budget="2GB")

    def bad_unload(obj):
        raise RuntimeError("driver says no")

    @gpuctx.model("a", vram="1.5GB", unload=bad_unload)
    def load_a():
        return object()

    make_model("b", vram="1.5GB")

    @gpuctx.gpu_task(model="a")
    def fa():
        return 1

    @gpuctx.gpu_task(model="b")
    def fb():
        return 2

    fa().result(TIMEOUT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fb().result(TIMEOUT) == 2
    assert any("driver says no" in str(w.message) for w in caught)
    assert gpuctx.scheduler().slot("a").state == "absent"


def test_grouping_loads_each_model_once_for_interleaved_calls(fresh, gate):
    gpuctx.configure(budget="2GB")  # one model at a time
    log: list = []
    for name in ("a", "b", "c"):
        make_model(name, vram="1.5GB", log=log)
    release = gate()

    @gpuctx.gpu_task(model="a")
    def hold():
        release.wait(TIMEOUT)

    fns = {}
    for name in ("a", "b", "c"):
        fns[name] = gpuctx.gpu_task(model=name, name=f"work_{name}")(lambda i, _n=name: (_n, i))

    h = hold()
    tasks = [fns[n](i) for i in range(5) for n in ("a", "b", "c")]
    release.set()
    gpuctx.wait(tasks + [h], timeout=TIMEOUT)
    loads = [e for e in log if e[0] == "load"]
    assert sorted(loads) == [("load", "a"), ("load", "b"), ("load", "c")]
    st = gpuctx.stats()
    assert st["models"]["a"]["loads"] == 1 and st["models"]["b"]["tasks"] == 5


def test_budget_is_never_exceeded(fresh):
    gpuctx.configure(budget="5GB")
    s = gpuctx.scheduler()
    peaks = []
    sizes = {"a": "2GB", "b": "3GB", "c": "1GB", "d": "4GB", "e": "2.5GB"}
    for name, size in sizes.items():
        make_model(name, vram=size)

    fns = {n: gpuctx.gpu_task(model=n, name=f"t_{n}")(lambda: peaks.append(s.committed())) for n in sizes}
    tasks = [fns[n]() for _ in range(6) for n in ("a", "d", "b", "e", "c")]
    gpuctx.wait(tasks, timeout=TIMEOUT)
    assert all(t.state is TaskState.DONE for t in tasks)
    assert max(peaks) <= s.budget
    assert gpuctx.stats()["peak_vram"] <= s.budget
    assert all(e.vram is None or e.vram <= s.budget for e in s.trace.events)


def test_task_that_can_never_fit_fails_at_submit_with_numbers(fresh):
    @gpuctx.gpu_task(model="huge", vram="11GB")
    def f():
        return 1

    with pytest.raises(gpuctx.BudgetError, match=r"11 GB.*budget 10 GB"):
        f()
    assert gpuctx.scheduler().tasks() == []


def test_model_larger_than_budget_fails_at_registration(fresh):
    with pytest.raises(gpuctx.BudgetError, match="never fit"):
        @gpuctx.model("huge", vram="20GB")
        def load():
            return 1


def test_two_sizes_for_one_model_is_an_error_naming_both(fresh):
    make_model("whisper", vram="4.5GB")
    with pytest.raises(gpuctx.ConfigError, match=r"4.5 GB.*5 GB"):
        @gpuctx.gpu_task(model="whisper", vram="5GB")
        def t():
            pass

        t()


def test_wrong_call_arguments_raise_type_error_at_the_call(fresh):
    @gpuctx.gpu_task(model="m")
    def f(a, b=1):
        return a + b

    with pytest.raises(TypeError):
        f()
    with pytest.raises(TypeError):
        f(1, 2, 3)
    with pytest.raises(TypeError):
        f(1, c=3)
    with pytest.raises(TypeError):
        f.options(priority=3)(1, 2, 3)
    assert gpuctx.scheduler().tasks() == []
    assert f(1, b=2).result(TIMEOUT) == 3


def test_signature_is_preserved(fresh):
    import inspect

    @gpuctx.gpu_task(model="m")
    def f(a: int, b: str = "x", *, c: float = 1.0) -> str:
        """Doc."""
        return b

    assert inspect.signature(f) == inspect.signature(f.__wrapped__)
    assert list(inspect.signature(f).parameters) == ["a", "b", "c"]
    assert f.__doc__ == "Doc." and f.__name__ == "f"


def test_after_rejects_non_tasks(fresh):
    with pytest.raises(gpuctx.ConfigError, match=r"after\[1\]=42"):
        @gpuctx.gpu_task(model="m", after=[gpuctx.Task.__new__(gpuctx.Task), 42])
        def f():
            pass


def test_cycle_between_functions_is_an_error_at_submit(fresh):
    @gpuctx.gpu_task(model="m")
    def a():
        pass

    @gpuctx.gpu_task(model="m", after=[a])
    def b():
        pass

    with pytest.raises(gpuctx.CycleError, match="b -> a -> b|a -> b -> a"):
        a.options(after=[b])()
    assert gpuctx.scheduler().tasks() == []


def _order_within_a_model(gate, priorities):
    """Queue one call per priority behind a held task of the same model; the order they ran in."""
    release = gate()
    order = []

    @gpuctx.gpu_task(model="m")
    def hold():
        release.wait(TIMEOUT)

    @gpuctx.gpu_task(model="m")
    def job(tag):
        order.append(tag)

    h = hold()
    ts = [job.options(priority=p)(f"p{p}-{i}") for i, p in enumerate(priorities)]
    release.set()
    gpuctx.wait(ts + [h], timeout=TIMEOUT)
    return order


def test_priority_order_within_a_model(fresh, gate):
    assert _order_within_a_model(gate, [0, 5, 1, 5, 9]) == ["p9-4", "p5-1", "p5-3", "p1-2", "p0-0"]


def test_an_overdue_task_is_not_starved_by_higher_priorities_of_its_model(fresh, gate):
    # Issue 14, entry 14: a task that waited max_wait goes before every younger one. With
    # max_wait=0 every queued task is overdue at once, so the queue is served oldest first.
    gpuctx.configure(max_wait=0.0)
    assert _order_within_a_model(gate, [0, 5, 5, 9]) == ["p0-0", "p5-1", "p5-2", "p9-3"]


def test_different_models_run_concurrently_when_the_budget_allows(fresh):
    make_model("a", vram="2GB")
    make_model("b", vram="2GB")
    met = threading.Barrier(2, timeout=TIMEOUT)

    @gpuctx.gpu_task(model="a")
    def fa():
        met.wait()
        return "a"

    @gpuctx.gpu_task(model="b")
    def fb():
        met.wait()
        return "b"

    assert gpuctx.gather(fa(), fb(), timeout=TIMEOUT) == ["a", "b"]


def test_label_model_reserves_only_while_running(fresh, gate):
    release = gate()
    inside = threading.Event()
    s = gpuctx.scheduler()

    @gpuctx.gpu_task(model="scratch", vram="3GB")
    def work():
        inside.set()
        release.wait(TIMEOUT)

    t = work()
    assert inside.wait(TIMEOUT)
    assert s.committed() == 3 * gpuctx.GB
    release.set()
    t.result(TIMEOUT)
    gpuctx.wait([t])
    # the group end releases the label; wait for the worker to pass that point
    for _ in range(1000):
        if s.committed() == 0:
            break
        threading.Event().wait(0.001)
    assert s.committed() == 0


def test_pinned_model_is_never_evicted(fresh):
    gpuctx.configure(budget="3GB")
    log: list = []
    make_model("pinned", vram="1GB", log=log, pin=True)
    make_model("b", vram="2GB", log=log)
    make_model("c", vram="2GB", log=log)
    fns = {n: gpuctx.gpu_task(model=n, name=n)(lambda: 1) for n in ("pinned", "b", "c")}
    for n in ("pinned", "b", "c", "b", "c"):
        fns[n]().result(TIMEOUT)
    assert ("unload", "pinned") not in log
    assert log.count(("unload", "b")) >= 1


def test_keep_alive_unloads_an_idle_model(fresh):
    unloaded = threading.Event()

    @gpuctx.model("m", vram="1GB", keep_alive=0.01, unload=lambda o: unloaded.set())
    def load():
        return object()

    @gpuctx.gpu_task(model="m")
    def f():
        return 1

    f().result(TIMEOUT)
    assert unloaded.wait(TIMEOUT)


def test_submit_after_shutdown_is_an_error(fresh):
    @gpuctx.gpu_task(model="m")
    def f():
        return 1

    assert f().result(TIMEOUT) == 1
    gpuctx.shutdown()
    with pytest.raises(gpuctx.SchedulerClosed, match="shut down"):
        f()
    gpuctx.configure(device="cpu")
    assert f().result(TIMEOUT) == 1


def test_shutdown_waits_for_queued_work_and_unloads(fresh):
    log = make_model("m")

    @gpuctx.gpu_task(model="m")
    def f(i):
        return i

    ts = [f(i) for i in range(20)]
    gpuctx.shutdown()
    assert [t.result(0) for t in ts] == list(range(20))
    assert ("unload", "m") in log


def test_shutdown_cancel_pending(fresh, gate):
    release = gate()

    @gpuctx.gpu_task(model="m")
    def hold():
        release.wait(TIMEOUT)

    h = hold()
    rest = [hold() for _ in range(3)]
    threading.Thread(target=lambda: (release.set())).start()
    gpuctx.shutdown(cancel_pending=True)
    assert h.done()
    assert all(t.done() for t in rest)


def test_evict_api_and_errors(fresh, gate):
    log = make_model("m")
    release = gate()
    running = threading.Event()

    @gpuctx.gpu_task(model="m")
    def f():
        running.set()
        release.wait(TIMEOUT)

    t = f()
    assert running.wait(TIMEOUT)
    with pytest.raises(gpuctx.ConfigError, match="in use"):
        gpuctx.evict("m")
    with pytest.raises(gpuctx.ConfigError, match="no such model"):
        gpuctx.evict("nope")
    release.set()
    t.result(TIMEOUT)
    for _ in range(1000):
        if not gpuctx.scheduler().slot("m").busy:
            break
        threading.Event().wait(0.001)
    assert gpuctx.evict("m") == ["m"]
    assert ("unload", "m") in log


def test_status_text_and_html(fresh):
    make_model("whisper", vram="4.5GB")

    @gpuctx.gpu_task(model="whisper")
    def f():
        return 1

    f().result(TIMEOUT)
    st = gpuctx.status()
    text = str(st)
    assert "whisper" in text and "budget 10 GB" in text
    assert "<table" in st._repr_html_() and "whisper" in st._repr_html_()


def test_task_repr_and_html(fresh):
    @gpuctx.gpu_task(model="m")
    def f():
        raise KeyError("x")

    t = f()
    gpuctx.wait([t], timeout=TIMEOUT)
    assert "failed" in repr(t) and "KeyError" in repr(t)
    assert "failed" in t._repr_html_()


def test_configure_rejects_bad_settings(fresh):
    with pytest.raises(gpuctx.ConfigError, match="safety_factor=1.5"):
        gpuctx.configure(safety_factor=1.5)
    with pytest.raises(gpuctx.ConfigError, match="unknown setting"):
        gpuctx.configure(budgte="1GB")
    with pytest.raises(gpuctx.ConfigError, match="device='tpu'"):
        gpuctx.configure(device="tpu")
    with pytest.raises(gpuctx.ConfigError, match="budget="):
        gpuctx.configure(budget="-3GB")


def test_shrinking_budget_below_what_is_loaded_is_refused(fresh):
    make_model("m", vram="6GB")

    @gpuctx.gpu_task(model="m")
    def f():
        return 1

    f().result(TIMEOUT)
    with pytest.raises(gpuctx.ConfigError, match="below what is committed"):
        gpuctx.configure(budget="4GB")
    assert f().result(TIMEOUT) == 1


class _Weights:
    """A stand-in model object that can be weakly referenced."""


def test_eviction_warns_when_a_notebook_variable_still_holds_the_model(fresh):
    keep = []

    @gpuctx.model("m", vram="1GB")
    def load():
        return _Weights()

    @gpuctx.gpu_task(model="m")
    def grab():
        keep.append(gpuctx.current_model())   # like `w = model` in a notebook cell

    grab().result(TIMEOUT)
    with pytest.warns(RuntimeWarning, match=r"'m' was evicted but its object is still referenced.*1 GB"):
        gpuctx.evict("m")
    keep.clear()

    grab.options()().result(TIMEOUT)
    keep.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpuctx.evict("m")    # nobody else holds it now: no warning


class _RecordingDevice(gpuctx.device.CpuDevice):
    """A CPU device that hands out events and logs how the scheduler orders streams."""

    def __init__(self) -> None:
        super().__init__(budget=10 * gpuctx.GB)
        self.name = "recording"
        self.log: list[tuple] = []
        self._n = 0

    def _event(self, where: str) -> str:
        self._n += 1
        return f"{where}#{self._n}"

    def record_caller(self) -> str:
        return self._event("caller")

    def record_event(self, context: str) -> str:
        return self._event(context)

    def wait_event(self, context: str, event) -> None:
        self.log.append(("wait", context, event))

    def record_stream(self, context: str, value) -> None:
        self.log.append(("in_use", context, value))

    def join_caller(self, event) -> None:
        self.log.append(("join", event))


def test_inputs_are_ordered_by_events_and_marked_in_use_on_the_consumer_stream():
    from gpuctx.engine import Scheduler, TaskSpec

    dev = _RecordingDevice()
    sched = Scheduler(device=dev)
    try:
        produce = TaskSpec(fn=lambda n: ["tensor", n], name="produce", model="a")
        consume = TaskSpec(fn=lambda x, y: x + [y], name="consume", model="b")
        p = sched.submit(produce, (1,), {})
        assert p.result(TIMEOUT) == ["tensor", 1]
        c = sched.submit(consume, (p, "raw"), {})
        assert c.result(TIMEOUT) == ["tensor", 1, "raw"]
    finally:
        sched.shutdown()
    p_caller, c_caller = p._caller_event, c._caller_event
    assert p_caller.startswith("caller") and c_caller.startswith("caller") and p_caller != c_caller
    assert ("wait", "a", p_caller) in dev.log
    consumer = [e for e in dev.log if e[1] == "b"]
    # The consumer's stream waits for its caller's stream and for the producer's event (recorded on
    # stream "a"), and the producer's result and the raw arguments are marked in use on stream "b".
    assert consumer[0] == ("wait", "b", c_caller)
    assert ("wait", "b", p._event) in consumer and p._event.startswith("a#")
    assert ("in_use", "b", ["tensor", 1]) in consumer
    assert ("in_use", "b", ((p, "raw"), {})) in consumer


def test_system_exit_in_a_task_fails_only_that_task_and_the_worker_goes_on(fresh):
    @gpuctx.gpu_task(model="m")
    def bail():
        raise SystemExit(3)

    @gpuctx.gpu_task(model="m")
    def ok(x):
        return x + 1

    t = bail()
    assert isinstance(t.exception(TIMEOUT), SystemExit) and t.state is TaskState.FAILED
    assert ok(1).result(TIMEOUT) == 2


def test_a_worker_survives_an_unloader_that_raises_system_exit(fresh):
    raised = []

    def bad_unload(obj):
        if not raised:                                   # once: shutdown's unload at teardown is plain
            raised.append(obj)
            raise SystemExit("unloader gave up")

    gpuctx.model("a", vram="6GB", unload=bad_unload)(lambda: "A")
    gpuctx.model("b", vram="6GB")(lambda: "B")

    @gpuctx.gpu_task(model="a")
    def use_a():
        return gpuctx.current_model()

    @gpuctx.gpu_task(model="b")
    def use_b():
        return gpuctx.current_model()

    assert use_a().result(TIMEOUT) == "A"
    with pytest.warns(RuntimeWarning, match="worker of 'b' caught SystemExit: unloader gave up"):
        assert use_b().result(TIMEOUT) == "B"           # 'a' had to go: its unloader raised on b's worker
    assert gpuctx.scheduler().slot("a").state == "absent"
    assert use_a().result(TIMEOUT) == "A"               # and everything still works


def test_a_session_end_orders_the_callers_next_work_after_the_body():
    from gpuctx.engine import Scheduler

    dev = _RecordingDevice()
    sched = Scheduler(device=dev)
    try:
        with sched.session("m"):
            assert dev.log[0][:2] == ("wait", "m") and dev.log[0][2].startswith("caller")   # the hold waited for its caller
            assert not any(e[0] == "join" for e in dev.log)
        assert dev.log[-1][0] == "join" and dev.log[-1][1].startswith("m#")   # the event recorded on m's stream
    finally:
        sched.shutdown()


class _MeasuringDevice(gpuctx.device.CpuDevice):
    """A CPU device that reports a measured size for each load, as the CUDA device does."""

    def __init__(self, sizes: dict) -> None:
        super().__init__(budget=10 * gpuctx.GB)
        self.sizes = sizes

    def load(self, context, loader):
        return loader(), self.sizes[context]


def _measuring_scheduler(sizes: dict):
    from gpuctx.engine import Config, Scheduler

    return Scheduler(Config(safety_factor=1.0), device=_MeasuringDevice(sizes))


def _use(sched, model):
    from gpuctx.engine import TaskSpec

    return sched.submit(TaskSpec(fn=lambda: model, name=f"use_{model}", model=model), (), {})


def test_a_measured_size_10_percent_above_the_declared_one_warns_and_is_used():
    GB = gpuctx.GB
    sched = _measuring_scheduler({"big": int(1.5 * GB), "close": int(1.05 * GB), "auto": 2 * GB})
    try:
        sched.register_model("big", lambda: "B", vram="1GB")
        sched.register_model("close", lambda: "C", vram="1GB")
        sched.register_model("auto", lambda: "A", vram="auto")
        with pytest.warns(RuntimeWarning, match=r"'big': measured 1.5 GB at load, more than 10% above the declared vram=1 GB"):
            assert _use(sched, "big").result(TIMEOUT) == "big"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _use(sched, "close").result(TIMEOUT) == "close"
            assert _use(sched, "auto").result(TIMEOUT) == "auto"
        sizes = {s.name: (s.size, s.size_source) for s in sched.slots()}
        assert sizes["big"] == (int(1.5 * GB), "measured")
        assert sizes["close"] == (int(1.05 * GB), "measured")   # larger than declared: counted, within 10%: quiet
        assert sizes["auto"] == (2 * GB, "measured")
        assert sched.committed() == int(4.55 * GB)
    finally:
        sched.shutdown()


def test_a_measured_size_over_the_budget_evicts_idle_models_to_stay_within_it():
    GB = gpuctx.GB
    sched = _measuring_scheduler({"a": 6 * GB, "b": 6 * GB})
    try:
        sched.register_model("a", lambda: "A", vram="6GB")
        sched.register_model("b", lambda: "B", vram="3GB")      # declared 3 GB, takes 6: a must go
        assert _use(sched, "a").result(TIMEOUT) == "a"
        with pytest.warns(RuntimeWarning, match="'b': measured 6 GB"):
            assert _use(sched, "b").result(TIMEOUT) == "b"
        assert sched.slot("a").state == "absent" and sched.committed() == 6 * GB <= sched.budget
    finally:
        sched.shutdown()


def _graph_scheduler():
    """A scheduler on a non-CPU (recording) device where every cuda_graph call counts as replayable."""
    from gpuctx.engine import Scheduler

    sched = Scheduler(device=_RecordingDevice())
    sched._replayable = lambda spec, args, kwargs: True
    return sched


def test_a_replayable_graph_call_is_launched_by_the_caller_when_its_model_is_idle():
    from gpuctx.engine import TaskSpec

    sched = _graph_scheduler()
    try:
        sched.register_model("m", lambda: "model", vram="1GB")
        warm = TaskSpec(fn=lambda: threading.get_ident(), name="warm", model="m")
        assert sched.submit(warm, (), {}).result(TIMEOUT) != threading.get_ident()   # loads on the worker
        graph = TaskSpec(fn=lambda x: (threading.get_ident(), x), name="replay", model="m", cuda_graph=True)
        t = sched.submit(graph, (7,), {})
        assert t.done() and t.state is TaskState.DONE            # launched before submit returned ...
        assert t.result(0) == (threading.get_ident(), 7)         # ... in this thread
        assert not sched.slot("m").busy and sched.slot("m").loads == 1
        kinds = [(e.kind, e.task) for e in sched.trace.events if e.task == t.id]
        assert kinds == [("submit", t.id), ("start", t.id), ("end", t.id)]
    finally:
        sched.shutdown()


def test_graph_calls_queue_as_usual_when_the_model_is_busy_or_not_loaded(gate):
    from gpuctx.engine import TaskSpec

    sched = _graph_scheduler()
    release, running = gate(), threading.Event()
    try:
        sched.register_model("m", lambda: "model", vram="1GB")
        graph = TaskSpec(fn=lambda: threading.get_ident(), name="replay", model="m", cuda_graph=True)
        first = sched.submit(graph, (), {})                       # not resident yet: its worker loads it
        assert first.result(TIMEOUT) != threading.get_ident()
        hold = TaskSpec(fn=lambda: (running.set(), release.wait(TIMEOUT)), name="hold", model="m")
        h = sched.submit(hold, (), {})
        assert running.wait(TIMEOUT)
        t = sched.submit(graph, (), {})                           # busy: it waits its turn in the queue
        assert not t.done() and t.state is TaskState.QUEUED
        release.set()
        assert t.result(TIMEOUT) != threading.get_ident() and h.result(TIMEOUT)
    finally:
        release.set()
        sched.shutdown()


def test_ctrl_c_while_launching_fails_the_task_reaches_the_caller_and_frees_the_model():
    from gpuctx.engine import TaskSpec

    def interrupted(x):
        if x == "stop":
            raise KeyboardInterrupt
        return x

    sched = _graph_scheduler()
    try:
        sched.register_model("m", lambda: "model", vram="1GB")
        graph = TaskSpec(fn=interrupted, name="replay", model="m", cuda_graph=True)
        assert sched.submit(graph, ("warm",), {}).result(TIMEOUT) == "warm"
        with pytest.raises(KeyboardInterrupt):
            sched.submit(graph, ("stop",), {})
        assert sched.tasks() == [] and not sched.slot("m").busy   # the task failed; nothing is held
        assert sched.submit(graph, ("again",), {}).result(TIMEOUT) == "again"
        assert sched.trace.stats.failed == 1
    finally:
        sched.shutdown()


def test_a_call_launched_by_the_caller_runs_under_a_workers_torch_modes():
    torch = pytest.importorskip("torch")
    from gpuctx.engine import TaskSpec

    sched = _graph_scheduler()
    try:
        sched.register_model("m", lambda: "model", vram="1GB")
        spec = TaskSpec(fn=lambda: torch.is_grad_enabled(), name="modes", model="m", cuda_graph=True)
        assert sched.submit(spec, (), {}).result(TIMEOUT) is True          # on the worker
        with torch.no_grad():
            t = sched.submit(spec, (), {})
            assert t.done() and t.result(0) is True                        # here, but as on a worker
            assert not torch.is_grad_enabled()                             # and the caller's mode is back
    finally:
        sched.shutdown()
