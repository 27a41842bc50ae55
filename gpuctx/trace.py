"""The event log: what happened when, kept in a bounded ring buffer, and what it adds up to.

The scheduler calls ``Trace.record`` (under its lock) for every submit, start, end,
group start, load, unload, offload, restore, eviction decision (with its reason),
keep-alive unload and OOM retry. The ring buffer keeps the last ``capacity`` events for
``timeline`` and ``export_chrome``; ``Stats`` is fed by the same call and
stays complete when old events fall out of the buffer. Nothing here imports matplotlib
or tqdm until a figure or a bar is asked for.
"""

from __future__ import annotations

import html
import json
import threading
import time
from collections import deque
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable

__all__ = ["Event", "Trace", "Stats", "StatsReport", "timeline", "row_labels", "export_chrome", "progress",
           "LoadBars"]

_SAMPLES = 10_000   # per-model wait/run samples kept for percentiles
_RESIDENCY = frozenset(("load_start", "load_end", "restore", "unload", "offload", "evict", "oom_retry"))
_RESIDENCY_KEPT = 64   # residency events kept apart from the ring buffer (a task burst cannot push them out)


@dataclass(slots=True)   # not frozen: a frozen __init__ costs ~2 µs per event on the hot path
class Event:
    """One thing that happened; unused fields are None."""

    t: float
    kind: str
    task: int | None = None
    name: str | None = None
    model: str | None = None
    context: str | None = None
    stream: str | None = None
    nbytes: int | None = None
    reason: str | None = None
    vram: int | None = None
    duration: float | None = None


def _fields(e: Event) -> tuple:
    return (e.t, e.kind, e.task, e.name, e.model, e.context, e.stream, e.nbytes, e.reason, e.vram, e.duration)


def _copy(items: Any, newest: int | None = None) -> list:
    """A consistent list of ``items`` (a deque, or a dict's items) while other threads append.

    Recording takes no lock (it is one deque append per task event), so a reader must not
    run Python code while it walks the live container: another thread could append between
    two items ("deque mutated during iteration", "dictionary changed size"). ``list()`` of a
    deque or of dict items runs in C without releasing the GIL, so it is one atomic copy;
    the retry covers interpreters where it is not (a free-threaded build, or a collection
    that runs a finaliser mid-copy). Everything else works on the copy. With ``newest``, only
    the ``newest`` last items of a deque, newest first.
    """
    while True:
        try:
            return list(items) if newest is None else list(islice(reversed(items), newest))
        except RuntimeError:   # mutated during the copy: take it again
            continue


