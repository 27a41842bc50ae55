"""The live panel (``gpuctx.dashboard()``, ``python -m gpuctx top``): one model of what the scheduler is doing, drawn as HTML (a notebook widget) or text (a terminal).

:class:`Panel` is a frozen reading, taken only from public read-only views: ``Status.of``
(budget, models, queues, and any fields a shared budget or cluster adds to it),
``Scheduler.tasks()`` (how long the oldest waiting task has waited), and the trace
(``Trace.since`` for the rolling timeline, ``Trace.residency`` for loads, restores and
evictions, ``stats`` for totals). :func:`render_html` and :func:`render_text` are pure
functions of a Panel, so the widget and ``python -m gpuctx top`` cannot disagree.

:class:`Dashboard` is the notebook view: an ``ipywidgets.HTML`` refreshed by one background
thread every ``interval`` seconds, so the kernel stays free for other cells and a burst of
10,000 tasks costs the frontend at most one message per interval (a refresh that changes
nothing sends nothing). It stops when closed (by :meth:`Dashboard.close`, or the widget's
``close()``) and when the extension is unloaded (:func:`close_all`); ``close`` returns only
once its thread has ended, so no update follows it.

(The module is ``panel``, not ``dashboard``: importing a submodule ``gpuctx.dashboard`` would
replace the function ``gpuctx.dashboard`` with the module.) Nothing here imports ``gpuctx.api``:
the caller passes ``source``, a function returning the scheduler to read or None.
"""

from __future__ import annotations

import html
import sys
import threading
import time
import weakref
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable, Iterable

from .errors import ConfigError
from .status import Status
from .units import format_size

__all__ = ["Panel", "ModelLine", "LoadLine", "EvictionLine", "Lane", "Dashboard", "render_html", "render_text",
           "open_dashboard", "close_all", "top"]

COLUMNS = 120          # timeline cells per lane, whatever the drawing's width
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf")
_ANSI = (33, 208, 34, 160, 97, 94, 170, 244, 142, 37)      # the palette as xterm-256 colours
_GLYPHS = "#=%@*+ox&$"                                    # the palette without colour
_PEER_FIELDS = ("share", "kernels", "workers", "peers")  # what a shared budget or a cluster may add to Status
_NO_PEERS = "this kernel only (no shared budget or cluster)"


@dataclass(frozen=True)
class ModelLine:
    """One model or context: where it is, what it holds, what waits for it."""

    name: str
    state: str
    size: int
    used: int
    pinned: bool
    qos: str
    priority: int
    queued: int
    pending: int
    running: int
    oldest_wait: float | None   # seconds the longest-waiting task not yet started has waited
    colour: int                 # index into the palette


@dataclass(frozen=True)
class LoadLine:
    """A load or restore: in progress (``seconds`` so far) or ended ``ago`` seconds back."""

    model: str
    kind: str                   # "load" or "restore"
    nbytes: int
    seconds: float
    done: bool
    ago: float

    @property
    def rate(self) -> float | None:
        """Bytes per second of an ended load (None while in progress or when it took no time)."""
        return self.nbytes / self.seconds if self.done and self.seconds > 0 else None


@dataclass(frozen=True)
class EvictionLine:
    """A model unloaded or offloaded ``ago`` seconds back, and why."""

    model: str
    kind: str                   # "unload" or "offload"
    nbytes: int
    reason: str
    ago: float


@dataclass(frozen=True)
class Lane:
    """One context's row of the timeline: ``COLUMNS`` cells, oldest first; each cell is None
    (idle) or ``(what, model)`` with ``what`` "run", "load" or "evict"."""

    context: str
    cells: tuple


