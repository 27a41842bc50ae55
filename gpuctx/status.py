"""A point-in-time summary of the scheduler, printable and shown as an HTML table in notebooks."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .models import QoS
from .policy import RESIDENT
from .units import format_size

if TYPE_CHECKING:  # pragma: no cover
    from .cluster._driver import ClusterScheduler
    from .engine import Scheduler

__all__ = ["Status", "ModelRow", "TaskRow", "KernelRow", "ClusterStatus", "WorkerRow"]


@dataclass(frozen=True)
class ModelRow:
    """One model/context in the summary."""

    name: str
    state: str
    size: int
    size_source: str
    used: int
    priority: int
    qos: str
    pinned: bool
    loads: int
    queued: int
    pending: int
    last_used: float
    resident_fraction: float | None = None   # a partial model's share on the card (None: not partial)
    working: int = 0              # working memory a task needs: declared, or the running estimate
    working_source: str = "none"  # "declared", "estimated" (measured on a GPU) or "none"
    working_now: int = 0          # working memory charged now, for the task running
    sm_share: float | None = None  # its share of the GPU's SMs (None: uses the rest)
    sm: str = ""                  # "enforced (...)" or "not enforced: why"; "" without a share

    def describe_working(self) -> str:
        """The working memory as one phrase, e.g. ``"working 1.5 GB (declared), 1.5 GB now"``."""
        if self.working_source == "none" and not self.working_now:
            return ""
        text = f"working {format_size(self.working)} ({self.working_source})"
        return text + (f", {format_size(self.working_now)} now" if self.working_now else "")

    def describe_sm(self) -> str:
        """The SM share as one phrase, e.g. ``"SM 0.50 (not enforced: ...)"``; "" without a share."""
        if self.sm_share is None:
            return f"SM count ({self.sm})" if self.sm else ""
        return f"SM {self.sm_share:.2f} ({self.sm})"


@dataclass(frozen=True)
class TaskRow:
    """One live task."""

    id: int
    name: str
    model: str
    state: str
    stream: str


@dataclass(frozen=True)
class KernelRow:
    """Another kernel of this kernel's share (``configure(share=...)``)."""

    pid: int
    notebook: str | None
    nbytes: int
    models: tuple[tuple[str, int], ...]   # (model, bytes charged)
    queued: int
    waiting: int                          # bytes it waits for

    @property
    def who(self) -> str:
        """The notebook when known, else the pid."""
        return self.notebook or f"pid {self.pid}"


