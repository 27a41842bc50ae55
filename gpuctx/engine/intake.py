"""Submit: checks, admission, queue limits, dependencies and after=."""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Any

from .. import policy
from ..errors import BudgetError, ConfigError, Overloaded, SchedulerClosed
from ..models import Slot
from ..task import Task
from ..units import format_size
from ._walkargs import _collect_tasks
from .spec import TaskSpec
from .state import _CANCELLED, _FAILED, _dep_error, _resolve


class _Intake:
    """Mixin of :class:`gpuctx.engine.Scheduler`; see the module docstring."""

    def submit(self, spec: TaskSpec, args: tuple, kwargs: dict, *, block: bool = True,
               timeout: float | None = None) -> Task:
        """Register one call of ``spec``; returns its Task at once (or raises on bad input/overload)."""
        deps = _collect_tasks(args, kwargs)
        for extra in spec.after:
            deps.extend(self._after_deps(spec, extra))
        to_resolve: list = []
        # Built before taking the lock: nothing else can see the task yet. Attributes left at
        # their class defaults (no dependencies, not batched, on the GPU) cost nothing here.
        task = Task(next(self._ids), spec.name, spec.model, spec.priority, self)
        task._spec = spec
        task._args, task._kwargs = args, kwargs
        if deps:
            task._deps = list(dict.fromkeys(deps))
        if spec.batch_size > 1:
            task._batch_key = spec.fn
        # Work the caller queued on its own stream before this call (the tensors it passes, made
        # on the default stream a moment ago) must be done before the task's stream reads them.
        task._caller_event = self._device.record_caller()
        slot = self._may_skip_lock(spec, deps)
        if slot is not None:
            return self._submit_to_draining(slot, task)
        launch = spec.cuda_graph and not deps and self._replayable(spec, args, kwargs)
        if self._handlers and spec.device != "cpu":
            self._ask_handlers(spec)
        with self._cond:
            if self._closed:
                raise SchedulerClosed(f"{spec.name}(): the gpuctx scheduler was shut down; call gpuctx.configure() or use a new one")
            for d in deps:
                if d._owner is not self:
                    raise ConfigError(f"{spec.name}(): a dependency Task #{d.id} belongs to another (shut down?) scheduler")
            slot = self._slots.get(spec.model)
            new = slot is None
            if new:   # a new label: recorded only once the request is accepted
                slot = Slot(name=spec.model)
            on_cpu = spec.device == "cpu"
            if not on_cpu and not (slot.state == policy.RESIDENT and (spec.vram is None or spec.vram == slot.size)
                                   and not self._handlers and spec.working is None):
                # A resident model fits (the ledger charged it); anything else is checked.
                on_cpu = self._admit_locked(slot, spec)
            if not on_cpu and slot.max_queue is not None:
                self._make_room_in_queue_locked(slot, spec, block, timeout, to_resolve)
            if new:
                self._slots.setdefault(spec.model, slot)
            task.submitted_at = self._clock()
            if on_cpu:
                task._on_cpu = True
                task.device = "cpu"
            else:
                task.device = self._device.name
            if self._link_locked(task, to_resolve):
                launch = launch and not on_cpu and self._may_launch_here_locked(slot)
                if launch:
                    obj = self._begin_here_locked(slot, task)
                else:
                    self._make_ready_locked(task)
                    if not slot.busy or on_cpu:   # a busy slot's worker takes it from the queue itself
                        self._dispatch_locked()
                    if spec.batch_size > 1:
                        self._cond.notify_all()   # a batch that waits to fill
            else:
                launch = False
                if self.config.prefetch and not slot.busy and slot.state in (policy.ABSENT, policy.OFFLOADED):
                    self._dispatch_locked()   # work for a model that is not loaded: a prefetch may start
        if to_resolve:
            _resolve(to_resolve)
        if launch:
            self._launch_here(slot, obj, task)
        return task

    def _link_locked(self, task: Task, to_resolve: list) -> bool:
        """Make ``task`` live (submitted at ``task.submitted_at``) and a dependent of its unfinished
        dependencies, or fail it when one failed; True when it is ready to queue now."""
        self._live.add(task)
        live = self._fn_live.get(task._spec.fn)
        if live is not None:   # some after=[this function] is watching its calls
            live.add(task)
        self.trace.submitted(task)
        if not task._on_cpu:
            slot = self._slots[task.model]
            slot.pending += 1
            slot.note_arrival(task.submitted_at)
        if not task._deps:
            return True
        for d in task._deps:
            if d.state in (_FAILED, _CANCELLED):
                for other in task._deps:
                    if task in other._dependents:
                        other._dependents.remove(task)
                self._fail_locked(task, _dep_error(task, d), to_resolve)
                return False
            if not d.state.terminal:
                if d._dependents:
                    d._dependents.append(task)
                else:
                    d._dependents = [task]
                task._ndeps += 1
        return task._ndeps == 0

    def _after_deps(self, spec: TaskSpec, item: Any) -> list[Task]:
        if isinstance(item, Task):
            return [item]
        inner = getattr(item, "__gpuctx_spec__", None)
        if inner is not None:
            with self._cond:
                live = self._fn_live.get(inner.fn)
                if live is None:
                    # First time a call waits for this function: from now on its calls are
                    # tracked at submit; the ones already live are found once, here.
                    live = self._fn_live[inner.fn] = weakref.WeakSet(
                        t for t in self._live if t._spec.fn is inner.fn)
                return [t for t in live if not t.state.terminal]
        raise ConfigError(f"{spec.name}: after=[..., {item!r}]: expected a gpuctx.Task or a @gpu_task function")

    def _admit_locked(self, slot: Slot, spec: TaskSpec) -> bool:
        """Check the request can fit; return True to route it to the CPU instead (fallback='cpu').

        Validates first, then changes the slot: a request refused here leaves its size unset.
        """
        size = slot.size
        if spec.vram is not None:
            if slot.size_source in ("declared", "task") and slot.size != spec.vram:
                where = "@gpuctx.model" if slot.size_source == "declared" else "an earlier task"
                raise ConfigError(
                    f"model {slot.name!r} declared with two sizes: {format_size(slot.size)} ({where}) and "
                    f"{format_size(spec.vram)} (@gpu_task {spec.name}); give one size"
                )
            if slot.size_source in ("label", "auto"):
                if slot.max_vram is not None and spec.vram > slot.max_vram:
                    raise BudgetError(f"{spec.name}: vram={format_size(spec.vram)} is above context {slot.name!r}'s "
                                      f"max_vram={format_size(slot.max_vram)}")
                size = spec.vram
        try:
            self._check_fits_locked(slot, size, what=f"{spec.name} (model {slot.name!r})")
            self._check_working_locked(slot, size, spec.working, f"{spec.name} (model {slot.name!r})")
        except BudgetError:
            if policy.route_to_cpu(spec.fallback, fits_ever=False, fits_now=False):
                return True
            raise
        if spec.working is not None:
            self._task_working = True   # from now on the plan looks at each queue's head for its working memory
        if size != slot.size or (spec.vram is not None and slot.size_source in ("label", "auto")):
            slot.size, slot.size_source = size, "task"
        return spec.fallback == "cpu" and policy.route_to_cpu(
            spec.fallback, fits_ever=True, fits_now=self._pressure_locked(slot) is None)

    def _pressure_locked(self, slot: Slot, size: int | None = None) -> int | None:
        """Free bytes when ``slot`` (of ``size``) cannot be made resident now even by evicting, else None."""
        if not self._handlers or slot.state in (policy.RESIDENT, policy.LOADING):
            return None
        snap = self._snapshot_locked()
        free = policy.free_bytes(snap)
        view = next((v for v in snap.slots if v.name == slot.name), None) or policy.SlotView(name=slot.name, size=0)
        if size is not None:
            view = replace(view, size=size)
        need = policy.need_bytes(view)
        if need <= free or policy.choose_victims(snap.slots, need - free, requester=view) is not None:
            return None
        return free

    def _ask_handlers(self, spec: TaskSpec) -> None:
        """Memory-pressure handlers decide whether a request that cannot fit now may wait.

        They are user code: they run without the lock (they may call gpuctx), before anything
        of the request is recorded, so a refusal leaves nothing behind.
        """
        if spec.fallback == "cpu":
            return
        with self._cond:
            slot = self._slots.get(spec.model) or Slot(name=spec.model)   # a new label: not recorded yet
            sized = spec.vram is not None and slot.size_source in ("label", "auto")
            size = spec.vram if sized else slot.size
            free = self._pressure_locked(slot, size)
            handlers = list(self._handlers)
        if free is None:
            return
        for handler in handlers:
            if not handler(slot, size, free):
                raise BudgetError(
                    f"{spec.name}: memory pressure handler {getattr(handler, '__name__', handler)!r} refused "
                    f"{format_size(size)} for {slot.name!r}; {format_size(free)} free of {format_size(self.budget)}"
                )

    def _make_room_in_queue_locked(self, slot: Slot, spec: TaskSpec, block: bool, timeout: float | None,
                                   to_resolve: list) -> None:
        if slot.max_queue is None:
            return
        def full() -> bool:
            return slot.queued + slot.pending >= slot.max_queue
        if not full():
            return
        victim = slot.oldest_queued() if slot.overflow == "drop_oldest" else None
        action = policy.on_full_queue(slot.overflow, block, can_drop=victim is not None)
        if action == "drop_oldest":
            self._fail_locked(victim, Overloaded(
                f"{victim.name} (Task #{victim.id}): dropped from {slot.name!r}'s full queue "
                f"(max_queue={slot.max_queue}, overflow='drop_oldest') for newer work"), to_resolve)
            return
        if action == "block":
            deadline = None if timeout is None else self._clock() + timeout
            while full() and not self._closed:
                left = None if deadline is None else deadline - self._clock()
                if left is not None and left <= 0:
                    raise Overloaded(f"{spec.name}: {slot.name!r}'s queue stayed full (max_queue={slot.max_queue}) for {timeout} s")
                self._cond.wait(left)
            if self._closed:
                raise SchedulerClosed(f"{spec.name}(): the gpuctx scheduler was shut down while waiting for queue room")
            return
        raise Overloaded(
            f"{spec.name}: {slot.name!r}'s queue is full ({slot.queued + slot.pending}/{slot.max_queue}, "
            f"overflow={slot.overflow!r}{', try_submit never waits' if not block else ''})"
        )
