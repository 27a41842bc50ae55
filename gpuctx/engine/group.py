"""Running a group: one worker per slot, draining its queue while the policy lets it.

A worker makes its model resident (evicting the victims the plan named, then loading or
restoring), then runs the slot's ready tasks one after another, asking
:func:`gpuctx.policy.should_yield` between them; finishing one task and picking the next happen
in one locked section. Also here: the CPU pool (``device="cpu"`` tasks) and the one case where
the submitting thread runs a task itself, a captured CUDA graph's replay when its model is idle.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from typing import Any, Iterable, TYPE_CHECKING

from .. import policy
from ..models import Slot
from ..task import Task
from ._walkargs import _substitute
from .spec import TaskSpec, _Frame, _current
from .state import _QUEUED, _resolve, slot_to


if TYPE_CHECKING:  # pragma: no cover
    from .scheduler import Scheduler

_GROUP, _PREFETCH, _STOP = "group", "prefetch", "stop"
_NO_SCOPE = contextlib.nullcontext()


class _Groups:
    """Mixin of :class:`gpuctx.engine.Scheduler`; see the module docstring."""

    def _run_group(self, name: str, victims: tuple[str, ...], need: int, drain: bool = True) -> None:
        """Evict ``victims``, make ``name`` resident, then (unless it is a prefetch: ``drain``
        False) run its ready tasks."""
        slot = self._slots[name]
        stale = False
        try:
            for v in victims:
                self._evict_marked(self._slots[v], reason=f"room for {name!r}")
            if not self._make_resident(slot):
                return
            with self._cond:
                self.trace.record("group_start" if drain else "prefetch", model=name, context=name)
            if drain:
                self._drain(slot)
        finally:
            with self._cond:
                self._end_work_locked(slot)   # whatever ended the group, its working memory is free
                self._set_idle_locked(slot)
                slot.last_used = self._clock()
                self._ledger.claims.pop(name, None)
                if slot.is_label and slot.state == policy.RESIDENT:
                    slot_to(slot, policy.ABSENT)
                    self._ledger.release(name)
                    self._share_settle_locked(name)
                stale = name in self._stale and slot.state == policy.RESIDENT and not slot.queued
                if stale:
                    self._stale.discard(name)
                    self._mark_evicting_locked(slot, "registered again")
                self._cond.notify_all()
                self._dispatch_locked()
            if stale:
                self._evict_marked(slot, "registered again", keep_host_copy=False)
            self._hk_wake.set()
            if self._share is not None:
                self._share.wake()   # the model just turned idle: tell the share now, not at the next beat
            if self._closed:
                self._stop_if_done()   # the last group after a shutdown that did not wait

    def _drain(self, slot: Slot) -> None:
        """Run ``slot``'s ready tasks until its queue is empty or the policy says yield."""
        prev: Any = ()
        prev_out: list = []
        began = 0.0
        cond = self._cond
        # The slot's model stays resident and its object the same while the slot is busy:
        # one frame serves every task of the group.
        token = _current.set(_Frame(slot.name, slot.obj, self._device.name, None))
        try:
            while True:
                to_resolve = []
                with cond:
                    if prev:
                        woke = False
                        for t, outcome in zip(prev, prev_out):
                            woke = self._settle_locked(t, outcome, to_resolve) or woke
                            if outcome[0] == "err":
                                self._to_scrub.setdefault(slot.name, []).append(outcome[1])
                        prev = prev_out = t = outcome = ()   # the results are the futures' now, not this frame's
                        self._end_work_locked(slot)
                        slot.last_used = self._clock()
                        slot.note_run(slot.last_used - began)
                        if woke:   # dependents became ready (or failed): other slots may start now
                            self._dispatch_locked()
                    batch = self._next_batch_locked(slot)
                    if cond._waiters:   # queue room for blocked submitters, progress for shutdown()
                        cond.notify_all()
                    for t in batch:
                        self._start_locked(slot.name, t)
                    obj = slot.obj
                resolved = bool(to_resolve)
                if resolved:
                    _resolve(to_resolve)
                to_resolve = None   # nor the (task, result) items it resolved
                if not batch:
                    if resolved and cond.intake:
                        continue   # a done-callback just submitted more: take it in before ending the group
                    return
                began = self._clock()
                prev, prev_out = batch, self._execute(slot, obj, batch)
        finally:
            _current.reset(token)

    def _next_batch_locked(self, slot: Slot) -> list[Task]:
        if not slot.queued or (self._closed and self._cancel_on_close):
            return []
        if self._others_waiting_locked(slot) and policy.should_yield(self._snapshot_locked(), slot.name):
            return []
        head = slot.peek(self._clock, self.config.max_wait)   # an overdue task goes first
        head = self._start_work_locked(slot, head)   # its working memory charged; None: step aside
        if head is None:
            return []
        spec: TaskSpec = head._spec
        if spec.batch_size <= 1:
            return [slot.pop_head()]
        # Dynamic batching: wait up to batch_wait for the batch to fill, unless latency-critical.
        window = policy.batch_window(head.priority, spec.batch_wait, self.params())
        if window > 0:
            deadline = self._clock() + window
            while self._count_matching(slot, head._batch_key) < spec.batch_size and not self._closed:
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._cond.wait(left)
        return slot.take_matching(head._batch_key, spec.batch_size,
                                  first=head if head.state is _QUEUED else None)   # unless withdrawn meanwhile

    @staticmethod
    def _count_matching(slot: Slot, key: Any) -> int:
        return sum(1 for e in slot._heap if e[2].state is _QUEUED and e[2]._batch_key == key)

    # ----------------------------------------------------------------------- graph replays at submit
    # A cuda_graph=True call whose graph is captured already is one asynchronous launch on its
    # context's stream: no body code runs, nothing blocks. Handing it to the model's worker
    # thread would cost more than the launch (two thread hand-offs, and the GIL shared with
    # every other worker), so when its model is resident and idle, nothing is queued for it
    # and no other group waits, the submitting thread launches it. The Task is done when the
    # call returns; result() still waits for the stream to reach the task's event.

    def _replayable(self, spec: TaskSpec, args: tuple, kwargs: dict) -> bool:
        if self._device.name == "cpu" or spec.batch_size > 1 or _current.get() is not None:
            return False
        runner = self._graph_runners.get((spec.fn, spec.model))
        if runner is None:
            return False
        from ..device.graphs import WORKER_MODES

        # Keyed as on a worker (a caller under torch.no_grad() would never match its graphs):
        # _launch_here runs the call under the worker's modes too.
        return runner.replayable(args, kwargs, WORKER_MODES)

    def _may_launch_here_locked(self, slot: Slot) -> bool:
        return (slot.state == policy.RESIDENT and not slot.busy and not slot.queued and not self._closed
                and not self._others_waiting_locked(slot))

    def _begin_here_locked(self, slot: Slot, task: Task) -> Any:
        slot.pending -= 1
        self._mark_busy_locked(slot, self._clock())
        self.trace.record("group_start", model=slot.name, context=slot.name)
        self._start_locked(slot.name, task)
        return slot.obj

    def _launch_here(self, slot: Slot, obj: Any, task: Task) -> None:
        from ..device.graphs import worker_modes

        torch = sys.modules.get("torch")
        token = _current.set(_Frame(slot.name, obj, self._device.name, None))
        try:
            with worker_modes(torch) if torch is not None else _NO_SCOPE:
                outcome = self._execute(slot, obj, [task])[0]
        except BaseException as exc:  # noqa: BLE001 - a signal (Ctrl-C) outside the body: settle, then re-raise
            outcome = ("err", exc)
        finally:
            _current.reset(token)
        to_resolve: list = []
        with self._cond:
            self._settle_locked(task, outcome, to_resolve)
            self._set_idle_locked(slot)
            slot.last_used = self._clock()
            self._dispatch_locked()   # work that arrived for this slot meanwhile went to its queue
            if self._cond._waiters:
                self._cond.notify_all()
        _resolve(to_resolve)
        self._hk_wake.set()
        if self._closed:
            self._stop_if_done()
        if outcome[0] == "err" and isinstance(outcome[1], KeyboardInterrupt):
            raise outcome[1]   # Ctrl-C while launching: the task failed with it; the caller sees it too

    def _run_on_cpu_locked(self, task: Task) -> None:
        if self._cpu_pool is None:
            self._cpu_pool = self._driver.pool(self.config.cpu_workers)
        self._cpu_pool.submit(self._cpu_main, task)

    def _cpu_main(self, task: Task) -> None:
        to_resolve: list = []
        with self._cond:
            if task.state is not _QUEUED:
                return
            self._start_locked("cpu", task)
        token = _current.set(_Frame(task.model, None, "cpu", task))
        try:
            args, kwargs = _substitute(task._args, task._kwargs)
            value, err = task._spec.fn(*args, **kwargs), None
        except BaseException as exc:  # noqa: BLE001 - fails that task only, as on a GPU worker
            value, err = None, exc
        finally:
            _current.reset(token)
        with self._cond:
            if err is None:
                self._finish_locked(task, value, to_resolve)
            else:
                self._fail_locked(task, err, to_resolve)
            self._dispatch_locked()
        _resolve(to_resolve)
        if self._closed:
            self._stop_if_done()


