"""What a share charges: weights, contexts' reservations and running tasks' working memory, as the
kernel's own ledger does; and, on a GPU, NVML's view reconciled with the charges (faked here).

The other kernel of the share is a real ShareClient in this process (its own connection and
heartbeat thread) whose "engine" is a dict, so these tests need no second process: waits end on
the task's result or on a database row; the one cross-thread wait (a request posted by the
worker) polls the database with a deadline, as tests/test_share.py does for processes.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
import types
import warnings

import pytest

import gpuctx
from gpuctx import share as gshare
from gpuctx.device.cpu import CpuDevice
from gpuctx.engine import Scheduler
from gpuctx.engine.spec import Config
from gpuctx.share import ShareClient, share_path

MB = 10**6


@pytest.fixture
def share_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCTX_SHARE_DIR", str(tmp_path / "shares"))
    gpuctx.reset()
    yield tmp_path / "shares"
    gpuctx.reset()


class Other:
    """Another kernel of the share: a real client; its models are a dict, evicted when asked if idle."""

    def __init__(self, share: str, budget: int) -> None:
        self.models: dict[str, list] = {}
        self.evicted: list[str] = []
        self.client = ShareClient(share, budget, self._rows, self._evict)

    def hold(self, name: str, nbytes: int, busy: bool) -> None:
        assert self.client.claim(name, nbytes, lambda: False)
        self.models[name] = [nbytes, busy]
        self.client.beat()   # published now: busy or idle, as the victim choice will read it

    def _rows(self):
        return 0, [(m, n, busy, False, 0, 0, 100.0, 1.0) for m, (n, busy) in self.models.items()]

    def _evict(self, model: str, why: str) -> bool:
        if self.models[model][1]:
            return False
        del self.models[model]
        self.client.settle(model, 0)
        self.evicted.append(model)
        return True


@pytest.fixture
def other():
    made: list[Other] = []

    def make(share: str, budget: int = 1000 * MB) -> Other:
        o = Other(share, budget)
        made.append(o)
        return o

    yield make
    for o in made:
        o.client.close()


def _rows(share: str, model: str | None = None) -> list[tuple]:
    db = sqlite3.connect(share_path(share), timeout=5, isolation_level=None)
    try:
        q = "SELECT k.pid, c.model, c.used, c.working, c.base, c.nbytes FROM charges c JOIN kernels k ON k.id = c.kernel"
        rows = db.execute(q + (" WHERE c.model = ?" if model else "") + " ORDER BY c.model",
                          (model,) if model else ()).fetchall()
    finally:
        db.close()
    return [r[1:] for r in rows]


def _total(share: str) -> int:
    return sum(r[-1] for r in _rows(share))


def _until(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# --------------------------------------------------------------------------- 1. reservations
def test_a_contexts_reservation_is_charged_to_the_share_and_its_model_loads_within_it(share_dir):
    gpuctx.configure(device="cpu", budget=1000 * MB, share="res", offload=False)
    gpuctx.create_context("c", base_vram="300MB")
    assert _rows("res") == [("c", 0, 0, 300 * MB, 300 * MB)]   # held while nothing is loaded
    gpuctx.model("c", vram="200MB")(lambda: "C")
    assert gpuctx.gpu_task(model="c")(lambda: gpuctx.current_model())().result(timeout=10) == "C"
    assert _rows("res") == [("c", 200 * MB, 0, 300 * MB, 300 * MB)]   # within it: max(base, used), not the sum
    assert gpuctx.evict() == ["c"]
    assert _rows("res") == [("c", 0, 0, 300 * MB, 300 * MB)]   # the reservation outlives the model
    gpuctx.reset()
    assert _rows("res") == []


def test_a_reservation_the_share_cannot_hold_is_refused_and_idle_models_elsewhere_make_room(share_dir, other,
                                                                                            monkeypatch):
    from gpuctx.engine import sharing

    monkeypatch.setattr(sharing, "ADMIT_PATIENCE", 30.0)   # a refusal that waited for it would show
    gpuctx.configure(device="cpu", budget=1000 * MB, share="res2")
    gpuctx.scheduler()
    o = other("res2")
    o.hold("busy", 800 * MB, busy=True)
    t0 = time.monotonic()
    with pytest.raises(gpuctx.AdmissionError, match=r"context 'd': cannot reserve 300 MB in share 'res2': 200 MB"):
        gpuctx.create_context("d", base_vram="300MB")
    assert time.monotonic() - t0 < 15   # no idle model anywhere: refused at once, not after the patience
    with pytest.raises(gpuctx.ConfigError, match="no such context"):
        gpuctx.get_context_usage("d")   # refused: nothing recorded
    assert _rows("res2", "d") == []
    o.models["busy"][1] = False   # now idle: the other kernel is asked and evicts it
    o.client.beat()
    gpuctx.create_context("d", base_vram="300MB")
    assert o.evicted == ["busy"] and _rows("res2", "d") == [("d", 0, 0, 300 * MB, 300 * MB)]


def test_joining_a_share_claims_what_the_kernel_holds_already(share_dir, other):
    gpuctx.configure(device="cpu", budget=1000 * MB, offload=False)
    gpuctx.create_context("c", base_vram="300MB")
    gpuctx.model("m", vram="100MB")(lambda: "M")
    gpuctx.gpu_task(model="m")(lambda: 1)().result(timeout=10)
    gpuctx.configure(share="join")
    assert _rows("join") == [("c", 0, 0, 300 * MB, 300 * MB), ("m", 100 * MB, 0, 0, 100 * MB)]
    gpuctx.configure(share=False)
    o = other("join")
    o.hold("all", 900 * MB, busy=True)
    with pytest.raises(gpuctx.ShareError, match=r"share 'join' .* cannot hold the .* this kernel charges"):
        gpuctx.configure(share="join")
    assert gpuctx.scheduler().share is None and _rows("join") == [("all", 900 * MB, 0, 0, 900 * MB)]


# --------------------------------------------------------------------------- 2. working memory
def test_working_memory_is_charged_to_the_share_while_the_task_runs_and_settled_on_every_path(share_dir):
    gpuctx.configure(device="cpu", budget=1000 * MB, share="work")
    gpuctx.model("m", vram="300MB", working="200MB")(lambda: "M")
    seen = []
    run = gpuctx.gpu_task(model="m")(lambda: seen.append(_rows("work", "m")) or "ran")
    assert run().result(timeout=10) == "ran"
    assert seen == [[("m", 300 * MB, 200 * MB, 0, 500 * MB)]] and _rows("work") == [("m", 300 * MB, 0, 0, 300 * MB)]

    def boom(exc):
        seen.append(_rows("work", "m"))
        raise exc

    fail = gpuctx.gpu_task(model="m")(boom)
    for exc in (ValueError("body failed"), KeyboardInterrupt()):   # an exception, and a BaseException
        with pytest.raises(type(exc)):
            fail(exc).result(timeout=10)
        assert seen[-1] == [("m", 300 * MB, 200 * MB, 0, 500 * MB)]
        assert _rows("work") == [("m", 300 * MB, 0, 0, 300 * MB)]


def test_a_task_waits_for_the_share_and_other_kernels_idle_models_are_evicted_for_its_working_memory(share_dir,
                                                                                                    other):
    gpuctx.configure(device="cpu", budget=1000 * MB, share="wait")
    gpuctx.model("m", vram="300MB")(lambda: "M")
    gpuctx.gpu_task(model="m")(lambda: 0)().result(timeout=10)   # resident: 300 MB charged
    o = other("wait")
    o.hold("idle", 600 * MB, busy=False)
    seen = []
    big = gpuctx.gpu_task(model="m", working="200MB")(lambda: seen.append(_total("wait")) or "ran")
    assert big().result(timeout=10) == "ran"   # 300 + 200 + 600 > 1000: the other kernel's idle model went
    assert o.evicted == ["idle"] and seen == [500 * MB]
    assert _rows("wait") == [("m", 300 * MB, 0, 0, 300 * MB)]


def test_a_task_waiting_for_the_share_can_be_cancelled_and_nothing_stays_charged(share_dir, other):
    gpuctx.configure(device="cpu", budget=1000 * MB, share="cancel")
    gpuctx.model("m", vram="300MB")(lambda: "M")
    small = gpuctx.gpu_task(model="m")(lambda: "small")
    small().result(timeout=10)
    o = other("cancel")
    o.hold("busy", 600 * MB, busy=True)
    task = gpuctx.gpu_task(model="m", working="200MB")(lambda: "never")()
    db = sqlite3.connect(share_path("cancel"), timeout=5, isolation_level=None)
    _until(lambda: db.execute("SELECT need FROM requests WHERE model = 'm'").fetchall() == [(200 * MB,)])
    assert gpuctx.scheduler().view().committed == 500 * MB   # charged here, claimed from the share, waiting
    assert task.cancel() and task.cancelled()
    assert small().result(timeout=10) == "small"   # the worker went on
    assert db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 0
    assert _rows("cancel", "m") == [("m", 300 * MB, 0, 0, 300 * MB)]
    assert gpuctx.scheduler().view().committed == 300 * MB
    db.close()


def test_only_tasks_with_working_memory_touch_the_share_once_each_way(share_dir):
    gpuctx.configure(device="cpu", budget=1000 * MB, share="cost")
    share = gpuctx.scheduler().share
    calls: list[tuple[str, str]] = []
    claim, settle = share.claim, share.settle
    share.claim = lambda model, n, closed, part="used", patience=None: (
        calls.append(("claim", part)), claim(model, n, closed, part, patience))[1]
    share.settle = lambda model, n, part="used": (calls.append(("settle", part)), settle(model, n, part))[1]
    plain = gpuctx.gpu_task(model="m", vram="100MB")(lambda i: i)
    assert [t.result(timeout=10) for t in [plain(i) for i in range(20)]] == list(range(20))
    assert [c for c in calls if c[1] == "working"] == []   # no working memory: no transaction for it
    working = gpuctx.gpu_task(model="m", working="10MB")(lambda i: i)
    for i in range(5):
        assert working(i).result(timeout=10) == i
    assert [c for c in calls if c[1] == "working"] == [("claim", "working"), ("settle", "working")] * 5


# --------------------------------------------------------------------------- 3. NVML, reconciled (pure, then wired)
def test_reconcile_reports_memory_outside_the_share_and_kernels_above_their_charges():
    charged = {1: 300 * MB, 2: 0}
    used = {1: 350 * MB, 2: 100 * MB, 9: 500 * MB, 10: None, 11: 20 * MB}
    r = gshare.reconcile(charged, used, me=1, tolerance=100 * MB)
    assert (r.outside, r.over, r.matched) == (520 * MB, (), True)   # 9 and 11; 10's use is unknown
    r = gshare.reconcile(charged, used, me=1, tolerance=10 * MB)
    assert r.over == ((1, 300 * MB, 350 * MB), (2, 0, 100 * MB))
    assert r.room(2000 * MB, 0.9) == 1800 * MB - 520 * MB
    # this kernel's pid not in NVML's list: another pid namespace, nothing can be matched
    assert gshare.reconcile(charged, {77: 900 * MB}, me=1) == gshare.Reconciled(0, (), matched=False)
    assert gshare.reconcile({1: 0}, {}, me=1) == gshare.Reconciled(0)   # nothing on the card yet


class FakeCuda(CpuDevice):
    """The CPU device under a CUDA name: what the share looks at (its name) says GPU."""

    def __init__(self, budget: int) -> None:
        super().__init__(budget)
        self.name = "cuda:0"


class FakeNvml(types.ModuleType):
    """pynvml with one card: its UUID, its total memory, and the processes using it (mutable)."""

    UUID = "GPU-5a1e0000-1111-2222-3333-444455556666"

    def __init__(self, total: int, procs: dict) -> None:
        super().__init__("pynvml")
        self.total, self.procs, self.inits = total, procs, 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetUUID(self, handle):
        assert handle == ("handle", 0)
        return self.UUID.encode()

    def nvmlDeviceGetHandleByUUID(self, uuid):
        assert uuid == self.UUID
        return ("handle", 0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(total=self.total, free=0, used=self.total)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=p, usedGpuMemory=n) for p, n in list(self.procs.items())]


@pytest.fixture
def fake_nvml(monkeypatch):
    fake = FakeNvml(1200 * MB, {})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    try:   # a CUDA torch would answer the UUID first; this test is about the NVML path
        import torch

        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: (_ for _ in ()).throw(RuntimeError("no")))
    except ImportError:
        pass
    return fake


def test_nvml_probe_is_for_cuda_devices_only_and_reads_the_processes(fake_nvml):
    touched = types.SimpleNamespace()   # any attribute looked up on it would raise
    assert gshare.nvml_probe(CpuDevice(MB), nvml=touched) is None
    fake_nvml.procs.update({5: 100 * MB, 6: None, 7: (1 << 64) - 1})
    total, used = gshare.nvml_probe(FakeCuda(MB))()
    assert (total, used) == (1200 * MB, {5: 100 * MB, 6: None, 7: None})


def test_on_a_gpu_the_default_share_is_the_uuid_and_share_false_opts_out(share_dir, fake_nvml):
    assert gshare.target(None, FakeCuda(MB)) == gshare.target(True, FakeCuda(MB)) == FakeNvml.UUID
    assert gshare.target(False, FakeCuda(MB)) is None and gshare.target(None, CpuDevice(MB)) is None
    s = Scheduler(Config(budget=1000 * MB), device=FakeCuda(1000 * MB))
    try:
        gshare.follow(s, None, strict=False)   # what a scheduler does when it starts with no share= set
        assert s.share is not None and s.share.name == FakeNvml.UUID
        assert os.path.exists(share_path(FakeNvml.UUID))
        gshare.follow(s, False, strict=True)
        assert s.share is None
        db = sqlite3.connect(share_path(FakeNvml.UUID), timeout=5, isolation_level=None)
        assert db.execute("SELECT COUNT(*) FROM kernels").fetchone()[0] == 0   # it left
        db.close()
    finally:
        gshare.leave(s)
        s.shutdown()


def test_the_heartbeat_on_a_gpu_shrinks_the_room_by_outside_processes_and_names_a_kernel_above_its_charges(
        share_dir, fake_nvml):
    me = os.getpid()
    fake_nvml.procs.update({me: 50 * MB, 424242: 400 * MB})   # 424242: a process outside the share
    s = Scheduler(Config(budget=1000 * MB), device=FakeCuda(1000 * MB))
    try:
        gshare.follow(s, None, strict=True)
        share = s.share
        share.beat()
        assert share.reconciled == gshare.Reconciled(400 * MB)
        assert share.free() == int(1200 * MB * 0.9) - 400 * MB   # 680 MB: less than the 1000 MB budget
        with pytest.raises(gpuctx.AdmissionError, match="cannot reserve 700 MB in share"):
            s.create_context("big", base_vram="700MB")
        s.create_context("ok", base_vram="600MB")
        fake_nvml.procs[me] = 600 * MB + gshare._nvml.TOLERANCE + 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            share.beat()   # whichever heartbeat reconciles first warns, inside the share's lock
            share.beat()
        said = [str(w.message) for w in caught if "NVML" in str(w.message)]
        assert len(said) == 1 and "this kernel uses" in said[0] and "charged 600 MB" in said[0]
        assert share.reconciled.over == ((me, 600 * MB, 600 * MB + gshare._nvml.TOLERANCE + 1),)
    finally:
        gshare.leave(s)
        s.shutdown()


def test_the_cpu_device_never_imports_pynvml(share_dir, monkeypatch):
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    gpuctx.configure(device="cpu", budget=100 * MB, share="cpu-only")
    share = gpuctx.scheduler().share
    share.beat()
    assert share.reconciled is None and "pynvml" not in sys.modules


def test_the_beat_thread_reconciles_without_the_test_driving_it(share_dir, fake_nvml):
    fake_nvml.procs.update({os.getpid(): 10 * MB, 31337: 100 * MB})
    s = Scheduler(Config(budget=1000 * MB), device=FakeCuda(1000 * MB))
    try:
        gshare.follow(s, None, strict=True)
        s.share.wake()
        db = sqlite3.connect(share_path(FakeNvml.UUID), timeout=5, isolation_level=None)
        _until(lambda: db.execute("SELECT value FROM meta WHERE key = 'room'").fetchone() is not None)
        assert int(db.execute("SELECT value FROM meta WHERE key = 'room'").fetchone()[0]) == 1080 * MB - 100 * MB
        db.close()
    finally:
        gshare.leave(s)
        s.shutdown()