@dataclass(frozen=True)
class Panel:
    """Everything the dashboard shows, read at one moment."""

    device: str
    budget: int
    committed: int
    healthy: bool
    problems: tuple[str, ...]
    models: tuple[ModelLine, ...]
    live: int
    running: int
    done: int
    failed: int
    loads: tuple[LoadLine, ...]
    evictions: tuple[EvictionLine, ...]
    lanes: tuple[Lane, ...]
    window: float
    peers: tuple[str, ...] | None
    note: str = ""

    @property
    def free(self) -> int:
        """Budget minus committed."""
        return self.budget - self.committed

    @classmethod
    def empty(cls, note: str, window: float = 30.0) -> "Panel":
        """A panel with nothing but ``note`` (no scheduler running)."""
        return cls("-", 0, 0, True, (), (), 0, 0, 0, 0, (), (), (), window, None, note)

    @classmethod
    def of(cls, sched: Any, window: float = 30.0) -> "Panel":
        """Read ``sched`` now: its status, live tasks and the last ``window`` seconds of its trace."""
        st = Status.of(sched)
        trace = sched.trace
        now = trace.now()
        waiting: dict[str, float] = {}
        running: dict[str, int] = {}
        for t in sched.tasks():
            state = t.state.value
            if state == "running":
                running[t.model] = running.get(t.model, 0) + 1
            elif state in ("waiting", "queued") and t.submitted_at is not None:
                waiting[t.model] = min(waiting.get(t.model, now), t.submitted_at)
        models = tuple(
            ModelLine(m.name, m.state, m.size, m.used, m.pinned, m.qos.lower(), m.priority, m.queued, m.pending,
                      running.get(m.name, 0), (now - waiting[m.name]) if m.name in waiting else None,
                      i % len(_PALETTE))
            for i, m in enumerate(st.models))
        colour = {m.name: m.colour for m in models}
        totals = trace.stats   # the running counts only: as_dict() would sort every wait sample each refresh
        loads, evictions = _residency(trace.residency(), now)
        return cls(st.device, st.budget, st.committed, st.healthy, st.problems, models, len(st.tasks),
                   sum(running.values()), totals.tasks, totals.failed, loads, evictions,
                   _lanes(trace.since(now - window), now, window, colour), window, _peers(st))


def _residency(events: list, now: float) -> tuple[tuple[LoadLine, ...], tuple[EvictionLine, ...]]:
    """Loads in progress and the last three ended, and the last five evictions (newest first)."""
    started: dict[str, Any] = {}
    ended: list[LoadLine] = []
    evictions: list[EvictionLine] = []
    for e in events:
        if e.kind == "load_start":
            started[e.model] = e
        elif e.kind in ("load_end", "restore"):
            s = started.pop(e.model, None)
            seconds = e.duration if e.duration is not None else (e.t - s.t if s is not None else 0.0)
            ended.append(LoadLine(e.model, "restore" if e.kind == "restore" else "load", e.nbytes or 0, seconds,
                                  True, now - e.t))
        elif e.kind in ("unload", "offload"):
            started.pop(e.model, None)   # a failed load ends with an unload
            evictions.append(EvictionLine(e.model, e.kind, e.nbytes or 0, e.reason or "", now - e.t))
    going = [LoadLine(s.model, s.reason or "load", s.nbytes or 0, now - s.t, False, 0.0) for s in started.values()]
    return tuple(going + ended[-3:][::-1]), tuple(evictions[-5:][::-1])


def _lanes(events: list, now: float, window: float, colour: dict[str, int]) -> tuple[Lane, ...]:
    """The timeline's rows from the events of the window; a task or load that began before it starts at its edge."""
    t0 = now - window
    rows: dict[str, list] = {}

    def cell(t: float) -> int:
        return min(COLUMNS - 1, max(0, int((t - t0) / window * COLUMNS)))

    def paint(ctx: str, a: float, b: float, what: str, model: str) -> None:
        cells = rows.setdefault(ctx, [None] * COLUMNS)
        for i in range(cell(a), cell(b) + 1):
            if cells[i] is None or what != "run":   # loads and evictions show over a run
                cells[i] = (what, model)

    starts: dict[int, Any] = {}
    loading: dict[str, float] = {}
    for e in events:
        if e.kind == "start":
            starts[e.task] = e
        elif e.kind == "end":
            s = starts.pop(e.task, None)
            if s is not None:
                paint(s.context or e.model or "?", s.t, e.t, "run", e.model or "?")
            elif e.reason is None:   # it ran from before the window (a failed or cancelled one may never have)
                paint(e.context or e.model or "?", t0, e.t, "run", e.model or "?")
        elif e.kind == "load_start":
            loading[e.model] = e.t
        elif e.kind in ("load_end", "restore"):
            paint(e.model, loading.pop(e.model, e.t - (e.duration or 0.0)), e.t, "load", e.model)
        elif e.kind in ("unload", "offload"):
            loading.pop(e.model, None)
            paint(e.model, e.t, e.t, "evict", e.model)
    for s in starts.values():          # still running
        paint(s.context or s.model or "?", s.t, now, "run", s.model or "?")
    for model, t in loading.items():   # still loading
        paint(model, t, now, "load", model)
    order = {name: i for i, name in enumerate(colour)}
    return tuple(Lane(ctx, tuple(cells)) for ctx, cells in sorted(rows.items(), key=lambda kv: order.get(kv[0], 1 << 30)))


