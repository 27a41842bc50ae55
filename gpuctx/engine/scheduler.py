"""The facade: the Scheduler's wiring, its settings, its queries and its shutdown.

:class:`Scheduler` is assembled from one mixin per concern (intake, registry, dispatch,
groups, residency, execution, transitions, the lock-free gate); its state is listed in
:mod:`gpuctx.engine.state`. What runs it, real threads or a virtual clock, is its driver.
"""

from __future__ import annotations

import copy
import itertools
import threading
import weakref
from typing import Any, Callable, Iterable, NamedTuple

from .. import policy
from ..device import Device, make_device
from ..errors import ConfigError, WaitDeadlock
from ..ledger import Ledger
from ..models import Slot
from ..task import Task, TaskState
from ..trace import Trace
from ..units import format_size
from ._guard import _IntakeGate
from .dispatch import _Dispatch
from .drivers import ThreadedDriver
from .execute import _Execution
from .group import _Groups, _STOP
from .intake import _Intake
from .registry import _Registry
from .residency import _Residency
from .session import Session
from .sharing import _Sharing
from .spec import Config, current_frame
from .state import _QUEUED, _Transitions, _WAITING, _resolve
from .working import _Working


class EngineView(NamedTuple):
    """What :meth:`Scheduler.view` returns: copies of the slots, so reading them takes no lock."""

    budget: int
    committed: int
    slots: tuple    # (Slot copy, bytes charged)
    tasks: tuple    # live Tasks, oldest first


