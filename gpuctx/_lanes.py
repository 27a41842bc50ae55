"""The dashboard's timeline, kept between refreshes: each refresh reads only the events new since the last.

A :class:`Lanes` paints task runs, loads and evictions into cells of a grid fixed in time
(cell ``i`` covers ``[i * width, (i + 1) * width)``, ``width = window / columns``), one row
(lane) per context or model. An event is painted once, when it is fed; a refresh then only
cuts the last ``columns`` cells of each lane and overlays what is still open (tasks running,
loads under way). So a refresh costs the events new since the last one plus ``lanes x
columns``, however many events the window holds: a 10,000-task burst is read once, not at
every refresh (bench/dashboard.py measures both).

The pairing of starts with ends is trace.py's (:class:`gpuctx.trace._Pairing`), the same the
matplotlib timeline and the Perfetto export use. :class:`Follower` ties a ``Lanes`` to a trace
through ``Trace.tail``; when the trace cannot continue from its mark (more than its capacity
since the last refresh, or it was cleared) the lanes start again from the window's events.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from .trace import _CTX, _KIND, _MODEL, _REASON, _T, _Pairing

__all__ = ["COLUMNS", "Lanes", "Follower"]

COLUMNS = 120          # timeline cells per lane, whatever the drawing's width


class Lanes:
    """Timeline rows over the last ``window`` seconds, fed raw trace events oldest first.

    Args:
        window: seconds the rows cover.
        columns: cells per row.
        start: the time the events fed begin at: a task that ends with no start fed ran from
            before it, and is drawn from there (or from the window's edge, whichever is later).
    """

    def __init__(self, window: float, columns: int = COLUMNS, start: float = float("-inf")) -> None:
        self.window, self.columns = window, columns
        self.width = window / columns
        self.pairing = _Pairing()
        self.fed = 0                               # events fed so far (the bench reads it)
        self._cells: dict[str, dict[int, tuple]] = {}   # lane -> cell index -> (what, model)
        self._start = start
        self._latest = start                       # the newest time seen (fed, or asked for)

    def _index(self, t: float) -> int:
        return math.floor(t / self.width)

    def _paint(self, cells: dict[int, tuple], a: float, b: float, what: str, model: str) -> None:
        first = self._index(max(a, self._latest - self.window))   # nothing before the window
        for i in range(first, self._index(b) + 1):
            if what != "run" or i not in cells:   # loads and evictions show over a run
                cells[i] = (what, model)

    def feed(self, events: Iterable[tuple]) -> None:
        """Paint what ``events`` (raw tuples, oldest first) close."""
        pairing, lanes = self.pairing, self._cells
        n = 0
        for e in events:
            n += 1
            if e[_T] > self._latest:
                self._latest = e[_T]
            out = pairing.feed(e)
            if out is None:
                continue
            tag = out[0]
            if tag == "task":
                s, end = out[1], out[2]
                model = end[_MODEL] or "?"
                if s is not None:
                    lane = s[_CTX] or model
                    self._paint(lanes.setdefault(lane, {}), s[_T], end[_T], "run", model)
                elif end[_REASON] is None and self._start < end[_T]:
                    # it ran from before the events fed (a failed or cancelled one may never have run)
                    self._paint(lanes.setdefault(end[_CTX] or model, {}), self._start, end[_T], "run", model)
            elif tag == "load":
                model = out[1]
                self._paint(lanes.setdefault(model, {}), out[2], out[3], "load", model)
            else:
                e = out[1]
                if e[_KIND] in ("unload", "offload"):
                    self._paint(lanes.setdefault(e[_MODEL], {}), e[_T], e[_T], "evict", e[_MODEL])
        self.fed += n

    def rows(self, now: float, order: dict[str, int] | None = None) -> list[tuple[str, tuple]]:
        """``(lane, cells)`` for the window ending at ``now``: ``columns`` cells, oldest first, each None
        (idle) or ``(what, model)`` with ``what`` "run", "load" or "evict". Lanes with nothing in
        the window are left out; the rest come in ``order`` (lane -> rank), then by name."""
        self._latest = max(self._latest, now)
        last = self._index(now)
        first = last - self.columns + 1
        open_runs: dict[str, list] = {}
        for s in self.pairing.starts.values():    # still running: up to now
            open_runs.setdefault(s[_CTX] or s[_MODEL] or "?", []).append(s)
        open_loads = {m: s for m, s in self.pairing.loads.items()}
        out = []
        for lane in set(self._cells) | set(open_runs) | set(open_loads):
            cells = self._cells.get(lane)
            if cells is not None:
                for i in [i for i in cells if i < first]:   # older than the window: forget it
                    del cells[i]
                if not cells:
                    del self._cells[lane]
            row = dict(cells or {})
            for s in open_runs.get(lane, ()):
                self._paint(row, s[_T], now, "run", s[_MODEL] or "?")
            if lane in open_loads:
                self._paint(row, open_loads[lane][_T], now, "load", lane)
            if row:
                out.append((lane, tuple(row.get(i) for i in range(first, last + 1))))
        rank = order or {}
        out.sort(key=lambda r: (rank.get(r[0], len(rank)), r[0]))
        return out


class Follower:
    """The timeline rows of one trace, read incrementally (``Trace.tail``) at each :meth:`rows`."""

    def __init__(self, trace: Any, window: float, columns: int = COLUMNS) -> None:
        self.trace, self.window, self.columns = trace, window, columns
        self.lanes: Lanes | None = None
        self.fed = 0          # events read from the trace, every restart included
        self._mark: tuple | None = None

    def rows(self, now: float, order: dict[str, int] | None = None) -> list[tuple[str, tuple]]:
        """Read the events new since the last call and return ``Lanes.rows(now, order)``."""
        since = now - self.window
        events, self._mark, continued = self.trace.tail(self._mark, since)
        if not continued or self.lanes is None:   # start again from the window's events
            self.lanes = Lanes(self.window, self.columns, start=since)
        self.lanes.feed(events)
        self.fed += len(events)
        return self.lanes.rows(now, order)
