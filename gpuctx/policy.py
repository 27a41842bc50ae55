"""The scheduling policy: pure functions from a snapshot of plain data to a decision.

The story. Work arrives as tasks, each bound to a *slot*: a model (or execution
context) with a VRAM size. Switching a GPU from one model to another costs an unload
and a load, often seconds, so the policy's first job is to **group**: once a model is
resident it keeps running that model's ready tasks for as long as making the others wait
costs less than a switch.

**Switch cost and patience.** A slot's *switch cost* is its measured load (or restore)
time plus its measured unload time (``load_cost + unload_cost``, EWMAs kept by the
engine): switching to a model and, later, away from it again. Its *patience* is

    P(s) = max(max_wait, switch_factor x switch_cost(s))

``max_wait`` is the documented floor (30 s by default), ``switch_factor`` ``k`` (4) the
multiple. A group's *wait* runs from ``waiting_since``: the later of its oldest ready
task's ready time and the end of its last group, so a group that just ran starts a fresh
wait. A group whose wait reached its patience is **urgent**.

**Ranking** (best first; :func:`rank_key`):

1. urgent groups, the one waiting longest first (compared against the threshold, then by
   the recorded time the wait began, never by tiny differences between two waits);
2. QoS tier: GUARANTEED, then BURSTABLE, then BEST_EFFORT;
3. priority class: the best priority among the group's ready tasks (no aging: a waiting
   group does not climb classes, so equal-priority backlog does not ping-pong);
4. residency: a resident (or loading) model needs no load, so it goes first;
5. the fuller queue, the earlier wait, the name.

:func:`plan` walks the ranking and starts every group whose model fits the budget,
evicting idle models when needed (:func:`choose_victims`). When the best-ranked group
cannot get memory, groups below it may still run if they need no new memory, but may
not take memory the blocked group is waiting for: that is what keeps a large model from
starving behind a stream of small ones. When the blocked group would fit once the running
groups it outranks stepped aside, the idle models it would evict are *held* for it (not
restarted), and those running groups yield at their next task boundary, so a group blocked
by several running ones is not starved either.

**Yielding.** A running group asks :func:`should_yield` before each next task. The answer
is *defined by* :func:`plan`: the group yields exactly when a plan made with it idle would
not start it again (it evicts it for a better-ranked group, or holds it for a blocked one). So plan and should_yield share one notion of what is
blocked and by whom, and a group told to yield is never restarted by the next plan in its
place (the livelock of issue 14, entry 1). In that hypothetical plan the running group
counts as having waited nothing (it is being served), except during its *quantum*: for
``P(self)`` seconds after its group started it keeps the wait it had when it started.
Consequences:

- a strictly higher priority class (or QoS tier) pre-empts at a task boundary, unless the
  running group was switched in as urgent and is within its quantum;
- an equal-class waiting group pre-empts only once it is urgent, so a running model keeps
  its backlog until the others have waited ``k`` switch costs (never a switch per task);
- several urgent groups take turns, each keeping the GPU for its quantum;
- past its quantum, a group keeps its wait for its *tail* (:func:`in_quantum`): while its
  remaining work (queued tasks x its measured run time, ``run_cost``) ends within ``2 P(self)``
  of its start. Stopping a group with a short remainder costs a switch back to it later.

**Rent or buy** (:func:`deferred_until`). A start that must evict idle models waits until its
group has waited as long as the switches it causes take (its own load plus each victim's
reload and unload); meanwhile more of its work joins the group. Not for an urgent
group, nor for a strictly higher class than every victim's queued work, nor when nothing is
evicted. :func:`plan_wake` says when such a start falls due, so the engine plans again then.

**One GPU.** ``Snapshot.concurrency`` is the measured real overlap of task runs
(:meth:`gpuctx.trace.Stats.real_concurrency`). Below ``SERIAL_BELOW`` runs are taken to be
serialised underneath: while a group runs, no other group that needs new memory is started
unless it is urgent (it would hold memory while it waits for the GPU).

**Prefetch** (:func:`prefetch`, when the engine's ``prefetch`` setting is on): the one model not
loaded with work waiting on dependencies is loaded into free memory while others compute.

**Starvation bound.** A ready group W that cannot start for memory is started no later than

    P(W) + D(W) + sum over the other groups j of (2 P(j) + switch_cost(j) + tau)

after its wait began, where ``tau`` is the longest single task (or batch) run and ``D(W)`` its
rent-or-buy wait (at most the switch costs its start causes): it turns urgent after ``P(W)``,
and each urgent group ranked ahead of it holds the GPU for at most its quantum and its tail
(``2 P(j)``) plus one task and a switch. Inside one model's queue, tasks go by priority,
but a task that has waited ``max_wait`` is served before any younger task (the engine's
:class:`~gpuctx.models.Slot` promotes it), so no task waits forever behind a stream of
higher-priority tasks of its own model.

**Eviction** (future-aware, Belady). Among resident, idle, unpinned models whose tier is
at most the requester's: BEST_EFFORT first, then the model whose next use is furthest
away (``next_use``: 0 with ready work, 1 with only pending work, waiting for
dependencies, inf with nothing queued), then lower priority, then least recently used,
then the cheapest to reload. A model's *charge* is ``max(reserved, used)``, so evicting a
BURSTABLE model frees only its burst above the base; GUARANTEED models free nothing and
are never chosen.

Nothing here locks, sleeps, or touches a device; :mod:`gpuctx.sim` replays the same
functions on a virtual clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    "deferred_until",
    "estimated_load_cost",
    "fits_ever",
    "free_bytes",
    "in_quantum",
    "next_use",
    "patience",
    "plan",
    "rank_key",
    "plan_wake",
    "prefetch",
    "remaining",
    "should_yield",
    "stepped_aside",
    "switch_cost",
]

BEST_EFFORT, BURSTABLE, GUARANTEED = 0, 1, 2

# Slot states. "evicting" memory is still counted by the ledger but is already
# promised away, so planning treats it as free; "claim" is memory promised to a
# load that waits for its victims to go.
ABSENT, LOADING, RESIDENT, EVICTING, OFFLOADED = "absent", "loading", "resident", "evicting", "offloaded"


@dataclass(frozen=True, slots=True)
class PolicyParams:
    """Knobs of the policy (seconds)."""

    max_wait: float = 30.0       # floor of the patience; in a queue, a task older than this goes first
    aging: float = 10.0          # no longer ranks groups (it made them ping-pong); kept for configure()
    latency_priority: int = 10   # priority at or above which tasks skip batching windows
    switch_factor: float = 4.0   # k: a waiting group turns urgent after k switch costs (floor max_wait)


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
    unload_cost: float = 0.0     # seconds its last unloads/offloads took (EWMA)
    waiting_since: float | None = None  # when its current wait began (None: ``oldest``); when busy,
    #                                     the value it had when its group started
    started: float | None = None  # when its running group started (None when idle)
    next_use: float | None = None  # estimated distance to its next use (None: from queued/pending)
    keep_alive: float | None = None  # seconds it may stay idle before it is unloaded (None: forever)
    label: bool = False          # no loader: its VRAM is held only while its tasks run
    run_cost: float = 0.0        # seconds one of its tasks (or batches) runs (EWMA; 0 until one is seen)

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
    concurrency: float | None = None   # measured real overlap of task runs (Stats.real_concurrency); None: unknown


SERIAL_BELOW = 1.15   # measured real concurrency under which runs are taken to be serialised


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


def estimated_load_cost(size: int, rate: float | None, prior: float = 1.0) -> float:
    """Seconds a model never loaded yet is expected to take: ``size`` at the measured load rate
    (bytes/s) of the engine's other loads, or ``prior`` before any load was measured."""
    return prior if rate is None or rate <= 0 or size <= 0 else size / rate