def _peers(st: Status) -> tuple[str, ...] | None:
    """Rows a shared budget or a cluster adds to the status (any of ``_PEER_FIELDS``), as text; None when none does."""
    if getattr(st, "share", None) is not None:   # a shared budget: one row per other kernel
        return _kernel_rows(st)
    for name in _PEER_FIELDS[1:]:
        rows = getattr(st, name, None)
        if rows is None:
            continue
        if isinstance(rows, dict):
            rows = [f"{k}: {v}" for k, v in rows.items()]
        elif is_dataclass(rows) or isinstance(rows, str):
            rows = [rows]
        return tuple(_describe(r) for r in rows)
    return None


def _kernel_rows(st: Status) -> tuple[str, ...]:
    rows = [f"share {st.share!r}: {len(st.others)} other kernel(s)"]
    for k in st.others:
        models = ", ".join(f"{m} {format_size(b)}" for m, b in k.models) or "no models"
        wait = f", waits for {format_size(k.waiting)}" if k.waiting else ""
        rows.append(f"{k.who}: {models} ({format_size(k.nbytes)}), {k.queued} queued{wait}")
    return tuple(rows)


def _describe(row: Any) -> str:
    if is_dataclass(row) and not isinstance(row, type):
        return ", ".join(f"{f.name}={getattr(row, f.name)}" for f in fields(row))
    return str(row)


def _ago(seconds: float) -> str:
    return f"{seconds:.1f} s ago"


def _load_text(x: LoadLine) -> str:
    if not x.done:
        return f"{x.kind} {x.model}: {format_size(x.nbytes)}, {x.seconds:.1f} s so far"
    rate = f", {x.rate / 1e9:.2f} GB/s" if x.rate is not None else ""
    return f"{x.kind} {x.model}: {format_size(x.nbytes)} in {x.seconds:.2f} s{rate}, {_ago(x.ago)}"


def _eviction_text(x: EvictionLine) -> str:
    return f"{_ago(x.ago)} {x.kind} {x.model} {format_size(x.nbytes)}: {x.reason or 'no reason recorded'}"


def _head_text(p: Panel) -> str:
    if p.note and not p.models and p.budget == 0:
        return f"gpuctx: {p.note}"
    head = (f"gpuctx on {p.device}: budget {format_size(p.budget)}, used {format_size(p.committed)}, "
            f"free {format_size(p.free)}\ntasks: {p.live} live, {p.running} running, {p.done} done, {p.failed} failed")
    if not p.healthy:
        head += " - UNHEALTHY: " + "; ".join(p.problems)
    return head


def _wait_text(m: ModelLine) -> str:
    return "" if m.oldest_wait is None else f"{m.oldest_wait:.1f} s"


def _runs(cells: Iterable) -> list[tuple[int, int, Any]]:
    """Runs of equal cells: (first, length, cell)."""
    out: list[tuple[int, int, Any]] = []
    for i, c in enumerate(cells):
        if out and out[-1][2] == c:
            first, n, _ = out[-1]
            out[-1] = (first, n + 1, c)
        else:
            out.append((i, 1, c))
    return out


_MODEL_COLUMNS = ("model", "state", "size", "counted", "pin", "qos", "prio", "queued", "deps", "running", "oldest")


def _model_cells(m: ModelLine) -> tuple:
    return (m.name, m.state, format_size(m.size), format_size(m.used), "pin" if m.pinned else "", m.qos, m.priority,
            m.queued, m.pending, m.running, _wait_text(m))


# --------------------------------------------------------------------------- HTML
def render_html(p: Panel) -> str:
    """The panel as one HTML fragment (inline styles and SVG: no script, no stylesheet)."""
    e = html.escape
    out = ["<div class='gpuctx-dash' style='font:12px/1.4 monospace;max-width:780px'>",
           f"<div class='gpuctx-head'><b>{e(_head_text(p)).replace(chr(10), '<br>')}</b></div>"]
    if p.budget:
        segs = "".join(
            f"<div title='{e(m.name)} {format_size(m.used)}' style='width:{100 * m.used / p.budget:.2f}%;"
            f"background:{_PALETTE[m.colour]}'></div>" for m in p.models if m.used > 0)
        out.append(f"<div class='gpuctx-bar' style='display:flex;height:14px;background:#e0e0e0;margin:4px 0'>{segs}</div>")
    if p.models:
        rows = "".join(
            "<tr>" + f"<td><span style='color:{_PALETTE[m.colour]}'>&#9632;</span> {e(m.name)}</td>"
            + "".join(f"<td>{e(str(v))}</td>" for v in _model_cells(m)[1:]) + "</tr>" for m in p.models)
        head = "".join(f"<th style='text-align:left;padding-right:8px'>{c}</th>" for c in _MODEL_COLUMNS)
        out.append(f"<table class='gpuctx-models' style='font-size:11px'><tr>{head}</tr>{rows}</table>")
    for title, items in (("loads", [_load_text(x) for x in p.loads] or ["none yet"]),
                         ("last evictions", [_eviction_text(x) for x in p.evictions] or ["none"])):
        out.append(f"<div><b>{title}</b><div style='padding-left:1em'>"
                   + "".join(f"<div>{e(i)}</div>" for i in items) + "</div></div>")
    out.append(_timeline_svg(p))
    peers = _NO_PEERS if p.peers is None else "; ".join(p.peers) or "none"
    out.append(f"<div><b>other kernels and workers</b>: {e(peers)}</div></div>")
    return "".join(out)