def _pct(values: Iterable[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return 0.0
    k = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[k]


class _ModelStats:
    __slots__ = ("loads", "unloads", "offloads", "restores", "evictions", "load_seconds", "offload_seconds",
                 "restore_seconds", "tasks", "failed", "waits", "runs", "working_peak", "working_measured")

    def __init__(self) -> None:
        self.loads = self.unloads = self.offloads = self.restores = self.evictions = 0
        self.load_seconds = self.offload_seconds = self.restore_seconds = 0.0
        self.tasks = self.failed = 0
        self.working_peak = self.working_measured = 0   # bytes: the most charged / measured for one task
        self.waits: deque = deque(maxlen=_SAMPLES)
        self.runs: deque = deque(maxlen=_SAMPLES)


class StatsReport(dict):
    """``Stats.as_dict()``: a plain dict that also shows as a table in notebooks."""

    def to_text(self) -> str:
        """A readable table."""
        lines = [f"tasks {self['tasks']} ({self['failed']} failed), model switches {self['model_switches']}, "
                 f"peak VRAM {self['peak_vram'] / 1e9:.2f} GB" + (f" of {self['budget'] / 1e9:.2f} GB" if self['budget'] else "")
                 + (f", evictions for other kernels {self['evictions_for_others']}" if self.get('evictions_for_others') else "")]
        working = self._has_working()
        lines.append(f"{'model':<14}{'loads':>6}{'unloads':>8}{'offl':>6}{'rest':>6}{'load s':>8}{'tasks':>7}"
                     f"{'wait p50':>10}{'wait p95':>10}{'run p50':>9}" + (f"{'working':>10}" if working else ""))
        for name, m in self["models"].items():
            lines.append(f"{name:<14}{m['loads']:>6}{m['unloads']:>8}{m['offloads']:>6}{m['restores']:>6}"
                         f"{m['load_seconds']:>8.2f}{m['tasks']:>7}{m['wait_p50'] * 1e3:>8.1f}ms"
                         f"{m['wait_p95'] * 1e3:>8.1f}ms{m['run_p50'] * 1e3:>7.1f}ms"
                         + (f"{m.get('working_peak', 0) / 1e9:>8.2f}GB" if working else ""))
        return "\n".join(lines)

    def _has_working(self) -> bool:
        """Whether any model was charged working memory (its column is shown only then)."""
        return any(m.get("working_peak") or m.get("working_measured") for m in self["models"].values())

    def __str__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        cols = ("model", "loads", "unloads", "offloads", "restores", "load s", "tasks", "failed",
                "wait p50", "wait p95", "wait max", "run p50", "run p95", "run max")
        working = self._has_working()
        cols += ("working peak",) if working else ()
        ms = lambda v: f"{v * 1e3:.1f} ms"  # noqa: E731
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                name, m["loads"], m["unloads"], m["offloads"], m["restores"], f"{m['load_seconds']:.2f}", m["tasks"],
                m["failed"], ms(m["wait_p50"]), ms(m["wait_p95"]), ms(m["wait_max"]), ms(m["run_p50"]),
                ms(m["run_p95"]), ms(m["run_max"])) + ((f"{m.get('working_peak', 0) / 1e9:.2f} GB",) if working else ()))
            + "</tr>"
            for name, m in self["models"].items()
        )
        head = (f"<div>tasks {self['tasks']} ({self['failed']} failed), model switches {self['model_switches']}, "
                f"peak VRAM {self['peak_vram'] / 1e9:.2f} GB</div>")
        return head + f"<table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{rows}</table>"