def switch_cost(s: SlotView) -> float:
    """Seconds a switch to ``s`` and away again costs: its load (or restore) plus its unload."""
    return s.load_cost + s.unload_cost


def patience(s: SlotView, params: PolicyParams) -> float:
    """How long ``s``'s ready work waits before it is urgent: ``max(max_wait, k x switch cost)``."""
    return max(params.max_wait, params.switch_factor * switch_cost(s))


def next_use(queued: int, pending: int) -> float:
    """Distance to a slot's next use, for furthest-next-use eviction: 0 ready, 1 pending, inf none."""
    return 0.0 if queued else 1.0 if pending else float("inf")


def _waited(s: SlotView, now: float) -> float:
    return now - _since(s)


def _since(s: SlotView) -> float:
    return s.oldest if s.waiting_since is None else s.waiting_since


def _next_use(s: SlotView) -> float:
    return next_use(s.queued, s.pending) if s.next_use is None else s.next_use


def rank_key(s: SlotView, now: float, params: PolicyParams) -> tuple:
    """Sort key, best first when sorted ascending."""
    since = _since(s)
    urgent = now - since >= patience(s, params)
    return (
        0 if urgent else 1,
        since if urgent else 0.0,
        -s.qos,
        -s.head_priority,
        0 if s.resident else 1,
        -s.queued,
        since,
        s.name,
    )


