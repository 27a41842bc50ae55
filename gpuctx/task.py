"""Task: the handle a ``@gpu_task`` call returns.

A `Task` is a `concurrent.futures.Future` (so ``concurrent.futures.wait``,
``as_completed`` and ``asyncio.wrap_future`` work) that can also be awaited directly.
Its `state` tells more than a future's: whether it still waits for dependencies,
sits in its model's queue, or runs. Every state change is made by the scheduler under
its lock; the future part is resolved right after, outside that lock, so user callbacks
never run while the scheduler is mid-change.

States::

    WAITING --deps done--> QUEUED --picked--> RUNNING --> DONE | FAILED
        \\______________________\\__ cancel / dependency failed / dropped --> CANCELLED | FAILED
"""

from __future__ import annotations

import html
import sys
import threading
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Future, InvalidStateError
from concurrent.futures import _base as _fb
from concurrent.futures import wait as _futures_wait
from enum import Enum
from typing import Any, Generator, Protocol

__all__ = ["Task", "TaskOwner", "TaskState", "wait_tasks"]


class TaskOwner(Protocol):
    """What a Task needs from the scheduler that made it: three calls, nothing else."""

    def cancel_task(self, task: "Task") -> bool:
        """Withdraw ``task`` if it has not started; True when it is cancelled now."""

    def synchronize(self, event: Any) -> None:
        """Block until the device has reached ``event`` (a task's end on its stream)."""

    def before_wait(self, task: "Task") -> None:
        """Raise instead of letting the caller wait for ``task`` when that wait could never end."""


class TaskState(str, Enum):
    """Where a task is in its life; the last three (`DONE`, `FAILED`, `CANCELLED`) are terminal.

    `WAITING`: for its dependencies. `QUEUED`: ready, in its model's queue. `RUNNING`: its body
    (or graph replay) runs. A `str` enum: `TaskState.DONE == "done"`.
    """

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


class _OnFirstUse:
    """A per-instance attribute made the first time it is read. A non-data descriptor: once made,
    the instance's own value is found first and this is not called again. ``setdefault`` is one
    dictionary operation, so two threads reading it first at once still share one value."""

    def __init__(self, make: Any) -> None:
        self._make = make
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.setdefault(self._name, self._make())


_FINISHED = _fb.FINISHED
_DONE_STATES = frozenset((_fb.CANCELLED, _fb.CANCELLED_AND_NOTIFIED, _fb.FINISHED))
_CANCELLED_STATES = frozenset((_fb.CANCELLED, _fb.CANCELLED_AND_NOTIFIED))

# What Future.__init__ makes, on this Python. Task makes the same lazily (below) only where
# that is the whole list; on a Python whose Future holds more, Task calls Future.__init__.
# The lock-free steps here and in the scheduler's intake rely on the GIL running one thread's
# steps at a time in some interleaving; a free-threaded Python takes the locked ways instead.
GIL = bool(getattr(sys, "_is_gil_enabled", lambda: True)())
_FUTURE_FIELDS = frozenset(Future().__dict__)
_LAZY_FUTURE = GIL and _FUTURE_FIELDS == {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}