class Stats:
    """Running totals fed by ``Trace.record``; ``as_dict()`` gives a ``StatsReport``."""

    def __init__(self) -> None:
        self.models: dict[str, _ModelStats] = {}
        self.tasks = self.failed = self.model_switches = 0
        self.evictions_for_others = 0   # evictions another kernel of the share asked for
        self.peak_vram = 0
        self.budget: int | None = None
        self._submitted: dict[int, float] = {}
        self._started: dict[int, float] = {}
        self._last_group: str | None = None
        # The last loads, restores and evictions: a task burst fills the ring buffer with task
        # events, and a view of "the last evictions" must not scan it or lose them to it.
        self.residency: deque = deque(maxlen=_RESIDENCY_KEPT)
        # Overlap of task runs: the runs of the current busy period (from the first start after
        # nothing ran to the next time nothing runs), folded into the totals when it ends.
        self._open = 0
        self._period: list[tuple[float, float, str | None]] = []
        self.run_seconds = self.busy_seconds = self.overlap_seconds = 0.0
        self._cut = float("-inf")   # the latest end of the runs folded so far
        self._solo: dict[str | None, list] = {}   # model -> [seconds, runs] of runs with nothing else running
        self._runs: dict[str | None, int] = {}    # model -> runs counted in busy_seconds
        self._apparent: dict[str | None, float] = {}   # model -> their seconds, as they looked

    def _run_ended(self, started: float, ended: float, model: str | None = None) -> None:
        self._open -= 1
        if self._open <= 0 and not self._period:   # a run alone (the serial case): _fold's result, without its sweep
            self._open = 0
            run = ended - started
            if ended > self._cut:
                self.busy_seconds += ended - (started if started > self._cut else self._cut)
                self._cut = ended
            self.run_seconds += run
            self._count_run(model, run, alone=True)
            return
        self._period.append((started, ended, model))
        if self._open <= 0 or len(self._period) >= 64:   # a long busy period is folded in pieces
            self._fold()

    def _fold(self) -> None:
        """Add the buffered runs to the totals: their sum, their union and the time >1 ran."""
        runs, self._period = self._period, []
        self._open = max(self._open, 0)
        if not runs:
            return
        # Time before the last fold's latest end was counted by that fold (a run still going
        # then, and not covered by it, loses that part: the cost of folding in pieces).
        cut = self._cut
        edges = sorted([(max(a, cut), 1) for a, b, _ in runs if b > cut] + [(b, -1) for a, b, _ in runs if b > cut])
        self._cut = max(cut, max(b for _, b, _ in runs))
        depth, last = 0, edges[0][0] if edges else 0.0
        for t, step in edges:
            if depth >= 1:
                self.busy_seconds += t - last
            if depth >= 2:
                self.overlap_seconds += t - last
            depth, last = depth + step, t
        self.run_seconds += sum(b - a for a, b, _ in runs)
        runs.sort()
        reach = float("-inf")   # the latest end among the runs that started earlier
        for i, (a, b, model) in enumerate(runs):
            nxt = runs[i + 1][0] if i + 1 < len(runs) else float("inf")
            self._count_run(model, b - a, alone=a >= reach and b <= nxt)   # alone: nothing else ran meanwhile
            reach = max(reach, b)

    def _count_run(self, model: str | None, seconds: float, alone: bool) -> None:
        """Count one run of ``model`` in the per-model totals; ``alone``: its time alone too."""
        if alone:
            solo = self._solo.setdefault(model, [0.0, 0])
            solo[0] += seconds
            solo[1] += 1
        self._runs[model] = self._runs.get(model, 0) + 1
        self._apparent[model] = self._apparent.get(model, 0.0) + seconds

    def overlap(self) -> dict[str, float]:
        """How much task runs really overlapped, measured.

        ``run_seconds`` (runs summed), ``busy_seconds`` (time with at least one running),
        ``overlap_seconds`` (time with more than one); ``concurrency`` = run / busy, as it looks
        from outside the bodies; ``effective_concurrency`` = the runs' time *alone* (each model's
        mean run when nothing else ran, times its runs) / busy: about 1.0 when runs that look
        concurrent were serialised underneath (one GPU queueing the kernels), more when they
        really overlapped. 1.0 until something ran."""
        self._fold_if_idle()
        busy = self.busy_seconds
        real = self.real_concurrency()
        effective = real if real is not None else (self.run_seconds / busy if busy > 0 else 1.0)
        return {"run_seconds": self.run_seconds, "busy_seconds": busy, "overlap_seconds": self.overlap_seconds,
                "concurrency": self.run_seconds / busy if busy > 0 else 1.0,
                "effective_concurrency": effective}

    def real_concurrency(self) -> float | None:
        """``effective_concurrency`` once runs have looked concurrent (``concurrency`` >= 1.2), else
        None (nothing to tell yet); cheap: from the totals folded so far (no sweep)."""
        busy = self.busy_seconds
        if busy <= 0 or self.run_seconds < 1.2 * busy:
            return None
        share = sum(self._apparent[m] for m in self._runs if m in self._solo)
        if share <= 0:
            return None
        alone = sum(n * self._solo[m][0] / self._solo[m][1] for m, n in self._runs.items() if m in self._solo)
        return alone * self.run_seconds / share / busy

    def _fold_if_idle(self) -> None:
        if self._open <= 0 and self._period:
            self._fold()

    def _m(self, name: str | None) -> _ModelStats:
        key = name or "?"
        m = self.models.get(key)
        if m is None:
            m = self.models[key] = _ModelStats()
        return m

    def feed(self, e: "Event | tuple") -> None:
        """Account one event (an ``Event``, or a tuple of its fields in order)."""
        t, k, task, _, model, _, _, nbytes, reason, vram, duration = e if isinstance(e, tuple) else _fields(e)
        if vram is not None and vram > self.peak_vram:
            self.peak_vram = vram
        if k in _RESIDENCY:
            self.residency.append(e if isinstance(e, tuple) else _fields(e))
        if k == "submit":
            self._submitted[task] = t
        elif k == "start":
            self._started[task] = t
        elif k == "end":
            self.task_ended(model, self._submitted.pop(task, None), self._started.pop(task, None), t, reason)
        elif k == "group_start":
            if self._last_group is not None and self._last_group != model:
                self.model_switches += 1
            self._last_group = model
        elif k == "load_end":
            m = self._m(model)
            m.loads += 1
            m.load_seconds += duration or 0.0
        elif k == "unload":
            self._m(model).unloads += 1
        elif k == "offload":
            m = self._m(model)
            m.offloads += 1
            m.offload_seconds += duration or 0.0
        elif k == "restore":
            m = self._m(model)
            m.restores += 1
            m.restore_seconds += duration or 0.0
        elif k in ("evict", "keep_alive"):
            self._m(model).evictions += 1
        elif k == "working" or k == "working_measured":
            m = self._m(model)
            if k == "working":
                m.working_peak = max(m.working_peak, nbytes or 0)
            else:
                m.working_measured = max(m.working_measured, nbytes or 0)
        elif k == "share_evict":
            self.evictions_for_others += 1

    def task_ended(self, model: str | None, submitted: float | None, started: float | None, ended: float,
                   reason: str | None = None) -> None:
        """Account one task's end (``reason`` set when it failed or was cancelled)."""
        m = self.models.get(model) if model else None
        if m is None:
            m = self._m(model)
        if started is not None and submitted is not None:
            m.waits.append(started - submitted)
        if reason is not None:
            self.failed += 1
            m.failed += 1
            return
        self.tasks += 1
        m.tasks += 1
        if started is not None:
            m.runs.append(ended - started)

    def as_dict(self) -> StatsReport:
        """Totals and per-model figures (seconds for times, bytes for VRAM)."""
        models = {}
        for name, m in _copy(self.models.items()):
            waits, runs = _copy(m.waits), _copy(m.runs)
            models[name] = {
                "loads": m.loads, "unloads": m.unloads, "offloads": m.offloads, "restores": m.restores,
                "evictions": m.evictions, "load_seconds": m.load_seconds, "offload_seconds": m.offload_seconds,
                "restore_seconds": m.restore_seconds, "tasks": m.tasks, "failed": m.failed,
                "wait_p50": _pct(waits, 0.5), "wait_p95": _pct(waits, 0.95), "wait_max": max(waits, default=0.0),
                "run_p50": _pct(runs, 0.5), "run_p95": _pct(runs, 0.95), "run_max": max(runs, default=0.0),
                "working_peak": m.working_peak, "working_measured": m.working_measured,
            }
        return StatsReport(budget=self.budget, peak_vram=self.peak_vram, model_switches=self.model_switches,
                           tasks=self.tasks, failed=self.failed, evictions_for_others=self.evictions_for_others,
                           models=models, overlap=self.overlap())


