"""vram="auto" models before their first load measures them: parallel first loads claim
conservatively and never overcommit the budget (the ledger's peak), on the CPU device, where a
loaded torch module is measured by its parameter bytes. Budgets are small (a megabyte) so that
the real allocations are too."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import gpuctx

TIMEOUT = 30
KB = 1000
PARAM_BYTES = 400 * KB     # what each test module's parameter measures on the CPU (100 000 float32)


def _module(nbytes: int = PARAM_BYTES) -> torch.nn.Module:
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(nbytes // 4))
    return m


class _Loads:
    """Loaders that record when they run and wait for a gate the test opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.most_at_once = 0
        self.calls: list[str] = []

    def loader(self, name: str, nbytes: int = PARAM_BYTES, fail: BaseException | None = None):
        def load():
            with self.lock:
                self.calls.append(name)
                self.running.add(name)
                self.most_at_once = max(self.most_at_once, len(self.running))
            try:
                assert self.gate.wait(TIMEOUT), "the test never opened the gate"
                if fail is not None:
                    raise fail
                return _module(nbytes)
            finally:
                with self.lock:
                    self.running.discard(name)
        return load


@pytest.fixture
def small(fresh):
    """gpuctx on the CPU device with a 1 MB budget."""
    fresh.configure(budget=1000 * KB)
    return fresh


def _task(name: str):
    return gpuctx.gpu_task(model=name, name=f"use_{name}")(lambda: sum(p.numel() for p in gpuctx.current_model().parameters()))