class Scheduler(_IntakeGate, _Intake, _Registry, _Dispatch, _Groups, _Residency, _Execution, _Transitions,
                _Working, _Sharing):
    """One per kernel: accepts tasks, keeps VRAM within budget, runs groups on per-slot workers.

    Args:
        config: the settings (see :func:`gpuctx.configure`).
        device: the device backend; by default the one ``config.device`` names.
        clock: seconds, for the trace and the policy; by default the driver's clock.
        driver: what runs the engine: real threads (the default) or a virtual clock.
    """

    def __init__(self, config: Config | None = None, device: Device | None = None,
                 clock: Callable[[], float] | None = None, driver: Any = None) -> None:
        self.config = config or Config()
        self._driver = driver if driver is not None else ThreadedDriver()
        self._device: Device = device if device is not None else make_device(self.config.device, self.config.budget)
        _apply_host_budget(self._device, self.config.host_budget)
        clock = clock if clock is not None else self._driver.clock
        self._clock = clock
        self._cond = self._driver.guard(self._ingest_locked)
        self._slots: dict[str, Slot] = {}
        self._ledger = Ledger(self._compute_budget())
        self._share: Any = None       # a gpuctx.share.ShareClient once attach_share is called
        self._live: set[Task] = set()
        self._ids = itertools.count(1)
        self._closed = False           # shutdown began: no new work
        self._stopped = False          # shutdown ended: workers stopped, models unloaded
        self._cancel_on_close = False
        self._unload_at_stop = False
        self._workers: dict[str, tuple[Any, Any]] = {}   # name -> (thread handle, inbox)
        self._cpu_pool: Any = None
        self._handlers: list[Callable[[Any, int, int], bool]] = []
        self._graph_runners: dict[Any, Callable] = {}
        self._origins: dict[str, tuple] = {}     # model -> where the user registered it (for warnings)
        self._lingering: dict[str, Any] = {}   # evicted models still referenced: name -> weakref
        self._stale: set[str] = set()          # models registered again while in use: evict at group end
        self._to_scrub: dict[str, list] = {}   # slot -> errors of its group whose callers' frames to clear
        self._fn_live: dict[Callable, "weakref.WeakSet[Task]"] = {}
        self._working_waiters: list[str] = []   # slots whose next task waits for working memory, in order
        self._task_working = False             # some @gpu_task declared working= (the plan looks at heads)
        self._sm_warned = False                # the one "sm_share not enforced" warning was given
        self.trace = Trace(self.config.trace_capacity, clock=clock)
        self.trace.budget = self._ledger.budget
        self._hk_wake = self._driver.event()
        self._replan_at: float | None = None   # when a start the policy deferred may begin (dispatch sets it)
        self._load_rate: float | None = None   # bytes/s of this engine's loads (EWMA): unmeasured models' cost
        self._housekeeper = self._driver.spawn(self._housekeep, name="gpuctx-housekeeper")

    def _compute_budget(self) -> int:
        return _budget_of(self.config, self._device)

    def budget_source(self) -> str:
        """How the budget was set: ``"declared"`` (``budget=``) or the device memory x safety factor."""
        if self.config.budget is not None:
            return "declared"
        return f"device memory x safety_factor {self.config.safety_factor}"

    @property
    def budget(self) -> int:
        """Bytes the scheduler may keep committed: ``budget=`` as given, else device memory x safety factor."""
        return self._ledger.budget

    @property
    def device(self) -> Device:
        """The device backend."""
        return self._device

    def reconfigure(self, **changes: Any) -> None:
        """Apply new settings to the running scheduler; ConfigError when a change is unsafe now."""
        new = Config.build(self.config, **changes)
        with self._cond:
            device = self._device
            if new.device != self.config.device:
                if any(s.state != policy.ABSENT for s in self._slots.values()) or self._live:
                    raise ConfigError(
                        f"device={new.device!r}: cannot change the device while models are loaded or tasks are live; "
                        "call gpuctx.shutdown() first"
                    )
                device = make_device(new.device, new.budget)
            budget = _budget_of(new, device)
            if self._share is not None:
                budget = min(budget, self._share.budget)
            if budget < self._ledger.committed():
                raise ConfigError(
                    f"budget={format_size(budget)} is below what is committed now "
                    f"({format_size(self._ledger.committed())}); evict models first"
                )
            if device is not self._device:
                self._device.close()
                self._device = device
            self.config = new
            _apply_host_budget(self._device, new.host_budget)
            self._hk_wake.set()
            self._ledger.budget = budget
            self.trace.budget = budget
            if new.trace_capacity != self.trace.capacity:
                self.trace.resize(new.trace_capacity)
            self._cond.notify_all()
            self._dispatch_locked()

    def params(self) -> policy.PolicyParams:
        """The policy knobs from the config."""
        c = self.config
        return policy.PolicyParams(max_wait=c.max_wait, aging=c.aging, latency_priority=c.latency_priority)

    def session(self, model: str, *, vram: int | str | None = None, priority: int = 0,
                after: Iterable[Task] = (), name: str | None = None) -> "Session":
        """A context manager (sync and async) that waits for ``model``'s turn and holds it for the body."""
        return Session(self, model, vram=vram, priority=priority, after=after, name=name)

    def tasks(self) -> list[Task]:
        """Tasks not yet finished, oldest first."""
        with self._cond:
            return sorted(self._live, key=lambda t: t.id)

    def view(self) -> "EngineView":
        """One consistent reading of the budget, every slot with its charge, and the live tasks."""
        with self._cond:
            slots = tuple((copy.copy(s), self._ledger.charge(s.name)) for s in self._slots.values())
            return EngineView(self._ledger.budget, self._ledger.committed(), slots,
                              tuple(sorted(self._live, key=lambda t: t.id)))

    def still_held(self) -> list[Any]:
        """Evicted model objects that something outside gpuctx still references (so still allocated)."""
        alive = [(name, ref()) for name, ref in list(self._lingering.items()) if ref is not None]
        for name, obj in alive:
            if obj is None:
                self._lingering.pop(name, None)
        return [obj for _, obj in alive if obj is not None]

    def snapshot(self) -> policy.Snapshot:
        """The policy's view of the scheduler now."""
        with self._cond:
            return self._snapshot_locked()

    def slots(self) -> list[Slot]:
        """All slots (models, contexts, labels)."""
        with self._cond:
            return list(self._slots.values())

    def committed(self) -> int:
        """Bytes the ledger counts now."""
        with self._cond:
            return self._ledger.committed()

    def peak_committed(self) -> int:
        """The most bytes the ledger ever counted at once (weights, reservations and working memory)."""
        with self._cond:
            return self._ledger.peak

    def healthy(self) -> tuple[bool, list[str]]:
        """False, with reasons, when a queue is 80% full or more."""
        with self._cond:
            reasons = [
                f"{s.name!r} queue {s.queued + s.pending}/{s.max_queue}"
                for s in self._slots.values()
                if s.max_queue and (s.queued + s.pending) >= 0.8 * s.max_queue
            ]
        return (not reasons, reasons)

    def shutdown(self, wait: bool = True, cancel_pending: bool = False, unload: bool = True) -> None:
        """Stop accepting work; optionally cancel what is queued; let the rest run; unload every model.

        Args:
            wait: return only once every task has ended and the workers have stopped. Called from
                inside gpuctx (a task body, a session, a done-callback on a worker) it cannot wait
                for itself: it returns at once, and the last group to end finishes the shutdown.
            cancel_pending: cancel the tasks that have not started.
            unload: unload (not offload) every model once the work has ended.
        """
        to_resolve: list = []
        inside = self._called_from_inside()
        with self._cond:
            if self._stopped:
                return
            self._closed = True
            self._take_intake_locked()   # what was submitted without the lock before the close
            self._cancel_on_close = self._cancel_on_close or cancel_pending
            self._unload_at_stop = self._unload_at_stop or unload
            self._hk_wake.set()
            if cancel_pending:
                for t in sorted(self._live, key=lambda t: t.id):
                    if t.state in (_WAITING, _QUEUED):
                        self._fail_locked(t, None, to_resolve, cancelled=True)  # type: ignore[arg-type]
            self._cond.notify_all()
        _resolve(to_resolve)
        if wait and not inside:
            with self._cond:
                while self._live or any(s.busy for s in self._slots.values()):
                    self._cond.wait(0.5)
            self._stop(join=True)
        else:
            self._stop_if_done()

    def _called_from_inside(self) -> bool:
        """True in a task body, a session, or a thread of this engine (a done-callback's)."""
        if current_frame() is not None:
            return True
        return any(self._driver.is_current(th) for th, _ in list(self._workers.values())) or \
            self._driver.is_current(self._housekeeper) or threading.current_thread().name.startswith("gpuctx-cpu")

    def _stop_if_done(self) -> None:
        """After a shutdown that did not wait: stop once the last task has ended (group ends call this)."""
        with self._cond:
            due = (self._closed and not self._stopped and not self._live
                   and not any(s.busy for s in self._slots.values()))
        if due:
            self._stop(join=False)

    def _stop(self, join: bool) -> None:
        """The end of a shutdown: stop the workers, unload the models, close the device (once)."""
        with self._cond:
            if self._stopped:
                return
            self._stopped = True   # no group starts and no worker is made from now on
            workers = list(self._workers.values())
            self._workers.clear()
            targets = []
            if self._unload_at_stop:
                targets = [s for s in self._slots.values() if s.state in (policy.RESIDENT, policy.OFFLOADED)]
                for s in targets:
                    self._mark_evicting_locked(s, "shutdown")
            self._hk_wake.set()
            self._cond.notify_all()
        for _, inbox in workers:
            inbox.put((_STOP, (), 0))
        if join:
            for th, _ in workers:
                if not self._driver.is_current(th):
                    self._driver.join(th, timeout=10)
        for s in targets:
            self._evict_marked(s, "shutdown", keep_host_copy=False)
        if self._cpu_pool is not None:
            self._cpu_pool.shutdown(wait=join)
        if join and not self._driver.is_current(self._housekeeper):
            self._driver.join(self._housekeeper, timeout=5)
        self._device.close()

    @property
    def closed(self) -> bool:
        """True after shutdown."""
        return self._closed

    def synchronize(self, event: Any) -> None:
        """Block until the device has reached ``event`` (see :class:`gpuctx.task.TaskOwner`)."""
        self._device.synchronize(event)

    def before_wait(self, task: Task) -> None:
        """WaitDeadlock when the caller holds ``task``'s model (a body or session of it) and
        ``task`` has not started: it would run only after the caller ends, which it never would."""
        frame = current_frame()
        if frame is None or frame.slot != task.model or (frame.task is not None and frame.task._on_cpu):
            return
        if task.state in (TaskState.WAITING, TaskState.QUEUED):
            me = frame.task
            who = f"{me.name} (Task #{me.id})" if me is not None else f"a task of {task.model!r}"
            raise WaitDeadlock(
                f"{who} waits for {task.name} (Task #{task.id}), which needs model {task.model!r}: the model "
                f"that {who} holds, so it cannot start before the wait ends. Pass the Task as an argument "
                "(a dependency) or return it, instead of waiting inside the body")


def _apply_host_budget(device: Device, host_budget: int | None) -> None:
    """Pass configure(host_budget=...) to a device that offloads to host RAM."""
    if hasattr(device, "host_budget"):
        device.host_budget = host_budget


def _budget_of(config: Config, device: Device) -> int:
    """An explicit ``budget=`` means what it says; the safety factor applies to memory read from the device."""
    if config.budget is not None:
        return config.budget
    return int(device.capacity() * config.safety_factor)
