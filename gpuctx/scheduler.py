"""The engine: tasks in, decisions from :mod:`gpuctx.policy`, work out to one worker per slot.

State, all guarded by one lock and condition (``self._cond``, a :class:`_Guard`):

``_slots``      name -> :class:`~gpuctx.models.Slot`: model object, size, QoS, ready queue.
``_ledger``     bytes charged per slot; never above the budget.
``_live``       tasks not yet in a terminal state (WAITING, QUEUED or RUNNING).

One way in does not take the lock: a call for a model that is resident and whose worker is
draining its queue needs no decision, so the submitting thread appends it to the guard's
*intake* and returns (:meth:`Scheduler._submit_to_draining`). Whoever takes the lock next
links it to its dependencies and queues it before doing anything else, so every locked
section sees it; the worker marks its slot idle only under the lock, after taking the intake
in, and the submitter looks at the slot again after publishing, so no call is left behind.

There is no dispatcher thread. Whoever changes the state (a submit, a worker finishing
a group, an eviction) calls :meth:`_dispatch_locked`, which asks :func:`policy.plan` what
to start and hands each group to its slot's worker thread. A worker makes its model
resident (evicting the victims named by the plan, then loading or restoring), then runs
the slot's ready tasks one after another, asking :func:`policy.should_yield` between
them; finishing one task and picking the next happen in one critical section, so a
resident model's queue drains with one lock round trip per task. Futures are resolved
after the lock is released, so user callbacks never run inside it.

One exception to "workers run tasks": a ``cuda_graph=True`` call whose graph is captured
already runs no body code (it is one asynchronous replay on the context's stream), so when
its model is resident and idle the submitting thread launches it itself
(:meth:`Scheduler._launch_here`); a hand-off to the worker would cost more than the launch.

A housekeeping thread unloads models idle past their ``keep_alive``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from queue import SimpleQueue
from typing import Any, Callable, Iterable

from . import policy
from .device import Device, make_device
from .errors import (
    BatchError,
    BudgetError,
    ConfigError,
    DependencyError,
    GpuOutOfMemory,
    ModelLoadError,
    Overloaded,
    SchedulerClosed,
)
from .ledger import Ledger
from .models import OVERFLOW_POLICIES, QoS, Slot
from .task import GIL as _GIL
from .task import Task, TaskState
from .trace import Trace
from .units import format_size, parse_size

__all__ = ["Config", "Scheduler", "TaskSpec", "current_frame"]

# The states as module constants: looking a member up on the Enum class costs ~70 ns, and the
# hot path does it several times per task.
_WAITING, _QUEUED, _RUNNING = TaskState.WAITING, TaskState.QUEUED, TaskState.RUNNING
_DONE, _FAILED, _CANCELLED = TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Config:
    """Scheduler settings; see :func:`gpuctx.configure` for what each means."""

    budget: int | None = None
    safety_factor: float = 0.9
    device: str = "auto"
    max_wait: float = 30.0
    aging: float = 10.0
    latency_priority: int = 10
    keep_alive: float | None = None
    oom_retries: int = 1
    offload: bool = True
    host_budget: int | None = None
    trace_capacity: int = 100_000
    cpu_workers: int = 2
    progress: bool = False

    @classmethod
    def build(cls, base: "Config | None" = None, **changes: Any) -> "Config":
        """Validate ``changes`` (each error names the key, the value and what was expected)."""
        base = base or cls()
        known = {f.name for f in fields(cls)}
        for key in changes:
            if key not in known:
                raise ConfigError(f"configure({key}=...): unknown setting; expected one of {', '.join(sorted(known))}")
        c = dict(changes)
        if "budget" in c and c["budget"] is not None:
            c["budget"] = parse_size(c["budget"], arg="budget", allow_zero=False)
        if "host_budget" in c and c["host_budget"] is not None:
            c["host_budget"] = parse_size(c["host_budget"], arg="host_budget")
        if "safety_factor" in c:
            sf = c["safety_factor"]
            if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not (0 < sf <= 1):
                raise ConfigError(f"safety_factor={sf!r}: expected a number in (0, 1], like 0.9")
            c["safety_factor"] = float(sf)
        for key in ("max_wait", "aging"):
            if key in c:
                c[key] = _seconds(c[key], key)
        if "keep_alive" in c and c["keep_alive"] is not None:
            c["keep_alive"] = _seconds(c["keep_alive"], "keep_alive")
        for key, low in (("latency_priority", None), ("oom_retries", 0), ("trace_capacity", 1), ("cpu_workers", 1)):
            if key in c:
                v = c[key]
                if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low):
                    raise ConfigError(f"{key}={v!r}: expected an int" + (f" >= {low}" if low is not None else ""))
        for key in ("offload", "progress"):
            if key in c and not isinstance(c[key], bool):
                raise ConfigError(f"{key}={c[key]!r}: expected True or False")
        if "device" in c:
            d = c["device"]
            if not isinstance(d, str) or not (d in ("auto", "cpu", "cuda") or d.startswith("cuda:")):
                raise ConfigError(f"device={d!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return replace(base, **c)


def _seconds(value: object, arg: str) -> float:
    """Seconds from a number or a string like '5ms', '2s', '1min'."""
    if isinstance(value, str):
        text = value.strip().lower()
        for suffix, scale in (("ms", 1e-3), ("us", 1e-6), ("min", 60.0), ("s", 1.0)):
            if text.endswith(suffix):
                try:
                    value = float(text[: -len(suffix)]) * scale
                except ValueError:
                    break
                break
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0) or value == float("inf"):
        raise ConfigError(f"{arg}={value!r}: expected seconds >= 0 (a number, or a string like '5ms' or '2s')")
    return float(value)


# --------------------------------------------------------------------------- task spec
@dataclass(frozen=True)
class TaskSpec:
    """What a ``@gpu_task`` declares; per-call overrides make a copy."""

    fn: Callable[..., Any]
    name: str
    model: str
    vram: int | None = None
    priority: int = 0
    after: tuple = ()
    device: str | None = None            # "cpu": run in the CPU pool outside the budget
    fallback: str | None = None          # "cpu": go there when the model cannot fit
    batch_size: int = 1
    batch_wait: float = 0.0
    cuda_graph: bool = False
    oom_retries: int | None = None

    @functools.cached_property
    def is_async(self) -> bool:
        """True for an ``async def`` body (run with asyncio.run on the worker)."""
        return asyncio.iscoroutinefunction(self.fn)


@dataclass
class _Frame:
    """What a running task body may ask for: its slot, model object and device."""

    slot: str
    obj: Any
    device: str
    task: Task | None


_current: contextvars.ContextVar[_Frame | None] = contextvars.ContextVar("gpuctx_current", default=None)


def current_frame() -> _Frame | None:
    """The frame of the task or session running in this thread/async task, or None."""
    return _current.get()


_GROUP, _STOP = "group", "stop"


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

    def _ingest_holding(self) -> None:
        try:
            self._ingest()
        except BaseException:
            self._lock.release()
            raise


class Scheduler:
    """One per kernel: accepts tasks, keeps VRAM within budget, runs groups on per-slot workers."""

    def __init__(self, config: Config | None = None, device: Device | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.config = config or Config()
        self._device: Device = device if device is not None else make_device(self.config.device, self.config.budget)
        _apply_host_budget(self._device, self.config.host_budget)
        self._clock = clock
        self._cond = _Guard(self._ingest_locked)
        self._slots: dict[str, Slot] = {}
        self._ledger = Ledger(self._compute_budget())
        self._live: set[Task] = set()
        self._ids = itertools.count(1)
        self._closed = False
        self._cancel_on_close = False
        self._workers: dict[str, tuple[threading.Thread, SimpleQueue]] = {}
        self._cpu_pool: ThreadPoolExecutor | None = None
        self._handlers: list[Callable[[Any, int, int], bool]] = []
        self._graph_runners: dict[Any, Callable] = {}
        self._fn_live: dict[Callable, "weakref.WeakSet[Task]"] = {}
        self.trace = Trace(self.config.trace_capacity, clock=clock)
        self.trace.budget = self._ledger.budget
        self._hk_wake = threading.Event()
        self._housekeeper = threading.Thread(target=self._housekeep, name="gpuctx-housekeeper", daemon=True)
        self._housekeeper.start()

    # ======================================================================= config
    def _compute_budget(self) -> int:
        raw = self._device.capacity() if self.config.budget is None else self.config.budget
        return int(raw * self.config.safety_factor)

    @property
    def budget(self) -> int:
        """Bytes the scheduler may keep committed (capacity x safety factor)."""
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
            raw = device.capacity() if new.budget is None else new.budget
            budget = int(raw * new.safety_factor)
            if budget < self._ledger.committed():
                raise ConfigError(
                    f"budget={format_size(raw)} x safety_factor={new.safety_factor} = {format_size(budget)} is below "
                    f"what is committed now ({format_size(self._ledger.committed())}); evict models first"
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

    # ======================================================================= slots
    def slot(self, name: str) -> Slot:
        """The slot called ``name`` (KeyError if none)."""
        with self._cond:
            return self._slots[name]

    def _slot_locked(self, name: str) -> Slot:
        s = self._slots.get(name)
        if s is None:
            s = self._slots[name] = Slot(name=name)
        return s

    def register_model(self, name: str, loader: Callable[[], Any] | None, *, vram: int | str | None,
                       priority: int = 0, pin: bool = False, keep_alive: float | None = None,
                       unload: Callable[[Any], Any] | None = None, offload: bool | None = None,
                       max_queue: int | None = None, overflow: str | None = None) -> Slot:
        """Register (or update) a model's loader and settings; sizes that disagree raise ConfigError."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"model name={name!r}: expected a non-empty string")
        auto = vram == "auto"
        size = None if (vram is None or auto) else parse_size(vram, arg="vram")
        with self._cond:
            s = self._slot_locked(name)
            if size is not None:
                self._check_size_locked(s, size, "declared")
            if size is not None and s.size_source in ("label", "auto", "task"):
                s.size, s.size_source = size, "declared"
            elif auto and s.size_source == "label":
                s.size_source = "auto"
            if loader is not None:
                s.loader = loader
            s.unloader = unload if unload is not None else s.unloader
            s.priority, s.pin = priority, pin
            s.keep_alive = keep_alive if keep_alive is not None else s.keep_alive
            s.offload = offload if offload is not None else s.offload
            self._set_queue_limits_locked(s, max_queue, overflow)
            self._check_fits_locked(s, s.size, what=f"model {name!r}")
            self._cond.notify_all()
            return s

    def _set_queue_limits_locked(self, s: Slot, max_queue: int | None, overflow: str | None) -> None:
        if max_queue is not None:
            if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
                raise ConfigError(f"max_queue={max_queue!r} for {s.name!r}: expected an int >= 1 (or None for no limit)")
            s.max_queue = max_queue
        if overflow is not None:
            if overflow not in OVERFLOW_POLICIES:
                raise ConfigError(f"overflow={overflow!r} for {s.name!r}: expected one of {', '.join(OVERFLOW_POLICIES)}")
            s.overflow = overflow

    def _check_size_locked(self, s: Slot, size: int, source: str) -> None:
        if s.size_source in ("declared", "task") and size != s.size:
            raise ConfigError(
                f"model {s.name!r} declared with two sizes: {format_size(s.size)} ({s.size_source}) and "
                f"{format_size(size)} ({source}); give one size"
            )
        if s.max_vram is not None and size > s.max_vram:
            raise BudgetError(
                f"model {s.name!r}: vram={format_size(size)} is above its context's max_vram={format_size(s.max_vram)}"
            )

    def _others_reserved_locked(self, name: str) -> int:
        return sum(v for k, v in self._ledger.reserved.items() if k != name)

    def _check_fits_locked(self, s: Slot, size: int, *, what: str) -> None:
        """BudgetError now when ``size`` can never fit, with the numbers."""
        others = self._others_reserved_locked(s.name)
        if not policy.fits_ever(size, s.name, s.base, self.budget, others):
            raise BudgetError(
                f"{what} needs {format_size(size)} but can never fit: budget {format_size(self.budget)} "
                f"(capacity x safety_factor {self.config.safety_factor}), of which other contexts reserve "
                f"{format_size(others)}; largest possible {format_size(self.budget - others)}"
            )

    def create_context(self, name: str, *, max_vram: int | str | None = None, base_vram: int | str | None = None,
                       qos: object = QoS.BURSTABLE, max_queue: int | None = None, overflow: str | None = None) -> Slot:
        """Create an execution context with a QoS tier; GUARANTEED/BURSTABLE reservations are admitted now."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"context name={name!r}: expected a non-empty string")
        tier = QoS.parse(qos)
        mx = None if max_vram is None else parse_size(max_vram, arg="max_vram", allow_zero=False)
        base = None if base_vram is None else parse_size(base_vram, arg="base_vram")
        if tier == QoS.GUARANTEED:
            if mx is None:
                raise ConfigError(f"context {name!r}: qos=GUARANTEED needs max_vram (the bytes to reserve)")
            if base is not None and base != mx:
                raise ConfigError(f"context {name!r}: qos=GUARANTEED reserves max_vram; base_vram={format_size(base)} must equal it or be omitted")
            base = mx
        elif tier == QoS.BEST_EFFORT:
            if base:
                raise ConfigError(f"context {name!r}: qos=BEST_EFFORT reserves nothing; base_vram={format_size(base)} must be 0 or omitted")
            base = 0
        base = base or 0
        if mx is not None and base > mx:
            raise ConfigError(f"context {name!r}: base_vram={format_size(base)} is larger than max_vram={format_size(mx)}")
        with self._cond:
            if mx is not None and mx > self.budget:
                raise ConfigError(f"context {name!r}: max_vram={format_size(mx)} is larger than the whole budget {format_size(self.budget)}")
            s = self._slot_locked(name)
            if s.explicit_context:
                raise ConfigError(f"context {name!r} exists already; use another name or gpuctx.reset()")
            if mx is not None and s.size_source != "label" and s.size > mx:
                raise ConfigError(f"context {name!r}: max_vram={format_size(mx)} is below its model's size {s.describe_size()}")
            if base:
                self._ledger.reserve_base(name, base)   # AdmissionError with the numbers
            s.qos, s.base, s.max_vram, s.explicit_context = tier, base, mx, True
            self._set_queue_limits_locked(s, max_queue, overflow)
            return s

    def explain(self, name: str, vram: int | str | None = None) -> str:
        """Why a request for ``vram`` in context ``name`` would be admitted now, wait, or fail."""
        with self._cond:
            s = self._slots.get(name)
            size = parse_size(vram) if vram is not None else (s.size if s else 0)
            tier = QoS.name(s.qos) if s else "BURSTABLE"
            others = self._others_reserved_locked(name)
            if size > self.budget - others:
                return (f"rejected: {name!r} ({tier}) needs {format_size(size)}; budget {format_size(self.budget)} minus "
                        f"{format_size(others)} reserved by other contexts leaves {format_size(self.budget - others)}")
            snap = self._snapshot_locked()
            free = policy.free_bytes(snap)
            view = next((v for v in snap.slots if v.name == name), policy.SlotView(name=name, size=size))
            view = replace(view, size=size, state=policy.ABSENT if view.state != policy.RESIDENT else view.state)
            need = policy.need_bytes(view)
            if need <= free:
                return f"admitted now: {name!r} ({tier}) needs {format_size(need)} more, {format_size(free)} free"
            victims = policy.choose_victims(snap.slots, need - free, requester=view)
            if victims is not None:
                return (f"admitted after evicting {', '.join(victims)}: {name!r} ({tier}) needs {format_size(need)}, "
                        f"{format_size(free)} free")
            return (f"waits: {name!r} ({tier}) needs {format_size(need)}, {format_size(free)} free, and no idle model "
                    f"of tier <= {tier} can make room until running work ends")

    def on_memory_pressure(self, handler: Callable[[Any, int, int], bool]) -> None:
        """Register ``handler(ctx, requested, available) -> bool``: True lets a request wait, False fails it."""
        if not callable(handler):
            raise ConfigError(f"on_memory_pressure(handler={handler!r}): expected a callable (ctx, requested, available) -> bool")
        with self._cond:
            self._handlers.append(handler)

    def context_usage(self, name: str) -> tuple[int, int | None, int]:
        """(used, max, base) bytes of context ``name``."""
        with self._cond:
            s = self._slots.get(name)
            if s is None:
                raise ConfigError(f"context {name!r}: no such context or model")
            return self._ledger.used.get(name, 0), s.max_vram, s.base

    def available(self) -> int:
        """Bytes free for new work now (budget minus what is counted or promised)."""
        with self._cond:
            return policy.free_bytes(self._snapshot_locked())

    # ======================================================================= submit
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
        if (_GIL and spec.batch_size <= 1 and spec.device is None and not spec.after
                and not (spec.cuda_graph and not deps)):
            slot = self._slots.get(spec.model)
            if (slot is not None and slot.busy and slot.state == policy.RESIDENT and slot.max_queue is None
                    and (spec.vram is None or spec.vram == slot.size) and not self._handlers and not self._closed
                    and (not deps or all(d._scheduler is self for d in deps))):
                return self._submit_to_draining(slot, task)
        launch = spec.cuda_graph and not deps and self._replayable(spec, args, kwargs)
        with self._cond:
            if self._closed:
                raise SchedulerClosed(f"{spec.name}(): the gpuctx scheduler was shut down; call gpuctx.configure() or use a new one")
            for d in deps:
                if d._scheduler is not self:
                    raise ConfigError(f"{spec.name}(): a dependency Task #{d.id} belongs to another (shut down?) scheduler")
            slot = self._slot_locked(spec.model)
            on_cpu = spec.device == "cpu"
            if not on_cpu and not (slot.state == policy.RESIDENT and (spec.vram is None or spec.vram == slot.size)
                                   and not self._handlers):
                # A resident model fits (the ledger charged it); anything else is checked.
                on_cpu = self._admit_locked(slot, spec)
            if not on_cpu and slot.max_queue is not None:
                self._make_room_in_queue_locked(slot, spec, block, timeout, to_resolve)
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
        if to_resolve:
            _resolve(to_resolve)
        if launch:
            self._launch_here(slot, obj, task)
        return task

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

    def _link_locked(self, task: Task, to_resolve: list) -> bool:
        """Make ``task`` live (submitted at ``task.submitted_at``) and a dependent of its unfinished
        dependencies, or fail it when one failed; True when it is ready to queue now."""
        self._live.add(task)
        live = self._fn_live.get(task._spec.fn)
        if live is not None:   # some after=[this function] is watching its calls
            live.add(task)
        self.trace.submitted(task)
        if not task._on_cpu:
            self._slots[task.model].pending += 1
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
        from .graphs import WORKER_MODES

        # Keyed as on a worker (a caller under torch.no_grad() would never match its graphs):
        # _launch_here runs the call under the worker's modes too.
        return runner.replayable(args, kwargs, WORKER_MODES)

    def _may_launch_here_locked(self, slot: Slot) -> bool:
        return (slot.state == policy.RESIDENT and not slot.busy and not slot.queued and not self._closed
                and not self._others_waiting_locked(slot))

    def _begin_here_locked(self, slot: Slot, task: Task) -> Any:
        slot.pending -= 1
        slot.busy = True
        self.trace.record("group_start", model=slot.name, context=slot.name)
        self._start_locked(slot, task)
        return slot.obj

    def _start_locked(self, slot: Slot, task: Task) -> None:
        """``task`` runs from now on, on ``slot``'s stream."""
        # The future part stays PENDING until resolved (Task.running() reads the state instead):
        # cancel() goes through the scheduler, which never cancels a RUNNING task.
        task.state = _RUNNING
        task.started_at = self._clock()
        self.trace.started(task, slot.name)

    def _launch_here(self, slot: Slot, obj: Any, task: Task) -> None:
        from .graphs import worker_modes

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
            slot.busy = False
            slot.last_used = self._clock()
            self._dispatch_locked()   # work that arrived for this slot meanwhile went to its queue
            if self._cond._waiters:
                self._cond.notify_all()
        _resolve(to_resolve)
        self._hk_wake.set()
        if outcome[0] == "err" and isinstance(outcome[1], KeyboardInterrupt):
            raise outcome[1]   # Ctrl-C while launching: the task failed with it; the caller sees it too

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
        """Check the request can fit; return True to route it to the CPU instead (fallback='cpu')."""
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
                slot.size, slot.size_source = spec.vram, "task"
        try:
            self._check_fits_locked(slot, slot.size, what=f"{spec.name} (model {slot.name!r})")
        except BudgetError:
            if spec.fallback == "cpu":
                return True
            raise
        if slot.state in (policy.RESIDENT, policy.LOADING) or not self._handlers:
            return False
        snap = self._snapshot_locked()
        free = policy.free_bytes(snap)
        view = next(v for v in snap.slots if v.name == slot.name)
        need = policy.need_bytes(view)
        if need <= free or policy.choose_victims(snap.slots, need - free, requester=view) is not None:
            return False
        if spec.fallback == "cpu":
            return True
        for handler in self._handlers:
            if not handler(slot, slot.size, free):
                raise BudgetError(
                    f"{spec.name}: memory pressure handler {getattr(handler, '__name__', handler)!r} refused "
                    f"{format_size(slot.size)} for {slot.name!r}; {format_size(free)} free of {format_size(self.budget)}"
                )
        return False

    def _make_room_in_queue_locked(self, slot: Slot, spec: TaskSpec, block: bool, timeout: float | None,
                                   to_resolve: list) -> None:
        if slot.max_queue is None:
            return
        def full() -> bool:
            return slot.queued + slot.pending >= slot.max_queue
        if not full():
            return
        policy_name = slot.overflow
        if policy_name == "drop_oldest":
            victim = slot.oldest_queued()
            if victim is not None:
                self._fail_locked(victim, Overloaded(
                    f"{victim.name} (Task #{victim.id}): dropped from {slot.name!r}'s full queue "
                    f"(max_queue={slot.max_queue}, overflow='drop_oldest') for newer work"), to_resolve)
                return
            policy_name = "reject"  # only tasks waiting for dependencies fill it: nothing to drop
        if policy_name == "block" and block:
            deadline = None if timeout is None else time.monotonic() + timeout
            while full() and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
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

    # ======================================================================= state changes (locked)
    def _make_ready_locked(self, task: Task) -> None:
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

    def _cancel(self, task: Task) -> bool:
        to_resolve: list = []
        with self._cond:
            if task.state not in (_WAITING, _QUEUED):
                return False
            self._fail_locked(task, None, to_resolve, cancelled=True)  # type: ignore[arg-type]
            self._dispatch_locked()
        _resolve(to_resolve)
        return True

    # ======================================================================= dispatch
    def _snapshot_locked(self) -> policy.Snapshot:
        now = self._clock()
        views = []
        for s in self._slots.values():
            oldest = s.oldest_queued() if s.queued else None
            views.append(policy.SlotView(
                name=s.name, size=s.size, state=s.state, used=self._ledger.used.get(s.name, 0),
                reserved=self._ledger.reserved.get(s.name, 0), claim=self._ledger.claims.get(s.name, 0),
                busy=s.busy, pinned=s.pin, priority=s.priority, qos=s.qos, last_used=s.last_used,
                load_cost=s.load_cost, queued=s.queued, pending=s.pending, head_priority=s.head_priority(),
                oldest=oldest._ready_at if oldest is not None else now,
            ))
        return policy.Snapshot(now=now, budget=self.budget, slots=tuple(views), params=self.params())

    def _dispatch_locked(self) -> None:
        if self._closed and not self._live:
            return
        for s in self._slots.values():
            if s.queued and not s.busy:
                break
        else:
            return   # every slot with work is running it already
        for start in policy.plan(self._snapshot_locked()):
            slot = self._slots[start.slot]
            slot.busy = True
            for v in start.evict:
                victim = self._slots[v]
                victim.state = policy.EVICTING
                self.trace.record("evict", model=v, nbytes=self._ledger.used.get(v, 0),
                                  reason=f"room for {start.slot!r}: {_victim_reason(victim)}")
            if start.need:
                self._ledger.claims[start.slot] = start.need
            self._worker(slot.name).put((_GROUP, start.evict, start.need))
        self._cond.notify_all()

    def _worker(self, name: str) -> SimpleQueue:
        entry = self._workers.get(name)
        if entry is None:
            inbox: SimpleQueue = SimpleQueue()
            th = threading.Thread(target=_worker_main, args=(weakref.ref(self), name, inbox),
                                  name=f"gpuctx-{name}", daemon=True)
            entry = self._workers[name] = (th, inbox)
            th.start()
        return entry[1]

    # ======================================================================= worker side
    def _run_group(self, name: str, victims: tuple[str, ...], need: int) -> None:
        slot = self._slots[name]
        try:
            for v in victims:
                self._evict_marked(self._slots[v], reason=f"room for {name!r}")
            if not self._make_resident(slot):
                return
            with self._cond:
                self.trace.record("group_start", model=name, context=name)
            self._drain(slot)
        finally:
            with self._cond:
                slot.busy = False
                slot.last_used = self._clock()
                self._ledger.claims.pop(name, None)
                if slot.is_label and slot.state == policy.RESIDENT:
                    slot.state = policy.ABSENT
                    self._ledger.release(name)
                self._cond.notify_all()
                self._dispatch_locked()
            self._hk_wake.set()

    def _make_resident(self, slot: Slot) -> bool:
        """Load, restore, or (for a label) just charge ``slot``; False if it failed (tasks already failed)."""
        with self._cond:
            if slot.state == policy.RESIDENT:
                return True
            size = slot.size
            if slot.size_source == "auto" and slot.loads == 0:
                size = max(0, policy.free_bytes(self._snapshot_locked()) + self._ledger.claims.get(slot.name, 0))
            while not self._ledger.can_activate(slot.name, size):
                if self._closed:
                    return False
                self._cond.wait(0.5)   # victims still unloading; they notify when done
            self._ledger.activate(slot.name, size)
            was_offloaded = slot.state == policy.OFFLOADED
            slot.state = policy.LOADING
        if slot.is_label:
            with self._cond:
                slot.state = policy.RESIDENT
            return True
        t0 = self._clock()
        with self._cond:
            self.trace.record("load_start", model=slot.name, context=slot.name, nbytes=size, t=t0)
        token = _current.set(_Frame(slot.name, None, self._device.name, None))
        try:
            measured = None
            if was_offloaded:
                obj = self._with_oom_retry(slot, self._device.restore, (slot.name, slot.obj))
            else:
                obj, measured = self._with_oom_retry(slot, self._device.load, (slot.name, slot.loader))
        except BaseException as exc:  # noqa: BLE001 - a loader may raise anything
            self._load_failed(slot, exc, was_offloaded)
            return False
        finally:
            _current.reset(token)
        dt = self._clock() - t0
        warn, victims = None, ()
        with self._cond:
            slot.obj = obj
            slot.state = policy.RESIDENT
            slot.loads += 1
            slot.load_cost = dt if slot.loads == 1 else 0.5 * slot.load_cost + 0.5 * dt
            if measured is not None or slot.size_source == "auto":
                warn, victims = self._apply_measured_locked(slot, measured)
            kind = "restore" if was_offloaded else "load_end"
            self.trace.record(kind, model=slot.name, context=slot.name, nbytes=self._ledger.used.get(slot.name, 0),
                              duration=dt, vram=self._ledger.committed())
        for v in victims:
            self._evict_marked(self._slots[v], reason=f"room for {slot.name!r}'s measured size")
        if warn:
            warnings.warn(warn, RuntimeWarning, stacklevel=2)
        return True

    def _apply_measured_locked(self, slot: Slot, measured: int | None) -> tuple[str | None, tuple[str, ...]]:
        """Count what the load really took; warn when the declaration was >10% low; evict to stay in budget."""
        if measured is None:   # "auto" on a device that cannot measure
            self._ledger.grow(slot.name, 0)
            slot.size, slot.size_source = 0, "measured"
            return (f"model {slot.name!r}: vram='auto' cannot be measured on device {self._device.name!r}; "
                    "counting 0 bytes (declare vram= to budget it)"), ()
        warn = None
        if slot.size_source != "auto" and measured > slot.size * 1.10:
            warn = (f"model {slot.name!r}: measured {format_size(measured)} at load, more than 10% above the declared "
                    f"vram={format_size(slot.size)}; using the measured size")
        if slot.size_source == "auto" or measured > slot.size:
            slot.size, slot.size_source = measured, "measured"
        over = self._ledger.grow(slot.name, slot.size)
        if not over:
            return warn, ()
        snap = self._snapshot_locked()
        me = next(v for v in snap.slots if v.name == slot.name)
        victims = policy.choose_victims(snap.slots, over, requester=me)
        if victims is None:
            return (warn or "") + (f" model {slot.name!r} took {format_size(measured)}: the budget is exceeded by "
                                   f"{format_size(over)} and no idle model can be evicted"), ()
        for v in victims:
            self._slots[v].state = policy.EVICTING
        return warn, victims

    def _load_failed(self, slot: Slot, exc: BaseException, was_offloaded: bool) -> None:
        to_resolve: list = []
        with self._cond:
            slot.state = policy.ABSENT
            slot.obj = None
            self._ledger.release(slot.name)
            err = ModelLoadError(
                f"model {slot.name!r}: {'restore' if was_offloaded else 'loader'} raised {type(exc).__name__}: {exc}"
            )
            err.__cause__ = exc
            while True:
                t = slot.pop()
                if t is None:
                    break
                slot.queued += 1  # _fail_locked withdraws it again
                self._fail_locked(t, err, to_resolve)
            self.trace.record("unload", model=slot.name, reason="load failed", vram=self._ledger.committed())
            self._cond.notify_all()
        _resolve(to_resolve)

    def _drain(self, slot: Slot) -> None:
        """Run ``slot``'s ready tasks until its queue is empty or the policy says yield."""
        prev: Any = ()
        prev_out: list = []
        cond = self._cond
        # The slot's model stays resident and its object the same while the slot is busy:
        # one frame serves every task of the group.
        token = _current.set(_Frame(slot.name, slot.obj, self._device.name, None))
        try:
            while True:
                to_resolve: list = []
                with cond:
                    if prev:
                        woke = False
                        for t, outcome in zip(prev, prev_out):
                            woke = self._settle_locked(t, outcome, to_resolve) or woke
                        prev = ()
                        slot.last_used = self._clock()
                        if woke:   # dependents became ready (or failed): other slots may start now
                            self._dispatch_locked()
                    batch = self._next_batch_locked(slot)
                    if cond._waiters:   # queue room for blocked submitters, progress for shutdown()
                        cond.notify_all()
                    for t in batch:
                        self._start_locked(slot, t)
                    obj = slot.obj
                if to_resolve:
                    _resolve(to_resolve)
                if not batch:
                    if to_resolve and cond.intake:
                        continue   # a done-callback just submitted more: take it in before ending the group
                    return
                prev, prev_out = batch, self._execute(slot, obj, batch)
        finally:
            _current.reset(token)

    def _next_batch_locked(self, slot: Slot) -> list[Task]:
        if not slot.queued or (self._closed and self._cancel_on_close):
            return []
        if self._others_waiting_locked(slot) and policy.should_yield(self._snapshot_locked(), slot.name):
            return []
        head = slot.peek()
        if head is None:
            return []
        spec: TaskSpec = head._spec
        if spec.batch_size <= 1:
            return [slot.pop_head()]
        # Dynamic batching: wait up to batch_wait for the batch to fill, unless latency-critical.
        if spec.batch_wait > 0 and head.priority < self.config.latency_priority:
            deadline = self._clock() + spec.batch_wait
            while self._count_matching(slot, head._batch_key) < spec.batch_size and not self._closed:
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._cond.wait(left)
        return slot.take_matching(head._batch_key, spec.batch_size)

    @staticmethod
    def _count_matching(slot: Slot, key: Any) -> int:
        return sum(1 for e in slot._heap if e[2].state is _QUEUED and e[2]._batch_key == key)

    def _others_waiting_locked(self, slot: Slot) -> bool:
        for s in self._slots.values():
            if s.queued and not s.busy and s is not slot:
                return True
        return False

    def _execute(self, slot: Slot, obj: Any, batch: list[Task]) -> list:
        """Run one task (or one batch) on the slot's stream; returns ("ok", value) / ("err", exc) per task."""
        spec: TaskSpec = batch[0]._spec
        device = self._device
        try:
            if device.name == "cpu":   # no stream to switch to
                value = self._run_bodies(slot, spec, batch)
            else:
                with device.stream_scope(slot.name):
                    self._order_inputs(slot.name, batch)
                    value = self._run_bodies(slot, spec, batch)
                    event = device.record_event(slot.name)
                for t in batch:
                    t._event = event
        except BaseException as exc:  # noqa: BLE001 - a task may raise anything; it fails that task only
            # SystemExit and KeyboardInterrupt raised by a body too (as a thread pool does): re-raised
            # here they would end this worker thread and leave the task RUNNING for good.
            if device.is_oom(exc):
                exc = self._oom_error(slot, exc, batch[0].name, spec.oom_retries)
            return [("err", exc)] * len(batch)
        if len(batch) == 1 and spec.batch_size <= 1:
            return [("ok", value)]
        if not isinstance(value, (list, tuple)) or len(value) != len(batch):
            got = f"{type(value).__name__} of length {len(value)}" if hasattr(value, "__len__") else type(value).__name__
            err = BatchError(f"{spec.name}: batched over {len(batch)} inputs but returned {got}; expected a list of {len(batch)} results")
            return [("err", err)] * len(batch)
        return [("ok", v) for v in value]

    def _run_bodies(self, slot: Slot, spec: TaskSpec, batch: list[Task]) -> Any:
        if len(batch) == 1 and spec.batch_size <= 1:
            fn, args, kwargs = self._callable(spec, slot.name, batch[0])
        else:
            fn, args, kwargs = spec.fn, ([_substitute(t._args, t._kwargs)[0][0] for t in batch],), {}
        return self._with_oom_retry(slot, fn, args, kwargs, spec.oom_retries)

    def _order_inputs(self, context: str, batch: list[Task]) -> None:
        """Make ``context``'s stream wait for each input's producer (an event, no host sync), and tell
        the allocator the inputs are in use on this stream, so their memory is not handed out again
        before this task's kernels have read them (the producer may drop its reference at once)."""
        device = self._device
        for t in batch:
            device.wait_event(context, t._caller_event)
            for d in t._deps:
                if d._event is not None and d.model != context:
                    device.wait_event(context, d._event)
                    device.record_stream(context, d._value)
            device.record_stream(context, (t._args, t._kwargs))

    def _callable(self, spec: TaskSpec, context: str, task: Task) -> tuple[Callable[..., Any], tuple, dict]:
        """(function, args, kwargs) that run ``task``'s body once."""
        # Only a task with dependencies can have Task arguments to replace by their values.
        args, kwargs = _substitute(task._args, task._kwargs) if task._deps else (task._args, task._kwargs)
        fn = spec.fn
        if spec.cuda_graph and self._device.name != "cpu":
            runner = self._graph_runners.get((spec.fn, context))
            if runner is None:
                from .graphs import make_graph_runner

                runner = self._graph_runners[(spec.fn, context)] = make_graph_runner(fn, device=self._device, context=context)
            return runner, (args, kwargs), {}
        if spec.is_async:
            return _run_coroutine, (fn, args, kwargs), {}
        return fn, args, kwargs

    def _with_oom_retry(self, slot: Slot, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None,
                        retries: int | None = None) -> Any:
        """``fn(*args, **kwargs)``; on out-of-memory, free what can be freed and call it again."""
        kwargs = {} if kwargs is None else kwargs
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            return self._retry_after_oom(slot, exc, fn, args, kwargs, retries)

    def _retry_after_oom(self, slot: Slot, exc: BaseException, fn: Callable[..., Any], args: tuple, kwargs: dict,
                         retries: int | None) -> Any:
        """``fn`` raised ``exc``: re-raise it unless it is out-of-memory; else evict idle models, empty
        the caches and call ``fn`` again, up to ``retries`` times (default: the configured number)."""
        retries = self.config.oom_retries if retries is None else retries
        for _ in range(retries):
            if not self._device.is_oom(exc):
                break
            with self._cond:
                self.trace.record("oom_retry", model=slot.name, context=slot.name, reason=type(exc).__name__)
            self._free_for_oom(slot)
            try:
                return fn(*args, **kwargs)
            except BaseException as again:
                exc = again
        raise exc

    def _free_for_oom(self, slot: Slot) -> None:
        with self._cond:
            snap = self._snapshot_locked()
            victims = policy.order_victims_for_oom(snap.slots, keep=slot.name)
            for v in victims:
                self._slots[v].state = policy.EVICTING
        for v in victims:
            self._evict_marked(self._slots[v], reason="out of memory in " + repr(slot.name))
        self._device.empty_caches()

    def _oom_error(self, slot: Slot, exc: BaseException, what: str, retries: int | None = None) -> GpuOutOfMemory:
        retries = self.config.oom_retries if retries is None else retries
        with self._cond:
            residents = ", ".join(
                f"{s.name}={format_size(self._ledger.used.get(s.name, 0))}" for s in self._slots.values()
                if self._ledger.used.get(s.name, 0)
            ) or "none"
            budget, committed = self.budget, self._ledger.committed()
        err = GpuOutOfMemory(
            f"{what} (model {slot.name!r}): out of device memory after {retries} retry(ies); "
            f"budget {format_size(budget)}, committed {format_size(committed)}, residents: {residents}"
        )
        err.__cause__ = exc
        return err

    # ======================================================================= eviction
    def _evict_marked(self, slot: Slot, reason: str) -> None:
        """Unload (or offload) a slot already marked EVICTING; update the ledger; never raises."""
        obj = slot.obj
        nbytes = self._ledger.used.get(slot.name, 0)
        t0 = self._clock()
        offloaded = False
        warn = None
        try:
            if obj is not None and self.config.offload and slot.offload is not False and self._device.can_offload(obj):
                try:
                    obj = self._device.offload(slot.name, obj)
                    offloaded = True
                except BudgetError:
                    offloaded = False   # host budget full: drop it instead
            if not offloaded:
                if slot.unloader is not None and obj is not None:
                    try:
                        slot.unloader(obj)
                    except Exception as exc:  # noqa: BLE001
                        warn = f"model {slot.name!r}: unload raised {type(exc).__name__}: {exc}; its object was dropped anyway"
                slot.obj = None
                if obj is not None:
                    holder, obj = [obj], None   # the device pops it: no reference left here
                    report = self._device.release(slot.name, holder, nbytes)
                    if report.still_referenced:
                        warn = (f"model {slot.name!r} was evicted but its object is still referenced elsewhere "
                                f"(a notebook variable?); {format_size(nbytes)} stay allocated until that reference is dropped")
            else:
                self._device.empty_caches()
        finally:
            dt = self._clock() - t0
            with self._cond:
                slot.obj = obj if offloaded else None
                slot.state = policy.OFFLOADED if offloaded else policy.ABSENT
                self._ledger.release(slot.name)
                self.trace.record("offload" if offloaded else "unload", model=slot.name, context=slot.name,
                                  nbytes=nbytes, reason=reason, duration=dt, vram=self._ledger.committed())
                self._cond.notify_all()
                self._dispatch_locked()
        if warn:
            warnings.warn(warn, RuntimeWarning, stacklevel=3)

    def evict(self, name: str | None = None, *, reason: str = "asked") -> list[str]:
        """Evict model ``name`` (or every idle, unpinned model when None) now; returns what was evicted."""
        with self._cond:
            if name is not None:
                s = self._slots.get(name)
                if s is None:
                    raise ConfigError(f"evict({name!r}): no such model; known: {', '.join(sorted(self._slots)) or 'none'}")
                if s.busy:
                    raise ConfigError(f"evict({name!r}): the model is in use by a running task; wait for it first")
                if s.state != policy.RESIDENT or s.is_label:
                    return []
                targets = [s]
            else:
                targets = [s for s in self._slots.values() if s.state == policy.RESIDENT and not s.busy and not s.pin and not s.is_label]
            for s in targets:
                s.state = policy.EVICTING
                self.trace.record("evict", model=s.name, nbytes=self._ledger.used.get(s.name, 0), reason=reason)
        for s in targets:
            self._evict_marked(s, reason)
        return [s.name for s in targets]

    def _housekeep(self) -> None:
        """Unload models idle for longer than their keep_alive (woken at group ends and config changes)."""
        while True:
            with self._cond:
                if self._closed:
                    return
                now = self._clock()
                due, next_at = [], None
                for s in self._slots.values():
                    ka = s.keep_alive if s.keep_alive is not None else self.config.keep_alive
                    if ka is None or s.pin or s.busy or s.state != policy.RESIDENT or s.is_label or s.queued:
                        continue
                    at = s.last_used + ka
                    if at <= now:
                        s.state = policy.EVICTING
                        self.trace.record("keep_alive", model=s.name, reason=f"idle for {ka:g} s (keep_alive)")
                        due.append(s)
                    else:
                        next_at = at if next_at is None else min(next_at, at)
            for s in due:
                self._evict_marked(s, "idle past keep_alive")
            if not due:
                self._hk_wake.wait(None if next_at is None else max(0.001, next_at - now))
                self._hk_wake.clear()

    # ======================================================================= CPU pool
    def _run_on_cpu_locked(self, task: Task) -> None:
        if self._cpu_pool is None:
            self._cpu_pool = ThreadPoolExecutor(self.config.cpu_workers, thread_name_prefix="gpuctx-cpu")
        self._cpu_pool.submit(self._cpu_main, task)

    def _cpu_main(self, task: Task) -> None:
        to_resolve: list = []
        with self._cond:
            if task.state is not _QUEUED:
                return
            task.state = _RUNNING
            task.started_at = self._clock()
            self.trace.started(task, "cpu")
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

    # ======================================================================= sessions
    def session(self, model: str, *, vram: int | str | None = None, priority: int = 0,
                after: Iterable[Task] = (), name: str | None = None) -> "Session":
        """A context manager (sync and async) that waits for ``model``'s turn and holds it for the body."""
        return Session(self, model, vram=vram, priority=priority, after=tuple(after), name=name)

    # ======================================================================= queries
    def tasks(self) -> list[Task]:
        """Tasks not yet finished, oldest first."""
        with self._cond:
            return sorted(self._live, key=lambda t: t.id)

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

    def healthy(self) -> tuple[bool, list[str]]:
        """False, with reasons, when a queue is 80% full or more."""
        with self._cond:
            reasons = [
                f"{s.name!r} queue {s.queued + s.pending}/{s.max_queue}"
                for s in self._slots.values()
                if s.max_queue and (s.queued + s.pending) >= 0.8 * s.max_queue
            ]
        return (not reasons, reasons)

    # ======================================================================= shutdown
    def shutdown(self, wait: bool = True, cancel_pending: bool = False, unload: bool = True) -> None:
        """Stop accepting work; optionally cancel what is queued; wait; unload every model."""
        to_resolve: list = []
        with self._cond:
            if self._closed and not self._workers:
                return
            self._closed = True
            self._take_intake_locked()   # what was submitted without the lock before the close
            self._cancel_on_close = cancel_pending
            self._hk_wake.set()
            if cancel_pending:
                for t in sorted(self._live, key=lambda t: t.id):
                    if t.state in (_WAITING, _QUEUED):
                        self._fail_locked(t, None, to_resolve, cancelled=True)  # type: ignore[arg-type]
            self._cond.notify_all()
        _resolve(to_resolve)
        if wait:
            with self._cond:
                while self._live or any(s.busy for s in self._slots.values()):
                    self._cond.wait(0.5)
        for _, inbox in list(self._workers.values()):
            inbox.put((_STOP, (), 0))
        if wait:
            for th, _ in list(self._workers.values()):
                if th is not threading.current_thread():
                    th.join(timeout=10)
        self._workers.clear()
        if unload:
            with self._cond:
                targets = [s for s in self._slots.values() if s.state in (policy.RESIDENT, policy.OFFLOADED) and not s.busy]
                for s in targets:
                    s.state = policy.EVICTING
            for s in targets:
                self._evict_marked(s, "shutdown")
                s.obj = None
                s.state = policy.ABSENT
        if self._cpu_pool is not None:
            self._cpu_pool.shutdown(wait=wait)
        with self._cond:
            self._cond.notify_all()
        self._housekeeper.join(timeout=5) if wait and self._housekeeper is not threading.current_thread() else None
        self._device.close()

    @property
    def closed(self) -> bool:
        """True after shutdown."""
        return self._closed


