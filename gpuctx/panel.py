"""The live panel (``gpuctx.dashboard()``, ``python -m gpuctx top``): one model of what the scheduler is doing, drawn as HTML (a notebook widget) or text (a terminal).

:class:`Panel` is a frozen reading, taken only from public read-only views: ``Status.of``
(budget, models, queues, the other kernels of a share), ``Scheduler.tasks()`` (how long the
oldest waiting task has waited), and the trace (``Trace.tail`` for the rolling timeline,
``Trace.residency`` for loads, restores and evictions, ``stats`` for totals). It has three
scopes:

- ``"kernel"``: this process's scheduler;
- ``"cluster"``: a Ray cluster's driver (``configure(cluster="ray")``): a row per worker, and
  the models, loads, evictions and timeline lanes of every worker, named ``worker/model``. Each
  worker reads its own panel (:meth:`gpuctx.cluster._worker.GpuWorker.panel`, incrementally,
  like here) and the driver asks for it without blocking (``ClusterScheduler.observe``: one
  request in flight per worker, waited for a bounded time; a late answer serves the next refresh);
- ``"share"``: a share's database read without joining it (``top --share NAME``,
  :mod:`gpuctx.share._reader`): its kernels, what each holds and is charged, requests, evictions asked.

:func:`render_html` and :func:`render_text` are pure functions of a Panel, so the widget and
``python -m gpuctx top`` cannot disagree.

The timeline is kept between refreshes (:mod:`gpuctx._lanes`): a refresh reads only the trace
events new since the last one, so its cost does not grow with the events in the window. A
one-off :meth:`Panel.of` reads the window once.

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
import itertools
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from ._lanes import COLUMNS, Follower
from .errors import ConfigError
from .status import Status, WorkerRow
from .trace import _KIND, _MODEL, _NBYTES, _REASON, _T, _fields, _Pairing
from .units import format_size

if TYPE_CHECKING:  # pragma: no cover
    from .share._reader import ShareReading

__all__ = ["Panel", "ModelLine", "LoadLine", "EvictionLine", "Lane", "Dashboard", "render_html", "render_text",
           "open_dashboard", "close_all", "top", "PanelReader", "COLUMNS"]

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf")
_ANSI = (33, 208, 34, 160, 97, 94, 170, 244, 142, 37)      # the palette as xterm-256 colours
_GLYPHS = "#=%@*+ox&$"                                    # the palette without colour
_NO_PEERS = "this kernel only (no shared budget or cluster)"
_ACTIVE = ("resident", "loading")                         # slot states that hold a worker's memory


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
    """A model unloaded or offloaded ``ago`` seconds back, and why (in a share's view: an eviction
    asked of a kernel, ``kind`` "asked", not yet carried out)."""

    model: str
    kind: str                   # "unload", "offload" or "asked"
    nbytes: int
    reason: str
    ago: float


@dataclass(frozen=True)
class Lane:
    """One context's row of the timeline: ``COLUMNS`` cells, oldest first; each cell is None
    (idle) or ``(what, model)`` with ``what`` "run", "load" or "evict". On a cluster the
    context and model are named ``worker/model``: a lane per worker and model."""

    context: str
    cells: tuple


@dataclass(frozen=True)
class Panel:
    """Everything the dashboard shows, read at one moment.

    ``scope`` is "kernel" (this process's scheduler), "cluster" (``workers`` has a row per
    worker; models, loads, evictions and lanes are every worker's, named ``worker/model``) or
    "share" (``share`` is the database's reading; no timeline).
    """

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
    scope: str = "kernel"
    workers: tuple[WorkerRow, ...] = ()
    share: "ShareReading | None" = None

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
        """Read ``sched`` now: its status, live tasks and the last ``window`` seconds of its trace
        (a one-off reading: the window's events are read once; a Dashboard keeps its timeline
        between refreshes and reads only new events). On a cluster's driver, waits up to 5 s for
        the workers' panels."""
        return PanelReader(lambda: sched, window, patience=5.0).read()

    @classmethod
    def of_share(cls, reading: "ShareReading", window: float = 30.0) -> "Panel":
        """The panel of a share's database (``gpuctx.share._reader.read_share``): its kernels, their
        charges, the requests waiting and the evictions asked; a kernel whose process is gone is
        a problem (its rows stay until another kernel reaps them)."""
        problems = tuple(f"{k.who}: process {k.pid} is gone (heartbeat {k.heartbeat_age:.1f} s ago); its rows "
                         "stay until a kernel of the share reaps them" for k in reading.kernels if not k.alive)
        asked = tuple(EvictionLine(f"{e.kernel}/{e.model}", "asked", e.nbytes, f"for {e.requester}'s {e.for_model!r}",
                                   e.age) for e in reading.evictions)
        return cls(f"share {reading.name!r}", reading.room, reading.charged, not problems, problems, (),
                   sum(k.queued for k in reading.kernels), sum(c.busy for k in reading.kernels for c in k.charges),
                   0, 0, (), asked, (), window, None, scope="share", share=reading)


def _local(sched: Any, window: float, follower: Follower) -> Panel:
    """This process's scheduler's panel, its timeline from ``follower`` (new events only)."""
    trace = sched.trace
    # The ended counts before the status: a task counted ended has left the live tasks by the
    # time the status lists them, so a panel never shows every task done with some still live.
    done, failed = trace.stats.tasks, trace.stats.failed
    st = Status.of(sched)
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
    loads, evictions = _residency(trace.residency(), now)
    order = {m.name: i for i, m in enumerate(models)}
    lanes = tuple(Lane(ctx, cells) for ctx, cells in follower.rows(now, order))
    return Panel(st.device, st.budget, st.committed, st.healthy, st.problems, models, len(st.tasks),
                 sum(running.values()), done, failed, loads, evictions, lanes, window,
                 _peers(st))


def _residency(events: list, now: float) -> tuple[tuple[LoadLine, ...], tuple[EvictionLine, ...]]:
    """Loads in progress and the last three ended, and the last five evictions (newest first)."""
    pairing = _Pairing()
    ended: list[LoadLine] = []
    evictions: list[EvictionLine] = []
    for e in events:
        out = pairing.feed(_fields(e))
        if out is None:
            continue
        if out[0] == "load":
            _, model, t0, t1, kind, nbytes, duration = out
            ended.append(LoadLine(model, "restore" if kind == "restore" else "load", nbytes,
                                  duration if duration is not None else t1 - t0, True, now - t1))
        elif out[0] == "instant" and out[1][_KIND] in ("unload", "offload"):
            x = out[1]
            evictions.append(EvictionLine(x[_MODEL], x[_KIND], x[_NBYTES] or 0, x[_REASON] or "", now - x[_T]))
    going = [LoadLine(s[_MODEL], s[_REASON] or "load", s[_NBYTES] or 0, now - s[_T], False, 0.0)
             for s in pairing.loads.values()]
    return tuple(going + ended[-3:][::-1]), tuple(evictions[-5:][::-1])


def _cluster(pairs: Sequence[tuple[dict, Panel | None]], live: int, window: float) -> Panel:
    """The driver's panel from a row per worker and each worker's own last panel (None before its first)."""
    colours: dict[str, int] = {}      # a model has one colour on every worker
    models: list[ModelLine] = []
    loads: list[LoadLine] = []
    evictions: list[EvictionLine] = []
    lanes: list[Lane] = []
    workers: list[WorkerRow] = []
    problems: list[str] = []
    done = failed = 0
    for row, p in pairs:
        w = row["name"]
        if not row["alive"]:
            problems.append(f"worker {w} LOST: {row['lost']}")
            workers.append(WorkerRow(**row))
            continue
        if p is None:                 # no report yet: what the driver knows
            workers.append(WorkerRow(**row))
            continue
        at = f"{w}/"                  # a lane per worker and model: "w0/whisper"
        for m in p.models:
            c = colours.setdefault(m.name, len(colours) % len(_PALETTE))
            models.append(replace(m, name=at + m.name, colour=c))
        loads += [replace(x, model=at + x.model) for x in p.loads]
        evictions += [replace(x, model=at + x.model) for x in p.evictions]
        lanes += [Lane(at + lane.context, tuple(None if c is None else (c[0], at + c[1]) for c in lane.cells))
                  for lane in p.lanes]
        problems += [f"{w}: {x}" for x in p.problems]
        done, failed = done + p.done, failed + p.failed
        resident = tuple((m.name, m.used) for m in p.models if m.state in _ACTIVE)
        workers.append(WorkerRow(**{**row, "resident": resident}))
    alive = [w for w in workers if w.alive]
    device = f"{len(alive)} of {len(workers)} workers alive ({', '.join(sorted({w.device for w in workers})) or '-'})"
    loads.sort(key=lambda x: (x.done, x.ago))
    evictions.sort(key=lambda x: x.ago)
    return Panel(device, sum(w.budget for w in alive), sum(w.used for w in alive), not problems, tuple(problems),
                 tuple(models), live, sum(w.running for w in workers), done, failed,
                 tuple([x for x in loads if not x.done] + [x for x in loads if x.done][:4]), tuple(evictions[:5]),
                 tuple(lanes), window, None, scope="cluster", workers=tuple(workers))


def _peers(st: Status) -> tuple[str, ...] | None:
    """The other kernels of this kernel's share, as text; None when it takes part in none."""
    if getattr(st, "share", None) is None:
        return None
    rows = [f"share {st.share!r}: {len(st.others)} other kernel(s)"]
    for k in st.others:
        models = ", ".join(f"{m} {format_size(b)}" for m, b in k.models) or "no models"
        wait = f", waits for {format_size(k.waiting)}" if k.waiting else ""
        rows.append(f"{k.who}: {models} ({format_size(k.nbytes)}), {k.queued} queued{wait}")
    return tuple(rows)


# --------------------------------------------------------------------------- the parts, as rows of strings
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
    if p.note and not p.models and p.budget == 0 and p.scope == "kernel":
        return f"gpuctx: {p.note}"
    money = f"budget {format_size(p.budget)}, used {format_size(p.committed)}, free {format_size(p.free)}"
    if p.scope == "share":
        r = p.share
        waiting = sum(k.waiting for k in r.kernels)
        room = "" if r.room == r.budget else f" (NVML leaves {format_size(r.room)} of {format_size(r.budget)})"
        head = (f"gpuctx {p.device}, read-only: {money}{room}\nkernels: {len(r.kernels)}, {p.live} tasks queued, "
                f"{p.running} busy" + (f", waiting for {format_size(waiting)}" if waiting else ""))
    else:
        where = "cluster: " if p.scope == "cluster" else "on "
        head = (f"gpuctx {where}{p.device}: {money}\n"
                f"tasks: {p.live} live, {p.running} running, {p.done} done, {p.failed} failed")
    if not p.healthy:
        head += " - UNHEALTHY: " + "; ".join(p.problems)
    return head


def _segments(p: Panel) -> list[tuple[str, int, int]]:
    """The budget bar's parts: (label, bytes, colour), by model (a share: by kernel and model)."""
    if p.scope == "share":
        return [(f"{k.who}/{c.model}", c.nbytes, i % len(_PALETTE))
                for i, k in enumerate(p.share.kernels) for c in k.charges if c.nbytes > 0]
    return [(m.name, m.used, m.colour) for m in p.models if m.used > 0]


_MODEL_COLUMNS = ("model", "state", "size", "counted", "pin", "qos", "prio", "queued", "deps", "running", "oldest")
_WORKER_COLUMNS = ("worker", "device", "budget", "used", "resident", "queued", "running", "state")
_CHARGE_COLUMNS = ("kernel", "model", "state", "weights", "working", "base", "charged", "pin", "prio", "queued",
                   "idle")
_KERNEL_COLUMNS = ("kernel", "pid", "heartbeat", "queued", "charged", "waits for", "process")


def _tables(p: Panel) -> list[tuple[str, tuple[str, ...], list[tuple]]]:
    """The panel's tables: (title, columns, rows of cells; a row's first cell may be (text, colour))."""
    out = []
    if p.scope == "cluster":
        rows = [(w.name, w.device, format_size(w.budget), format_size(w.used),
                 ", ".join(f"{m} {format_size(n)}" for m, n in w.resident) or "-", w.queued, w.running,
                 "alive" if w.alive else f"LOST: {w.lost}") for w in p.workers]
        out.append(("workers", _WORKER_COLUMNS, rows))
    if p.models:
        rows = [((m.name, m.colour), m.state, format_size(m.size), format_size(m.used), "pin" if m.pinned else "",
                 m.qos, m.priority, m.queued, m.pending, m.running,
                 "" if m.oldest_wait is None else f"{m.oldest_wait:.1f} s") for m in p.models]
        out.append(("models", _MODEL_COLUMNS, rows))
    if p.scope == "share":
        r = p.share
        rows = [((k.who, i % len(_PALETTE)), c.model, "evict asked" if c.asked else "busy" if c.busy else "idle",
                 format_size(c.used), format_size(c.working), format_size(c.base), format_size(c.nbytes),
                 "pin" if c.pinned else "", c.priority, c.queued, "" if c.busy else f"{c.idle:.1f} s")
                for i, k in enumerate(r.kernels) for c in k.charges]
        out.append(("charges", _CHARGE_COLUMNS, rows))
        rows = [(k.who, k.pid, _ago(k.heartbeat_age), k.queued, format_size(k.nbytes),
                 format_size(k.waiting) if k.waiting else "", "alive" if k.alive else "gone") for k in r.kernels]
        out.append(("kernels", _KERNEL_COLUMNS, rows))
    return out


def _lists(p: Panel) -> list[tuple[str, list[str]]]:
    """The panel's lists: (title, lines)."""
    if p.scope == "share":
        waits = [f"{k.who} waits for {format_size(need)} for {model!r} ({age:.1f} s)"
                 for k in p.share.kernels for model, need, age in k.requests]
        return [("requests", waits or ["none"]),
                ("evictions asked", [_eviction_text(x) for x in p.evictions] or ["none"])]
    return [("loads", [_load_text(x) for x in p.loads] or ["none yet"]),
            ("last evictions", [_eviction_text(x) for x in p.evictions] or ["none"])]


def _peers_text(p: Panel) -> str | None:
    if p.scope != "kernel":
        return None
    return _NO_PEERS if p.peers is None else "; ".join(p.peers) or "none"


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


# --------------------------------------------------------------------------- HTML
def render_html(p: Panel) -> str:
    """The panel as one HTML fragment (inline styles and SVG: no script, no stylesheet)."""
    e = html.escape
    out = ["<div class='gpuctx-dash' style='font:12px/1.4 monospace;max-width:780px'>",
           f"<div class='gpuctx-head'><b>{e(_head_text(p)).replace(chr(10), '<br>')}</b></div>"]
    if p.budget:
        segs = "".join(
            f"<div title='{e(label)} {format_size(n)}' style='width:{100 * n / p.budget:.2f}%;"
            f"background:{_PALETTE[c]}'></div>" for label, n, c in _segments(p))
        out.append(f"<div class='gpuctx-bar' style='display:flex;height:14px;background:#e0e0e0;margin:4px 0'>{segs}</div>")
    for title, cols, rows in _tables(p):
        def cell(v: Any) -> str:
            if isinstance(v, tuple):
                return f"<td><span style='color:{_PALETTE[v[1]]}'>&#9632;</span> {e(str(v[0]))}</td>"
            return f"<td>{e(str(v))}</td>"
        body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
        head = "".join(f"<th style='text-align:left;padding-right:8px'>{c}</th>" for c in cols)
        out.append(f"<table class='gpuctx-{title}' style='font-size:11px'><tr>{head}</tr>{body}</table>")
    for title, items in _lists(p):
        out.append(f"<div><b>{title}</b><div style='padding-left:1em'>"
                   + "".join(f"<div>{e(i)}</div>" for i in items) + "</div></div>")
    if p.scope != "share":
        out.append(_timeline_svg(p))
    peers = _peers_text(p)
    if peers is not None:
        out.append(f"<div><b>other kernels and workers</b>: {e(peers)}</div>")
    return "".join(out) + "</div>"


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
    def glyph(c: int) -> str:
        return f"\x1b[38;5;{_ANSI[c]}m█\x1b[0m" if colour else _GLYPHS[c]

    lines = [_head_text(p)]
    if p.budget:
        bar_w = max(10, width - 2)
        segs = _segments(p)
        cells = [(round(bar_w * n / p.budget), c) for _, n, c in segs]
        lines.append("[" + "".join(glyph(c) * k for k, c in cells) + "." * max(0, bar_w - sum(k for k, _ in cells)) + "]")
        lines.append("  " + "  ".join(f"{glyph(c)} {label} {format_size(n)}" for label, n, c in segs))
    for title, cols, rows in _tables(p):
        if p.scope != "kernel":
            lines.append(f"{title}:")
        cells = [cols] + [tuple(str(v[0] if isinstance(v, tuple) else v) for v in r) for r in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
        for r in cells:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    for title, items in _lists(p):
        lines.append(f"{title}:" + ("".join(f"\n  {i}" for i in items) if items[0] not in ("none", "none yet")
                                    else f" {items[0]}"))
    if p.scope == "share":
        lines.append("timeline: none (a share's database keeps charges, not events)")
    else:
        glyphs = {m.name: glyph(m.colour) for m in p.models}
        lines.append(f"timeline, last {p.window:g} s (a run: the model's glyph; a load ':'; an eviction 'v'):")
        label = max([14] + [min(24, len(lane.context)) for lane in p.lanes])
        cols = max(10, min(COLUMNS, width - label - 4))
        for lane in p.lanes:
            cells = []
            for i in range(cols):   # downsample: a cell shows the most telling of the cells it covers
                span = lane.cells[i * COLUMNS // cols:max(i * COLUMNS // cols + 1, (i + 1) * COLUMNS // cols)]
                c = next((c for c in span if c and c[0] == "evict"), None) or next(
                    (c for c in span if c and c[0] == "load"), None) or next((c for c in span if c), None)
                cells.append(" " if c is None else "v" if c[0] == "evict" else ":" if c[0] == "load"
                             else glyphs.get(c[1], "?"))
            lines.append(f"  {lane.context[:label]:<{label}} |{''.join(cells)}|")
    peers = _peers_text(p)
    if peers is not None:
        lines.append("other kernels and workers: " + peers)
    return "\n".join(lines)


# --------------------------------------------------------------------------- reading, refresh after refresh
class PanelReader:
    """Reads the panel of whatever ``source()`` returns (a scheduler or None), keeping its timeline between reads.

    On this process's scheduler the timeline follows the trace (only new events are read). On
    a cluster's driver (a scheduler with ``observe``), each worker keeps this reader's timeline
    on its side, and the driver's ``observe`` never waits more than ``patience`` seconds for
    their answers. Not thread-safe: one reader per refreshing thread.

    Args:
        source: returns the scheduler to read (a local one or a cluster's driver), or None.
        window: seconds of history in the timeline.
        patience: on a cluster, the most seconds a reading waits for the workers' answers.

    Attributes:
        key: this reader's name on the cluster's workers (each keeps its timeline).
        follower: the timeline kept for a local scheduler (None before the first reading).
    """

    _keys = itertools.count(1)

    def __init__(self, source: Callable[[], Any], window: float, patience: float = 0.0) -> None:
        self._source, self.window, self.patience = source, window, patience
        self.key = f"{os.getpid()}-{next(self._keys)}"   # this reader's state on the cluster's workers
        self._sched: Any = None
        self.follower: Follower | None = None

    def read(self) -> Panel:
        """The panel now."""
        sched = self._source()
        if sched is None:
            self._sched = self.follower = None
            return Panel.empty("no scheduler running yet: it starts with the first model or task", self.window)
        observe = getattr(sched, "observe", None)   # a cluster's driver
        if observe is not None:
            return _cluster(observe(self.key, self.window, self.patience), len(sched.tasks()), self.window)
        if sched is not self._sched or self.follower is None:
            self._sched, self.follower = sched, Follower(sched.trace, self.window)
        return _local(sched, self.window, self.follower)


class _ShareReader:
    """Reads a share's database (read-only, never joining it) at each :meth:`read`."""

    def __init__(self, name: str, window: float) -> None:
        from .share._reader import read_share

        self._read, self.name, self.window = read_share, name, window
        read_share(name)   # ShareError now (no database, not ours, not a share), not at the first frame

    def read(self) -> Panel:
        """The share's panel now."""
        return Panel.of_share(self._read(self.name), self.window)


# --------------------------------------------------------------------------- the notebook view
_open: "weakref.WeakSet[Dashboard]" = weakref.WeakSet()


class Dashboard:
    """A live view of the scheduler in a notebook, from [`gpuctx.dashboard`][gpuctx.dashboard].

    Shown by Jupyter as its widget. One daemon thread refreshes it every ``interval`` seconds;
    a refresh that changes nothing sends nothing to the frontend. Its timeline is kept between
    refreshes (each reads only the trace events new since the last). On a cluster's driver the
    workers' panels are asked for from that thread and waited for at most ``interval`` seconds,
    so a slow worker delays nothing: its last panel is shown until its answer arrives.

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
        self._reader = PanelReader(source, window, patience=0.0)   # the first frame waits for no worker
        self._lock = threading.Lock()     # a send and close() exclude each other: nothing is sent after close
        self._reading = threading.Lock()  # one reading at a time (the thread's, or a caller's refresh())
        self._stop = threading.Event()
        self._closed = False
        self.updates = 0
        self.panel = self._reader.read()
        self._reader.patience = min(interval, 1.0)
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
        with self._reading:
            if self._closed:
                return False
            panel = self._reader.read()
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


def _check_seconds(**values: Any) -> None:
    for arg, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"dashboard({arg}={v!r}): expected seconds > 0")


def open_dashboard(source: Callable[[], Any], fallback: Callable[[], Any], interval: float = 0.3,
                   window: float = 30.0) -> Any:
    """A live [`Dashboard`][gpuctx.panel.Dashboard] of ``source()``; without ipywidgets, a one-line
    note and ``fallback()`` (the status)."""

    _check_seconds(interval=interval, window=window)
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        print(_NOTE)
        return fallback()
    return Dashboard(source, interval, window)


# --------------------------------------------------------------------------- the terminal
def top(source: Callable[[], Any], *, once: bool = False, interval: float = 1.0, window: float = 30.0, width: int | None = None,
        colour: bool | None = None, out: Any = None, frames: int | None = None, share: str | None = None) -> int:
    """Draw the panel of ``source()`` in a terminal: one frame (``once``), or redrawn every ``interval`` seconds until Ctrl-C.

    ``colour``: ANSI colours and an in-place redraw (default: when ``out`` is a terminal).
    ``frames``: stop after this many frames (None: until interrupted). ``share``: draw that
    share's database instead, read-only (``source`` is not called; nothing is written to the
    share, and this process does not join it). Returns 0.

    Raises:
        ShareError: ``share`` names no database, or one that is not the user's or not a share.
    """
    import shutil

    reader: Any = _ShareReader(share, window) if share is not None else PanelReader(source, window, patience=5.0)
    out = out or sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    colour = tty if colour is None else colour
    width = width or shutil.get_terminal_size((100, 24)).columns
    n = 0
    try:
        while True:
            frame = render_text(reader.read(), width=width, colour=colour)
            out.write(("\x1b[H\x1b[2J" if colour and not once else "") + frame + "\n")
            out.flush()
            n += 1
            if once or (frames is not None and n >= frames):
                return 0
            if isinstance(reader, PanelReader):
                reader.patience = min(interval, 5.0)   # after the first frame, a slow worker waits for the next
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