@dataclass(frozen=True)
class Status:
    """Budget, what is committed, each model, and the live tasks."""

    device: str
    budget: int
    committed: int
    models: tuple[ModelRow, ...]
    tasks: tuple[TaskRow, ...]
    healthy: bool
    problems: tuple[str, ...]
    share: str | None = None               # the share's name, when this kernel takes part in one
    others: tuple[KernelRow, ...] = ()     # the share's other kernels

    @classmethod
    def of(cls, sched: "Scheduler") -> "Status":
        """Take the summary now."""
        view = sched.view()
        models = tuple(
            ModelRow(s.name, s.state, s.size, s.size_source, charge, s.priority, QoS.name(s.qos),
                     s.pin, s.loads, s.queued, s.pending, s.last_used,
                     s.resident_fraction if s.state == RESIDENT else None, *s.working_need(), s.working_charged,
                     s.sm_share, s.sm_enforced)
            for s, charge in view.slots
        )
        tasks = tuple(TaskRow(t.id, t.name, t.model, t.state.value, t.device if t.device == "cpu" else t.model)
                      for t in view.tasks)
        budget, committed = view.budget, view.committed
        ok, problems = sched.healthy()
        share = sched.share
        others = tuple(KernelRow(k.pid, k.notebook, k.nbytes, k.models, k.queued, k.waiting)
                       for k in share.others()) if share is not None else ()
        return cls(sched.device.name, budget, committed, models, tasks, ok, tuple(problems),
                   share.name if share is not None and not share.alone else None, others)

    def _share_lines(self) -> list[str]:
        if self.share is None:
            return []
        out = [f"  share {self.share!r}: {len(self.others)} other kernel(s)"]
        for k in self.others:
            held = ", ".join(f"{m} {format_size(n)}" for m, n in k.models) or "nothing"
            out.append(f"    {k.who}: {format_size(k.nbytes)} ({held}), {k.queued} tasks"
                       + (f", waiting for {format_size(k.waiting)}" if k.waiting else ""))
        return out

    @property
    def free(self) -> int:
        """Budget minus committed."""
        return self.budget - self.committed

    def __str__(self) -> str:
        lines = [
            f"gpuctx on {self.device}: budget {format_size(self.budget)}, used {format_size(self.committed)}, "
            f"free {format_size(self.free)}" + ("" if self.healthy else f" — UNHEALTHY: {'; '.join(self.problems)}")
        ]
        for m in self.models:
            lines.append(
                f"  {m.name:<14} {m.state:<9} {format_size(m.size):>9} ({m.size_source}) counted {format_size(m.used):>9} "
                f"prio {m.priority} {m.qos.lower()}{' pinned' if m.pinned else ''} loads {m.loads} "
                f"queued {m.queued} waiting {m.pending}"
                + ("" if m.resident_fraction is None else f" partial {m.resident_fraction:.0%} resident")
                + "".join(f", {x}" for x in (m.describe_working(), m.describe_sm()) if x)
            )
        running = [t for t in self.tasks if t.state == "running"]
        lines.append(f"  tasks: {len(self.tasks)} live, {len(running)} running"
                     + "".join(f"\n    #{t.id} {t.name} on stream {t.stream}" for t in running))
        return "\n".join(lines + self._share_lines())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        e = html.escape
        pct = 0 if self.budget == 0 else min(100, round(100 * self.committed / self.budget))
        head = (
            f"<div class='gpuctx-status'><b>gpuctx</b> on <code>{e(self.device)}</code> — budget "
            f"{format_size(self.budget)}, used {format_size(self.committed)}, free {format_size(self.free)}"
            f"<div style='background:#eee;width:300px;height:8px'><div style='background:#1565c0;width:{pct}%;height:8px'></div></div>"
        )
        if not self.healthy:
            head += f"<div style='color:#c62828'>unhealthy: {e('; '.join(self.problems))}</div>"
        cols = ("model", "state", "size", "counted", "priority", "qos", "pinned", "loads", "queued", "waiting")
        extra = any(m.describe_working() or m.describe_sm() for m in self.models)   # columns only when used
        cols += ("working", "SM share") if extra else ()
        rows = "".join(
            "<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
                m.name, m.state + ("" if m.resident_fraction is None else f" ({m.resident_fraction:.0%} resident)"),
                f"{format_size(m.size)} ({m.size_source})", format_size(m.used), m.priority,
                m.qos.lower(), "yes" if m.pinned else "", m.loads, m.queued, m.pending)
                + ((m.describe_working(), m.describe_sm()) if extra else ())) + "</tr>"
            for m in self.models
        )
        table = f"<table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{rows}</table>"
        running = "".join(f"<li>#{t.id} {e(t.name)} ({e(t.model)}) on stream <code>{e(t.stream)}</code></li>"
                          for t in self.tasks if t.state == "running")
        tasks = f"<div>{len(self.tasks)} live tasks</div>" + (f"<ul>{running}</ul>" if running else "")
        return head + table + tasks + self._share_html() + "</div>"

    def _share_html(self) -> str:
        if self.share is None:
            return ""
        e = html.escape
        rows = "".join(
            "<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
                k.who, format_size(k.nbytes), ", ".join(f"{m} {format_size(n)}" for m, n in k.models),
                k.queued, format_size(k.waiting) if k.waiting else "")) + "</tr>"
            for k in self.others)
        cols = "".join(f"<th>{c}</th>" for c in ("kernel", "charged", "models", "tasks", "waiting for"))
        return (f"<div>share <code>{e(self.share)}</code>: {len(self.others)} other kernel(s)</div>"
                + (f"<table><tr>{cols}</tr>{rows}</table>" if self.others else ""))


@dataclass(frozen=True)
class WorkerRow:
    """One cluster worker in the summary: its budget, what it holds, its queue, or why it was lost."""

    name: str
    device: str
    budget: int
    alive: bool
    lost: str | None
    resident: tuple[tuple[str, int], ...]   # (model, bytes)
    queued: int
    running: int

    @property
    def used(self) -> int:
        """Bytes its resident models take."""
        return sum(n for _, n in self.resident)


@dataclass(frozen=True)
class ClusterStatus:
    """A row per worker of a cluster (`gpuctx.configure(cluster="ray")`)."""

    workers: tuple[WorkerRow, ...]

    @classmethod
    def of(cls, cluster: "ClusterScheduler") -> "ClusterStatus":
        """Take the summary now (each live worker is asked what it holds)."""
        return cls(tuple(WorkerRow(**row) for row in cluster.workers()))

    @property
    def healthy(self) -> bool:
        """True while no worker was lost."""
        return all(w.alive for w in self.workers)

    @property
    def lost(self) -> tuple[str, ...]:
        """The names of the workers lost."""
        return tuple(w.name for w in self.workers if not w.alive)

    def __str__(self) -> str:
        alive = sum(w.alive for w in self.workers)
        lines = [f"gpuctx cluster: {alive} of {len(self.workers)} workers alive"]
        for w in self.workers:
            if not w.alive:
                lines.append(f"  {w.name:<5} LOST: {w.lost}")
                continue
            models = ", ".join(f"{m} {format_size(n)}" for m, n in w.resident) or "nothing resident"
            lines.append(f"  {w.name:<5} {w.device:<7} budget {format_size(w.budget):>9} used {format_size(w.used):>9} "
                         f"queued {w.queued} running {w.running}: {models}")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        e = html.escape
        cols = ("worker", "device", "budget", "used", "resident", "queued", "running", "state")
        rows = "".join(
            "<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
                w.name, w.device, format_size(w.budget), format_size(w.used),
                ", ".join(m for m, _ in w.resident), w.queued, w.running,
                "alive" if w.alive else f"lost: {w.lost}")) + "</tr>"
            for w in self.workers
        )
        return (f"<div class='gpuctx-status'><b>gpuctx cluster</b><table><tr>"
                f"{''.join(f'<th>{c}</th>' for c in cols)}</tr>{rows}</table></div>")
