"""Task: the handle a ``@gpu_task`` call returns.

A :class:`Task` is a :class:`concurrent.futures.Future` (so ``concurrent.futures.wait``,
``as_completed`` and ``asyncio.wrap_future`` work) that can also be awaited directly.
Its :attr:`state` tells more than a future's: whether it still waits for dependencies,
sits in its model's queue, or runs. Every state change is made by the scheduler under
its lock; the future part is resolved right after, outside that lock, so user callbacks
never run while the scheduler is mid-change.

States::

    WAITING --deps done--> QUEUED --picked--> RUNNING --> DONE | FAILED
        \\______________________\\__ cancel / dependency failed / dropped --> CANCELLED | FAILED
"""

from __future__ import annotations

import html
from concurrent.futures import Future
from enum import Enum
from typing import TYPE_CHECKING, Any, Generator

if TYPE_CHECKING:  # pragma: no cover
    from .scheduler import Scheduler

__all__ = ["Task", "TaskState"]


class TaskState(str, Enum):
    """Where a task is in its life; the last three are terminal."""

    WAITING = "waiting"      # for dependencies
    QUEUED = "queued"        # ready, in its model's queue
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for DONE, FAILED and CANCELLED."""
        return self in (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)


class Task(Future):
    """A scheduled call. ``result()``, ``await task``, ``cancel()``; ``state``, ``wait_time``, ``run_time``."""

    # Values every task starts with, at class level: a submit assigns only what differs
    # (an instance attribute shadows these on first assignment; these values are immutable).
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    device: str | None = None                 # "cpu" when routed to the CPU pool
    _deps: Any = ()                           # Tasks this one waits for
    _ndeps = 0                                # dependencies not finished yet
    _dependents: Any = ()                     # Tasks waiting for this one (a list once one waits)
    _batch_key: Any = None
    _ready_at = 0.0
    _on_cpu = False
    _caller_event: Any = None                 # CUDA event on the submitter's stream
    _event: Any = None                        # CUDA event recorded on the producing stream
    _value: Any = None                        # the result, for dependents (no future round trip)

    def __init__(self, tid: int, name: str, model: str, priority: int, scheduler: "Scheduler | None" = None) -> None:
        super().__init__()
        self.id = tid
        self.name = name
        self.model = model
        self.priority = priority
        self.state = TaskState.WAITING
        self._scheduler = scheduler

    # -- waiting ----------------------------------------------------------------
    def result(self, timeout: float | None = None) -> Any:
        """The task's return value; on a GPU, only once its stream has finished the work."""
        value = super().result(timeout)
        if self._event is not None and self._scheduler is not None:
            self._scheduler._device.synchronize(self._event)
        return value

    def __await__(self) -> Generator[Any, None, Any]:
        import asyncio

        yield from asyncio.wrap_future(self).__await__()
        return self.result()

    def running(self) -> bool:
        """True while the task's body (or graph replay) runs."""
        return self.state is TaskState.RUNNING

    def cancel(self) -> bool:
        """Withdraw the task if it has not started; its dependents fail with DependencyError."""
        if self._scheduler is not None:
            return self._scheduler._cancel(self)
        return super().cancel()

    # -- display ----------------------------------------------------------------
    @property
    def wait_time(self) -> float | None:
        """Seconds from submit to start (None until it starts)."""
        if self.started_at is None or self.submitted_at is None:
            return None
        return self.started_at - self.submitted_at

    @property
    def run_time(self) -> float | None:
        """Seconds from start to end (None until it ends)."""
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    def _error_text(self) -> str:
        if self.state is TaskState.FAILED and self.done() and not self.cancelled():
            exc = self.exception(0)
            return f"{type(exc).__name__}: {exc}"
        return ""

    def __repr__(self) -> str:
        parts = [f"Task #{self.id} {self.name}", f"model={self.model!r}", self.state.value]
        if self.wait_time is not None:
            parts.append(f"waited {self.wait_time * 1e3:.1f} ms")
        if self.run_time is not None:
            parts.append(f"ran {self.run_time * 1e3:.1f} ms")
        err = self._error_text()
        if err:
            parts.append(err)
        return "<" + ", ".join(parts) + ">"

    def _repr_html_(self) -> str:
        colour = {"done": "#2e7d32", "failed": "#c62828", "cancelled": "#757575", "running": "#1565c0"}.get(
            self.state.value, "#ef6c00"
        )
        fmt = lambda v: "–" if v is None else f"{v * 1e3:.1f} ms"  # noqa: E731
        err = self._error_text()
        rows = [
            ("task", f"#{self.id} {self.name}"),
            ("model", self.model),
            ("state", f'<b style="color:{colour}">{self.state.value}</b>'),
            ("wait", fmt(self.wait_time)),
            ("run", fmt(self.run_time)),
        ]
        body = "".join(
            f"<tr><th style='text-align:left'>{k}</th><td style='text-align:left'>{v if k == 'state' else html.escape(str(v))}</td></tr>"
            for k, v in rows
        )
        if err:
            body += f"<tr><th style='text-align:left'>error</th><td style='text-align:left'><code>{html.escape(err)}</code></td></tr>"
        return f"<table class='gpuctx-task'>{body}</table>"