class Trace:
    """Ring buffer of ``Event`` plus running ``Stats``."""

    def __init__(self, capacity: int = 100_000, clock: Callable[[], float] = time.perf_counter) -> None:
        self._events: deque = deque(maxlen=capacity)
        self._clock = clock
        self.stats = Stats()

    @property
    def capacity(self) -> int:
        """Events kept (older ones are dropped; stats stay complete)."""
        return self._events.maxlen or 0

    def resize(self, capacity: int) -> None:
        """Keep the last ``capacity`` events from now on."""
        self._events = deque(self._events, maxlen=capacity)

    @property
    def budget(self) -> int | None:
        """The scheduler's budget (for plots)."""
        return self.stats.budget

    @budget.setter
    def budget(self, value: int | None) -> None:
        self.stats.budget = value

    def record(self, kind: str, *, task: int | None = None, name: str | None = None, model: str | None = None,
               context: str | None = None, stream: str | None = None, nbytes: int | None = None,
               reason: str | None = None, vram: int | None = None, duration: float | None = None,
               t: float | None = None) -> None:
        """Append one event (``t`` defaults to now)."""
        # Kept as a plain tuple: the collector stops tracking tuples of plain values, so a full
        # ring buffer costs the garbage collector nothing (Event objects it would scan forever).
        e = (self._clock() if t is None else t, kind, task, name, model, context, stream, nbytes, reason, vram, duration)
        self._events.append(e)
        self.stats.feed(e)

    # -- the scheduler's hot path: one positional append per task event; the task's stats are
    # -- accounted once, at its end, from the times the task carries (no per-event lookups).
    def submitted(self, task: Any) -> None:
        """``task`` was submitted (at ``task.submitted_at``)."""
        self._events.append((task.submitted_at, "submit", task.id, task.name, task.model,
                             None, None, None, None, None, None))

    def started(self, task: Any, context: str) -> None:
        """``task`` started (at ``task.started_at``) on ``context``'s stream."""
        self._events.append((task.started_at, "start", task.id, task.name, task.model,
                             context, context, None, None, None, None))
        self.stats._open += 1

    def ended(self, task: Any, vram: int | None = None, reason: str | None = None) -> None:
        """``task`` ended (at ``task.ended_at``); ``reason`` is "failed" or "cancelled" unless it succeeded."""
        t = task.ended_at
        self._events.append((t, "end", task.id, task.name, task.model, task.model, None, None, reason, vram, None))
        stats = self.stats
        if vram is not None and vram > stats.peak_vram:
            stats.peak_vram = vram
        stats.task_ended(task.model, task.submitted_at, task.started_at, t, reason)
        if task.started_at is not None:
            stats._run_ended(task.started_at, t, task.model)

    def now(self) -> float:
        """The time now on the trace's clock (the scheduler's: real or virtual seconds)."""
        return self._clock()

    def since(self, t0: float) -> list[Event]:
        """The kept events recorded at ``t0`` or later, oldest first.

        Only the tail is copied and turned into ``Event`` objects (the walk of :meth:`tail`,
        from the newest), so a view that refreshes a few times a second costs the length of its
        window, not of the whole buffer. Events are appended in time order except lock-free
        submits (recorded a moment late with the time of the call), so the walk back stops at
        the first event older than ``t0`` by more than a second.
        """
        return [Event(*e) for e in self.tail(None, t0)[0]]

    def tail(self, mark: tuple | None, since: float) -> tuple[list[tuple], tuple | None, bool]:
        """The kept events appended after ``mark``, for a view that follows the trace.

        The cost is the number of new events (the walk starts at the newest), not the buffer's
        length, so a view refreshed a few times a second never re-reads a whole burst.

        Args:
            mark: the mark a previous call returned (None the first time).
            since: the oldest time wanted when the events cannot follow on from ``mark``.

        Returns:
            ``(events, mark, continued)``: ``events`` as raw tuples (``Event``'s fields in order;
            ``Event(*e)`` makes one), oldest first, and the mark to pass next time. ``continued``
            is True when the events follow on from ``mark``; False when there was no mark, or it
            is no longer kept (more than ``capacity`` events since, a ``resize``, a ``clear``), or
            the walk back reached events older than ``since`` first: then ``events`` are those
            recorded at ``since`` or later, as :meth:`since` picks them, and the caller starts
            again from them.
        """
        buf = self._events
        cut = since - 1.0   # lock-free submits are recorded a moment late (see since())
        k = 256
        while True:
            chunk = _copy(buf, k)   # newest first
            for i, e in enumerate(chunk):
                if e is mark:
                    return chunk[i - 1::-1] if i else [], chunk[0], True
                if e[0] < cut:
                    return [x for x in reversed(chunk[:i]) if x[0] >= since], chunk[0], False
            if len(chunk) < k:   # the whole buffer, and neither the mark nor an old event in it
                return [x for x in reversed(chunk) if x[0] >= since], chunk[0] if chunk else None, False
            k *= 8

    def residency(self) -> list[Event]:
        """The last loads, restores, evictions and OOM retries (up to 64), oldest first.

        Kept apart from the ring buffer: a burst of task events does not push them out.
        """
        return [Event(*e) for e in _copy(self.stats.residency)]

    @property
    def events(self) -> list[Event]:
        """A copy of the kept events in the order they were recorded. A call submitted without the
        scheduler lock is recorded when the scheduler takes it in, with the time of the call, so its
        ``submit`` can follow events a few microseconds younger than itself."""
        return [Event(*e) for e in _copy(self._events)]

    def clear(self) -> None:
        """Forget events and stats."""
        budget = self.stats.budget
        self._events.clear()
        self.stats = Stats()
        self.stats.budget = budget