class Task(Future):
    """A scheduled call, returned at once by calling a `@gpu_task` function.

    A `concurrent.futures.Future` (so `concurrent.futures.wait`, `as_completed` and
    `asyncio.wrap_future` work) that can also be awaited: `task.result()`, `await task`,
    `task.cancel()`. Made by the scheduler, not by user code.

    Attributes:
        id: a number unique in its scheduler, counted from 1.
        name: the task's name (the function's, unless `name=` was given).
        model: the model or context it runs in.
        priority: its priority; higher runs first.
        state: where it is in its life, a [`TaskState`][gpuctx.TaskState].
        submitted_at: when it was submitted, in seconds on the scheduler's clock.
        started_at: when its body started (`None` before).
        ended_at: when it ended (`None` before).
        device: where it runs: `"cpu"` when routed to the CPU pool, else the device's name
            (such as `"cuda:0"`).
    """

    # The future's own fields. Most tasks are resolved before anyone waits on them or adds a
    # callback; those never need the condition (a lock, its bound methods and a deque) nor the
    # two lists, so they are made on first use instead of for every task (see _set_result for
    # the other half: resolving without the condition when it was never made).
    _state = _fb.PENDING
    _result: Any = None
    _exception: Any = None
    _condition = _OnFirstUse(threading.Condition)
    _waiters = _OnFirstUse(list)
    _done_callbacks = _OnFirstUse(list)

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
    _ready_at: float | None = None
    _on_cpu = False
    _caller_event: Any = None                 # CUDA event on the submitter's stream
    _event: Any = None                        # CUDA event recorded on the producing stream
    _value: Any = None                        # the result, for dependents (no future round trip)
    _watches: Any = ()                        # watches of gpuctx.wait() calls (a list once one watches)

    def __init__(self, tid: int, name: str, model: str, priority: int, owner: TaskOwner | None = None) -> None:
        if not _LAZY_FUTURE:
            super().__init__()
        self.id = tid
        self.name = name
        self.model = model
        self.priority = priority
        self.state = TaskState.WAITING
        self._owner = owner

    # -- the future's state, read without its condition (one attribute read is atomic) ----------
    def done(self) -> bool:
        """True once the task finished, failed or was cancelled."""
        return self._state in _DONE_STATES

    def cancelled(self) -> bool:
        """True if the task was cancelled before it started."""
        return self._state in _CANCELLED_STATES

    def _set_result(self, value: Any) -> None:
        """``Future.set_result``, without the condition when nobody has made it yet.

        Nobody waiting and no callback: there is no lock to take and nobody to notify (the
        condition is made on first use). Ordering, whatever the interleaving of threads: this
        writes the state before it looks for the condition again; a waiter makes the condition
        before it reads the state. So either the waiter sees FINISHED, or this sees its
        condition and does what set_result does with it: wake the waiters, run the callbacks.
        """
        d = self.__dict__
        if not _LAZY_FUTURE or "_condition" in d:
            Future.set_result(self, value)
            return
        if self._state != _fb.PENDING:
            raise InvalidStateError(f"{self._state}: {self!r}")
        self._result = value
        self._state = _FINISHED
        if "_condition" in d:
            with self._condition:
                for waiter in self._waiters:
                    waiter.add_result(self)
                self._condition.notify_all()
            self._invoke_callbacks()

    def _tell_watches(self, kind: str) -> None:
        for watch in list(self._watches):
            watch.done(self, kind)

    # -- waiting ----------------------------------------------------------------
    def result(self, timeout: float | None = None) -> Any:
        """The task's return value; on a GPU, only once its stream has finished the work.

        Args:
            timeout: seconds to wait at most. Default `None`: no limit.

        Returns:
            What the function returned.

        Raises:
            TimeoutError: the task did not end within `timeout`.
            concurrent.futures.CancelledError: the task was cancelled.
            WaitDeadlock: called in a task body or session that holds the model this task
                needs while it has not started, so the wait could never end.
            Exception: what the function raised, or why the task failed.
        """
        if self._state == _FINISHED and self._exception is None:
            value = self._result   # finished: no need to make (and take) the condition
        else:
            if self._owner is not None and self._state not in _DONE_STATES:
                self._owner.before_wait(self)
            value = super().result(timeout)
        if self._event is not None and self._owner is not None:
            self._owner.synchronize(self._event)
        return value

    def __await__(self) -> Generator[Any, None, Any]:
        import asyncio

        yield from asyncio.wrap_future(self).__await__()
        return self.result()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's error, once it has ended.

        Args:
            timeout: seconds to wait at most. Default `None`: no limit.

        Returns:
            The exception that made the task fail; `None` if it succeeded.

        Raises:
            TimeoutError: the task did not end within `timeout`.
            concurrent.futures.CancelledError: the task was cancelled.
            WaitDeadlock: as for `result`.
        """
        if self._owner is not None and self._state not in _DONE_STATES:
            self._owner.before_wait(self)
        return super().exception(timeout)

    def running(self) -> bool:
        """True while the task's body (or graph replay) runs."""
        return self.state is TaskState.RUNNING

    def cancel(self) -> bool:
        """Withdraw the task if it has not started; its dependents fail with `DependencyError`.

        Returns:
            `True` when the task is cancelled now.
        """
        if self._owner is not None:
            return self._owner.cancel_task(self)
        return super().cancel()

    # -- display ----------------------------------------------------------------
    @property
    def ready_at(self) -> float | None:
        """When its dependencies were done and it entered its model's queue (None before)."""
        return self._ready_at

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


# --------------------------------------------------------------------------- waiting for many
class _Watch:
    """One ``wait_tasks`` call: its event is set once ``return_when`` is met."""

    __slots__ = ("pending", "event", "return_when")

    def __init__(self, tasks: list[Task], return_when: str) -> None:
        self.pending = dict.fromkeys(tasks)
        self.event = threading.Event()
        self.return_when = return_when

    def done(self, task: Task, kind: str) -> None:
        # dict.pop is one operation: of the resolver and the waiter's own check, one counts it.
        if self.pending.pop(task, _MISSING) is _MISSING:
            return
        if (not self.pending or self.return_when == FIRST_COMPLETED
                or (self.return_when == FIRST_EXCEPTION and kind == "exception")):
            self.event.set()


_MISSING = object()


def wait_tasks(tasks: list[Task], timeout: float | None = None,
               return_when: str = ALL_COMPLETED) -> tuple[set[Task], set[Task]]:
    """``concurrent.futures.wait`` for Tasks, without a lock per task.

    The standard wait takes every future's condition twice and puts a waiter in each; here
    one watch is put in each task not done yet, and the resolver (the scheduler, right after
    resolving a task's future) tells it. A task is counted once whichever of the two sees it
    done first.
    """
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION):
        raise ValueError(f"return_when={return_when!r}: expected ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION")
    items = list(dict.fromkeys(tasks))
    if not GIL:
        done, not_done = _futures_wait(items, timeout=timeout, return_when=return_when)
        return set(done), set(not_done)
    todo = [t for t in items if not t.done()]
    if todo and not _met(items, len(todo), return_when):
        watch = _Watch(todo, return_when)
        for t in todo:   # publish the watch, then look again
            t.__dict__.setdefault("_watches", []).append(watch)
        for t in todo:
            if t.done():
                watch.done(t, "exception" if _raised(t) else "result")
        watch.event.wait(timeout)
        for t in todo:
            t._watches.remove(watch)
    done = {t for t in items if t.done()}
    return done, set(items) - done


def _raised(t: Task) -> bool:
    return t._state == _FINISHED and t._exception is not None


def _met(items: list[Task], not_done: int, return_when: str) -> bool:
    if return_when == FIRST_COMPLETED:
        return not_done < len(items)
    if return_when == FIRST_EXCEPTION:
        return any(_raised(t) for t in items)
    return False
