"""The dashboard's timeline kept between refreshes (gpuctx._lanes): what it draws, that each refresh
reads only the trace's new events, and that it draws what a reading from scratch draws."""

from __future__ import annotations

import random

import pytest

from gpuctx._lanes import Follower, Lanes
from gpuctx.trace import Trace, _spans


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_runs_loads_and_evictions_land_in_the_cells_of_their_time():
    trace = Trace(clock=Clock())
    trace.record("load_start", model="m", context="m", nbytes=5, t=0.5)
    trace.record("load_end", model="m", context="m", nbytes=5, duration=1.0, t=1.5)
    trace.record("start", task=1, model="m", context="m", t=1.6)
    trace.record("end", task=1, model="m", t=4.2)
    trace.record("start", task=2, model="x", context="ctx", t=9.0)   # still running: drawn up to now
    trace.record("unload", model="m", reason="room", t=6.0)
    f = Follower(trace, window=12.0, columns=12)
    rows = dict(f.rows(11.5, {"m": 0}))
    load, run, evict = ("load", "m"), ("run", "m"), ("evict", "m")
    assert rows["m"] == (load, load, run, run, run, None, evict, None, None, None, None, None)
    assert rows["ctx"] == (None,) * 9 + (("run", "x"),) * 3
    assert list(rows) == ["m", "ctx"]
    # 10 s later the window has moved: the old cells went, the running task goes on
    rows = dict(f.rows(21.5))
    assert "m" not in rows and rows["ctx"] == (("run", "x"),) * 12
    trace.record("end", task=2, model="x", t=22.0)
    assert dict(f.rows(22.5))["ctx"] == (("run", "x"),) * 12
    assert f.fed == 7


def test_a_refresh_reads_only_the_events_recorded_since_the_last():
    clock = Clock()
    trace = Trace(clock=clock)
    f = Follower(trace, window=30.0)
    n = 0
    for burst in (1, 500, 0, 3000, 7):
        for i in range(burst):
            clock.t += 0.001
            trace.record("start", task=n, model="m", context="m")
            trace.record("end", task=n, model="m")
            n += 1
        f.rows(clock.t)
        assert f.fed == 2 * n            # every event read once, none twice
    events, mark, continued = trace.tail(trace._events[-1], clock.t - 30)
    assert events == [] and continued and mark is trace._events[-1]


def test_tail_continues_from_its_mark_and_starts_again_when_the_mark_is_gone():
    clock = Clock()
    trace = Trace(capacity=50, clock=clock)
    for i in range(10):
        trace.record("submit", task=i, t=float(i))
    first, mark, continued = trace.tail(None, 5.0)
    assert [e[0] for e in first] == [5.0, 6.0, 7.0, 8.0, 9.0] and not continued
    trace.record("submit", task=10, t=10.0)
    new, mark, continued = trace.tail(mark, 5.0)
    assert [e[2] for e in new] == [10] and continued
    for i in range(11, 80):               # more than the capacity: the mark falls out
        trace.record("submit", task=i, t=float(i))
    new, mark, continued = trace.tail(mark, 70.0)
    assert not continued and [e[2] for e in new] == list(range(70, 80))
    trace.clear()
    trace.record("submit", task=99, t=100.0)
    new, _, continued = trace.tail(mark, 90.0)
    assert not continued and [e[2] for e in new] == [99]


def _workload(trace: Trace, clock: Clock, rng: random.Random, window: float, refresh):
    """Tasks on three contexts, loads and evictions, in time order, with refreshes at random moments.

    Tasks and loads last at most a third of the window, and only tasks that never started fail:
    a task or load that began before the window and is still open (or failed) is drawn by the
    kept timeline, which saw its start, and not by a reading from scratch, which does not; the
    one way the two differ."""
    running: dict[int, tuple[str, float]] = {}
    loading: dict[str, float] = {}
    tid = 0
    for _ in range(600):
        clock.t += rng.expovariate(1 / (window / 40))
        r = rng.random()
        ctx = rng.choice("abc")
        for c, began in list(loading.items()):
            if clock.t - began > window / 3:
                trace.record("load_end", model=c, context=c, nbytes=10, duration=clock.t - loading.pop(c))
        for t, (c, end) in list(running.items()):
            if end <= clock.t:
                del running[t]
                trace.record("end", task=t, model=c)
        if r < 0.5 and len(running) < 4:
            tid += 1
            running[tid] = (ctx, clock.t + rng.uniform(0, window / 3))
            trace.record("start", task=tid, model=ctx, context=ctx)
        elif r < 0.6 and ctx not in loading:
            loading[ctx] = clock.t
            trace.record("load_start", model=ctx, context=ctx, nbytes=10)
        elif r < 0.7 and ctx in loading:
            trace.record("restore" if r < 0.65 else "load_end", model=ctx, context=ctx, nbytes=10,
                         duration=clock.t - loading.pop(ctx))
        elif r < 0.75:
            loading.pop(ctx, None)
            trace.record(rng.choice(("unload", "offload")), model=ctx, reason="room")
        elif r < 0.8:   # an end whose start is not in the trace: drawn from the edge unless it never ran
            trace.record("end", task=10_000 + tid, model=ctx, reason=rng.choice((None, "cancelled")))
        if rng.random() < 0.1:
            refresh(clock.t)


@pytest.mark.parametrize("seed", range(6))
def test_the_kept_timeline_draws_what_a_reading_from_scratch_draws(seed):
    rng = random.Random(seed)
    clock = Clock()
    window = rng.choice((5.0, 12.0, 30.0))
    trace = Trace(capacity=rng.choice((300, 100_000)), clock=clock)   # small: the mark falls out at times
    kept = Follower(trace, window, columns=40)
    checked = []

    def refresh(now: float) -> None:
        order = {"b": 0}
        assert kept.rows(now, order) == Follower(trace, window, columns=40).rows(now, order), now
        checked.append(now)

    _workload(trace, clock, rng, window, refresh)
    assert len(checked) > 20


def test_the_timeline_and_the_export_pair_events_as_before():
    clock = Clock()
    trace = Trace(clock=clock)
    trace.record("load_start", model="m", context="m", nbytes=4, t=0.0)
    trace.record("unload", model="m", reason="load failed", t=0.5)       # a failed load: no span
    trace.record("load_end", model="m", context="m", nbytes=4, duration=0.25, t=1.0)   # no start: from its duration
    trace.record("start", task=1, name="f", model="m", context="m", stream="m", t=1.0)
    trace.record("end", task=1, model="m", reason="failed", t=2.0)
    trace.record("end", task=2, model="m", t=2.5)                        # no start: not drawn
    trace.record("keep_alive", model="m", t=3.0)
    trace.record("offload", model="m", reason="idle", t=3.0)
    tasks, loads, instants, vram = _spans(trace.events)
    assert tasks == [("m", "m", "m", 1.0, 2.0, "f", "failed")]
    assert loads == [("m", 0.75, 1.0, "load_end")]
    assert [e.kind for e in instants] == ["unload", "keep_alive", "offload"]
    assert vram == {"m": [(1.0, 4), (3.0, 0)]}


def test_lanes_start_at_the_first_event_fed_for_an_end_without_its_start():
    lanes = Lanes(window=10.0, columns=10, start=4.0)
    lanes.feed([(6.5, "end", 3, "f", "m", "m", None, None, None, None, None)])
    assert lanes.rows(9.5) == [("m", (None,) * 4 + (("run", "m"),) * 3 + (None,) * 3)]