def _events_of(source: Trace | Iterable[Event]) -> list[Event]:
    return source.events if isinstance(source, Trace) else list(source)


# Positions of an event's fields in the raw tuples the trace keeps (Event's fields, in order).
_T, _KIND, _TASK, _NAME, _MODEL, _CTX, _STREAM, _NBYTES, _REASON, _VRAM, _DUR = range(11)
_INSTANTS = frozenset(("unload", "offload", "evict", "oom_retry", "keep_alive"))


class _Pairing:
    """Pairs a trace's events into spans, one raw event at a time: the one implementation behind
    the timeline, the Perfetto export and the dashboard (its lanes, kept between refreshes, and
    its load lines).

    ``feed`` returns what an event closes, or None:

    - ``("task", start, end)``: a task's run; ``start`` is None when its start was not fed (it
      began before the events seen);
    - ``("load", model, t0, t1, kind, nbytes, duration)``: a load (``kind`` "load_end") or a
      restore ended; ``t0`` is its ``load_start``, else the end less its duration;
    - ``("instant", e)``: an unload, offload, eviction decision, OOM retry or keep-alive expiry.

    ``starts`` (task id -> start) and ``loads`` (model -> load_start) are what is still open.
    """

    __slots__ = ("starts", "loads")

    def __init__(self) -> None:
        self.starts: dict[int, tuple] = {}
        self.loads: dict[str, tuple] = {}

    def feed(self, e: tuple) -> tuple | None:
        """Account one raw event; returns the span or instant it closes (see the class)."""
        kind = e[_KIND]
        if kind == "start":
            self.starts[e[_TASK]] = e
        elif kind == "end":
            return ("task", self.starts.pop(e[_TASK], None), e)
        elif kind == "load_start":
            self.loads[e[_MODEL]] = e
        elif kind == "load_end" or kind == "restore":
            s = self.loads.pop(e[_MODEL], None)
            t0 = s[_T] if s is not None else e[_T] - (e[_DUR] or 0.0)
            return ("load", e[_MODEL], t0, e[_T], kind, e[_NBYTES] or 0, e[_DUR])
        elif kind in _INSTANTS:
            if kind == "unload" or kind == "offload":
                self.loads.pop(e[_MODEL], None)   # a failed load ends with an unload
            return ("instant", e)
        return None