def _victim_key(s: SlotView) -> tuple:
    return (s.qos, -_next_use(s), s.priority, s.last_used, s.load_cost, s.name)


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
    return plan_wake(snapshot)[0]


def deferred_until(s: SlotView, victims: Sequence[SlotView], now: float, params: PolicyParams) -> float | None:
    """When a start of ``s`` that must evict ``victims`` is worth its switches, or None if it is now.

    Rent or buy: evicting an idle model to make room costs its reload when its work comes
    back, and ``s``'s own load, while waiting costs only the waiting. So the start waits until
    ``s``'s group has waited as long as those switches take (``switch_cost(s)`` + the victims'
    switch costs, from the wait's start), and meanwhile more of its work gathers in one group.
    (Counting the wait of every queued task, ``queued x wait``, made the start earlier the more
    arrived; on the virtual driver with run and load times jittered by up to 30%, that made
    loads vary by more than 10% in twice as many benchmark rows, and made more of them.) Never for an urgent group, nor for a strictly
    higher class than every victim's queued work (a pre-emption is not delayed), nor when no
    victim is needed. At most that sum of switch costs per start: the starvation bound holds.
    """
    if not victims or _waited(s, now) >= patience(s, params):
        return None
    with_work = [v for v in victims if v.queued]
    if with_work and all((s.qos, s.head_priority) > (v.qos, v.head_priority) for v in with_work):
        return None
    cost = switch_cost(s) + sum(switch_cost(v) for v in victims)
    at = _since(s) + cost
    return at if at > now else None


def plan_wake(snapshot: Snapshot) -> tuple[list[Start], float | None]:
    """:func:`plan`, and when a group it defers (:func:`deferred_until`) may start (None: none).

    Nothing else may happen before then (no arrival, no task end), so the engine plans again
    at that time by itself."""
    params = snapshot.params
    slots = {s.name: s for s in snapshot.slots}
    ready = sorted((s for s in snapshot.slots if s.queued > 0 and not s.busy and s.state != EVICTING), key=lambda s: rank_key(s, snapshot.now, params))
    free = free_bytes(snapshot)
    evicting: set[str] = set()
    starts: list[Start] = []
    blocked = False
    started: set[str] = set()
    held: set[str] = set()
    wake: float | None = None
    # Runs measured not to overlap (one GPU queueing the kernels): a second group would only
    # wait for the GPU while holding memory, so while one runs, only urgent groups load.
    serial = (snapshot.concurrency is not None and snapshot.concurrency < SERIAL_BELOW
              and any(s.busy for s in snapshot.slots))
    for s in ready:
        if s.name in evicting or s.name in held:
            continue  # a victim of a better-ranked group in this same plan, or held for a blocked one
        need = need_bytes(s)
        if need == 0:
            starts.append(Start(s.name))
            started.add(s.name)
            continue
        if blocked:
            # A better-ranked group waits for memory: do not take any from under it.
            continue
        if serial and _waited(s, snapshot.now) < patience(s, params):
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
            held = _held_for(snapshot, s, pool, need - free)
            continue
        later = deferred_until(s, [slots[v] for v in victims], snapshot.now, params)
        if later is not None:
            wake = later if wake is None else min(wake, later)
            continue
        for v in victims:
            free += slots[v].used - slots[v].reserved
            evicting.add(v)
        free -= need
        starts.append(Start(s.name, victims, need))
        started.add(s.name)
    return starts, wake


