"""Models and execution contexts as the scheduler keeps them.

A `Slot` is one named execution context: at most one model object, a VRAM
size, a QoS tier with its reservation, a queue of ready tasks, and its own worker and
stream. ``@gpuctx.model`` fills a slot's loader; ``create_context`` sets its QoS; a
``@gpu_task(model=...)`` naming a slot nobody registered makes a *label*: no loader,
its VRAM held only while its tasks run.
"""

from __future__ import annotations

import heapq
import itertools
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from . import policy
from .errors import ConfigError
from .task import TaskState
from .units import format_size

__all__ = ["QoS", "Slot", "OVERFLOW_POLICIES"]

OVERFLOW_POLICIES = ("block", "reject", "drop_oldest")
_QUEUED = TaskState.QUEUED   # a module constant: the Enum class lookup costs ~70 ns per use


class QoS:
    """QoS tiers of an execution context (PyGPUkit's names), for [`create_context`][gpuctx.create_context].

    `GUARANTEED` reserves the context's `max_vram` when it is created; `BURSTABLE` reserves its
    `base_vram` and may use more while there is room; `BEST_EFFORT` reserves nothing. When memory
    is needed, idle models of the lowest tier are evicted first.

    Attributes:
        BEST_EFFORT: tier `0`.
        BURSTABLE: tier `1`, the default.
        GUARANTEED: tier `2`.
    """

    BEST_EFFORT = policy.BEST_EFFORT
    BURSTABLE = policy.BURSTABLE
    GUARANTEED = policy.GUARANTEED
    _NAMES = {0: "BEST_EFFORT", 1: "BURSTABLE", 2: "GUARANTEED"}

    @classmethod
    def parse(cls, value: object) -> int:
        """The tier that `value` names.

        Args:
            value: a tier constant (`QoS.GUARANTEED`) or its name in any case (`"guaranteed"`,
                `"best-effort"`).

        Returns:
            The tier constant.

        Raises:
            ConfigError: `value` names no tier.
        """
        if isinstance(value, int) and not isinstance(value, bool) and value in cls._NAMES:
            return value
        if isinstance(value, str):
            key = value.strip().upper().replace("-", "_")
            for k, v in cls._NAMES.items():
                if v == key:
                    return k
        raise ConfigError(f"qos={value!r}: expected gpuctx.QoS.GUARANTEED, BURSTABLE or BEST_EFFORT")

    @classmethod
    def name(cls, tier: int) -> str:
        """The name of a tier.

        Args:
            tier: a tier constant.

        Returns:
            Its name, such as `"GUARANTEED"`.
        """
        return cls._NAMES[tier]


_seq = itertools.count()