def _spans(events: list[Event]) -> tuple[list, list, list, dict]:
    """(task spans, load spans, instants, vram steps per model) from events."""
    pairing = _Pairing()
    tasks, load_spans, instants = [], [], []
    vram: dict[str, list[tuple[float, int]]] = {}
    cur: dict[str, int] = {}
    for e in events:
        out = pairing.feed(_fields(e))
        if out is None:
            continue
        if out[0] == "task":
            s, end = out[1], out[2]
            if s is not None:
                tasks.append((s[_CTX] or s[_MODEL] or "?", s[_STREAM], s[_MODEL], s[_T], end[_T], s[_NAME],
                              end[_REASON]))
        elif out[0] == "load":
            _, model, t0, t1, kind, nbytes, _dur = out
            load_spans.append((model, t0, t1, kind))
            if nbytes:
                cur[model] = nbytes
                vram.setdefault(model, []).append((t1, nbytes))
        else:
            instants.append(e)
            if e.kind in ("unload", "offload") and e.model in cur:
                cur.pop(e.model)
                vram.setdefault(e.model, []).append((e.t, 0))
    return tasks, load_spans, instants, vram


def row_labels(events: Iterable[Event], rows: Iterable[str]) -> list[str]:
    """Each context's row label: its name, with its SM share where it has one (the last
    ``sm_share`` event), e.g. ``"asr · SM 0.25"`` or ``"asr · SM 0.25 (not enforced)"``."""
    shares: dict[str, str] = {}
    for e in events:
        if e.kind == "sm_share" and e.model and e.reason:
            text = e.reason.split(" (", 1)
            label = text[0].replace("sm_share ", "SM ").replace("sm_count ", "SMs ")
            if len(text) > 1 and "not enforced" in text[1]:
                label += " (not enforced)"
            shares[e.model] = label
    return [f"{r} · {shares[r]}" if r in shares else r for r in rows]


