"""The scheduling policy: pure functions from a snapshot of plain data to a decision.

The story. Work arrives as tasks, each bound to a *slot*: a model (or execution
context) with a VRAM size. Switching a GPU from one model to another costs a load,
often seconds, so the policy's first job is to **group**: once a model is resident it
keeps running that model's ready tasks. Grouping must not starve anyone, so every
ready group is **ranked** by

1. staleness: a group whose oldest ready task has waited ``max_wait`` seconds or more
   jumps ahead of everything else (oldest first);
2. QoS tier: GUARANTEED, then BURSTABLE, then BEST_EFFORT;
3. effective priority: the group's highest task priority plus one level per ``aging``
   seconds its oldest task has waited;
4. residency: a resident (or loading) model needs no load, so it goes first;
5. the fuller queue, then the older head.

:func:`plan` walks the ranking and starts every group whose model fits the budget,
evicting idle models when needed (:func:`choose_victims`). When the best-ranked group
cannot get memory, groups below it may still run if they need no new memory, but may
not take memory the blocked group is waiting for: that is what keeps a large model from
starving behind a stream of small ones. A running group asks :func:`should_yield` before
each next task; it yields to a blocked group that ranks above it.

Eviction order among resident, idle, unpinned models whose tier is at most the
requester's: BEST_EFFORT first, then models with no queued work, then lower priority,
then least recently used, then the cheapest to reload. A model's *charge* is
``max(reserved, used)``, so evicting a BURSTABLE model frees only its burst above the
base; GUARANTEED models free nothing and are never chosen.

Nothing here locks, sleeps, or touches a device; :mod:`gpuctx.sim` replays the same
functions on a virtual clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

__all__ = [
    "BEST_EFFORT",
    "BURSTABLE",
    "GUARANTEED",
    "PolicyParams",
    "SlotView",
    "Snapshot",
    "Start",
    "charge",
    "choose_victims",
    "fits_ever",
    "free_bytes",
    "plan",
    "rank_key",
    "should_yield",
]

BEST_EFFORT, BURSTABLE, GUARANTEED = 0, 1, 2

# Slot states. "evicting" memory is still counted by the ledger but is already
# promised away, so planning treats it as free; "claim" is memory promised to a
# load that waits for its victims to go.
ABSENT, LOADING, RESIDENT, EVICTING, OFFLOADED = "absent", "loading", "resident", "evicting", "offloaded"


@dataclass(frozen=True, slots=True)
class PolicyParams:
    """Knobs of the policy (seconds)."""

    max_wait: float = 30.0       # staleness bound: a ready task older than this goes first
    aging: float = 10.0          # one priority level gained per this many seconds waited
    latency_priority: int = 10   # priority at or above which tasks skip batching windows


@dataclass(frozen=True, slots=True)
class SlotView:
    """One model/context as the policy sees it."""

    name: str
    size: int                    # bytes it takes when resident
    state: str = ABSENT
    used: int = 0                # bytes the ledger counts for it now
    reserved: int = 0            # QoS base reservation
    claim: int = 0               # bytes promised to its pending load
    busy: bool = False           # a worker is running its group
    pinned: bool = False
    priority: int = 0
    qos: int = BURSTABLE
    last_used: float = 0.0
    load_cost: float = 1.0       # seconds to make it resident again
    queued: int = 0              # ready tasks
    pending: int = 0             # tasks still waiting for dependencies
    head_priority: int = 0       # best priority among ready tasks
    oldest: float = 0.0          # ready time of its oldest ready task

    @property
    def resident(self) -> bool:
        """Resident or on its way (no new memory needed to run it)."""
        return self.state in (RESIDENT, LOADING)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a decision needs: the time, the budget, the slots."""

    now: float
    budget: int
    slots: tuple[SlotView, ...]
    params: PolicyParams = field(default_factory=PolicyParams)


@dataclass(frozen=True, slots=True)
class Start:
    """Decision: start a group of ``slot``'s tasks, after evicting ``evict``."""

    slot: str
    evict: tuple[str, ...] = ()
    need: int = 0                # bytes to claim for the load (0 when resident)


def charge(s: SlotView) -> int:
    """Bytes the ledger counts for ``s`` for planning (evicting memory counts as gone)."""
    used = 0 if s.state == EVICTING else s.used
    return max(s.reserved, used, s.claim)


def free_bytes(snapshot: Snapshot) -> int:
    """Budget minus every slot's planning charge."""
    return snapshot.budget - sum(charge(s) for s in snapshot.slots)


def need_bytes(s: SlotView) -> int:
    """Extra bytes ``s`` needs to become resident: what its size adds above what it is charged now."""
    if s.resident:
        return 0
    return max(0, max(s.reserved, s.size) - charge(s))


def fits_ever(size: int, slot: str, reserved: int, budget: int, others_reserved: int) -> bool:
    """True when ``size`` bytes for ``slot`` can ever fit: the budget less other slots' reservations."""
    return max(size, reserved) <= budget - others_reserved