def prefetch(snapshot: Snapshot, starts: Sequence[Start]) -> Start | None:
    """A model to load now, ahead of its work, while others compute; None when there is none.

    Only a model whose work is all *pending* (waiting on dependencies: it will be ready once
    running tasks end), absent or offloaded, and only into memory that is free after
    ``starts`` (the plan just made) without evicting anything, and only when that plan left no
    ready group waiting (blocked for memory or deferred): those come first. Only when it is the
    one model not resident that has work coming: with two, which is needed first is a guess,
    and the wrong one can be evicted before its first use (a load for nothing). Its restore
    (or load) then overlaps the running groups' compute, so its first task need not wait for it.
    """
    started = {st.slot for st in starts}
    if any(s.queued and not s.busy and s.state != EVICTING and s.name not in started for s in snapshot.slots):
        return None   # a ready group is waiting: the free memory is its
    free = free_bytes(snapshot) - sum(st.need for st in starts)
    candidates = [s for s in snapshot.slots
                  if s.state in (ABSENT, OFFLOADED) and not s.busy and not s.label and s.queued == 0
                  and s.pending > 0 and s.name not in started and 0 < need_bytes(s) <= free]
    if len(candidates) != 1:
        return None   # none, or several models that will want memory: which comes first is a guess
    best = candidates[0]
    if any(s.name != best.name and not s.busy and not s.resident and not s.label and (s.pending or s.queued)
           for s in snapshot.slots):
        return None   # another model will want memory too: the prefetch could be evicted unused
    return Start(best.name, (), need_bytes(best))


def _held_for(snapshot: Snapshot, s: SlotView, pool: list[SlotView], short: int) -> set[str]:
    """Idle models kept for the blocked group ``s``: the victims it would take if the running
    groups it outranks (once they step aside) were idle too; they do not start again meanwhile,
    and those running groups yield at their next task boundary. Empty when that would not do."""
    now, params = snapshot.now, snapshot.params
    mine = rank_key(s, now, params)
    widened = [_aside(v, now, params) if v.busy and rank_key(_aside(v, now, params), now, params) > mine else v
               for v in pool]
    victims = choose_victims(widened, short, requester=s)
    return set(victims) if victims is not None else set()


def remaining(s: SlotView) -> float:
    """Seconds of ready work ``s`` has queued, by its measured run time (0 until one is seen)."""
    return s.queued * s.run_cost


def in_quantum(s: SlotView, now: float, params: PolicyParams) -> bool:
    """True while the running group ``s`` keeps the wait it had when it started.

    For its quantum, ``P(s)`` seconds after its group started; then, for its *tail*, as long
    as what it has left (:func:`remaining`) ends within ``k x switch_cost(s)`` of the quantum's
    end. Stopping a group with a short tail left costs a switch back to it later, which is
    what the tail is worth waiting for; the tail's hard end keeps the starvation bound.
    """
    if s.started is None:
        return False
    run_for, quantum = now - s.started, patience(s, params)
    if run_for < quantum:
        return True
    return s.run_cost > 0 and run_for + remaining(s) <= 2 * quantum


def _aside(s: SlotView, now: float, params: PolicyParams) -> SlotView:
    return replace(s, busy=False, started=None, waiting_since=_since(s) if in_quantum(s, now, params) else now)


def stepped_aside(snapshot: Snapshot, running: str) -> Snapshot:
    """``snapshot`` with ``running``'s group idle, as the plan after it ended would see it.

    It has waited nothing (it was being served), unless it is within its quantum (``patience``
    seconds since its group started): then it keeps the wait it had when it started.
    """
    views = tuple(_aside(s, snapshot.now, snapshot.params) if s.name == running else s for s in snapshot.slots)
    return replace(snapshot, slots=views)


