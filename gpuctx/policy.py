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

**Eviction** (future-aware, Belady, weighted by what a miss costs). Among resident, idle,
unpinned models whose tier is at most the requester's: BEST_EFFORT first; then a model that
will not be used again (``next_use`` inf: nothing queued, nothing pending, and its calls do not
arrive as a stream still going, :func:`expected`); then lower priority; then, among models
that will be used again, the cheapest to switch back in (a 4.5 GB Whisper is not evicted for a
2 GB TTS when a 1.5 GB LLM can go), and at equal cost the one used furthest ahead (0 with
ready work, 1 with pending work or an expected call); then least recently used, then the
cheapest to reload. When cheaper victims are running now, a start waits for their group to end,
up to its patience, rather than evict a dearer idle model (:func:`cheaper_running`,
:func:`deferred_until`); a pre-emption by a strictly higher class does not wait. A model's
*charge* is ``max(reserved, used)``, so evicting a BURSTABLE model frees only its burst
above the base; GUARANTEED models free nothing and are never chosen.

**Unknown sizes** (``vram="auto"`` before its first load measures it; ``SlotView.size_known``
False). :func:`auto_size_claim` decides what such a load claims: its estimate (a size it had
before), else everything free; and only one of them loads at a time: while another is being
measured, the plan does not start it (two guesses together could overcommit the budget). Once
the load is measured, :func:`measured_fit` says whether the measured size is charged now, after
evicting idle models, or (the rest running) the model is unloaded and loaded again once the plan
finds room for its size, now known. Neither ever charges more than the budget.

**Working memory and SM shares.** A running task is charged its working memory (activations,
caches) on top of its model's weights, so what a group needs to start (:func:`start_need`) is
its load plus its next task's working memory; before each further task :func:`admit_working`
says start, wait (memory in use will come back) or yield (let the plan evict or run others).
A group with an SM share starts only while the shares of the groups running at once stay
within 1.0 (:func:`sm_fits`); groups without one are never held back by it.

Nothing here locks, sleeps, or touches a device; :mod:`gpuctx.sim` replays the same
functions on a virtual clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