def timeline(source: Trace | Iterable[Event], *, budget: int | None = None, ax: Any = None,
             title: str | None = None) -> Any:
    """Draw the trace: one row per context (tasks coloured by model, loads hatched, evictions ▼), VRAM below.

    Args:
        source: a ``Trace`` or its events.
        budget: bytes, drawn as a dashed line on the VRAM panel (default: the trace's budget).
        ax: draw into this matplotlib Axes (the task rows only), or into a pair
            ``(tasks_ax, vram_ax)``; by default a new figure with both panels.
        title: the title of the task panel.

    Returns:
        The matplotlib Figure. A figure made here is closed for pyplot, so that Jupyter
        shows the returned figure once (not again when the cell ends); ``fig.savefig`` works.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    events = _events_of(source)
    if budget is None and isinstance(source, Trace):
        budget = source.budget
    tasks, load_spans, instants, vram = _spans(events)
    t0 = min((e.t for e in events), default=0.0)   # a lock-free submit is recorded a moment late
    t_end = max((e.t for e in events), default=0.0)
    rows = sorted({r[0] for r in tasks} | {m for m, *_ in load_spans})
    models = sorted({r[2] for r in tasks if r[2]} | {m for m, *_ in load_spans} | set(vram))
    cmap = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    colour = {m: cmap(i % cmap.N) for i, m in enumerate(models)}
    if ax is None:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 2 + 0.45 * max(1, len(rows)) + 2), sharex=True,
                                          gridspec_kw={"height_ratios": [max(1, len(rows)), 2]},
                                          layout="constrained")
        plt.close(fig)   # returned, not also shown by pyplot at the end of the cell
    elif isinstance(ax, (tuple, list)):
        top, bottom = ax
        fig = top.figure
    else:
        top, bottom, fig = ax, None, ax.figure
    index = {r: i for i, r in enumerate(rows)}
    by_row_model: dict[tuple[int, str], list] = {}
    for ctx, _stream, model, s, e, _name, _reason in tasks:
        by_row_model.setdefault((index[ctx], model), []).append((s - t0, max(e - s, 1e-9)))
    for (row, model), spans in by_row_model.items():
        top.broken_barh(spans, (row - 0.4, 0.8), facecolors=colour.get(model, "grey"))
    for model, s, e, kind in load_spans:
        if model in index:
            top.broken_barh([(s - t0, max(e - s, 1e-9))], (index[model] - 0.4, 0.8), facecolors="white",
                            edgecolors=colour.get(model, "grey"), hatch="///")
    ev_x = [(e.t - t0, index[e.model]) for e in instants if e.model in index and e.kind in ("unload", "offload")]
    if ev_x:
        top.scatter([x for x, _ in ev_x], [y + 0.45 for _, y in ev_x], marker="v", color="black", s=18, zorder=3)
    top.set_yticks(range(len(rows)))
    top.set_yticklabels(row_labels(events, rows))
    top.set_ylim(-0.6, max(0.6, len(rows) - 0.4))
    top.set_title(title or f"gpuctx timeline — {len(tasks)} tasks")
    outside = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small")
    top.legend(handles=[Patch(color=colour[m], label=m) for m in models] +
               [Patch(facecolor="white", edgecolor="black", hatch="///", label="load")], **outside)
    if bottom is None:
        return fig
    # VRAM stacked per model: step functions on a shared time grid that runs to the end of the
    # trace, so a model still resident then is drawn up to the end.
    times = sorted({t for steps in vram.values() for t, _ in steps} | ({t_end} if vram else set()))
    if times:
        xs = [t - t0 for t in times]
        stacks = []
        for m in models:
            steps, level, out, i = vram.get(m, []), 0, [], 0
            for t in times:
                while i < len(steps) and steps[i][0] <= t:
                    level = steps[i][1]
                    i += 1
                out.append(level / 1e9)
            stacks.append(out)
        bottom.stackplot(xs, stacks, step="post", colors=[colour[m] for m in models])
    if budget:
        bottom.axhline(budget / 1e9, color="black", linestyle="--", linewidth=1, label="budget")
        bottom.legend(**outside)
    bottom.set_ylabel("VRAM (GB)")
    bottom.set_xlabel("seconds")
    return fig


def export_chrome(source: Trace | Iterable[Event], path: str) -> None:
    """Write Chrome trace-event JSON (ui.perfetto.dev, chrome://tracing): tasks, loads, evictions, VRAM."""
    events = _events_of(source)
    tasks, load_spans, instants, vram = _spans(events)
    t0 = min((e.t for e in events), default=0.0)   # a lock-free submit is recorded a moment late
    us = lambda t: (t - t0) * 1e6  # noqa: E731
    tids: dict[str, int] = {}

    def tid(ctx: str) -> int:
        return tids.setdefault(ctx, len(tids) + 1)

    out: list[dict] = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "gpuctx"}}]
    for ctx, stream, model, s, e, name, reason in tasks:
        out.append({"ph": "X", "pid": 1, "tid": tid(ctx), "name": name or "task", "cat": "task", "ts": us(s),
                    "dur": (e - s) * 1e6, "args": {"model": model, "stream": stream, "status": reason or "done"}})
    for model, s, e, kind in load_spans:
        out.append({"ph": "X", "pid": 1, "tid": tid(model), "name": "restore" if kind == "restore" else "load",
                    "cat": "model", "ts": us(s), "dur": (e - s) * 1e6, "args": {"model": model}})
    for e in instants:
        out.append({"ph": "i", "s": "t", "pid": 1, "tid": tid(e.model or "?"), "name": e.kind, "cat": "memory",
                    "ts": us(e.t), "args": {"model": e.model, "bytes": e.nbytes, "reason": e.reason}})
    for model, steps in vram.items():
        for t, nbytes in steps:
            out.append({"ph": "C", "pid": 1, "name": "VRAM", "ts": us(t), "args": {model: nbytes}})
    for (ctx, n), label in zip(tids.items(), row_labels(events, tids)):
        out.append({"ph": "M", "pid": 1, "tid": n, "name": "thread_name", "args": {"name": f"{label} (stream {ctx})"}})
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"traceEvents": out, "displayTimeUnit": "ms"}, fh)


