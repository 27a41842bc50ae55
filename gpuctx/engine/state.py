"""The engine's state and its transitions: the only code that changes a task's or a slot's state.

State (one :class:`~gpuctx.engine.Scheduler` holds it all, guarded by ``_cond``):

``_slots``         name -> :class:`~gpuctx.models.Slot`: loader, size, QoS, state, ready queue, busy.
``_ledger``        bytes reserved / used / claimed per slot (:class:`~gpuctx.ledger.Ledger`).
``_live``          tasks not yet terminal (WAITING, QUEUED or RUNNING).
``_workers``       slot name -> (thread handle, inbox) of its worker.
``_fn_live``       gpu_task function -> its live calls, for ``after=[function]``.
``_graph_runners`` (function, context) -> captured CUDA graphs.
``_handlers``      memory-pressure handlers.
``_closed``        shutdown began; ``_cancel_on_close``: queued work is being cancelled.
``_working_waiters`` slots whose next task waits for working memory, first asked first
                   (:mod:`.working`); ``_task_working``: some call declared ``working=``;
                   ``_sm_warned``: the one "SM share not enforced" warning was given.
``_cond.intake``   calls submitted without the lock, not yet linked (see :mod:`._guard`).

A task moves ``WAITING -> QUEUED -> RUNNING -> DONE | FAILED``, or from WAITING or QUEUED to
FAILED or CANCELLED (cancelled, dropped, a dependency failed). A slot moves
``ABSENT | OFFLOADED -> LOADING -> RESIDENT -> EVICTING -> ABSENT | OFFLOADED``; a failed load goes
back to ABSENT, a label's charge ends RESIDENT -> ABSENT when its group ends. Any other move
raises :class:`IllegalTransition`, naming the object and both states, as
``concurrent.futures`` raises ``InvalidStateError``.

Every function here mutates: call it with the guard held. Futures are resolved later, outside
the guard, by :func:`_resolve`, so that user callbacks never run under it.
"""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from typing import Any

from .. import policy
from ..errors import DependencyError
from ..models import Slot
from ..task import Task, TaskState


# The states as module constants: looking a member up on the Enum class costs ~70 ns, and the
# hot path does it several times per task.
_WAITING, _QUEUED, _RUNNING = TaskState.WAITING, TaskState.QUEUED, TaskState.RUNNING
_DONE, _FAILED, _CANCELLED = TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED
_TERMINAL = frozenset((_DONE, _FAILED, _CANCELLED))

_SLOT_MOVES = {
    policy.LOADING: (policy.ABSENT, policy.OFFLOADED),
    policy.RESIDENT: (policy.LOADING,),
    policy.EVICTING: (policy.RESIDENT, policy.OFFLOADED),
    policy.ABSENT: (policy.LOADING, policy.EVICTING, policy.OFFLOADED, policy.RESIDENT),
    policy.OFFLOADED: (policy.EVICTING,),
}
_MAX_CAUSE = 300   # characters of the root cause's message quoted in a DependencyError


class IllegalTransition(InvalidStateError):
    """A task or slot was asked to move to a state it cannot reach from where it is."""


def _illegal(what: str, old: Any, new: Any) -> IllegalTransition:
    old = getattr(old, "value", old)
    new = getattr(new, "value", new)
    return IllegalTransition(f"{what}: cannot move from {old!r} to {new!r}")


def _task_what(task: Task) -> str:
    return f"{task.name} (Task #{task.id})"


def slot_to(slot: Slot, new: str) -> None:
    """Move ``slot`` to state ``new``; IllegalTransition unless the move is legal (the label's
    RESIDENT -> ABSENT only for a slot with no loader)."""
    old = slot.state
    if old not in _SLOT_MOVES[new] or (old == policy.RESIDENT and new == policy.ABSENT and not slot.is_label):
        raise _illegal(f"model {slot.name!r}", old, new)
    slot.state = new


