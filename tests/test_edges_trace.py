"""Issue 14, entry 10: reading the trace while work records into it never raises.

A reader that runs Python code per item (building Event objects, per-model figures) lets
another thread record in between. These tests make that interleaving certain: the
recording is injected into the middle of the read, so each test fails on the old code
every time, without threads or sleeps.
"""

from __future__ import annotations

import json
import threading

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

import gpuctx.trace as trace_mod  # noqa: E402
from gpuctx.trace import Trace  # noqa: E402


def _filled(n: int = 50) -> Trace:
    tr = Trace()
    for i in range(n):
        tr.record("submit", task=i, model="m", t=float(i))
        tr.record("start", task=i, model="m", context="m", t=i + 0.1)
        tr.record("end", task=i, model="m", context="m", t=i + 0.5)
    return tr


def _record_during(monkeypatch, name: str, action) -> list:
    """Replace trace_mod.<name> by a wrapper that runs ``action`` once, on its 3rd call."""
    real = getattr(trace_mod, name)
    calls = []

    def wrapper(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            action()
        return real(*a, **k)

    monkeypatch.setattr(trace_mod, name, wrapper)
    return calls


def test_events_read_while_a_task_records(monkeypatch):
    tr = _filled()
    calls = _record_during(monkeypatch, "Event", lambda: tr.record("submit", task=999, model="m"))
    events = tr.events
    assert len(calls) >= 3
    assert len(events) in (150, 151)
    assert [e.kind for e in tr.events][-1] == "submit"


def test_export_and_timeline_read_while_a_task_records(monkeypatch, tmp_path):
    tr = _filled()
    _record_during(monkeypatch, "Event", lambda: tr.record("load_end", model="n", nbytes=5, duration=0.1))
    trace_mod.export_chrome(tr, str(tmp_path / "t.json"))
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    _record_during(monkeypatch, "Event", lambda: tr.record("unload", model="n"))
    fig = trace_mod.timeline(tr)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_stats_read_while_new_labels_appear(monkeypatch):
    tr = _filled()
    for name in ("a", "b", "c"):
        tr.record("load_end", model=name, nbytes=1, duration=0.1)
    new = iter(f"new{i}" for i in range(100))
    _record_during(monkeypatch, "_pct", lambda: tr.record("load_end", model=next(new), nbytes=1, duration=0.1))
    report = tr.stats.as_dict()
    assert {"m", "a", "b", "c"} <= set(report["models"])


def test_stats_read_while_samples_are_added(monkeypatch):
    tr = _filled()
    k = iter(range(1000, 2000))

    def more():
        i = next(k)
        tr.record("submit", task=i, model="m", t=0.0)
        tr.record("start", task=i, model="m", context="m", t=1.0)
        tr.record("end", task=i, model="m", context="m", t=2.0)

    _record_during(monkeypatch, "_pct", more)
    assert tr.stats.as_dict()["models"]["m"]["tasks"] >= 50


def test_reads_from_another_thread_while_recording_never_raise():
    tr = Trace(capacity=5_000)
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            tr.record("load_end", model=f"m{i % 300}", nbytes=1, duration=0.0)
            tr.record("submit", task=i, model="m")
            i += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        for _ in range(30):
            tr.events
            tr.stats.as_dict()
    finally:
        stop.set()
        t.join(10)