def progress(futures: Iterable[Any], *, enabled: bool = True, desc: str = "gpuctx", timeout: float | None = None) -> None:
    """Wait for ``futures`` with a tqdm bar (a widget in notebooks); silent when ``enabled`` is False."""
    from concurrent.futures import as_completed, wait

    items = list(futures)
    if not enabled:
        wait(items, timeout=timeout)
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        wait(items, timeout=timeout)
        return
    with tqdm(total=len(items), desc=desc) as bar:
        try:
            for _ in as_completed(items, timeout=timeout):
                bar.update(1)
        except FutureTimeout:   # not the builtin TimeoutError before Python 3.11
            pass


class LoadBars:
    """A residency listener (``Scheduler.on_residency``): one tqdm bar per load or restore, in bytes.

    The engine reports a load's size when it starts and its bytes and seconds when it ends, not
    the bytes in between (a loader is the user's code), so the bar fills at the end and its rate
    is the load's GB/s. Called on the loading thread, never under the engine's lock; nothing is
    drawn while ``enabled()`` is False or tqdm is missing.
    """

    def __init__(self, enabled: Callable[[], bool]) -> None:
        self._enabled = enabled
        self._bars: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, phase: str, kind: str, model: str, nbytes: int, seconds: float | None) -> None:
        if phase == "start":
            if not self._enabled():
                return
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            bar = tqdm(total=nbytes or None, unit="B", unit_scale=True, unit_divisor=1000,
                       desc=f"gpuctx {kind} {model}", leave=False)
            with self._lock:
                old, self._bars[model] = self._bars.get(model), bar
            if old is not None:
                old.close()
            return
        with self._lock:
            bar = self._bars.pop(model, None)
        if bar is None:
            return
        if phase == "end":
            bar.total = max(bar.total or 0, nbytes)
            bar.update(nbytes - bar.n)
        else:
            bar.set_postfix_str("failed")
        bar.close()