class _Transitions:
    """Mixin of :class:`gpuctx.engine.Scheduler`; see the module docstring."""

    def _mark_evicting_locked(self, slot: Slot, reason: str) -> None:
        """``slot`` is to be evicted (unloaded or offloaded) for ``reason``; the one place that
        decides an eviction, so every one is in the trace and in ``stats()``."""
        slot_to(slot, policy.EVICTING)
        self.trace.record("evict", model=slot.name, nbytes=self._ledger.used.get(slot.name, 0), reason=reason)

    def _start_locked(self, context: str, task: Task) -> None:
        """``task`` runs from now on, on ``context``'s stream (``"cpu"``: in the CPU pool)."""
        # The future part stays PENDING until resolved (Task.running() reads the state instead):
        # cancel() goes through the scheduler, which never cancels a RUNNING task.
        # (Or WAITING with nothing to wait for: a graph replay launched at submit, never queued.)
        if task.state is not _QUEUED and (task.state is not _WAITING or task._ndeps):
            raise _illegal(_task_what(task), task.state, _RUNNING)
        task.state = _RUNNING
        task.started_at = self._clock()
        self.trace.started(task, context)

    def _make_ready_locked(self, task: Task) -> None:
        """``task``'s dependencies are done: into its model's queue (or the CPU pool)."""
        # A lock-free submission shows QUEUED from the start (see _guard); it was never made ready.
        if task.state is not _WAITING and not (task.state is _QUEUED and task._ready_at is None):
            raise _illegal(_task_what(task), task.state, _QUEUED)
        task.state = _QUEUED
        task._ready_at = self._clock()
        if task._on_cpu:
            self._run_on_cpu_locked(task)
            return
        slot = self._slots[task.model]
        slot.pending -= 1
        slot.push(task)

    def _withdraw_locked(self, task: Task) -> None:
        """Take a not-yet-running task out of its queue/counts (its state is set by the caller)."""
        if task._on_cpu:
            return
        slot = self._slots[task.model]
        if task.state is _QUEUED:
            slot.queued -= 1
            slot.forget_stale()
        elif task.state is _WAITING:
            slot.pending -= 1

    def _finish_locked(self, task: Task, value: Any, to_resolve: list) -> bool:
        """Mark ``task`` done; True when a dependent became ready (then a dispatch is due)."""
        task._value = value
        self._end_locked(task, _DONE, "result", value, to_resolve, None, self._ledger.committed())
        if not task._dependents:
            return False
        woke = False
        for dep in task._dependents:
            if dep.state is _WAITING:
                dep._ndeps -= 1
                if dep._ndeps == 0:
                    self._make_ready_locked(dep)
                    woke = True
        task._dependents = ()
        return woke

    def _end_locked(self, task: Task, state: TaskState, kind: str, value: Any, to_resolve: list,
                    reason: str | None, vram: int | None = None) -> None:
        """What every end does: the terminal state and time, out of the live set, into the trace;
        the future is resolved (``kind``, ``value``) once the lock is released."""
        old = task.state
        if old in _TERMINAL or (state is _CANCELLED if old is _RUNNING else state is _DONE):
            raise _illegal(_task_what(task), old, state)
        task.state = state
        task.ended_at = self._clock()
        # Inputs and producers are not needed any more: do not keep them (often tensors) alive
        # for as long as the caller keeps this Task.
        task._args = task._kwargs = None
        task._deps = ()
        self._live.discard(task)
        self.trace.ended(task, vram, reason)
        to_resolve.append((task, kind, value))

    def _settle_locked(self, task: Task, outcome: tuple, to_resolve: list) -> bool:
        """Finish or fail ``task`` from an ``("ok", value)`` / ``("err", exc)`` outcome of
        :meth:`_execute`; True when other slots may have work to start now (a dispatch is due)."""
        kind, value = outcome
        if kind == "ok":
            return self._finish_locked(task, value, to_resolve)
        self._fail_locked(task, value, to_resolve)
        return True

    def _fail_locked(self, task: Task, exc: BaseException, to_resolve: list, cancelled: bool = False) -> None:
        """Fail (or cancel) ``task`` and, transitively, everything that depends on it."""
        stack = [(task, exc, cancelled)]
        while stack:
            t, e, canc = stack.pop()
            if t.state.terminal:
                continue
            if t.state in (_WAITING, _QUEUED):
                self._withdraw_locked(t)
            t._pending_error = e
            if canc:
                self._end_locked(t, _CANCELLED, "cancel", e, to_resolve, "cancelled")
            else:
                self._end_locked(t, _FAILED, "exception", e, to_resolve, "failed")
            for d in t._dependents:
                stack.append((d, _dep_error(d, t), False))
            t._dependents = ()
        self._cond.notify_all()

    def cancel_task(self, task: Task) -> bool:
        """Withdraw ``task`` if it has not started (its dependents fail); True when cancelled now."""
        to_resolve: list = []
        with self._cond:
            if task.state not in (_WAITING, _QUEUED):
                return task.state is _CANCELLED   # as a Future: cancelling a cancelled one is True
            self._fail_locked(task, None, to_resolve, cancelled=True)  # type: ignore[arg-type]
            self._dispatch_locked()
        _resolve(to_resolve)
        if self._closed:
            self._stop_if_done()
        return True