def rank_key(s: SlotView, now: float, params: PolicyParams) -> tuple:
    """Sort key, best first when sorted ascending."""
    waited = max(0.0, now - s.oldest)
    stale = waited >= params.max_wait
    eff = s.head_priority + (int(waited // params.aging) if params.aging > 0 else 0)
    return (
        0 if stale else 1,
        -waited if stale else 0.0,
        -s.qos,
        -eff,
        0 if s.resident else 1,
        -s.queued,
        s.oldest,
        s.name,
    )


def _victim_key(s: SlotView) -> tuple:
    has_work = (s.queued + s.pending) > 0
    return (s.qos, has_work, s.priority, s.last_used, s.load_cost, s.name)


def choose_victims(slots: Iterable[SlotView], need: int, requester: SlotView | None = None) -> tuple[str, ...] | None:
    """Names of idle models to evict so that ``need`` more bytes are free, or None if impossible.

    Only resident, idle, unpinned models with something to free (``used > reserved``) whose
    QoS tier is at most the requester's are candidates; the fewest in eviction order are taken,
    then any that turned out unnecessary are put back.
    """
    if need <= 0:
        return ()
    tier = requester.qos if requester is not None else GUARANTEED
    name = requester.name if requester is not None else None
    candidates = sorted(
        (
            s
            for s in slots
            if s.state == RESIDENT
            and not s.busy
            and not s.pinned
            and s.qos != GUARANTEED
            and s.qos <= tier
            and s.name != name
            and s.used > s.reserved
        ),
        key=_victim_key,
    )
    chosen: list[SlotView] = []
    freed = 0
    for s in candidates:
        if freed >= need:
            break
        chosen.append(s)
        freed += s.used - s.reserved
    if freed < need:
        return None
    # Put back the latest-chosen victims we do not need after all (a big victim taken
    # last can make earlier small ones unnecessary).
    for s in list(reversed(chosen[:-1])):
        if freed - (s.used - s.reserved) >= need:
            chosen.remove(s)
            freed -= s.used - s.reserved
    return tuple(s.name for s in chosen)


def plan(snapshot: Snapshot) -> list[Start]:
    """Groups to start now, best-ranked first, each with the evictions it needs."""
    params = snapshot.params
    slots = {s.name: s for s in snapshot.slots}
    ready = sorted((s for s in snapshot.slots if s.queued > 0 and not s.busy and s.state != EVICTING), key=lambda s: rank_key(s, snapshot.now, params))
    free = free_bytes(snapshot)
    evicting: set[str] = set()
    starts: list[Start] = []
    blocked = False
    started: set[str] = set()
    for s in ready:
        if s.name in evicting:
            continue  # chosen as a victim by a better-ranked group in this same plan
        need = need_bytes(s)
        if need == 0:
            starts.append(Start(s.name))
            started.add(s.name)
            continue
        if blocked:
            # A better-ranked group waits for memory: do not take any from under it.
            continue
        if need <= free:
            free -= need
            starts.append(Start(s.name, (), need))
            started.add(s.name)
            continue
        pool = [v for v in slots.values() if v.name not in evicting and v.name not in started]
        victims = choose_victims(pool, need - free, requester=s)
        if victims is None:
            blocked = True
            continue
        for v in victims:
            free += slots[v].used - slots[v].reserved
            evicting.add(v)
        free -= need
        starts.append(Start(s.name, victims, need))
        started.add(s.name)
    return starts


def should_yield(snapshot: Snapshot, running: str) -> bool:
    """True when the group running ``running`` should stop before its next task.

    It yields to a ready group that ranks above it and cannot start while ``running``
    holds its memory. A group with no ready task left ends anyway.
    """
    params = snapshot.params
    me = next((s for s in snapshot.slots if s.name == running), None)
    if me is None or me.queued == 0:
        return True
    mine = rank_key(me, snapshot.now, params)
    free = free_bytes(snapshot)
    for s in snapshot.slots:
        if s.name == running or s.queued == 0 or s.busy:
            continue
        if rank_key(s, snapshot.now, params) >= mine:
            continue
        need = need_bytes(s)
        if need <= free:
            continue  # it can start beside us; the dispatcher will start it
        # Would it fit if we stepped aside and our model became evictable?
        idle_me = SlotView(**{**_asdict(me), "busy": False, "queued": 0, "pending": 0})
        others = [idle_me if v.name == running else v for v in snapshot.slots]
        if choose_victims(others, need - free, requester=s) is not None:
            return True
    return False


def _asdict(s: SlotView) -> dict:
    return {f: getattr(s, f) for f in SlotView.__slots__}


def order_victims_for_oom(slots: Sequence[SlotView], keep: str) -> tuple[str, ...]:
    """Every idle, unpinned, evictable resident except ``keep``, in eviction order (for OOM recovery)."""
    return tuple(
        s.name
        for s in sorted(slots, key=_victim_key)
        if s.state == RESIDENT and not s.busy and not s.pinned and s.qos != GUARANTEED and s.name != keep and s.used > 0
    )
