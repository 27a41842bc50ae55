"""gpuctx on a local Ray cluster (CPU device, declared budgets): routing, data, faults, budgets.

Ray starts once for the module (the slow part: ~10 s on the 2-core box; the ``local_ray`` and
``cluster`` fixtures are in conftest.py); each test starts its own workers with
``configure(cluster="ray", ...)`` (about a second) so a killed worker does not leak into the next
test. Waits on other processes poll with a deadline: nothing else exists
across processes. The policy's routing rule is tested as a pure function at the end.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

import gpuctx
from gpuctx import policy
from gpuctx.policy import WorkerView
from gpuctx.status import Status as LocalStatus

GB = 10**9
def _until(cond, what: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- the notebook code
class Tracked:
    """A payload that writes the pid of every process that unpickles it to a file."""

    def __init__(self, path: str, data: bytes) -> None:
        self.path, self.data = path, data

    def __reduce__(self):
        return (_rebuild, (self.path, self.data))


def _rebuild(path: str, data: bytes) -> Tracked:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return Tracked(path, data)


def pipeline(n: int) -> list:
    """The same notebook code for both runs: two models, a dependency between them."""

    @gpuctx.model("enc", vram="3GB")
    def load_enc():
        return {"scale": 3}

    @gpuctx.gpu_task(model="enc")
    def encode(x):
        return x * gpuctx.current_model()["scale"]

    @gpuctx.gpu_task(model="dec", vram="2GB")
    def decode(a, b):
        return a + b

    enc = [encode(i) for i in range(n)]
    out = [decode(enc[i], enc[(i + 1) % n]) for i in range(n)]
    return gpuctx.gather(out)


def test_the_same_code_gives_the_same_results_locally_and_on_the_cluster(cluster):
    gpuctx.reset()
    gpuctx.configure(budget="8GB", device="cpu")
    local = pipeline(12)
    cluster(workers=3)
    remote = pipeline(12)
    assert remote == local == [3 * i + 3 * ((i + 1) % 12) for i in range(12)]
    st = gpuctx.stats()
    assert st["tasks"] == 24 and st["failed"] == 0
    assert set(st["workers"]) == {"w0", "w1", "w2"}


def test_a_failed_call_fails_its_consumers_and_configure_cluster_none_goes_back_to_one_process(cluster):
    cluster(workers=2)

    @gpuctx.gpu_task(model="p", vram="1GB")
    def boom(x):
        raise KeyError(x)

    @gpuctx.gpu_task(model="q", vram="1GB")
    def after(v):
        return v

    bad = boom("nope")
    downstream = after(after(bad))
    with pytest.raises(KeyError):
        bad.result(30)
    with pytest.raises(gpuctx.DependencyError, match=r"after\(\): its dependency Task #\d+ after failed: KeyError") as err:
        downstream.result(30)
    assert isinstance(err.value.__cause__, KeyError)
    assert gpuctx.stats()["failed"] == 1          # only the body that ran and raised
    gpuctx.configure(cluster=None)
    assert isinstance(gpuctx.status(), LocalStatus)
    assert after(5).result(10) == 5               # the same function, now on this process


def test_calls_go_to_the_worker_where_their_model_is_resident(cluster, tmp_path):
    cluster(workers=3)

    @gpuctx.model("slowload", vram="2GB")
    def load():
        time.sleep(0.4)          # a load worth avoiding: the router measures it
        return "m"

    @gpuctx.gpu_task(model="slowload")
    def f(x):
        return x

    first = f(0)
    first.result(30)
    home = first.worker
    rest = [f(i) for i in range(1, 9)]
    gpuctx.wait(rest, timeout=30)
    assert [t.worker for t in rest] == [home] * 8
    st = gpuctx.stats()
    assert st["models"]["slowload"]["loads"] == 1
    rows = {w.name: w for w in gpuctx.status().workers}
    assert [m for m, _ in rows[home].resident] == ["slowload"]
    assert all(not rows[n].resident for n in rows if n != home)
    out = tmp_path / "trace.json"
    gpuctx.export_trace(str(out))           # the timeline's lanes: one per worker and model
    lanes = {e["args"]["name"] for e in json.loads(out.read_text())["traceEvents"] if e["name"] == "thread_name"}
    assert f"{home}/slowload (stream {home}/slowload)" in lanes
    assert all(lane.startswith(home) for lane in lanes)


def test_a_cross_worker_dependency_travels_as_an_object_ref_not_through_the_driver(cluster, local_ray, tmp_path):
    ray = local_ray
    cluster(workers=2)
    log = tmp_path / "unpickled"
    log.write_text("")

    gpuctx.model("big", vram="7GB")(lambda: "loaded")   # stays resident: the next model goes elsewhere

    @gpuctx.gpu_task(model="big")
    def produce(path):
        return Tracked(path, b"x" * 2_000_000)    # above Ray's inline limit: in the object store

    @gpuctx.gpu_task(model="other", vram="7GB")
    def consume(t):
        return (len(t.data), os.getpid())

    p = produce(str(log))
    gpuctx.wait([p], timeout=30)
    c = consume(p)
    n, consumer_pid = c.result(30)
    assert n == 2_000_000
    assert c.worker != p.worker                 # 7 GB + 7 GB cannot share an 8 GB worker
    pids = log.read_text().split()
    assert str(os.getpid()) not in pids and str(consumer_pid) in pids
    assert isinstance(p.ref, ray.ObjectRef)
    st = gpuctx.stats()["cluster"]
    assert st["cross_worker"] == 1 and st["cross_worker_bytes"] == 0   # the payload has no nbytes
    assert p.result().data == b"x" * 2_000_000  # fetched only when asked
    assert str(os.getpid()) in log.read_text().split()


def test_no_worker_ever_holds_more_than_its_budget(cluster):
    cluster(workers=2, budget="5GB")

    names = ("m1", "m2", "m3", "m4")
    for i, name in enumerate(names):
        gpuctx.model(name, vram=f"{2 + i % 2}GB")(lambda name=name: name)

    fns = {name: gpuctx.gpu_task(model=name, name=f"run_{name}")(lambda x: x) for name in names}
    tasks = [fns[names[i % 4]](i) for i in range(40)]
    done, not_done = gpuctx.wait(tasks, timeout=60, progress=True)   # the progress bar covers the cluster
    assert len(done) == 40 and not not_done
    assert gpuctx.gather(tasks) == list(range(40))
    st = gpuctx.stats()
    for w in st["workers"].values():
        assert 0 < w["peak_vram"] <= 5 * GB
    assert sum(m["loads"] for m in st["models"].values()) >= 4


def test_a_model_larger_than_every_worker_fails_at_submit_with_the_largest_budget(cluster):
    cluster(workers=2, budget="4GB")
    with pytest.raises(gpuctx.BudgetError, match=r"larger than every worker's budget.*w0 with 4 GB"):
        gpuctx.model("huge", vram="6GB")(lambda: None)

    @gpuctx.gpu_task(model="huge2", vram="5GB")
    def f():
        return 1

    with pytest.raises(gpuctx.BudgetError, match="vram=5 GB"):
        f()


def test_a_killed_worker_fails_its_running_task_moves_its_queue_and_retries_when_allowed(cluster, local_ray, tmp_path):
    ray = local_ray
    cluster(workers=3)
    flag = tmp_path / "ran-once"

    @gpuctx.gpu_task(model="m", vram="2GB")
    def hang(i):
        if i == 0:
            time.sleep(60)       # killed before it ends
        return i

    @gpuctx.gpu_task(model="r", vram="2GB", max_retries=1)
    def flaky(path):
        if not os.path.exists(path):
            pathlib.Path(path).touch()
            time.sleep(60)       # its first worker is killed under it
        return "ok"

    running = hang(0)
    # the calls behind it are made once it runs: an async actor may start calls in any order
    _until(lambda: running.state == gpuctx.TaskState.RUNNING, "the first call to start")
    queued = [hang(i) for i in range(1, 4)]
    victim = running.worker
    behind = [t for t in queued if t.worker == victim and t.state == gpuctx.TaskState.QUEUED]
    assert behind, [(t.worker, t.state) for t in queued]
    retried = flaky(str(flag))
    _until(lambda: retried.state == gpuctx.TaskState.RUNNING, "the retryable call to start")
    second = retried.worker
    actors = gpuctx.scheduler().actors()
    ray.kill(actors[victim])
    if second != victim:
        ray.kill(actors[second])

    with pytest.raises(gpuctx.WorkerLost, match=rf"hang\(\) \(Task #{running.id}\) was running on worker {victim}"):
        running.result(30)
    assert gpuctx.gather(queued, timeout=30) == [1, 2, 3]
    assert all(t.worker != victim for t in behind)
    assert retried.result(30) == "ok" and retried.worker not in (victim, second)
    status = gpuctx.status()
    assert not status.healthy and victim in status.lost
    assert f"{victim:<5} LOST" in str(status)
    counts = gpuctx.stats()["cluster"]
    assert counts["moved"] >= len(behind) and counts["retried"] == 1


def test_import_gpuctx_imports_no_ray():
    import subprocess

    code = "import gpuctx, sys; assert 'ray' not in sys.modules; gpuctx.configure(budget='1GB')"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parent.parent)


# --------------------------------------------------------------------------- the routing policy
def _w(name, budget=8 * GB, free=None, backlog=0.0, holds=(), idle=(), alive=True):
    return WorkerView(name, budget, budget if free is None else free, backlog, tuple(holds), tuple(idle), alive)


def test_route_prefers_a_worker_holding_the_model_over_an_empty_one():
    ws = [_w("a"), _w("b", free=4 * GB, backlog=3.0, holds=("m",))]
    assert policy.route(ws, "m", 4 * GB, load_cost=2.0) == "b"


def test_route_replicates_a_hot_model_only_when_its_queue_is_long():
    ws = [_w("a", backlog=3.0, holds=("m",)), _w("b")]
    assert policy.route(ws, "m", GB, load_cost=2.0) == "a"          # 3 s < 2 loads
    ws = [_w("a", backlog=10.0, holds=("m",)), _w("b")]
    assert policy.route(ws, "m", GB, load_cost=2.0) == "b"          # 10 s > 2 loads, and b finishes sooner
    ws = [_w("a", backlog=10.0, holds=("m",)), _w("b", backlog=9.0)]
    assert policy.route(ws, "m", GB, load_cost=2.0) == "a"          # b is no sooner after its load


def test_route_places_a_new_model_where_its_load_and_its_victims_cost_least():
    full = dict(free=0, idle=(("x", 4 * GB, 5.0),))
    cheap = dict(free=0, idle=(("y", 4 * GB, 1.0),))
    ws = [_w("a", **full), _w("b", **cheap)]
    assert policy.route(ws, "m", 4 * GB, load_cost=1.0) == "b"
    ws = [_w("a", **full), _w("b", **cheap, backlog=6.0), _w("c", free=4 * GB, backlog=1.0)]
    assert policy.route(ws, "m", 4 * GB, load_cost=1.0) == "c"
    assert policy.eviction_cost(ws[0], 4 * GB) == 5.0 and policy.eviction_cost(ws[2], 4 * GB) == 0.0
    assert policy.eviction_cost(ws[0], 5 * GB) is None


def test_route_skips_dead_and_too_small_workers_and_says_none_when_nothing_fits():
    ws = [_w("a", holds=("m",), alive=False), _w("b", budget=2 * GB), _w("c")]
    assert policy.route(ws, "m", 3 * GB, load_cost=1.0) == "c"
    assert policy.route(ws[:2], "m", 3 * GB, load_cost=1.0) is None
    assert policy.largest_worker(ws).name == "c"
    assert policy.should_replicate(5.0, 2.0) and not policy.should_replicate(4.0, 2.0)


_views = st.lists(st.builds(
    WorkerView, name=st.just(""), budget=st.integers(1, 16).map(lambda g: g * GB),
    free=st.integers(-8, 16).map(lambda g: g * GB), backlog=st.floats(0, 50),
    holds=st.lists(st.sampled_from(["m", "x", "y"]), max_size=3).map(tuple),
    idle=st.lists(st.tuples(st.sampled_from(["x", "y"]), st.integers(1, 8).map(lambda g: g * GB),
                            st.floats(0, 10)), max_size=2).map(tuple),
    alive=st.booleans()), max_size=5).map(lambda ws: [replace(w, name=f"w{i}") for i, w in enumerate(ws)])


@given(_views, st.integers(1, 12), st.floats(0.01, 10))
def test_route_picks_a_live_worker_that_can_hold_the_model_and_keeps_affinity_unless_replicating(ws, gb, load):
    size = gb * GB
    got = policy.route(ws, "m", size, load)
    fit = [w for w in ws if w.alive and w.budget >= size]
    if not fit:
        assert got is None
        return
    chosen = next(w for w in fit if w.name == got)
    holders = [w for w in fit if "m" in w.holds]
    if holders and "m" not in chosen.holds:     # a replica: only when the holder's queue is long
        home = min(holders, key=lambda w: w.backlog)
        assert policy.should_replicate(home.backlog, load)
        assert policy.placement_cost(chosen, size, load) < home.backlog
    if not holders:                              # a placement: the cheapest
        assert policy.placement_cost(chosen, size, load) == min(policy.placement_cost(w, size, load) for w in fit)