__all__ = [
    "BEST_EFFORT",
    "BURSTABLE",
    "GUARANTEED",
    "PolicyParams",
    "WorkingAdmission",
    "admit_working",
    "auto_size_claim",
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
    "measured_fit",
    "next_use",
    "patience",
    "plan",
    "rank_key",
    "plan_wake",
    "prefetch",
    "remaining",
    "should_yield",
    "sm_explain",
    "sm_fits",
    "start_need",
    "stepped_aside",
    "switch_cost",
    "working_estimate",
    "working_extra",
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
    working: int = 0             # working memory charged now for its running task (activations, caches)
    next_working: int = 0        # working memory its next ready task needs (declared or estimated)
    sm_share: float | None = None  # fraction of the GPU's SMs its context asks for (None: the rest)
    run_cost: float = 0.0        # seconds one of its tasks (or batches) runs (EWMA; 0 until one is seen)
    size_known: bool = True      # False: vram="auto" not measured yet (``size``: an estimate, 0 for none)

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
    return max(s.reserved, used + s.working, s.claim)


def _view(snapshot: Snapshot, name: str, **missing: Any) -> SlotView:
    """``name``'s view in ``snapshot``; a view of an empty slot (with ``missing``) if it has none."""
    return next((s for s in snapshot.slots if s.name == name), None) or SlotView(name=name, size=0, **missing)


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


def next_use(queued: int, pending: int, expected: bool = False) -> float:
    """Distance to a slot's next use, for eviction: 0 ready, 1 pending or expected
    (:func:`expected`), inf none."""
    return 0.0 if queued else 1.0 if pending or expected else float("inf")


EXPECT_GAPS = 3.0   # a stream of calls has stopped once this many of its mean gaps passed


def expected(last_arrival: float | None, gap: float | None, now: float) -> bool:
    """True while a model's calls arrive as a stream that has not stopped: it had two calls or
    more, and the latest came within ``EXPECT_GAPS`` of their mean gap (an EWMA) of ``now``.
    Calls submitted in one burst have a gap of about 0, so they stop being expected at once."""
    return gap is not None and last_arrival is not None and now - last_arrival <= EXPECT_GAPS * gap


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
    use = _next_use(s)
    needed = use != float("inf")   # a miss costs its switch back in only if it is used again
    return (s.qos, needed, s.priority, switch_cost(s) if needed else 0.0, -use, s.last_used, s.load_cost, s.name)


def cheaper_running(pool: Sequence[SlotView], need: int, requester: SlotView, victims: Sequence[SlotView]) -> bool:
    """True when evicting models that run now, once their groups end, would cost less in switches
    than ``victims`` (the idle ones :func:`choose_victims` found)."""
    if not any(v.busy for v in pool):
        return False
    alt = choose_victims([replace(v, busy=False) if v.busy else v for v in pool], need, requester=requester)
    views = {v.name: v for v in pool}
    return alt is not None and sum(switch_cost(views[n]) for n in alt) < sum(map(switch_cost, victims))


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


def deferred_until(s: SlotView, victims: Sequence[SlotView], now: float, params: PolicyParams,
                   wait_for_running: bool = False) -> float | None:
    """When a start of ``s`` that must evict ``victims`` is worth its switches, or None if it is now.

    Rent or buy: evicting an idle model to make room costs its reload when its work comes
    back, and ``s``'s own load, while waiting costs only the waiting. So the start waits until
    ``s``'s group has waited as long as those switches take (``switch_cost(s)`` + the victims'
    switch costs, from the wait's start), and meanwhile more of its work gathers in one group.
    (Counting the wait of every queued task, ``queued x wait``, made the start earlier the more
    arrived; on the virtual driver with run and load times jittered by up to 30%, that made
    loads vary by more than 10% in twice as many benchmark rows, and made more of them.) Never
    for an urgent group, nor for a strictly higher class than every victim's queued work (a
    pre-emption is not delayed), nor when no victim is needed. With ``wait_for_running``
    (:func:`cheaper_running`: cheaper victims run now), the start waits for their group to end
    (which plans again) up to ``s``'s patience, rather than evict the dearer idle ones. Never
    past the patience: the starvation bound holds.
    """
    if not victims or _waited(s, now) >= patience(s, params):
        return None
    with_work = [v for v in victims if v.queued]
    if with_work and all((s.qos, s.head_priority) > (v.qos, v.head_priority) for v in with_work):
        return None
    if wait_for_running:
        at = _since(s) + patience(s, params)
    else:
        at = _since(s) + switch_cost(s) + sum(switch_cost(v) for v in victims)
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
        if not sm_fits(snapshot, s, started):
            continue  # its SM share does not fit beside the groups that run at once
        need = start_need(s)  # its load and its next task's working memory
        unknown = not s.size_known and not s.resident
        if unknown:  # a load of unknown size takes memory, even when none is free to claim
            claim = auto_size_claim(snapshot, s.name, free, started)
            if claim is None:
                continue  # another model's first load is being measured: this one waits for it
            need = max(0, max(s.reserved, claim) - charge(s))
        elif need == 0:
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
        views = [slots[v] for v in victims]
        later = deferred_until(s, views, snapshot.now, params, cheaper_running(pool, need - free, s, views))
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
                  if s.state in (ABSENT, OFFLOADED) and not s.busy and not s.label and s.queued == 0 and s.size_known
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
    # As the engine leaves it when the group ends: its group's claim dropped and its working memory
    # released (a claim kept here made the plan see no room for the slot's own next task, so the
    # group yielded, the real plan restarted it, and that repeated with no time passing).
    return replace(s, busy=False, started=None, claim=0, working=0,
                   waiting_since=_since(s) if in_quantum(s, now, params) else now)


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
    """Why ``s`` is evicted, in the terms of the eviction order (tier, next use, priority, the
    cost of switching back, idle)."""
    if _next_use(s) == float("inf"):
        return f"no queued work, {_TIER_NAMES[s.qos]}, priority {s.priority}, idle"
    work = "has queued work" if s.queued else "has pending work" if s.pending else "calls expected"
    return (f"{work}, {_TIER_NAMES[s.qos]}, priority {s.priority}, "
            f"{format(switch_cost(s), '.3g')} s to switch back in, idle")


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


def auto_size_claim(snapshot: Snapshot, name: str, free: int | None = None,
                    starting: Iterable[str] = ()) -> int | None:
    """Bytes to charge the load of ``name`` while its size is unknown (``vram="auto"`` not measured
    yet), or None: it waits.

    Only one model of unknown size loads at a time: while another one is (its group started, or
    it is in ``starting``, the groups a plan is starting), this one waits (None), since what that
    load will take is unknown and two of them could together overcommit the budget. Otherwise the
    load claims its estimate (``size``, a size known before, such as one declared earlier) or, with
    none, everything it holds plus everything ``free`` (by default :func:`free_bytes`): nothing
    else takes memory while it loads. Once measured, its charge shrinks to the real size (or grows:
    :func:`measured_fit`) and the others go on. A model whose size is known is charged its size.
    """
    me = _view(snapshot, name, size_known=False)
    if me.size_known:
        return max(me.reserved, me.size)
    also = set(starting)
    if any(not s.size_known and (s.busy or s.name in also) and s.name != name for s in snapshot.slots):
        return None
    if me.size > 0:
        return max(me.reserved, me.size)
    return charge(me) + max(0, free_bytes(snapshot) if free is None else free)


def measured_fit(snapshot: Snapshot, name: str, measured: int) -> tuple[str, tuple[str, ...]]:
    """What a load of ``name`` that measured ``measured`` bytes does, while it is charged its claim.

    ``("keep", ())``: charge it the measured size now (it fits in its charge and the memory that
    is free and not promised to another load). ``("evict", victims)``: evict these idle models
    first, then charge it. ``("retry", ())``: it does not fit now and evicting idle models would
    not do (the others are running): unload it, and load it again once the plan finds room for
    its size, now known. (Whether it can ever fit is the caller's check, with its reservations
    and pinned models: :func:`fits_ever`.) Never an answer that charges more than the budget.
    """
    me = _view(snapshot, name)
    held = _held_now(me)
    want = max(me.reserved, measured + me.working)
    if want <= held + free_now(snapshot):
        return "keep", ()
    others = [s for s in snapshot.slots if s.name != name]
    victims = choose_victims(others, want - held - free_bytes(snapshot), requester=me)
    return ("evict", victims) if victims else ("retry", ())


def route_to_cpu(fallback: str | None, fits_ever: bool, fits_now: bool) -> bool:
    """True when a call goes to the CPU pool instead of waiting for the GPU: ``fallback="cpu"``
    and its model can never fit, or cannot fit now even by evicting (with a pressure handler)."""
    return fallback == "cpu" and not (fits_ever and fits_now)


# --------------------------------------------------------------------------- a budget shared by several kernels
# gpuctx.share keeps one budget for several kernels (processes) in a database; these are the
# decisions it takes over a reading of that database. The fairness rule, with N the live
# kernels of the share and F = budget / N their fair share:
#   1. victims are taken first from the kernels holding more than F;
#   2. a kernel holding at most F that is itself waiting for memory is never asked to evict;
#   3. a kernel that would end above F takes nothing from a kernel with work queued (or a
#      request open) that would fall below F;
#   4. a kernel that would end above F leaves free memory to a waiting kernel below F that
#      can take it now.
# Otherwise (the others' demand is satisfied: nothing queued, nothing asked) a kernel may use
# the whole budget.


@dataclass(frozen=True, slots=True)
class SharedModel:
    """One model charged in a share, as the share's database shows it."""

    kernel: int                  # the owning kernel's row id
    model: str
    nbytes: int                  # bytes charged
    busy: bool = True            # running, loading or evicting: not a victim
    pinned: bool = False
    priority: int = 0
    queued: int = 0              # its tasks queued or waiting for dependencies
    idle_for: float = 0.0        # seconds since it was last used (ages compare across processes)
    load_cost: float = 1.0       # seconds to load it again


@dataclass(frozen=True, slots=True)
class ShareDemand:
    """A kernel of a share: what it holds, whether work is queued, and what it waits for."""

    kernel: int
    held: int                    # bytes charged to it
    queued: int = 0              # its live tasks
    waiting: int = 0             # bytes its open requests ask for beyond what it holds (0: none)


def share_fair(budget: int, kernels: int) -> float:
    """The fair share F of one kernel: the budget over the live kernels."""
    return budget / max(1, kernels)


def share_may_take(budget: int, demands: Sequence[ShareDemand], me: int, extra: int) -> bool:
    """True when kernel ``me`` may be granted ``extra`` more bytes now (fits, and rule 4)."""
    held = {d.kernel: d.held for d in demands}
    free = budget - sum(held.values())
    if extra > free:
        return False
    fair = share_fair(budget, len(demands))
    if held.get(me, 0) + extra <= fair:
        return True
    return not any(d.kernel != me and d.waiting and d.held < fair and d.waiting <= free for d in demands)


def _share_victim_key(m: SharedModel, over: set[int]) -> tuple:
    # As inside a kernel: a model with work coming costs its reload when evicted, so among those
    # the cheapest to load again goes first (a share sees no streams of calls, only queued work).
    return (0 if m.kernel in over else 1, 1 if m.queued else 0, m.priority, m.load_cost if m.queued else 0.0,
            -m.idle_for, m.load_cost, m.kernel, m.model)


def share_victims(models: Iterable[SharedModel], need: int, me: int, budget: int,
                  demands: Sequence[ShareDemand]) -> tuple[tuple[int, str], ...] | None:
    """(kernel, model) pairs of OTHER kernels to ask to evict so ``need`` bytes come free, or None.

    Candidates are idle, unpinned models of other kernels; the order is the fairness rule's
    (owners above their fair share first), then no queued work first, lower priority, among
    models with queued work the cheapest to reload, then least recently used, cheapest to reload. The fewest are taken, then any found unnecessary are put back.
    """
    if need <= 0:
        return ()
    fair = share_fair(budget, len(demands))
    by = {d.kernel: d for d in demands}
    mine = by[me].held if me in by else 0
    over = {d.kernel for d in demands if d.held > fair}
    taken: dict[int, int] = {}
    chosen: list[SharedModel] = []
    freed = 0
    for m in sorted((m for m in models if m.kernel != me and not m.busy and not m.pinned and m.nbytes > 0),
                    key=lambda m: _share_victim_key(m, over)):
        if freed >= need:
            break
        owner = by.get(m.kernel, ShareDemand(m.kernel, m.nbytes))
        left = owner.held - taken.get(m.kernel, 0) - m.nbytes
        if owner.waiting and owner.held <= fair:
            continue                                            # rule 2
        if mine + need > fair and left < fair and (owner.queued or owner.waiting):
            continue                                            # rule 3
        chosen.append(m)
        taken[m.kernel] = taken.get(m.kernel, 0) + m.nbytes
        freed += m.nbytes
    if freed < need:
        return None
    for m in list(reversed(chosen[:-1])):
        if freed - m.nbytes >= need:
            chosen.remove(m)
            freed -= m.nbytes
    return tuple((m.kernel, m.model) for m in chosen)
# --------------------------------------------------------------------------- working memory
# A task needs memory beyond its model's weights while it runs: activations, KV caches,
# workspaces. The ledger charges it from the task's start to its end, so two co-resident models
# whose weights fit but whose tasks together would not are not run at once. A task's working
# memory is what it declares (``working=`` on the task, else on the model), else the model's
# estimate: the largest of its last measured peaks (measured on a GPU only).
WORKING_SAMPLES = 16   # measured peaks the estimate looks back over


@dataclass(frozen=True, slots=True)
class WorkingAdmission:
    """Whether a task may start given its working memory (:func:`admit_working`).

    ``action`` is ``"start"`` (charge ``charge`` bytes and run), ``"wait"`` (memory that is in
    use now will come back: another task's working memory, a load or an eviction under way) or
    ``"yield"`` (nothing under way will make room: the group steps aside and the next
    :func:`plan` decides, evicting idle models or letting the other groups go first).
    """

    action: str
    charge: int
    need: int
    free: int
    reason: str


def start_need(s: SlotView) -> int:
    """Extra bytes ``s`` needs to start its next task: its load when it is not resident, plus that
    task's working memory, above what it is charged now (:func:`need_bytes` when it needs none)."""
    held = s.used + s.working if s.resident else s.size
    return max(0, max(s.reserved, held + s.next_working) - charge(s))


def working_extra(s: SlotView, working: int) -> int:
    """Bytes that charging ``working`` more to ``s`` adds to the total (its reservation or claim absorbs some)."""
    return max(0, max(s.reserved, s.used + s.working + working, s.claim) - charge(s))


def free_now(snapshot: Snapshot) -> int:
    """Budget minus every slot's charge, memory still being evicted included (what may be taken now)."""
    return snapshot.budget - sum(_held_now(s) for s in snapshot.slots)


def _held_now(s: SlotView) -> int:
    """What ``s`` holds of the budget now: its base, its bytes in use with its working memory, or its claim."""
    return max(s.reserved, s.used + s.working, s.claim)


def working_estimate(samples: Iterable[int]) -> int:
    """The running estimate of a model's peak working memory: the largest recent measured peak
    (an over-estimate only makes a task wait a little; an under-estimate can run out of memory)."""
    return max((int(x) for x in samples), default=0)


def working_cap(size: int, reserved: int, budget: int, others_held: int) -> int:
    """The most working memory a model of ``size`` can ever be charged: the budget less its
    weights (or reservation) and what others hold for good (reservations, pinned models)."""
    return max(0, budget - others_held - max(size, reserved))


def admit_working(snapshot: Snapshot, name: str, working: int, ahead: Sequence[str] = ()) -> WorkingAdmission:
    """May ``name``'s next task, needing ``working`` bytes of working memory, start now?

    ``ahead`` names the slots whose tasks asked for working memory earlier and still wait:
    they go first, so two models that cannot run at once take turns task by task. A task
    that fits starts. One that does not waits while memory in use will come back (another
    task's working memory, a load or an eviction under way), and otherwise yields its group
    to the plan, which can evict idle models or run the others first. When nothing else is
    running and nothing can be evicted, waiting would be forever: it starts with what is free.
    """
    me = _view(snapshot, name)
    free = free_now(snapshot)
    need = working_extra(me, working)
    if working <= 0:
        return WorkingAdmission("start", 0, 0, free, "no working memory")
    if ahead:
        return WorkingAdmission("wait", 0, need, free, f"{', '.join(ahead)} asked for working memory first")
    if need <= free:
        return WorkingAdmission("start", working, need, free, f"needs {need} bytes more, {free} free")
    others = [s for s in snapshot.slots if s.name != name]
    moving = [s.name for s in others if s.working or s.state in (LOADING, EVICTING)]
    if moving:
        return WorkingAdmission("wait", 0, need, free, f"needs {need} bytes more, {free} free; "
                                f"{', '.join(moving)} will release memory")
    if any(s.busy for s in others) or choose_victims(others, need - free, requester=me) is not None:
        return WorkingAdmission("yield", 0, need, free, f"needs {need} bytes more, {free} free; "
                                "the plan evicts idle models or runs the others first")
    # Only this group runs and nothing can be evicted: the most it can be given.
    most = max(0, min(working, max(me.reserved, me.used + me.working, me.claim) + free - me.used - me.working))
    return WorkingAdmission("start", most, need, free, f"needs {need} bytes more, {free} free; "
                            f"nothing else runs or can be evicted: charged {most}")


# --------------------------------------------------------------------------- SM shares
# A context may ask for a share of the GPU's SMs (``sm_share=``). The shares of the groups that
# run at once never add up to more than 1.0; contexts without a share use the rest and are
# never held back by this rule. On CUDA with green contexts the share is an SM partition of
# the context's stream; elsewhere it is bookkeeping only (``status()`` says "not enforced").
SM_EPSILON = 1e-9


def sm_in_use(snapshot: Snapshot, also: Iterable[str] = ()) -> float:
    """Sum of the SM shares of the busy slots and of ``also`` (groups a plan is starting)."""
    extra = set(also)
    return sum(s.sm_share for s in snapshot.slots if s.sm_share and (s.busy or s.name in extra))


def sm_fits(snapshot: Snapshot, s: SlotView, started: Iterable[str] = ()) -> bool:
    """True when ``s``'s SM share fits beside the groups running at once (and ``started``): the
    shares add up to at most 1.0. A slot without a share always fits (it uses the rest)."""
    if not s.sm_share or s.busy:
        return True
    return sm_in_use(snapshot, started) + s.sm_share <= 1.0 + SM_EPSILON


def sm_explain(snapshot: Snapshot, name: str, share: float | None) -> str:
    """One sentence, with the numbers, on whether ``name``'s SM share fits beside what runs now."""
    if not share:
        return f"{name!r} has no SM share: it uses the SMs the running shares leave"
    running = [(s.name, s.sm_share) for s in snapshot.slots if s.sm_share and s.busy and s.name != name]
    used = sum(v for _, v in running)
    parts = " + ".join(f"{n} {v:.2f}" for n, v in running) or "none"
    verdict = "fits" if used + share <= 1.0 + SM_EPSILON else "exceeds 1.0: it waits for a running share to end"
    return (f"SM shares running: {parts} (= {used:.2f}); {name!r} asks {share:.2f}, total {used + share:.2f} "
            f"{verdict}")


# --------------------------------------------------------------------------- routing across workers
# A cluster runs one engine per GPU. Before a call reaches an engine, the driver picks the worker,
# over a frozen view of each one as the driver knows it (what it holds, what it has queued, what
# is free). The rule, best first:
#
# 1. *Affinity.* A worker that holds the model (resident, loading, or with its tasks queued)
#    takes the call, the one with the shortest backlog among them, so calls of one model group
#    on one engine and load once.
# 2. *Replication.* When that holder's backlog is long (more than ``replicate_after`` loads of
#    the model) and another worker would finish the call sooner even after loading the model
#    there, the call goes to that worker: the hot model gets a second home.
# 3. *Placement.* A model no worker holds goes where loading it costs least: its load, plus the
#    reload cost of the idle models it would push out (cheapest first, only when the free memory
#    is short), plus the worker's backlog.
#
# A worker whose budget can never hold the model is never chosen; none at all: None.

@dataclass(frozen=True, slots=True)
class WorkerView:
    """One cluster worker as the router sees it (bytes and seconds)."""

    name: str
    budget: int
    free: int = 0                                   # budget less what its held models take
    backlog: float = 0.0                            # seconds of work routed there and not ended
    holds: tuple[str, ...] = ()                     # models resident, loading or queued there
    idle: tuple[tuple[str, int, float], ...] = ()   # evictable residents: (name, bytes, reload seconds)
    alive: bool = True


def eviction_cost(w: WorkerView, need: int) -> float | None:
    """Seconds of reloads that freeing ``need`` bytes on ``w`` would cost later (idle models,
    the cheapest reload per byte first); 0 when ``w`` has the room; None when it cannot."""
    short = need - w.free
    if short <= 0:
        return 0.0
    cost = 0.0
    for _, nbytes, reload_s in sorted(w.idle, key=lambda v: (v[2] / max(v[1], 1), v[0])):
        cost += reload_s
        short -= nbytes
        if short <= 0:
            return cost
    return None


def placement_cost(w: WorkerView, size: int, load_cost: float) -> float:
    """Seconds until ``w`` could start a call of a model it does not hold: its backlog, the load,
    and the later reloads of its victims (a worker short of room even after evicting its idle
    models has to wait for its queue to drain, so it counts its whole backlog twice)."""
    victims = eviction_cost(w, size)
    if victims is None:
        return 2 * w.backlog + load_cost + sum(v[2] for v in w.idle)
    return w.backlog + load_cost + victims


def route(workers: Sequence[WorkerView], model: str, size: int, load_cost: float,
          replicate_after: float = 2.0) -> str | None:
    """The worker a call of ``model`` (``size`` bytes, ``load_cost`` seconds to load) goes to.

    Affinity first, then replication when the holder's backlog is long, else the cheapest
    placement (see the rules above). Ties go to the first worker listed. None: no live worker's
    budget can ever hold ``size``.
    """
    fit = [w for w in workers if w.alive and w.budget >= size]
    if not fit:
        return None
    holders = [w for w in fit if model in w.holds]
    others = [w for w in fit if model not in w.holds]
    best_other = min(others, key=lambda w: placement_cost(w, size, load_cost), default=None)
    if holders:
        home = min(holders, key=lambda w: w.backlog)
        if (best_other is not None and should_replicate(home.backlog, load_cost, replicate_after)
                and placement_cost(best_other, size, load_cost) < home.backlog):
            return best_other.name
        return home.name
    return None if best_other is None else best_other.name


def should_replicate(holder_backlog: float, load_cost: float, replicate_after: float = 2.0) -> bool:
    """True when a model's queue on its holder is long enough (``replicate_after`` loads of it)
    that a second worker loading it may pay off."""
    return holder_backlog > replicate_after * max(load_cost, 0.0)


def largest_worker(workers: Sequence[WorkerView]) -> WorkerView | None:
    """The live worker with the largest budget (what a too-large model is measured against)."""
    return max((w for w in workers if w.alive), key=lambda w: w.budget, default=None)


__all__ += ["WorkerView", "eviction_cost", "largest_worker", "placement_cost", "route", "should_replicate"]