class Session:
    """``with``/``async with`` body that runs as a task of ``model``: the model resident, its stream current."""

    def __init__(self, sched: Scheduler, model: str, *, vram: Any, priority: int, after: tuple, name: str | None) -> None:
        self._sched = sched
        self._granted: Future = Future()
        self._release = threading.Event()
        self._scope: Any = None
        self._token: Any = None
        vram_b = None if vram is None else parse_size(vram, arg="vram")
        spec = TaskSpec(fn=self._hold, name=name or f"session:{model}", model=model, vram=vram_b, priority=priority, after=after)
        self.task = sched.submit(spec, (), {})
        self.task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: Task) -> None:
        # The request failed (load error, dependency failed) or was cancelled before it was granted.
        if not self._granted.done():
            exc = task.exception() if not task.cancelled() else None
            if exc is None:
                from concurrent.futures import CancelledError

                exc = CancelledError(f"{task.name}: withdrawn before it started")
            self._granted.set_exception(exc)

    def _hold(self) -> None:
        frame = _current.get()
        self._granted.set_result(frame)
        self._release.wait()

    def _enter(self, frame: _Frame) -> Any:
        self._slot = frame.slot
        self._scope = self._sched._device.stream_scope(frame.slot)
        self._scope.__enter__()
        self._token = _current.set(_Frame(frame.slot, frame.obj, frame.device, self.task))
        return frame.obj

    def _abandon(self) -> None:
        if not self.task.cancel():
            self._release.set()

    def __enter__(self) -> Any:
        try:
            frame = self._granted.result()
        except BaseException:
            self._abandon()   # Ctrl-C while waiting: withdraw the request
            raise
        return self._enter(frame)

    def _exit(self) -> None:
        try:
            if self._token is not None:
                try:
                    _current.reset(self._token)
                except ValueError:
                    # Left from another context than the one entered (IPython's post_run_cell after a
                    # cell that ran as an asyncio task): that context, and our frame in it, is gone.
                    pass
            if self._scope is not None:
                device = self._sched._device
                event = device.record_event(self._slot)   # the end of what the body queued ...
                self._scope.__exit__(None, None, None)
                device.join_caller(event)                 # ... comes before what the caller queues next
        finally:
            self._release.set()

    def __exit__(self, *exc: Any) -> None:
        self._exit()
        self.task.exception()   # wait for the hold to end so the slot is free again

    async def __aenter__(self) -> Any:
        try:
            frame = await asyncio.wrap_future(self._granted)
        except BaseException:
            self._abandon()
            raise
        return self._enter(frame)

    async def __aexit__(self, *exc: Any) -> None:
        self._exit()
        await asyncio.wrap_future(self.task)


