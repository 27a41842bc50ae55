"""The dashboard, status and top on a Ray cluster (issues 17.5 and 20): a row per worker, a lane per
worker and model, gathered from the dashboard's own thread without blocking the notebook.

A local Ray cluster, CPU device, two workers of 8 GB (the ``cluster`` fixture of conftest.py).
Task bodies run in the workers' processes, so a body held open waits for a file to appear
(polled with a deadline: nothing else crosses processes).
"""

from __future__ import annotations

import io
import os
import time

import pytest

import gpuctx
from gpuctx import panel

from dash_helpers import model_line, wait_for

TIMEOUT = 30


def _hold(path: str) -> None:
    """Wait (in a worker's process) until ``path`` exists."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)


def _worker(p: panel.Panel, name: str):
    return next(w for w in p.workers if w.name == name)


@pytest.fixture
def gate(tmp_path):
    """A file path that held bodies wait for; created at the end whatever happened, so no body
    keeps a worker (and the fixture's shutdown) waiting."""
    path = tmp_path / "open"
    yield str(path)
    path.touch()


def test_the_dashboard_shows_each_worker_its_models_and_lanes_and_a_lost_worker(cluster, dashboards, local_ray, gate):
    cluster(workers=2, budget="8GB")
    gpuctx.model("a", vram="5GB")(lambda: "A")
    gpuctx.model("b", vram="5GB")(lambda: "B")   # 5 + 5 > 8: a and b live on different workers

    @gpuctx.gpu_task(model="a")
    def slow(i, path):
        _hold(path)
        return i

    @gpuctx.gpu_task(model="b")
    def quick(i):
        return i

    d = dashboards(interval=0.05, window=20)
    first = d.panel                                   # the first frame waits for no worker
    assert first.scope == "cluster" and [w.name for w in first.workers] == ["w0", "w1"]
    held = slow(0, gate)
    end = time.monotonic() + TIMEOUT
    while held.state != gpuctx.TaskState.RUNNING:     # started in its worker's process
        assert time.monotonic() < end, held.state
        time.sleep(0.01)
    held_worker = held.worker
    behind = slow(1, gate)                            # queued behind it, on the same worker (affinity)
    quicks = [quick(i) for i in range(5)]
    gpuctx.wait(quicks, timeout=TIMEOUT)
    other = quicks[0].worker
    assert behind.worker == held_worker and other != held_worker
    a, b = f"{held_worker}/a", f"{other}/b"

    def shows_both(p: panel.Panel) -> bool:
        ma, mb = model_line(p, a), model_line(p, b)
        lanes = {lane.context: lane.cells for lane in p.lanes}
        return (ma is not None and ma.running == 1 and ma.queued == 1 and ma.oldest_wait is not None
                and mb is not None and mb.state == "resident" and a in lanes and lanes[a][-1] == ("run", a)
                and b in lanes and any(c is not None and c[1] == b for c in lanes[b]) and p.done >= 5
                and _worker(p, held_worker).running == 1 and _worker(p, held_worker).queued == 1)

    # a value sent after this point shows it (the panel may show it already: then the next refresh,
    # which still changes the value, since a's oldest wait grows)
    senders = wait_for(d, shows_both, TIMEOUT, sent=True)
    assert senders and set(senders) == {"gpuctx-dashboard"}   # driven from the dashboard's own thread
    p = d.panel
    w_a, w_b = _worker(p, held_worker), _worker(p, other)
    assert w_a.alive and w_a.budget == 8 * gpuctx.GB and w_a.used == 5 * gpuctx.GB and w_a.resident == (("a", 5 * gpuctx.GB),)
    assert w_b.resident == (("b", 5 * gpuctx.GB),) and w_b.queued == 0
    assert p.budget == 16 * gpuctx.GB and p.committed == 10 * gpuctx.GB and p.healthy
    assert model_line(p, a).colour == model_line(p, f"{other}/a").colour    # a model has one colour everywhere
    assert {x.model for x in p.loads} >= {a, b}
    html = d.widget.value
    assert "gpuctx-workers" in html and f">{held_worker}/a<" in html and "2 of 2 workers alive" in html

    open(gate, "w").close()
    assert gpuctx.gather([held, behind], timeout=TIMEOUT) == [0, 1]
    wait_for(d, lambda p: p.live == 0 and p.done == 7 and _worker(p, held_worker).running == 0, TIMEOUT)

    local_ray.kill(gpuctx.scheduler().actors()[other])   # an idle worker: no call of it notices, the view does
    wait_for(d, lambda p: not _worker(p, other).alive, TIMEOUT)
    p = d.panel
    assert not p.healthy and f"worker {other} LOST" in panel.render_text(p)
    assert all(not m.name.startswith(f"{other}/") for m in p.models)
    assert all(not lane.context.startswith(f"{other}/") for lane in p.lanes)

    status = gpuctx.status()                         # print(gpuctx.status()): a row per worker, the loss
    text = str(status)
    assert "1 of 2 workers alive" in text and f"{other:<5} LOST" in text
    assert f"{held_worker:<5} cpu     budget      8 GB used      5 GB queued 0 running 0: a 5 GB" in text
    assert "lost: ActorDiedError" in status._repr_html_() or "lost: RayActorError" in status._repr_html_()

    out = io.StringIO()                              # the top-style panel of the driver
    assert panel.top(gpuctx.api.current_scheduler, once=True, out=out, width=120) == 0
    frame = out.getvalue()
    assert frame.startswith("gpuctx cluster: 1 of 2 workers alive (cpu): budget 8 GB, used 5 GB")
    assert "workers:" in frame and f"  {held_worker}/a " in frame and "LOST" in frame


def test_a_worker_that_does_not_answer_delays_no_refresh_and_its_answer_serves_a_later_one(cluster, gate):
    cluster(workers=2, budget="8GB")

    def unload(obj):   # runs on the worker's event loop (evict is a plain actor call): its calls wait
        _hold(gate)

    gpuctx.model("m", vram="1GB", unload=unload)(lambda: "M")
    t = gpuctx.gpu_task(model="m")(lambda: 1)()
    assert t.result(TIMEOUT) == 1
    stuck, free = t.worker, ("w1" if t.worker == "w0" else "w0")
    sched = gpuctx.scheduler()
    reader = panel.PanelReader(gpuctx.api.current_scheduler, 10.0, patience=TIMEOUT)
    before = reader.read()                           # both answer
    assert model_line(before, f"{stuck}/m").state == "resident"
    evicting = sched.actors()[stuck].evict.remote("m")   # the stuck worker's loop waits in the unloader
    reader.patience = 0.5
    t0 = time.monotonic()
    for _ in range(3):
        p = reader.read()
    waited = time.monotonic() - t0
    assert waited < 3 * 0.5 + 5, waited               # each refresh waited its patience, not for the worker
    assert model_line(p, f"{stuck}/m").state == "resident"   # its last answer, kept
    assert model_line(p, f"{free}/m") is not None
    open(gate, "w").close()
    import ray

    assert ray.get(evicting, timeout=TIMEOUT) == ["m"]
    reader.patience = TIMEOUT
    end = time.monotonic() + TIMEOUT
    while model_line(reader.read(), f"{stuck}/m").state == "resident":   # the answer comes, then a fresh one
        assert time.monotonic() < end
    assert model_line(reader.read(), f"{stuck}/m").state == "absent"


def test_a_worker_reads_only_new_trace_events_for_each_reader_and_sends_a_panel_of_bounded_size():
    import pickle

    from gpuctx.cluster._worker import GpuWorker
    from gpuctx.engine import Config

    w = GpuWorker("w0", Config.build(Config(), device="cpu", budget="4GB"))   # the actor's body, in this process
    try:
        w.sched.register_model("m", loader=lambda: "M", vram="1GB")
        spec = gpuctx.gpu_task(model="m")(lambda i: i).__gpuctx_spec__
        run = lambda n: [w.sched.submit(spec, (i,), {}).result(TIMEOUT) for i in range(n)]  # noqa: E731
        run(50)
        small = w.panel("r1", 30.0)
        run(2000)
        big = w.panel("r1", 30.0)
        assert w._readers["r1"].follower.fed == len(w.sched.trace.events)   # each event read once
        assert big.done == 2050 and small.done == 50
        assert len(pickle.dumps(big)) < 2 * len(pickle.dumps(small)) + 4000   # bounded: cells, not events
        w.panel("r2", 30.0)                            # another reader has its own timeline
        assert set(w._readers) == {"r1", "r2"}
        for i in range(10):
            w.panel(f"x{i}", 30.0)
        assert len(w._readers) == 8 and "r1" not in w._readers
    finally:
        w.shutdown()