def _timeline_svg(p: Panel) -> str:
    label, cw, lh = 100, 5, 14
    width = label + COLUMNS * cw
    height = lh * max(1, len(p.lanes)) + 14
    colour = {m.name: _PALETTE[m.colour] for m in p.models}
    parts = [f"<div><b>last {p.window:g} s</b></div><svg class='gpuctx-timeline' viewBox='0 0 {width} {height}' "
             f"width='100%' xmlns='http://www.w3.org/2000/svg' style='background:#fafafa;max-width:{width}px'>"]
    for row, lane in enumerate(p.lanes):
        y = row * lh
        parts.append(f"<text x='2' y='{y + 11}' font-size='11'>{html.escape(lane.context[:14])}</text>")
        for first, n, c in _runs(lane.cells):
            if c is None:
                continue
            what, model = c
            fill = colour.get(model, "#999")
            x = label + first * cw
            if what == "run":
                parts.append(f"<rect x='{x}' y='{y + 2}' width='{n * cw}' height='{lh - 4}' fill='{fill}'/>")
            elif what == "load":
                parts.append(f"<rect x='{x}' y='{y + 2}' width='{n * cw}' height='{lh - 4}' fill='white' "
                             f"stroke='{fill}' stroke-dasharray='2,1'/>")
            else:
                parts.append(f"<path d='M{x} {y + 1} l{cw} 0 l{-cw / 2} {lh - 4} z' fill='black'/>")
    y = lh * max(1, len(p.lanes)) + 11
    parts.append(f"<text x='{label}' y='{y}' font-size='10'>-{p.window:g} s</text>"
                 f"<text x='{width - 24}' y='{y}' font-size='10'>now</text></svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- text
def render_text(p: Panel, width: int = 100, colour: bool = False) -> str:
    """The panel as lines of text; ``colour``: with ANSI colours (a terminal), else one glyph per model."""
    def paint(m_colour: int, text: str) -> str:
        return f"\x1b[38;5;{_ANSI[m_colour]}m{text}\x1b[0m" if colour else text

    glyph = {m.name: (paint(m.colour, "█") if colour else _GLYPHS[m.colour]) for m in p.models}
    lines = [_head_text(p)]
    if p.budget:
        bar_w = max(10, width - 2)
        bar = []
        for m in p.models:
            n = round(bar_w * m.used / p.budget)
            bar.append(glyph[m.name] * n)
        used = sum(round(bar_w * m.used / p.budget) for m in p.models)
        lines.append("[" + "".join(bar) + "." * max(0, bar_w - used) + "]")
        lines.append("  " + "  ".join(f"{glyph[m.name]} {m.name} {format_size(m.used)}" for m in p.models if m.used))
    if p.models:
        rows = [_MODEL_COLUMNS] + [tuple(str(v) for v in _model_cells(m)) for m in p.models]
        widths = [max(len(r[i]) for r in rows) for i in range(len(_MODEL_COLUMNS))]
        for r in rows:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    lines.append("loads:" + ("".join(f"\n  {_load_text(x)}" for x in p.loads) or " none yet"))
    lines.append("last evictions:" + ("".join(f"\n  {_eviction_text(x)}" for x in p.evictions) or " none"))
    lines.append(f"timeline, last {p.window:g} s (a run: the model's glyph; a load ':'; an eviction 'v'):")
    cols = max(10, min(COLUMNS, width - 18))
    for lane in p.lanes:
        cells = []
        for i in range(cols):   # downsample: a cell shows the most telling of the cells it covers
            span = lane.cells[i * COLUMNS // cols:max(i * COLUMNS // cols + 1, (i + 1) * COLUMNS // cols)]
            c = next((c for c in span if c and c[0] == "evict"), None) or next(
                (c for c in span if c and c[0] == "load"), None) or next((c for c in span if c), None)
            cells.append(" " if c is None else "v" if c[0] == "evict" else ":" if c[0] == "load"
                         else glyph.get(c[1], "?"))
        lines.append(f"  {lane.context[:14]:<14} |{''.join(cells)}|")
    lines.append("other kernels and workers: " + (_NO_PEERS if p.peers is None else "; ".join(p.peers) or "none"))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the notebook view
def _read(source: Callable[[], Any], window: float) -> Panel:
    sched = source()
    if sched is None:
        return Panel.empty("no scheduler running yet: it starts with the first model or task", window)
    return Panel.of(sched, window)


_open: "weakref.WeakSet[Dashboard]" = weakref.WeakSet()


class Dashboard:
    """A live view of the scheduler in a notebook, from [`gpuctx.dashboard`][gpuctx.dashboard].

    Shown by Jupyter as its widget. One daemon thread refreshes it every ``interval`` seconds;
    a refresh that changes nothing sends nothing to the frontend.

    Attributes:
        widget: the ``ipywidgets.HTML`` shown.
        panel: the last [`Panel`][gpuctx.panel.Panel] read.
        updates: how many times the widget's value was sent to the frontend.
        interval: seconds between refreshes.
        window: seconds of history in the timeline.
    """

    def __init__(self, source: Callable[[], Any], interval: float = 0.3, window: float = 30.0) -> None:
        import ipywidgets

        self.interval, self.window = interval, window
        self._source = source
        self._lock = threading.Lock()     # a send and close() exclude each other: nothing is sent after close
        self._stop = threading.Event()
        self._closed = False
        self.updates = 0
        self.panel = _read(self._source, window)
        self.widget = ipywidgets.HTML(value=render_html(self.panel))
        self.widget.observe(self._comm_changed, names="comm")
        self._thread = threading.Thread(target=self._run, name="gpuctx-dashboard", daemon=True)
        _open.add(self)
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the refreshing thread is alive."""
        return self._thread.is_alive()

    def refresh(self) -> bool:
        """Read the scheduler and send the panel if it changed; False when nothing was sent."""
        panel = _read(self._source, self.window)
        value = render_html(panel)
        with self._lock:
            if self._closed:
                return False
            self.panel = panel
            if value == self.widget.value:
                return False
            self.widget.value = value
            self.updates += 1
            return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - a view must not die of one bad reading; say so in place
                with self._lock:
                    if not self._closed:
                        self.widget.value = f"<pre>gpuctx dashboard: {html.escape(repr(exc))}</pre>"
                        self.updates += 1

    def close(self) -> None:
        """Stop refreshing and close the widget; returns once the thread has ended (no update follows)."""
        with self._lock:
            self._closed = True
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        _open.discard(self)
        if self.widget.comm is not None:
            self.widget.close()

    def _comm_changed(self, change: Any) -> None:
        if change["new"] is None and not self._closed:   # the widget was closed on its own
            self.close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return render_text(self.panel)


def close_all() -> int:
    """Close every open dashboard (``%unload_ext gpuctx`` calls this); returns how many were open."""
    boards = list(_open)
    for d in boards:
        d.close()
    return len(boards)


_NOTE = "gpuctx: ipywidgets is not installed (pip install 'gpuctx[notebook]'): showing the status once, not live"


def open_dashboard(source: Callable[[], Any], fallback: Callable[[], Any], interval: float = 0.3,
                   window: float = 30.0) -> Any:
    """A live [`Dashboard`][gpuctx.panel.Dashboard] of ``source()``; without ipywidgets, a one-line
    note and ``fallback()`` (the status)."""

    for arg, v in (("interval", interval), ("window", window)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"dashboard({arg}={v!r}): expected seconds > 0")
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        print(_NOTE)
        return fallback()
    return Dashboard(source, interval, window)


# --------------------------------------------------------------------------- the terminal
def top(source: Callable[[], Any], *, once: bool = False, interval: float = 1.0, window: float = 30.0, width: int | None = None,
        colour: bool | None = None, out: Any = None, frames: int | None = None) -> int:
    """Draw the panel of ``source()`` in a terminal: one frame (``once``), or redrawn every ``interval`` seconds until Ctrl-C.

    ``colour``: ANSI colours and an in-place redraw (default: when ``out`` is a terminal).
    ``frames``: stop after this many frames (None: until interrupted). Returns 0.
    """
    import shutil

    out = out or sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    colour = tty if colour is None else colour
    width = width or shutil.get_terminal_size((100, 24)).columns
    n = 0
    try:
        while True:
            frame = render_text(_read(source, window), width=width, colour=colour)
            out.write(("\x1b[H\x1b[2J" if colour and not once else "") + frame + "\n")
            out.flush()
            n += 1
            if once or (frames is not None and n >= frames):
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