# --------------------------------------------------------------------------- helpers
def _worker_main(ref: "weakref.ref[Scheduler]", name: str, inbox: Any) -> None:
    """One thread per slot; holds only a weak reference to the scheduler between jobs.

    Task bodies cannot end it (their exceptions fail their tasks). What else escapes a group
    (an unloader or the device raising during an eviction) is reported as a warning and the
    thread goes on: a dead worker would leave its slot's future work queued for good.
    """
    while True:
        kind, victims, need = inbox.get()
        if kind == _STOP:
            return
        sched = ref()
        if sched is None:
            return
        try:
            sched._run_group(name, victims, need, drain=kind == _GROUP)
            _clear_finished_frames(sched._to_scrub.pop(name, ()))
        except BaseException as exc:  # noqa: BLE001 - see the docstring
            warnings.warn(f"gpuctx: worker of {name!r} caught {type(exc).__name__}: {exc}; the group ended early "
                          "and its queued tasks are planned again", RuntimeWarning, stacklevel=1)
        del sched


def _clear_finished_frames(errors: Iterable[BaseException]) -> None:
    """Clear the engine frames that called the failed bodies, now that the group has ended.

    A stored exception's frames keep their callers (``f_back``), and those the model object
    and the batch (see ``execute._drop_frames``, which cut them off the traceback). Once the
    group is over they have all finished, up to this worker's own loop, and can be cleared.
    """
    for exc in errors:
        tb = exc.__traceback__
        frame = tb.tb_frame.f_back if tb is not None else None
        while frame is not None:
            try:
                frame.clear()
            except RuntimeError:
                break   # still running: the worker's loop, which holds nothing of the group
            frame = frame.f_back
