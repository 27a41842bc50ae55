"""A budget shared by several kernels (gpuctx.share): real processes on the CPU device, one share.

The ``share_dir`` and ``kernels`` fixtures (kernels in other processes, tests/share_worker.py) are in
conftest.py. Cross-process work has no event to wait on, so these tests poll the share's database (or a
worker's answers) with a deadline; nothing sleeps to wait for a thread of this process.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sqlite3
import threading
import time

import pytest

import gpuctx
from gpuctx import policy
from gpuctx.share import STALE, HEARTBEAT, share_path

ROOT = pathlib.Path(__file__).resolve().parent.parent
MB = 10**6


def _db(share: str) -> sqlite3.Connection:
    return sqlite3.connect(share_path(share), timeout=5, isolation_level=None)


def _until(check, timeout: float = 10.0, step: float = 0.005):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


class Sampler(threading.Thread):
    """Reads the sum of charges from the database until stopped; keeps the largest."""

    def __init__(self, share: str) -> None:
        super().__init__(daemon=True)
        self.conn = sqlite3.connect(share_path(share), timeout=5, isolation_level=None, check_same_thread=False)
        self.stop, self.peak, self.samples = threading.Event(), 0, 0

    def run(self) -> None:
        while not self.stop.is_set():
            total = self.conn.execute("SELECT COALESCE(SUM(nbytes), 0) FROM charges").fetchone()[0]
            self.peak, self.samples = max(self.peak, total), self.samples + 1
            self.stop.wait(0.002)


# --------------------------------------------------------------------------- processes
def test_three_processes_evict_each_others_idle_models_and_never_exceed_the_budget(share_dir, kernels):
    a, b, c = (kernels("three", 1000 * MB) for _ in range(3))
    sampler = Sampler("three")
    sampler.start()
    a("model", name="ma", vram=400 * MB)
    b("model", name="mb", vram=400 * MB)
    c("model", name="mc", vram=500 * MB)
    assert a("run", model="ma")["result"] == "ma"
    assert b("run", model="mb")["result"] == "mb"
    # a model turns idle in the share when its owner's heartbeat says so; wait for both, so that
    # the victim below is chosen by age and not by whose heartbeat came first
    idle = "SELECT COUNT(*) FROM charges WHERE model IN ('ma', 'mb') AND busy = 0"
    db = _db("three")
    assert _until(lambda: db.execute(idle).fetchone()[0] == 2), "ma and mb never published idle"
    db.close()
    assert c("run", model="mc")["result"] == "mc"   # 400 + 400 + 500 > 1000: one idle model goes
    # the least recently used of the two (ma) was asked for, and its owner evicted it
    sa, sb, sc = a("state"), b("state"), c("state")
    assert (sa["for_others"], sb["for_others"], sa["resident"], sb["resident"]) == (1, 0, {}, {"mb": 400 * MB})
    assert sc["resident"] == {"mc": 500 * MB}
    assert sorted(k["pid"] for k in sc["others"]) == sorted([a.pid, b.pid])
    assert f"pid {b.pid}: 400 MB (mb 400 MB)" in sc["text"] and "mb 400 MB" in sc["html"]
    for _ in range(3):   # round robin: each run needs another kernel's idle model gone
        for k, m in ((a, "ma"), (b, "mb"), (c, "mc")):
            assert k("run", model=m)["result"] == m
    # a busy model is never a victim: mb is held, so a's load takes mc, not mb
    b("hold", model="mb")
    a("run", model="ma")
    assert "mb" in b("state")["resident"]
    b("release", model="mb")
    sampler.stop.set()
    sampler.join()
    assert sampler.samples > 10 and 900 * MB <= sampler.peak <= 1000 * MB
    total = sum(sum(k("state")["resident"].values()) for k in (a, b, c))
    assert _db("three").execute("SELECT SUM(nbytes) FROM charges").fetchone()[0] == total


def test_a_sigkilled_kernels_charges_are_reclaimed_within_the_bound(share_dir, kernels):
    a, b = kernels("dead", 1000 * MB), kernels("dead", 1000 * MB)
    a("model", name="ma", vram=700 * MB)
    a("run", model="ma")
    db = _db("dead")
    assert db.execute("SELECT SUM(nbytes) FROM charges").fetchone()[0] == 700 * MB
    os.kill(a.pid, signal.SIGKILL)
    a.p.wait(10)
    t0 = time.monotonic()
    gone = _until(lambda: db.execute("SELECT COUNT(*) FROM kernels WHERE pid = ?", (a.pid,)).fetchone()[0] == 0)
    elapsed = time.monotonic() - t0
    assert gone
    # the documented bound: STALE without a heartbeat plus the next heartbeat of a live kernel
    # (0.175 s at the defaults); a loaded 2-core box gets 1 s of slack for scheduling
    assert elapsed <= STALE + HEARTBEAT + 1.0, elapsed
    assert db.execute("SELECT COUNT(*) FROM charges").fetchone()[0] == 0
    b("model", name="mb", vram=900 * MB)
    assert b("run", model="mb")["result"] == "mb"   # the dead kernel's 700 MB are free again


def test_stress_a_thousand_cross_process_eviction_cycles_leave_charges_equal_to_what_is_resident(share_dir,
                                                                                                kernels):
    fast = {"GPUCTX_SHARE_HEARTBEAT": "0.005"}   # 5 ms heartbeats: 1,000 cycles in seconds
    a, b = kernels("stress", 100 * MB, env=fast), kernels("stress", 100 * MB, env=fast)
    a("model", name="ma", vram=60 * MB)
    b("model", name="mb", vram=60 * MB)
    sampler = Sampler("stress")
    sampler.start()
    t0 = time.monotonic()
    for i in range(1001):   # each run after the first needs the other kernel's model gone (60 + 60 > 100)
        k, m = (a, "ma") if i % 2 == 0 else (b, "mb")
        assert k("run", model=m)["result"] == m
    elapsed = time.monotonic() - t0
    sampler.stop.set()
    sampler.join()
    sa, sb = a("state"), b("state")
    assert sa["for_others"] + sb["for_others"] == 1000, (sa["for_others"], sb["for_others"], elapsed)
    assert sampler.peak <= 100 * MB
    db = _db("stress")
    charged = db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM charges").fetchone()[0]
    assert charged == sum(sa["resident"].values()) + sum(sb["resident"].values()) == 60 * MB
    assert db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM evictions").fetchone()[0] == 0
    a.close()
    b.close()
    assert [db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("kernels", "charges")] == [0, 0]


# --------------------------------------------------------------------------- one process, the database faked
def _fake_kernel(share: str, pid: int, started: str | None, nbytes: int, age: float) -> int:
    db = _db(share)
    cur = db.execute("INSERT INTO kernels(pid, started, heartbeat) VALUES (?, ?, ?)", (pid, started, time.time() - age))
    db.execute("INSERT INTO charges(kernel, model, used, busy) VALUES (?, 'ghost', ?, 1)", (cur.lastrowid, nbytes))
    return cur.lastrowid


def test_a_reused_pid_is_not_the_dead_kernel_but_a_live_one_is_kept(share_dir):
    from gpuctx.share._db import process_start

    gpuctx.configure(device="cpu", budget=1000 * MB, share="reuse")
    gpuctx.scheduler()
    me = os.getpid()
    alive = _fake_kernel("reuse", me, process_start(me), 300 * MB, age=60)    # this very process: alive
    reused = _fake_kernel("reuse", me, "1", 600 * MB, age=60)                  # same pid, another start time
    gpuctx.model("m", vram=600 * MB)(lambda: "M")
    task = gpuctx.gpu_task(model="m")(lambda: gpuctx.current_model())()
    assert task.result(timeout=10) == "M"   # fits only once the 600 MB of the "dead" kernel are reclaimed
    rows = dict(_db("reuse").execute("SELECT id, pid FROM kernels").fetchall())
    assert reused not in rows and alive in rows
    assert [k.nbytes for k in gpuctx.status().others] == [300 * MB]


def test_the_share_files_are_private_and_a_foreign_or_open_one_is_refused(share_dir):
    gpuctx.configure(device="cpu", budget=100 * MB, share="perm")
    gpuctx.scheduler()
    path = share_path("perm")
    assert oct(os.stat(share_dir).st_mode & 0o777) == "0o700"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    gpuctx.reset()
    os.chmod(path, 0o644)
    with pytest.raises(gpuctx.ShareError, match=f"{path} has mode 0644.*chmod 600"):
        gpuctx.configure(share="perm")
    os.chmod(path, 0o600)
    if os.getuid() == 0:   # only root can hand a file to another user
        os.chown(path, 4242, -1)
        with pytest.raises(gpuctx.ShareError, match=f"{path} belongs to uid 4242"):
            gpuctx.configure(share="perm")
        os.chown(path, 0, -1)
    os.chmod(share_dir, 0o755)
    with pytest.raises(gpuctx.ShareError, match="directory .* has mode 0755"):
        gpuctx.configure(share="perm")


def test_a_corrupt_database_is_a_clear_error_and_the_kernel_goes_on(share_dir):
    os.makedirs(share_dir, mode=0o700)
    path = share_path("bad")
    with open(path, "wb") as f:
        f.write(b"this is not a database" * 100)
    os.chmod(path, 0o600)
    gpuctx.configure(device="cpu", budget=100 * MB)
    with pytest.raises(gpuctx.ShareError, match=f"{path} is not a usable gpuctx share.*delete the file"):
        gpuctx.configure(share="bad")
    assert gpuctx.api.current_config().share is None   # refused: nothing changed
    assert gpuctx.gpu_task(model="x", vram=10 * MB)(lambda: 7)().result(timeout=10) == 7


def test_a_lost_share_warns_once_and_the_kernel_works_alone(share_dir):
    gpuctx.configure(device="cpu", budget=100 * MB, share="lost")
    share = gpuctx.scheduler().share
    with share._lock:
        share._conn.close()   # the database is gone from under the kernel
    f = gpuctx.gpu_task(model="x", vram=60 * MB)(lambda: 1)
    with pytest.warns(RuntimeWarning, match="share 'lost' .* cannot be reached.*works alone") as caught:
        assert [f().result(timeout=10) for _ in range(3)] == [1, 1, 1]
    assert len([w for w in caught if "cannot be reached" in str(w.message)]) == 1
    assert share.alone and gpuctx.status().share is None


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "a\\b", "x" * 101, 5])
def test_a_share_name_with_path_characters_is_refused(share_dir, name):
    with pytest.raises(gpuctx.ConfigError, match=r"share=.*expected a name of letters, digits"):
        gpuctx.configure(share=name)
    assert gpuctx.api.current_config().share is None


def test_share_false_works_alone_and_a_cpu_kernel_has_no_default_share(share_dir):
    gpuctx.configure(device="cpu", budget=100 * MB)
    assert gpuctx.scheduler().share is None
    gpuctx.configure(share="s1")
    assert gpuctx.scheduler().share.name == "s1"
    gpuctx.configure(share=False)
    assert gpuctx.scheduler().share is None
    assert _db("s1").execute("SELECT COUNT(*) FROM kernels").fetchone()[0] == 0   # it left


# --------------------------------------------------------------------------- the pure decisions
def test_share_victims_follow_the_fairness_rule_then_the_policy_order():
    D, M = policy.ShareDemand, policy.SharedModel
    budget = 900
    demands = [D(1, 0, waiting=300), D(2, 500), D(3, 300)]   # fair share: 300
    models = [M(2, "old", 250, busy=False, idle_for=50), M(2, "new", 250, busy=False, idle_for=1),
              M(3, "c", 300, busy=False, idle_for=99)]
    # kernel 2 holds more than its fair share: asked first, least recently used first
    assert policy.share_victims(models, 200, 1, budget, demands) == ((2, "old"),)
    # no queued work goes before queued work, then lower priority
    models2 = [M(2, "q", 250, busy=False, queued=1, idle_for=99), M(2, "p", 250, busy=False, priority=5)]
    assert policy.share_victims(models2, 200, 1, budget, demands) == ((2, "p"),)
    # among models with queued work, the cheapest to load again, however recently used
    models3 = [M(2, "dear", 250, busy=False, queued=1, idle_for=99, load_cost=4.5),
               M(2, "cheap", 250, busy=False, queued=1, idle_for=1, load_cost=1.5)]
    assert policy.share_victims(models3, 200, 1, budget, demands) == ((2, "cheap"),)
    # busy and pinned models are never victims; our own neither
    assert policy.share_victims([M(2, "b", 900), M(3, "p", 900, busy=False, pinned=True),
                                 M(1, "mine", 900, busy=False)], 100, 1, budget, demands) is None
    # rule 2: a kernel at or below its fair share that waits itself is not asked
    waiting3 = [D(1, 0, waiting=300), D(2, 0), D(3, 300, waiting=100)]
    assert policy.share_victims([M(3, "c", 300, busy=False)], 100, 1, budget, waiting3) is None
    # rule 3: a kernel that would end above F takes nothing from one with queued work that falls below F
    big = [D(1, 600, waiting=200), D(2, 300, queued=2)]
    assert policy.share_victims([M(2, "x", 300, busy=False)], 200, 1, 900, big) is None
    assert policy.share_victims([M(2, "x", 300, busy=False)], 200, 1, 900, [D(1, 600), D(2, 300)]) == ((2, "x"),)


def test_share_may_take_leaves_free_memory_to_a_waiting_kernel_below_its_fair_share():
    D = policy.ShareDemand
    assert policy.share_may_take(1000, [D(1, 400), D(2, 100)], 1, 200)          # fits, nobody waits
    assert not policy.share_may_take(1000, [D(1, 400), D(2, 100)], 1, 600)      # does not fit
    # kernel 1 would end above 500 while kernel 2 (100 < 500) waits for 300 it could take now
    assert not policy.share_may_take(1000, [D(1, 400), D(2, 100, waiting=300)], 1, 200)
    assert policy.share_may_take(1000, [D(1, 300), D(2, 100, waiting=300)], 1, 200)   # within its share
    assert policy.share_may_take(1000, [D(1, 400), D(2, 100, waiting=900)], 1, 200)   # 2 cannot use it now


# --------------------------------------------------------------------------- two real Jupyter kernels
def test_two_jupyter_kernels_share_one_budget(share_dir):
    pytest.importorskip("ipykernel")
    from jupyter_client import KernelManager

    setup = ("import gpuctx\n"
             "gpuctx.configure(device='cpu', budget='1GB', share='nb', offload=False)\n"
             "gpuctx.model('{m}', vram='600MB')(lambda: '{m}')\n"
             "run = gpuctx.gpu_task(model='{m}')(lambda: gpuctx.current_model())\n"
             "print(run().result(timeout=30))\n")
    managers, clients = [], []
    try:
        for i in (1, 2):
            km = KernelManager(kernel_name="python3")
            km.start_kernel(env=dict(os.environ, PYTHONPATH=str(ROOT), GPUCTX_SHARE_DIR=str(share_dir),
                                     JPY_SESSION_NAME=f"notebook{i}.ipynb"))
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=60)
            managers.append(km)
            clients.append(kc)

        def run(kc, code: str) -> str:
            out: list[str] = []

            def hook(msg):
                if msg["msg_type"] == "stream":
                    out.append(msg["content"]["text"])
                elif msg["msg_type"] == "error":
                    out.append("\n".join(msg["content"]["traceback"]))
            reply = kc.execute_interactive(code, timeout=60, output_hook=hook)
            assert reply["content"]["status"] == "ok", "".join(out)
            return "".join(out)

        one, two = clients
        assert run(one, setup.format(m="m1")).strip() == "m1"
        assert run(two, setup.format(m="m2")).strip() == "m2"   # 600 + 600 > 1000: kernel 1 evicts m1
        assert run(one, "print(gpuctx.stats()['evictions_for_others'], gpuctx.evict())").strip() == "1 []"
        text = run(two, "print(gpuctx.status())")
        assert "share 'nb': 1 other kernel(s)" in text and "notebook1.ipynb: 0 B (nothing), 0 tasks" in text
    finally:
        for kc in clients:
            kc.stop_channels()
        for km in managers:
            km.shutdown_kernel(now=True)