@dataclass(eq=False)
class Slot:
    """Runtime state of one model/context. Mutated only under the scheduler's lock."""

    name: str
    size: int = 0
    size_source: str = "label"          # "declared", "task", "measured", "auto", "label"
    loader: Callable[[], Any] | None = None
    unloader: Callable[[Any], Any] | None = None
    priority: int = 0
    pin: bool = False
    keep_alive: float | None = None     # None: scheduler default
    offload: bool | None = None         # None: offload when the object supports it
    partial: bool = False               # run with a prefix resident and the rest streamed (size: its share)
    qos: int = policy.BURSTABLE
    base: int = 0
    max_vram: int | None = None
    max_queue: int | None = None
    overflow: str = "block"
    explicit_context: bool = False
    # Working memory (activations, KV caches) of a running task, beyond the weights:
    working: int | None = None          # declared with @gpuctx.model(working=...); None: the estimate
    working_est: int = 0                # the running estimate from measured peaks (policy.working_estimate)
    working_charged: int = 0            # bytes charged to the ledger for the task running now
    working_peak: int = 0               # the largest working memory charged or measured for one task
    working_sample: int | None = None   # the last task's measured peak (written by the slot's worker only)
    # A share of the GPU's SMs (create_context / @gpuctx.model sm_share= or sm_count=):
    sm_share: float | None = None
    sm_count: int | None = None
    sm_enforced: str = ""               # "enforced (green context, N SMs)" or "not enforced: why"

    state: str = policy.ABSENT
    obj: Any = None
    busy: bool = False
    last_used: float = 0.0
    load_cost: float = 1.0
    unload_cost: float = 0.0            # EWMA of measured unload/offload seconds (0 until one is seen)
    run_cost: float = 0.0               # EWMA of measured seconds per task (or batch) run (0 until one is seen)
    last_arrival: float | None = None   # when its latest task was submitted (None: never)
    arrival_gap: float | None = None    # EWMA of the gaps between its submits (None: fewer than two)
    queued: int = 0
    pending: int = 0
    loads: int = 0
    resident_fraction: float | None = None   # of a partial model as last placed (None: not partial)
    # For the policy's quantum (see policy.stepped_aside), set when a group starts (the engine's
    # _mark_busy_locked) and read while it runs: when its wait began, and when it started.
    waiting_since: float = 0.0
    group_start: float | None = None
    _heap: list = field(default_factory=list)
    _fifo: deque = field(default_factory=deque)
    _gone: set = field(default_factory=set)      # ids of tasks taken out of order (still in _heap)
    _promoted: Any = None                        # the overdue task peek() returned, if it did
    _mixed: bool = False                         # queued tasks of more than one priority (since empty)
    _first_priority: int = 0
    _samples: deque = field(default_factory=deque)   # recent measured working peaks (policy.WORKING_SAMPLES)

    def note_arrival(self, now: float) -> None:
        """Account a submit at ``now`` in :attr:`arrival_gap` (call with the lock held)."""
        last = self.last_arrival
        if last is not None:
            gap = now - last
            self.arrival_gap = gap if self.arrival_gap is None else 0.75 * self.arrival_gap + 0.25 * gap
        self.last_arrival = now

    def note_run(self, seconds: float) -> None:
        """Account one task (or batch) run of ``seconds`` in :attr:`run_cost` (call with the lock held)."""
        self.run_cost = seconds if not self.run_cost else 0.5 * self.run_cost + 0.5 * seconds

    @property
    def is_label(self) -> bool:
        """A slot with no loader: VRAM held only while its tasks run."""
        return self.loader is None

    def describe_size(self) -> str:
        return f"{format_size(self.size)} ({self.size_source})"

    def working_need(self) -> tuple[int, str]:
        """(bytes of working memory a task of this slot needs unless it declares its own, where from)."""
        if self.working is not None:
            return self.working, "declared"
        return self.working_est, ("estimated" if self._samples else "none")

    def note_working(self, measured: int) -> None:
        """Fold one task's measured working peak into the running estimate."""
        self._samples.append(max(0, int(measured)))
        while len(self._samples) > policy.WORKING_SAMPLES:
            self._samples.popleft()
        self.working_est = policy.working_estimate(self._samples)
        self.working_peak = max(self.working_peak, int(measured))

    # -- queue: priority first, then submission order; lazy deletion of withdrawn tasks.
    # A task that has waited ``promote_after`` seconds (the policy's max_wait) goes before every
    # younger one, whatever the priorities: the starvation bound holds per task inside a queue.
    # While every queued task has one priority the heap is in arrival order, so its head is the
    # oldest task and no FIFO is kept. The first task of another priority starts the FIFO (weak
    # references: a finished task is not kept alive by an older one still queued).
    def push(self, task: Any) -> None:
        if not self.queued:
            self._first_priority, self._mixed = task.priority, False
            self._fifo.clear()
        elif not self._mixed and task.priority != self._first_priority:
            self._mixed = True
            self._fifo.extend(weakref.ref(e[2]) for e in sorted(self._heap, key=lambda e: e[1])
                              if e[2].state is _QUEUED)
        heapq.heappush(self._heap, (-task.priority, next(_seq), task))
        if self._mixed:
            self._fifo.append(weakref.ref(task))
        self.queued += 1

    def _head(self) -> Any:
        """The heap's best queued task (stale entries dropped), or None."""
        heap, gone = self._heap, self._gone
        while heap and (heap[0][2].state is not _QUEUED or (gone and id(heap[0][2]) in gone)):
            gone.discard(id(heapq.heappop(heap)[2]))
        return heap[0][2] if heap else None

    def peek(self, now: Any = None, promote_after: float | None = None) -> Any:
        """The next task: the best by priority, or the oldest when it waited ``promote_after``
        seconds by ``now`` (a time, or a clock to call: only called when priorities differ)."""
        head = self._head()
        self._promoted = None
        if head is None:
            return None
        if promote_after is not None and now is not None and self._mixed:
            old = self.oldest_queued()
            if callable(now):
                now = now()
            if old is not head and now - old._ready_at >= promote_after:
                self._promoted = old
                return old
        return head

    def pop(self) -> Any:
        task = self.peek()
        if task is not None:
            self.pop_head()
        return task

    def pop_head(self) -> Any:
        """Remove and return the task :meth:`peek` just returned (it must have returned one)."""
        self.queued -= 1
        task = self._promoted
        if task is not None:   # the FIFO's head; its heap entry goes lazily
            self._promoted = None
            self._fifo.popleft()
            self._gone.add(id(task))
        else:
            task = heapq.heappop(self._heap)[2]
        self.forget_stale()
        return task

    def forget_stale(self) -> None:
        """With nothing queued, every entry left is stale (withdrawn, or still in the FIFO after
        it started): drop them, so that finished tasks and their results are not kept alive."""
        if not self.queued:
            self._heap.clear()
            self._fifo.clear()
            self._gone.clear()

    def take_matching(self, key: Any, limit: int, first: Any = None) -> list:
        """Pop up to ``limit`` queued tasks whose ``_batch_key`` is ``key``: ``first`` (the head
        :meth:`peek` returned, maybe a promoted one) and then the best."""
        taken, keep = ([first] if first is not None else []), []
        self._promoted = None
        gone = self._gone
        for entry in sorted(self._heap):
            task = entry[2]
            if task.state is not _QUEUED or task is first or (gone and id(task) in gone):
                continue
            if len(taken) < limit and task._batch_key == key:
                taken.append(task)
            else:
                keep.append(entry)
        heapq.heapify(keep)
        self._heap = keep
        gone.clear()
        self.queued -= len(taken)
        self.forget_stale()
        return taken

    def oldest_queued(self) -> Any:
        """The queued task that became ready first (for drop_oldest and staleness)."""
        if not self._mixed:
            return self._head()
        fifo = self._fifo
        while fifo:
            task = fifo[0]()
            if task is not None and task.state is _QUEUED:
                return task
            fifo.popleft()
        return None

    def head_priority(self) -> int:
        head = self.peek()
        return head.priority if head is not None else 0
