"""The one way into the engine without its lock: the lock-free intake, and why it is safe.

The common call in a loop is for a model that is resident and whose worker is draining its
queue. Nothing has to be decided for it (no admission, no plan: the worker takes it from the
queue itself), so the submitting thread appends it to ``intake`` and returns. Taking the lock
instead made submitter and worker hand the lock and the GIL back and forth once per task
(46 µs per no-op task against 31 µs, bench/overhead.py on the 2-core CI machine).

The proof, in the four places it needs (all in this module but the last):

1. *Taking in.* :class:`_Guard` moves every intake entry into its queue whenever the lock is
   taken or a wait wakes (``__enter__``, ``wait``), so every locked section sees the same state
   as if the call had been submitted under the lock. A call failed there (a dependency had
   failed) goes to ``late`` and is resolved when the lock is released, as every future is.
2. *Eligibility* (:meth:`_IntakeGate._may_skip_lock`, asked by ``submit``): only under the GIL,
   only a plain call (no batch, no CPU routing, no ``after=``, no ``working=``, no graph launch at submit) for a
   slot that is busy, resident, unlimited (no ``max_queue``), of the same size, with no pressure
   handler and dependencies of this scheduler.
3. *Publish, then look; mark idle, then look* (Dekker's handshake). The submitter appends, then
   reads ``slot.busy`` (:meth:`_IntakeGate._submit_to_draining`); a worker ending its group
   writes ``busy = False``, then reads the intake (:meth:`_IntakeGate._set_idle_locked`). Under
   the GIL the steps of two threads interleave in some order, so one of them always sees the
   other: either the worker finds the call, or the submitter finds the slot idle and dispatches
   it itself under the lock. (Issue 14, entry 15 was this handshake with the worker's second
   look missing; tests/test_intake.py injects the call at exactly that point.)
4. *Closing.* ``shutdown`` takes the intake in right after setting ``_closed``; after that the
   guard no longer ingests, and a submitter that finds the scheduler closed after publishing
   takes its call back out (or finds that shutdown took it) and raises SchedulerClosed.

A free-threaded Python (no GIL) takes the locked way for every call.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import Any, Callable, Iterator

from .. import policy
from ..errors import SchedulerClosed
from ..models import Slot
from ..task import GIL as _GIL, Task
from .spec import TaskSpec
from .state import _QUEUED, _resolve


class _Guard(threading.Condition):
    """The scheduler's lock and condition, plus ``intake``: calls submitted without the lock.

    A call for a model whose worker is draining its queue is appended to ``intake`` by the
    submitting thread without taking the lock (see :meth:`Scheduler.submit`). Whoever takes
    the lock next, or wakes from :meth:`wait`, first moves those calls into their queues, so
    every locked section sees the same state as if they had been submitted under the lock.
    A call failed there (a dependency had failed) is put in ``late``: its future is resolved
    when the lock is released, as every future is.
    """

    def __init__(self, ingest: Callable[[], None]) -> None:
        super().__init__(threading.Lock())
        self.intake: deque = deque()
        self.late: list = []
        self._ingest = ingest

    def __enter__(self) -> bool:
        self._lock.acquire()
        if self.intake:
            self._ingest_holding()
        return True

    def __exit__(self, *exc: Any) -> None:
        late = self.late
        if late:
            self.late = []
            self._lock.release()
            _resolve(late)
        else:
            self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        woke = super().wait(timeout)
        if self.intake:
            self._ingest_holding()
        return woke

    @contextlib.contextmanager
    def unlocked(self) -> Iterator[None]:
        """Release the lock around a call that may block on something outside the engine (a
        share's claim); taken again on the way out, with the intake taken in as :meth:`wait` does."""
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            if self.intake:
                self._ingest_holding()

    def _ingest_holding(self) -> None:
        try:
            self._ingest()
        except BaseException:
            self._lock.release()
            raise

class _IntakeGate:
    """Mixin of :class:`gpuctx.engine.Scheduler`; see the module docstring."""

    # ----------------------------------------------------------------------- submit without the lock
    # The common call in a loop: a model that is resident and whose worker is draining its
    # queue right now. Nothing has to be decided for it (no admission, no plan: the worker takes
    # it from the queue itself), so the submitting thread only appends it to the intake; the
    # next lock holder (most often that worker, between two tasks) links it to its dependencies
    # and queues it. Taking the lock here instead made submitter and worker hand the lock back
    # and forth for every task, which cost more than all the bookkeeping (measured: 46 µs per
    # no-op task before, 31 µs after, on the 2-core CI box; bench/overhead.py).

    def _submit_to_draining(self, slot: Slot, task: Task) -> Task:
        if not task._deps:
            task.state = _QUEUED   # what it will be once taken in
        task.device = self._device.name
        task.submitted_at = self._clock()
        intake = self._cond.intake
        intake.append(task)
        # Publish, then look. A worker marks its slot idle under the lock after taking the intake
        # in; so either it took this task in, or this thread sees the slot idle now and dispatches.
        if slot.busy and not self._closed:
            return task
        with self._cond:   # takes the intake in, unless the scheduler is closed
            if not self._closed:
                self._dispatch_locked()
                return task
            try:
                intake.remove(task)
            except ValueError:
                return task   # shutdown() took it in before this thread looked: it is shutdown's now
        raise SchedulerClosed(f"{task.name}(): the gpuctx scheduler was shut down during this call; "
                              "call gpuctx.configure() or use a new one")

    def _may_skip_lock(self, spec: TaskSpec, deps: list) -> Slot | None:
        """The slot a call may be submitted to without the lock (point 2 of the module's proof), or None."""
        if (_GIL and spec.batch_size <= 1 and spec.device is None and not spec.after and spec.working is None
                and not (spec.cuda_graph and not deps)):
            slot = self._slots.get(spec.model)
            if (slot is not None and slot.busy and slot.state == policy.RESIDENT and slot.max_queue is None
                    and (spec.vram is None or spec.vram == slot.size) and not self._handlers and not self._closed
                    and (not deps or all(d._owner is self for d in deps))):
                return slot
        return None

    def _set_idle_locked(self, slot: Slot) -> None:
        """The worker's half of the handshake: mark ``slot`` idle, *then* look at the intake."""
        slot.busy = False
        if self._cond.intake and not self._closed:
            self._take_intake_locked()

    def _ingest_locked(self) -> None:
        """Move lock-free submissions into their queues (called by :class:`_Guard` on locking)."""
        if not self._closed:   # once closed, shutdown() takes the intake in itself, once
            self._take_intake_locked()

    def _take_intake_locked(self) -> None:
        intake, late = self._cond.intake, self._cond.late
        while intake:
            task = intake.popleft()
            if self._link_locked(task, late):
                self._make_ready_locked(task)