def _dep_error(task: Task, dep: Task) -> DependencyError:
    """The error of ``task`` whose dependency ``dep`` failed or was cancelled.

    Its message names the root cause and how far away it is, never the whole chain, and its
    ``__cause__`` is the root error itself: along a chain of 10,000 tasks each message and
    each traceback stays the same small size.
    """
    cause = getattr(dep, "_pending_error", None)
    if isinstance(cause, DependencyError) and getattr(cause, "root_task", None) is not None:
        root_task, root, depth = cause.root_task, cause.__cause__, cause.depth + 1
    else:
        root_task, root, depth = dep, (None if dep.state is _CANCELLED else cause), 1
    via = "" if depth == 1 else f" (via {dep.name}, Task #{dep.id}; {depth} links away)"
    if root_task.state is _CANCELLED and root is None:
        what = "was cancelled"
    else:
        text = f"{type(root).__name__}: {root}" if root is not None else "failed"
        if len(text) > _MAX_CAUSE:
            text = text[:_MAX_CAUSE] + "..."
        what = f"failed: {text}"
    err = DependencyError(f"{_task_what(task)}: dependency {root_task.name} (Task #{root_task.id}) {what}{via}")
    err.__cause__ = root
    err.root_task, err.depth = root_task, depth
    return err


def _resolve(items: list) -> None:
    """Resolve futures outside the scheduler lock (callbacks may call back into gpuctx).

    Every item is resolved even when a done-callback raises SystemExit, or Ctrl-C lands in the
    middle: the first such BaseException is raised again once all of them are resolved.
    """
    pending: BaseException | None = None
    for task, kind, value in items:
        try:
            if kind == "result":   # the common case, without the call
                task._set_result(value)
            else:
                _deliver(task, kind, value)
        except InvalidStateError:
            continue   # resolved already (and its watchers told) by whoever did it
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the rest
            pending = pending or exc
            if not task.done():   # interrupted before the future changed: once more
                try:
                    _deliver(task, kind, value)
                except BaseException:  # noqa: BLE001
                    pass
        if task._watches:
            task._tell_watches(kind)   # a watch counts a task once, however often it is told
    if pending is not None:
        raise pending


def _deliver(task: Task, kind: str, value: Any) -> None:
    if kind == "result":
        task._set_result(value)
    elif kind == "cancel":
        if Future.cancel(task):
            # Like an executor's worker: move CANCELLED to CANCELLED_AND_NOTIFIED so that
            # concurrent.futures.wait() and as_completed() count the task as done.
            Future.set_running_or_notify_cancel(task)
    else:
        task._pending_error = value
        Future.set_exception(task, value)