def should_yield(snapshot: Snapshot, running: str) -> bool:
    """True when the group running ``running`` should stop before its next task.

    Exactly when :func:`plan`, made with that group idle (:func:`stepped_aside`), would not
    start it again: it evicts its model for a better-ranked group, or holds it for a blocked
    one. The next plan then does the same, never restarting it in that group's place. A group
    with no ready task left ends anyway.
    """
    me = next((s for s in snapshot.slots if s.name == running), None)
    if me is None or me.queued == 0:
        return True
    if not any(s.queued and not s.busy and s.name != running for s in snapshot.slots):
        return False
    return all(start.slot != running for start in plan(stepped_aside(snapshot, running)))


def order_victims_for_oom(slots: Sequence[SlotView], keep: str) -> tuple[str, ...]:
    """Every idle, unpinned, evictable resident except ``keep``, in eviction order (for OOM recovery)."""
    return tuple(
        s.name
        for s in sorted(slots, key=_victim_key)
        if s.state == RESIDENT and not s.busy and not s.pinned and s.qos != GUARANTEED and s.name != keep and s.used > 0
    )


# --------------------------------------------------------------------------- the engine's other decisions
_TIER_NAMES = {BEST_EFFORT: "best_effort", BURSTABLE: "burstable", GUARANTEED: "guaranteed"}


def victim_reason(s: SlotView) -> str:
    """Why ``s`` is evicted, in the terms of the eviction order (tier, next use, priority, idle)."""
    work = "no queued work" if _next_use(s) == float("inf") else "has queued work"
    return f"{work}, {_TIER_NAMES[s.qos]}, priority {s.priority}, idle"


def keep_alive_due(slots: Iterable[SlotView], now: float) -> tuple[tuple[str, ...], float | None]:
    """(models idle past their ``keep_alive`` now, the next time one will be), over resident,
    idle, unpinned, loaded models with nothing queued."""
    due, next_at = [], None
    for s in slots:
        if (s.keep_alive is None or s.pinned or s.busy or s.state != RESIDENT or s.label
                or s.queued or s.pending):
            continue
        at = s.last_used + s.keep_alive
        if at <= now:
            due.append(s.name)
        else:
            next_at = at if next_at is None else min(next_at, at)
    return tuple(due), next_at


def evictable_now(slots: Iterable[SlotView]) -> tuple[str, ...]:
    """What ``gpuctx.evict()`` with no name evicts: every resident, idle, unpinned loaded model."""
    return tuple(s.name for s in slots if s.state == RESIDENT and not s.busy and not s.pinned and not s.label)


def batch_window(priority: int, batch_wait: float, params: PolicyParams) -> float:
    """Seconds a batch waits to fill: ``batch_wait``, or none for latency-critical work."""
    return 0.0 if priority >= params.latency_priority else batch_wait


def on_full_queue(overflow: str, block: bool, can_drop: bool) -> str:
    """What a submit to a full queue does: ``"drop_oldest"`` (fail the oldest queued task),
    ``"block"`` (wait for room) or ``"reject"`` (raise Overloaded now)."""
    if overflow == "drop_oldest" and can_drop:
        return "drop_oldest"
    if overflow == "block" and block:
        return "block"
    return "reject"


def auto_size_claim(snapshot: Snapshot, name: str) -> int:
    """Bytes a first load of a ``vram="auto"`` model may take before it is measured: all that is free."""
    claim = next((s.claim for s in snapshot.slots if s.name == name), 0)
    return max(0, free_bytes(snapshot) + claim)


def route_to_cpu(fallback: str | None, fits_ever: bool, fits_now: bool) -> bool:
    """True when a call goes to the CPU pool instead of waiting for the GPU: ``fallback="cpu"``
    and its model can never fit, or cannot fit now even by evicting (with a pressure handler)."""
    return fallback == "cpu" and not (fits_ever and fits_now)
