"""Trace content on a known workload, stats, the timeline figure, the Chrome/Perfetto export, progress."""

from __future__ import annotations

import itertools
import json

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

import gpuctx  # noqa: E402
from gpuctx.trace import Trace, export_chrome, progress, timeline  # noqa: E402

TIMEOUT = 10


def fake_clock():
    counter = itertools.count()
    return lambda: float(next(counter))


def test_ring_buffer_keeps_the_last_events_and_stats_stay_complete():
    tr = Trace(capacity=3, clock=fake_clock())
    for i in range(5):
        tr.record("submit", task=i, model="m")
        tr.record("start", task=i, model="m", context="m")
        tr.record("end", task=i, model="m", context="m")
    assert [(e.kind, e.task) for e in tr.events] == [("submit", 4), ("start", 4), ("end", 4)]
    assert tr.stats.as_dict()["tasks"] == 5


def test_stats_on_a_known_sequence():
    tr = Trace(clock=fake_clock())
    r = tr.record
    r("group_start", model="a")
    r("load_start", model="a")
    r("load_end", model="a", nbytes=4, duration=2.0, vram=4)
    r("submit", task=1, model="a", t=0.0)
    r("start", task=1, model="a", context="a", t=1.0)
    r("end", task=1, model="a", context="a", t=4.0)
    r("group_start", model="b")
    r("evict", model="a", reason="room for b")
    r("unload", model="a", nbytes=4, vram=0)
    r("load_end", model="b", nbytes=6, duration=1.0, vram=6)
    r("submit", task=2, model="b", t=5.0)
    r("start", task=2, model="b", context="b", t=8.0)
    r("end", task=2, model="b", context="b", t=9.0, reason="failed")
    r("group_start", model="b")
    d = tr.stats.as_dict()
    assert d["model_switches"] == 1 and d["peak_vram"] == 6 and d["tasks"] == 1 and d["failed"] == 1
    a, b = d["models"]["a"], d["models"]["b"]
    assert (a["loads"], a["unloads"], a["evictions"], a["load_seconds"]) == (1, 1, 1, 2.0)
    assert (a["wait_p50"], a["run_max"]) == (1.0, 3.0)
    assert (b["failed"], b["wait_max"]) == (1, 3.0)
    html = d._repr_html_()
    assert "<table" in html and ">a<" in html and ">b<" in html
    assert "model switches 1" in str(d)


def _workload(n: int) -> Trace:
    tr = Trace(clock=fake_clock())
    models = ["whisper", "qwen3", "clap"]
    for i in range(n):
        m = models[i % 3]
        if i % 50 == 0:
            tr.record("load_start", model=m, context=m)
            tr.record("load_end", model=m, nbytes=10**9, duration=1.0)
        tr.record("submit", task=i, model=m)
        tr.record("start", task=i, model=m, context=m, stream=m)
        tr.record("end", task=i, model=m, context=m)
        if i % 50 == 49:
            tr.record("unload", model=m, nbytes=10**9, reason="room")
    return tr


@pytest.mark.parametrize("n", [10, 10_000])
def test_timeline_renders_small_and_large_traces(n):
    fig = timeline(_workload(n), budget=3 * 10**9)
    top = fig.axes[0]
    assert [t.get_text() for t in top.get_yticklabels()] == ["clap", "qwen3", "whisper"]
    assert f"{n} tasks" in top.get_title()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_export_chrome_trace(tmp_path):
    path = tmp_path / "trace.json"
    export_chrome(_workload(60), str(path))
    data = json.loads(path.read_text())
    evs = data["traceEvents"]
    assert data["displayTimeUnit"] == "ms"
    tasks = [e for e in evs if e["ph"] == "X" and e["cat"] == "task"]
    assert len(tasks) == 60 and all(e["dur"] >= 0 and "ts" in e for e in tasks)
    assert {e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"} == {
        "whisper (stream whisper)", "qwen3 (stream qwen3)", "clap (stream clap)"}
    assert any(e["ph"] == "C" for e in evs) and any(e["ph"] == "i" and e["name"] == "unload" for e in evs)


def test_live_scheduler_trace_has_the_workload(fresh, tmp_path):
    gpuctx.configure(budget="2GB")
    for m in ("a", "b"):
        gpuctx.model(m, vram="1.5GB")(lambda _m=m: _m)
    fa = gpuctx.gpu_task(model="a", name="fa")(lambda: 1)
    fb = gpuctx.gpu_task(model="b", name="fb")(lambda: 2)
    gpuctx.wait([fa(), fb(), fa()], timeout=TIMEOUT)
    kinds = [e.kind for e in gpuctx.scheduler().trace.events]
    for k in ("submit", "start", "end", "group_start", "load_start", "load_end", "evict", "unload"):
        assert k in kinds, k
    evict = next(e for e in gpuctx.scheduler().trace.events if e.kind == "evict")
    assert "room for" in evict.reason
    st = gpuctx.stats()
    assert st["models"]["a"]["tasks"] == 2 and st["models"]["b"]["loads"] == 1
    gpuctx.export_trace(str(tmp_path / "t.json"))
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    fig = gpuctx.timeline()
    assert fig.axes


def test_progress_disabled_prints_nothing_and_waits(fresh, capsys):
    f = gpuctx.gpu_task(model="m")(lambda x: x)
    ts = [f(i) for i in range(5)]
    gpuctx.wait(ts, progress=False)
    progress(ts, enabled=False)
    assert all(t.done() for t in ts)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_progress_enabled_draws_a_text_bar(fresh, capsys):
    f = gpuctx.gpu_task(model="m")(lambda x: x)
    ts = [f(i) for i in range(5)]
    gpuctx.wait(ts, progress=True, timeout=TIMEOUT)
    assert "5/5" in capsys.readouterr().err