def test_parallel_first_loads_of_auto_models_never_exceed_the_budget(small):
    loads = _Loads()
    names = ("a", "b", "c")   # 3 x 400 KB > 1 MB: they cannot all be resident at once
    for n in names:
        gpuctx.model(n, vram="auto")(loads.loader(n))
    tasks = [_task(n)() for n in names]   # submitted together, while the first load is under way
    _until(lambda: len(loads.calls) == 1, "the first load to start")
    sched = gpuctx.scheduler()
    for _ in range(3):   # reads while it loads change nothing: still one load, nothing else claimed
        text = str(gpuctx.status()) + str(gpuctx.stats()) + str(sched.snapshot()) + str(sched.available())
        assert len(loads.calls) == 1 and sched.committed() <= sched.budget, text
    loads.gate.set()
    assert [t.result(TIMEOUT) for t in tasks] == [PARAM_BYTES // 4] * 3
    sched = gpuctx.scheduler()
    assert sched.peak_committed() <= sched.budget
    assert gpuctx.stats()["peak_vram"] <= sched.budget
    assert loads.most_at_once == 1   # a first load waits while another one's size is unknown
    for n in names:
        slot = sched.slot(n)
        assert (slot.size, slot.size_source) == (PARAM_BYTES, "measured"), n
    kinds = [(e.kind, e.model) for e in sched.trace.events if e.kind in ("load_start", "load_end")]
    for i in range(0, len(kinds), 2):   # one load at a time: each start is followed by its own end
        assert kinds[i][0] == "load_start" and kinds[i + 1] == ("load_end", kinds[i][1]), kinds


def _until(cond, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)   # polling a condition with a deadline, not waiting for a thread by time


def _resident(n: str, nbytes: int, *, gate: threading.Event | None = None):
    """Register declared model ``n`` (``nbytes``) and run one task on it; return that task.
    With ``gate``, the task runs until the gate opens."""
    gpuctx.model(n, vram=nbytes)(lambda: _module(nbytes))
    task = gpuctx.gpu_task(model=n, name=f"hold_{n}")(lambda: gate.wait(TIMEOUT) if gate else True)()
    if gate is None:
        task.result(TIMEOUT)
        _until(lambda: not gpuctx.scheduler().slot(n).busy, f"{n}'s group to end")
    else:
        _until(lambda: task.running(), f"{n}'s task to start")
    return task


def test_an_auto_model_larger_than_the_free_memory_evicts_an_idle_model_after_it_is_measured(small):
    _resident("x", 600 * KB)                  # idle, 400 KB free
    gpuctx.model("big", vram="auto")(lambda: _module(700 * KB))
    assert _task("big")().result(TIMEOUT) == 700 * KB // 4
    sched = gpuctx.scheduler()
    assert sched.slot("x").state == "absent" and sched.slot("big").state == "resident"
    assert sched.committed() == 700 * KB and sched.peak_committed() <= sched.budget
    assert gpuctx.stats()["models"]["big"]["loads"] == 1   # measured, x evicted, then charged: one load
    evicts = [e for e in sched.trace.events if e.kind == "evict" and e.model == "x"]
    assert evicts and "'big''s measured size" in evicts[0].reason


def test_an_auto_model_that_does_not_fit_beside_running_work_is_unloaded_and_loaded_once_there_is_room(small):
    gate = threading.Event()
    held = _resident("x", 600 * KB, gate=gate)   # running: cannot be evicted
    gpuctx.model("big", vram="auto")(lambda: _module(700 * KB))
    task = _task("big")()
    sched = gpuctx.scheduler()
    _until(lambda: any(e.kind == "unload" and e.model == "big" for e in sched.trace.events), "big to be unloaded")
    assert not task.done()                        # its work waits, no error
    slot = sched.slot("big")
    assert (slot.size, slot.size_source) == (700 * KB, "measured")
    gate.set()
    assert held.result(TIMEOUT) is True
    assert task.result(TIMEOUT) == 700 * KB // 4
    assert gpuctx.stats()["models"]["big"]["loads"] == 2
    assert sched.peak_committed() <= sched.budget and gpuctx.stats()["peak_vram"] <= sched.budget
    reason = next(e.reason for e in sched.trace.events if e.kind == "unload" and e.model == "big")
    assert "measured 700 kB at load" in reason and "loaded again once there is room" in reason


@pytest.mark.parametrize("error", [RuntimeError("no weights"), KeyboardInterrupt(), SystemExit(3)],
                         ids=["exception", "ctrl-c", "exit"])
def test_a_failed_first_load_releases_its_claim_and_the_waiting_first_load_goes_on(small, error):
    loads = _Loads()
    gpuctx.model("a", vram="auto")(loads.loader("a", fail=error))
    gpuctx.model("b", vram="auto")(loads.loader("b"))
    ta, tb = _task("a")(), _task("b")()
    sched = gpuctx.scheduler()
    _until(lambda: loads.calls == ["a"], "a's load to start")
    assert sched.slot("b").state == "absent" and not sched.slot("b").busy   # b waits for a's size
    loads.gate.set()
    with pytest.raises(gpuctx.errors.ModelLoadError, match=f"'a': loader raised {type(error).__name__}"):
        ta.result(TIMEOUT)
    assert tb.result(TIMEOUT) == PARAM_BYTES // 4
    assert loads.most_at_once == 1
    assert sched.committed() == PARAM_BYTES and "a" not in sched._ledger.claims and "a" not in sched._ledger.used
    assert sched.slot("a").size_source == "auto"   # still unknown: the next load measures it


def test_an_auto_model_measured_larger_than_the_budget_fails_clearly(small):
    gpuctx.model("huge", vram="auto")(lambda: _module(1500 * KB))
    first = _task("huge")()
    after = gpuctx.gpu_task(model="huge", name="after")(lambda t: t)(first)   # waits for first
    with pytest.raises(gpuctx.errors.BudgetError,
                       match=r"model 'huge' \(vram='auto', measured at its first load\) needs 1.5 MB but can never "
                             r"fit: budget 1 MB"):
        first.result(TIMEOUT)
    with pytest.raises(gpuctx.errors.GpuCtxError):
        after.result(TIMEOUT)
    sched = gpuctx.scheduler()
    assert sched.slot("huge").state == "absent" and sched.committed() == 0
    assert sched.peak_committed() <= sched.budget
    with pytest.raises(gpuctx.errors.BudgetError, match="needs 1.5 MB but can never fit"):
        _task("huge")()                           # known now: refused at submit
    gpuctx.model("ok", vram="auto")(lambda: _module())
    assert _task("ok")().result(TIMEOUT) == PARAM_BYTES // 4   # and nothing is left blocked


def test_a_declared_model_measured_above_the_budget_fails_instead_of_overcommitting(small):
    gpuctx.model("liar", vram="100kB")(lambda: _module(1500 * KB))
    with pytest.warns(RuntimeWarning, match="'liar': measured 1.5 MB at load"):
        with pytest.raises(gpuctx.errors.BudgetError, match=r"model 'liar' \(measured at load\) needs 1.5 MB"):
            _task("liar")().result(TIMEOUT)
    assert gpuctx.scheduler().peak_committed() <= gpuctx.scheduler().budget