# --------------------------------------------------------------------------- helpers
def _worker_main(ref: "weakref.ref[Scheduler]", name: str, inbox: SimpleQueue) -> None:
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
            sched._run_group(name, victims, need)
        except BaseException as exc:  # noqa: BLE001 - see the docstring
            warnings.warn(f"gpuctx: worker of {name!r} caught {type(exc).__name__}: {exc}; the group ended early "
                          "and its queued tasks are planned again", RuntimeWarning, stacklevel=1)
        del sched


_SCALARS = frozenset((int, float, str, bytes, bool, type(None)))
_NO_SCOPE = contextlib.nullcontext()


def _run_coroutine(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return asyncio.run(fn(*args, **kwargs))


def _apply_host_budget(device: Device, host_budget: int | None) -> None:
    """Pass configure(host_budget=...) to a device that offloads to host RAM."""
    if hasattr(device, "host_budget"):
        device.host_budget = host_budget


def _collect_tasks(args: tuple, kwargs: dict) -> list[Task]:
    found: list[Task] = []
    for a in args:
        if type(a) not in _SCALARS:   # plain values (the common case) need no walk
            _find_tasks(a, found)
    if kwargs:
        _find_tasks(kwargs, found)
    return found


# Module-level recursion, not nested closures: a closure that calls itself is a reference
# cycle, which would keep what it saw (Tasks, their results) alive until the collector runs.
def _find_tasks(x: Any, found: list) -> None:
    if isinstance(x, Task):
        found.append(x)
    elif isinstance(x, (list, tuple, set, frozenset)):
        for y in x:
            _find_tasks(y, found)
    elif isinstance(x, dict):
        for y in x.values():
            _find_tasks(y, found)


def _substitute(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Replace every Task in the arguments by its value."""
    return tuple([_value_of(a) for a in args]), ({k: _value_of(v) for k, v in kwargs.items()} if kwargs else kwargs)


def _value_of(x: Any) -> Any:
    if type(x) in _SCALARS:
        return x
    if isinstance(x, Task):
        return x._value
    if isinstance(x, (list, tuple, set, frozenset)):
        return type(x)(_value_of(y) for y in x)
    if isinstance(x, dict):
        return {k: _value_of(v) for k, v in x.items()}
    return x


def _dep_error(task: Task, dep: Task) -> DependencyError:
    if dep.state is _CANCELLED:
        err = DependencyError(f"{task.name} (Task #{task.id}): dependency {dep.name} (Task #{dep.id}) was cancelled")
        err.__cause__ = None
    else:
        cause = getattr(dep, "_pending_error", None)
        err = DependencyError(
            f"{task.name} (Task #{task.id}): dependency {dep.name} (Task #{dep.id}) failed"
            + (f": {type(cause).__name__}: {cause}" if cause is not None else "")
        )
        err.__cause__ = cause
    return err


def _victim_reason(s: Slot) -> str:
    work = "has queued work" if (s.queued or s.pending) else "no queued work"
    return f"{work}, {QoS.name(s.qos).lower()}, priority {s.priority}, idle"


def _resolve(items: list) -> None:
    """Resolve futures outside the scheduler lock (callbacks may call back into gpuctx)."""
    for task, kind, value in items:
        try:
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
        except InvalidStateError:
            continue   # resolved already (and its watchers told) by whoever did it
        if task._watches:
            task._tell_watches(kind)
