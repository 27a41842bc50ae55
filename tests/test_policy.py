"""The pure policy: properties over random snapshots (hypothesis) and whole decisions on known ones."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuctx import policy
from gpuctx.policy import (
    ABSENT, BEST_EFFORT, BURSTABLE, GUARANTEED, RESIDENT, PolicyParams, SlotView, Snapshot, Start,
    choose_victims, plan, should_yield,
)

G = 10**9


@st.composite
def snapshots(draw):
    budget = draw(st.integers(4, 16)) * G
    n = draw(st.integers(1, 6))
    slots, committed = [], 0
    for i in range(n):
        size = draw(st.integers(0, 8)) * G // 2
        qos = draw(st.sampled_from([BEST_EFFORT, BURSTABLE, BURSTABLE, GUARANTEED]))
        reserved = size if qos == GUARANTEED else (draw(st.integers(0, 2)) * G // 2 if qos == BURSTABLE else 0)
        reserved = min(reserved, size)
        resident = draw(st.booleans())
        used = size if resident else 0
        charge = max(reserved, used)
        if committed + charge > budget:
            resident, used, charge = False, 0, reserved
            if committed + charge > budget:
                reserved, charge = 0, 0
        committed += charge
        slots.append(SlotView(
            name=f"m{i}", size=size, state=RESIDENT if resident else ABSENT, used=used, reserved=reserved,
            busy=resident and draw(st.booleans()), pinned=draw(st.booleans()) and resident,
            priority=draw(st.integers(0, 3)), qos=qos, last_used=draw(st.floats(0, 100)),
            load_cost=draw(st.floats(0.1, 10)), queued=draw(st.integers(0, 4)), pending=draw(st.integers(0, 2)),
            head_priority=draw(st.integers(0, 3)), oldest=draw(st.floats(0, 100)),
        ))
    return Snapshot(now=100.0, budget=budget, slots=tuple(slots))


def apply(snapshot: Snapshot, starts: list[Start]) -> dict[str, int]:
    """Charges after every start of the plan has evicted its victims and loaded."""
    charges = {s.name: policy.charge(s) for s in snapshot.slots}
    by_name = {s.name: s for s in snapshot.slots}
    for start in starts:
        for v in start.evict:
            charges[v] = by_name[v].reserved
        s = by_name[start.slot]
        if start.need:
            charges[s.name] = max(s.reserved, s.size)
    return charges


@settings(max_examples=300, derandomize=True, deadline=None)
@given(snapshots())
def test_a_plan_never_exceeds_the_budget(snap):
    starts = plan(snap)
    assert sum(apply(snap, starts).values()) <= snap.budget


@settings(max_examples=300, derandomize=True, deadline=None)
@given(snapshots())
def test_victims_are_idle_unpinned_not_guaranteed_and_not_started(snap):
    starts = plan(snap)
    by_name = {s.name: s for s in snap.slots}
    started = {s.slot for s in starts}
    evicted = [v for s in starts for v in s.evict]
    assert len(evicted) == len(set(evicted))
    for v in evicted:
        s = by_name[v]
        assert s.state == RESIDENT and not s.busy and not s.pinned and s.qos != GUARANTEED
        assert v not in started
    for start in starts:
        requester = by_name[start.slot]
        assert all(by_name[v].qos <= requester.qos for v in start.evict)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(snapshots())
def test_only_ready_idle_groups_start(snap):
    by_name = {s.name: s for s in snap.slots}
    for start in plan(snap):
        assert by_name[start.slot].queued > 0 and not by_name[start.slot].busy


def view(name, size, **kw):
    return SlotView(name=name, size=size * G, **kw)


def test_eviction_order_no_work_then_priority_then_lru_then_cheapest():
    slots = [
        view("busy_work", 2, state=RESIDENT, used=2 * G, queued=3, last_used=1),
        view("idle_hi", 2, state=RESIDENT, used=2 * G, priority=5, last_used=1),
        view("idle_old", 2, state=RESIDENT, used=2 * G, last_used=1, load_cost=9),
        view("idle_new", 2, state=RESIDENT, used=2 * G, last_used=5),
        view("idle_old_cheap", 2, state=RESIDENT, used=2 * G, last_used=1, load_cost=1),
    ]
    assert choose_victims(slots, 2 * G) == ("idle_old_cheap",)
    assert choose_victims(slots, 4 * G) == ("idle_old_cheap", "idle_old")
    assert choose_victims(slots, 6 * G) == ("idle_old_cheap", "idle_old", "idle_new")
    assert choose_victims(slots, 8 * G) == ("idle_old_cheap", "idle_old", "idle_new", "idle_hi")
    assert choose_victims(slots, 10 * G)[-1] == "busy_work"
    assert choose_victims(slots, 11 * G) is None


def test_unneeded_small_victims_are_put_back():
    slots = [view("small", 1, state=RESIDENT, used=1 * G, last_used=0),
             view("big", 4, state=RESIDENT, used=4 * G, last_used=1)]
    assert choose_victims(slots, 3 * G) == ("big",)


def test_plan_prefers_the_resident_model_and_blocks_for_the_better_ranked():
    snap = Snapshot(now=10, budget=4 * G, slots=(
        view("a", 3, state=RESIDENT, used=3 * G, queued=2, oldest=9),
        view("b", 3, queued=2, oldest=8),
    ))
    assert plan(snap) == [Start("a")]


def test_plan_starts_with_evictions_when_the_model_is_idle():
    snap = Snapshot(now=10, budget=4 * G, slots=(
        view("a", 3, state=RESIDENT, used=3 * G),
        view("b", 3, queued=1, oldest=7),   # waited 3 s: more than b's load and a's reload (1 s each)
    ))
    assert plan(snap) == [Start("b", ("a",), 3 * G)]


def test_blocked_group_keeps_smaller_ones_from_taking_its_memory():
    snap = Snapshot(now=10, budget=4 * G, slots=(
        view("busy", 2, state=RESIDENT, used=2 * G, busy=True, queued=1, oldest=9.9),
        view("big", 3, queued=1, head_priority=5, oldest=9),
        view("small", 1, queued=1, oldest=9.5),
    ))
    assert plan(snap) == []


def test_stale_group_overtakes_priority_and_grouping():
    params = PolicyParams(max_wait=5, aging=100)
    me = view("a", 2, state=RESIDENT, used=2 * G, busy=True, queued=5, head_priority=9, oldest=99)
    old = view("b", 2, queued=1, oldest=90)
    snap = Snapshot(now=100, budget=3 * G, slots=(me, old), params=params)
    assert should_yield(snap, "a")
    fresh = Snapshot(now=100, budget=3 * G, slots=(me, view("b", 2, queued=1, oldest=98)), params=params)
    assert not should_yield(fresh, "a")


def test_no_yield_when_the_other_group_fits_beside():
    snap = Snapshot(now=10, budget=8 * G, slots=(
        view("a", 2, state=RESIDENT, used=2 * G, busy=True, queued=5, oldest=9),
        view("b", 2, queued=1, head_priority=9, oldest=9),
    ))
    assert not should_yield(snap, "a")
    assert plan(snap) == [Start("b", (), 2 * G)]


def test_urgency_not_aging_lifts_a_waiting_group_above_a_higher_class():
    p = PolicyParams(aging=1.0, max_wait=10)            # patience max(10, 4 x 1 s) = 10 s
    young_hi = view("a", 1, queued=1, head_priority=3, oldest=99.5)
    old_lo = view("b", 1, queued=1, head_priority=0, oldest=95)
    assert policy.rank_key(young_hi, 100, p) < policy.rank_key(old_lo, 100, p)   # 5 s: no aging
    assert policy.rank_key(old_lo, 105, p) < policy.rank_key(young_hi, 105, p)   # 10 s: urgent



# -- issue 14, entry 1: plan and should_yield share one notion of what is blocked --------------------

def _entry1(b_busy: bool) -> Snapshot:
    """Budget 8 GB; A and C busy; B resident with 3 queued; D (4 GB, priority 9) and E (priority 5) queued."""
    return Snapshot(now=10, budget=8 * G, slots=(
        SlotView("A", int(2.5 * G), state=RESIDENT, used=int(2.5 * G), busy=True, queued=1, oldest=9),
        SlotView("C", 2 * G, state=RESIDENT, used=2 * G, busy=True, queued=1, oldest=9),
        SlotView("B", int(2.5 * G), state=RESIDENT, used=int(2.5 * G), busy=b_busy, queued=3, oldest=9),
        SlotView("D", 4 * G, queued=1, head_priority=9, oldest=9),
        SlotView("E", int(2.5 * G), queued=1, head_priority=5, oldest=9),
    ))


def test_livelock_repro_plan_and_should_yield_agree():
    # D (priority 9) is blocked by the running A and C. Neither E nor B takes the memory D waits
    # for: B is held for D, and told to yield, consistently (before: plan started B, should_yield
    # stopped it before its first task, forever).
    assert plan(_entry1(b_busy=False)) == []
    assert should_yield(_entry1(b_busy=True), "B")
    # A steps aside at its next task boundary: then D starts, evicting A and B.
    assert should_yield(_entry1(b_busy=False), "A")
    assert plan(policy.stepped_aside(_entry1(b_busy=False), "A")) == [Start("D", ("A", "B"), 4 * G)]


def test_a_group_blocked_by_two_running_groups_is_not_starved():
    # W (urgent) needs the memory of both running groups: each yields at its boundary, in turn.
    snap = Snapshot(now=100, budget=4 * G, params=P, slots=(
        view("x", 2, state=RESIDENT, used=2 * G, busy=True, queued=9, waiting_since=99),
        view("y", 2, state=RESIDENT, used=2 * G, busy=True, queued=9, waiting_since=99),
        view("w", 4, queued=1, waiting_since=0),
    ))
    assert should_yield(snap, "x")
    x_idle = policy.stepped_aside(snap, "x")
    assert plan(x_idle) == []                                   # x is held for w, not restarted
    assert should_yield(x_idle, "y")
    assert plan(policy.stepped_aside(x_idle, "y")) == [Start("w", ("x", "y"), 4 * G)]


@st.composite
def running_snapshots(draw):
    snap = draw(snapshots())
    slots = []
    for s in snap.slots:
        since = draw(st.floats(0, 100))
        busy = s.busy
        slots.append(replace(s, waiting_since=since, started=draw(st.floats(since, 100)) if busy else None,
                             unload_cost=draw(st.floats(0, 5))))
    params = PolicyParams(max_wait=draw(st.sampled_from([0.0, 5.0, 30.0])), switch_factor=draw(st.sampled_from([1.0, 4.0])))
    return Snapshot(now=100.0, budget=snap.budget, slots=tuple(slots), params=params)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(running_snapshots())
def test_a_group_told_to_yield_is_not_restarted_in_its_place(snap):
    for r in snap.slots:
        if not (r.busy and r.resident and r.queued):
            continue
        if should_yield(snap, r.name):
            # The plan once it has ended (idle, fresh wait) does not restart it in that group's place.
            after = Snapshot(now=snap.now, budget=snap.budget, params=snap.params, slots=tuple(
                replace(s, busy=False, started=None, waiting_since=snap.now)
                if s.name == r.name else s for s in snap.slots))
            starts = plan(after)
            assert all(st_.slot != r.name for st_ in starts)    # evicted, or held for a blocked group


# -- switch-cost-aware grouping -----------------------------------------------------------------------

P = PolicyParams(max_wait=5.0, switch_factor=4.0)


def _pair(now, *, me_prio=0, other_prio=0, other_since=0.0, me_started=None, me_since=0.0, load=2.0, unload=0.5):
    """``me`` runs (busy, 3 GB of 4); ``other`` (3 GB) waits for its memory."""
    me = view("me", 3, state=RESIDENT, used=3 * G, busy=True, queued=20, head_priority=me_prio,
              waiting_since=me_since, started=me_started, load_cost=load, unload_cost=unload)
    other = view("other", 3, queued=20, head_priority=other_prio, waiting_since=other_since,
                 load_cost=load, unload_cost=unload)
    return Snapshot(now=now, budget=4 * G, slots=(me, other), params=P)


def test_patience_is_k_switch_costs_with_max_wait_as_floor():
    assert policy.patience(view("x", 1, load_cost=2.0, unload_cost=0.5), P) == 10.0   # 4 x 2.5 s
    assert policy.patience(view("x", 1, load_cost=0.1, unload_cost=0.0), P) == 5.0    # the floor


def test_equal_priority_backlog_does_not_ping_pong():
    # The other group's work waited 9.9 s, under its patience (10 s): the running model keeps serving.
    assert not should_yield(_pair(9.9), "me")
    # At its patience it pre-empts at the task boundary.
    assert should_yield(_pair(10.0), "me")


def test_strictly_higher_class_pre_empts_at_a_task_boundary():
    assert should_yield(_pair(0.1, other_prio=1), "me")
    assert not should_yield(_pair(0.1, me_prio=1), "me")     # a lower class waits for its patience


def test_a_group_switched_in_as_urgent_keeps_its_quantum():
    # "me" started at 20 after waiting since 0 (urgent); the other has waited 10 s since 10.
    snap = _pair(29.0, other_since=10.0, other_prio=5, me_started=20.0, me_since=0.0)
    assert not should_yield(snap, "me")                     # within its 10 s quantum, not even priority 5
    assert should_yield(_pair(30.0, other_since=10.0, other_prio=5, me_started=20.0, me_since=0.0), "me")


def test_thresholds_not_tiny_differences_decide():
    # Two urgent groups whose waits differ by a microsecond are ordered by when each wait began,
    # and one below its threshold never overtakes by being a hair older.
    a = view("a", 3, queued=1, waiting_since=0.0)
    b = view("b", 3, queued=1, waiting_since=1e-6)
    assert sorted([b, a], key=lambda s: policy.rank_key(s, 100, P))[0].name == "a"
    young = view("y", 3, queued=1, waiting_since=95.000001, state=RESIDENT, used=3 * G)
    old = view("o", 3, queued=1, waiting_since=95.0)
    assert policy.rank_key(young, 99.9, P) < policy.rank_key(old, 99.9, P)   # residency, not 1 us


# -- future-aware eviction ----------------------------------------------------------------------------

def test_eviction_prefers_the_model_used_furthest_in_the_future():
    slots = [
        view("ready", 2, state=RESIDENT, used=2 * G, queued=2, last_used=0),
        view("pending", 2, state=RESIDENT, used=2 * G, pending=1, last_used=0),
        view("unused", 2, state=RESIDENT, used=2 * G, last_used=9),     # used most recently, but never again
    ]
    assert choose_victims(slots, 2 * G) == ("unused",)
    assert choose_victims(slots, 4 * G) == ("unused", "pending")
    assert choose_victims([replace(s, next_use=5.0) if s.name == "ready" else s for s in slots], 4 * G) \
        == ("unused", "ready")                                            # an explicit estimate wins
    assert choose_victims(slots, 2 * G, requester=view("r", 2, qos=BEST_EFFORT)) is None   # tiers rule first


def test_tiers_pins_and_guarantees_still_rule_eviction():
    slots = [
        view("g", 2, state=RESIDENT, used=2 * G, reserved=2 * G, qos=GUARANTEED),
        view("pinned", 2, state=RESIDENT, used=2 * G, pinned=True),
        view("best", 2, state=RESIDENT, used=2 * G, qos=BEST_EFFORT, queued=5),
        view("burst", 2, state=RESIDENT, used=2 * G),
    ]
    assert choose_victims(slots, 2 * G) == ("best",)        # BEST_EFFORT first, even with ready work
    assert choose_victims(slots, 6 * G) is None
    assert choose_victims(slots, 2 * G, requester=view("r", 1, qos=BEST_EFFORT)) == ("best",)


# -- the virtual-clock driver: whole traces ---------------------------------------------------------

def test_backlog_of_three_models_loads_each_once_not_per_task():
    from gpuctx.sim import SimModel, SimTask, simulate
    models = [SimModel(n, 2 * G, 1.0) for n in "abc"]
    tasks = [SimTask(i * 3 + j, n, 0.0, 0.05) for i in range(30) for j, n in enumerate("abc")]
    for params in (PolicyParams(max_wait=0.0, aging=0.01), PolicyParams()):
        r = simulate(models, tasks, 3 * G, params=params)    # one model at a time
        assert r.loads == 3, params                          # 30 x 0.05 s < 4 x 1 s: no switch


def test_long_backlog_switches_once_per_patience_not_per_task():
    from gpuctx.sim import SimModel, SimTask, simulate
    models = [SimModel("a", 2 * G, 1.0), SimModel("b", 2 * G, 1.0)]
    tasks = [SimTask(i * 2 + j, n, 0.0, 0.1) for i in range(200) for j, n in enumerate("ab")]
    r = simulate(models, tasks, 3 * G, params=PolicyParams(max_wait=0.0))
    work, patience, load, task = 400 * 0.1, 4.0, 1.0, 0.1
    # Each slice serves its patience less the load it began with: never one load per task.
    assert 2 < r.loads <= 2 + work / (patience - load)
    # The bound: once its last task ends, a model's wait begins; it is served again within its
    # patience, the other's tail (at most k x its switch cost), its task in progress and its load.
    tail = 4.0 * load
    for m in "ab":
        starts = sorted(r.start[t.id] for t in tasks if t.model == m)
        gaps = [y - x for x, y in zip(starts, starts[1:])]
        assert max(gaps) <= task + (patience + tail + task + load) + 1e-9
    again = simulate(models, tasks, 3 * G, params=PolicyParams(max_wait=0.0))
    assert (again.loads, again.start) == (r.loads, r.start)                    # deterministic


def test_interleaved_rounds_of_two_models_take_four_loads():
    from gpuctx.sim import SimModel, SimTask, simulate
    # Each round's two calls wait on a gate task (model g, resident throughout), so they are
    # ready together: the resident model serves its call first. g once, then a b | b a | a b.
    models = [SimModel("a", 2 * G, 1.0), SimModel("b", 2 * G, 1.0), SimModel("g", 1 * G, 0.0)]
    tasks = []
    for r in range(3):
        tasks += [SimTask(10 + r, "g", r * 10.0, 0.1), SimTask(r * 2, "a", r * 10.0, 0.1, (10 + r,)),
                  SimTask(r * 2 + 1, "b", r * 10.0, 0.1, (10 + r,))]
    assert simulate(models, tasks, 3 * G).loads == 1 + 4


def test_higher_class_pre_empts_a_backlog_at_a_task_boundary():
    from gpuctx.sim import SimModel, SimTask, simulate
    models = [SimModel("batch", 2 * G, 1.0), SimModel("chat", 2 * G, 1.0)]
    tasks = [SimTask(i, "batch", 0.0, 0.5) for i in range(40)] + [SimTask(100, "chat", 3.2, 0.1, priority=5)]
    r = simulate(models, tasks, 3 * G)
    assert r.start[100] == 3.5 + 1.0                      # the batch task running at 3.2 ends at 3.5; chat loads
    assert r.loads == 3


# -- inside one model's queue (issue 14, entry 14) -----------------------------------------------------

class _T:
    def __init__(self, priority, ready_at):
        from gpuctx.task import TaskState
        self.priority, self._ready_at, self.state, self._batch_key = priority, ready_at, TaskState.QUEUED, None


def test_slot_queue_promotes_an_overdue_task_over_higher_priorities():
    from gpuctx.models import Slot
    from gpuctx.task import TaskState
    slot = Slot("m")
    low = _T(0, 0.0)
    slot.push(low)
    for i in range(3):
        slot.push(_T(5, 1.0 + i))
    assert slot.peek(1.5, promote_after=2.0).priority == 5       # not overdue yet: priority order
    assert slot.peek(2.0, promote_after=2.0) is low               # waited max_wait: oldest first
    assert slot.pop_head() is low
    low.state = TaskState.RUNNING
    got = []
    while slot.queued:
        t = slot.peek(2.0, promote_after=2.0)
        got.append(slot.pop_head())
        t.state = TaskState.RUNNING
    assert [t.priority for t in got] == [5, 5, 5] and low not in got and not slot._heap and not slot._gone


# ----------------------------------------------------------------------------- the engine's other decisions, pure
def test_keep_alive_expiry_is_a_pure_decision():
    from gpuctx.policy import keep_alive_due
    views = [SlotView("old", 1, state=RESIDENT, last_used=0.0, keep_alive=5.0),
             SlotView("young", 1, state=RESIDENT, last_used=8.0, keep_alive=5.0),
             SlotView("pinned", 1, state=RESIDENT, pinned=True, keep_alive=1.0),
             SlotView("waits", 1, state=RESIDENT, pending=1, keep_alive=1.0),
             SlotView("forever", 1, state=RESIDENT, keep_alive=None)]
    assert keep_alive_due(views, now=10.0) == (("old",), 13.0)


def test_overflow_batch_window_evict_all_and_victim_reasons_are_pure_decisions():
    from gpuctx.policy import batch_window, evictable_now, on_full_queue, victim_reason
    assert on_full_queue("drop_oldest", True, can_drop=True) == "drop_oldest"
    assert on_full_queue("drop_oldest", True, can_drop=False) == "reject"   # only waiting tasks fill it
    assert on_full_queue("block", True, can_drop=True) == "block"
    assert on_full_queue("block", False, can_drop=True) == "reject"          # try_submit never waits
    assert batch_window(0, 0.5, PolicyParams(latency_priority=10)) == 0.5
    assert batch_window(10, 0.5, PolicyParams(latency_priority=10)) == 0.0
    views = [SlotView("a", 1, state=RESIDENT), SlotView("b", 1, state=RESIDENT, busy=True),
             SlotView("c", 1, state=RESIDENT, pinned=True), SlotView("l", 1, state=RESIDENT, label=True)]
    assert evictable_now(views) == ("a",)
    assert victim_reason(SlotView("a", 1, state=RESIDENT)) == "no queued work, burstable, priority 0, idle"
    assert victim_reason(SlotView("a", 1, state=RESIDENT, queued=2, priority=3)).startswith("has queued work")
    assert victim_reason(SlotView("a", 1, state=RESIDENT, next_use=1.0, load_cost=1.5, unload_cost=0.25)) == (
        "calls expected, burstable, priority 0, 1.75 s to switch back in, idle")


def test_should_yield_is_false_when_no_other_group_waits_which_the_engine_shortcut_relies_on():
    from gpuctx.policy import route_to_cpu
    for params in (PolicyParams(), PolicyParams(max_wait=0.0)):
        snap = Snapshot(now=100.0, budget=4, params=params, slots=(
            SlotView("run", 3, state=RESIDENT, used=3, busy=True, queued=5, oldest=0.0, started=0.0),
            SlotView("idle", 1, state=RESIDENT, used=1),                      # nothing queued
            SlotView("busy", 1, state=ABSENT, busy=True, queued=3)))          # running already
        assert should_yield(snap, "run") is False
    assert route_to_cpu("cpu", fits_ever=False, fits_now=False)
    assert route_to_cpu("cpu", fits_ever=True, fits_now=False)
    assert not route_to_cpu("cpu", fits_ever=True, fits_now=True)
    assert not route_to_cpu(None, fits_ever=False, fits_now=False)


# ----------------------------------------------------------------------------- vram="auto" before it is measured
def test_an_unmeasured_model_claims_all_that_is_free_or_its_estimate_or_waits_for_another_one():
    from gpuctx.policy import auto_size_claim
    snap = Snapshot(now=0.0, budget=10 * G, slots=(
        view("x", 4, state=RESIDENT, used=4 * G),
        SlotView("a", 0, queued=1, size_known=False),
        SlotView("b", 0, queued=1, size_known=False),
        view("est", 3, queued=1, size_known=False),      # an estimate: a size known before
        view("known", 2, queued=1)))
    assert auto_size_claim(snap, "a") == 6 * G                 # everything free
    assert auto_size_claim(snap, "a", free=2 * G) == 2 * G     # what the plan has left when it gets there
    assert auto_size_claim(snap, "est") == 3 * G
    assert auto_size_claim(snap, "known") == 2 * G
    assert auto_size_claim(snap, "a", starting={"b"}) is None  # b's first load starts in the same plan
    assert auto_size_claim(snap, "a", starting={"known"}) == 6 * G
    measuring = replace(snap, slots=tuple(replace(s, busy=True, claim=6 * G) if s.name == "b" else s
                                          for s in snap.slots))
    assert auto_size_claim(measuring, "a") is None and auto_size_claim(measuring, "est") is None
    assert auto_size_claim(measuring, "b") == 6 * G            # its own claim and what is free (none)
    assert auto_size_claim(measuring, "known") == 2 * G


def test_a_plan_starts_one_unmeasured_first_load_with_all_the_free_memory_and_the_next_after_it():
    slots = (SlotView("a", 0, queued=1, oldest=1.0, size_known=False),
             SlotView("b", 0, queued=1, oldest=2.0, size_known=False),
             SlotView("c", 0, queued=1, oldest=3.0, size_known=False))
    snap = Snapshot(now=5.0, budget=10 * G, slots=slots)
    assert plan(snap) == [Start("a", (), 10 * G)]
    loading = replace(snap, slots=(replace(slots[0], busy=True, state="loading", used=10 * G),) + slots[1:])
    assert plan(loading) == []                                 # b and c wait for a's size
    measured = replace(snap, slots=(replace(slots[0], size=4 * G, size_known=True, busy=True, state=RESIDENT,
                                            used=4 * G),) + slots[1:])
    assert plan(measured) == [Start("b", (), 6 * G)]           # a measured: b claims what a left


def test_an_unmeasured_model_with_no_free_memory_starts_claiming_nothing_and_is_fitted_when_measured():
    snap = Snapshot(now=5.0, budget=10 * G, slots=(
        view("x", 10, state=RESIDENT, used=10 * G),
        SlotView("a", 0, queued=1, oldest=1.0, size_known=False)))
    assert plan(snap) == [Start("a")]                          # nothing free to claim; measured, it evicts x
    blocked = Snapshot(now=5.0, budget=10 * G, slots=(
        view("run", 6, state=RESIDENT, used=6 * G, busy=True, queued=1, oldest=4.0),
        view("big", 6, queued=1, head_priority=5, oldest=1.0),      # better ranked, waits for run's memory
        SlotView("a", 0, queued=1, oldest=1.0, size_known=False)))
    assert plan(blocked) == []                                 # a takes no memory from under big


def test_a_measured_size_is_kept_evicts_idle_models_first_or_retries_when_the_rest_runs():
    from gpuctx.policy import measured_fit
    loaded = view("a", 0, state=RESIDENT, used=3 * G, busy=True, size_known=False)   # charged its claim, 3 GB
    snap = Snapshot(now=0.0, budget=10 * G, slots=(loaded, view("x", 5, state=RESIDENT, used=5 * G)))
    assert measured_fit(snap, "a", 2 * G) == ("keep", ())      # smaller than its claim
    assert measured_fit(snap, "a", 5 * G) == ("keep", ())      # larger, into the 2 GB free
    assert measured_fit(snap, "a", 7 * G) == ("evict", ("x",))  # x is idle: it goes first
    running = replace(snap, slots=(loaded, view("x", 5, state=RESIDENT, used=5 * G, busy=True)))
    assert measured_fit(running, "a", 7 * G) == ("retry", ())  # x runs: unload a, load it again with room
    promised = replace(snap, slots=snap.slots + (view("p", 2, claim=2 * G, busy=True),))
    assert measured_fit(promised, "a", 5 * G) == ("evict", ("x",))   # the free 2 GB are promised to p's load


@st.composite
def unmeasured_snapshots(draw):
    """Snapshots where some absent models have no known size yet, maybe one of them loading."""
    snap = draw(snapshots())
    slots = list(snap.slots)
    for i, s in enumerate(slots):
        if s.state == ABSENT and not s.reserved and draw(st.booleans()):
            slots[i] = replace(s, size=0, size_known=False, queued=max(1, s.queued), busy=False)
    unknown = [i for i, s in enumerate(slots) if not s.size_known]
    if unknown and draw(st.booleans()):
        i = draw(st.sampled_from(unknown))
        free = policy.free_bytes(replace(snap, slots=tuple(slots)))
        slots[i] = replace(slots[i], busy=True, claim=max(0, free))
    return replace(snap, slots=tuple(slots))


@settings(max_examples=300, derandomize=True, deadline=None)
@given(unmeasured_snapshots())
def test_a_plan_starts_at_most_one_unmeasured_load_never_beside_another_and_within_the_budget(snap):
    starts = plan(snap)
    by_name = {s.name: s for s in snap.slots}
    unknown = [st_.slot for st_ in starts if not by_name[st_.slot].size_known]
    measuring = any(not s.size_known and s.busy for s in snap.slots)
    assert len(unknown) <= (0 if measuring else 1)
    charges = {s.name: policy.charge(s) for s in snap.slots}
    for start in starts:
        for v in start.evict:
            charges[v] = by_name[v].reserved
        s = by_name[start.slot]
        charges[s.name] = policy.charge(s) + start.need if not s.size_known else max(charges[s.name], s.reserved, s.size)
    assert sum(charges.values()) <= snap.budget


@settings(max_examples=300, derandomize=True, deadline=None)
@given(snapshots(), st.integers(0, 16))
def test_a_measured_size_is_never_charged_above_the_budget(snap, measured_half_gb):
    from gpuctx.policy import measured_fit
    loading = [s for s in snap.slots if s.state == RESIDENT]
    if not loading:
        return
    me = replace(loading[0], busy=True)
    snap = replace(snap, slots=tuple(me if s.name == me.name else s for s in snap.slots))
    measured = measured_half_gb * G // 2
    action, victims = measured_fit(snap, me.name, measured)
    by_name = {s.name: s for s in snap.slots}
    after = {s.name: max(s.reserved, s.used + s.working, s.claim) for s in snap.slots}
    for v in victims:
        assert by_name[v].state == RESIDENT and not by_name[v].busy and not by_name[v].pinned
        after[v] = by_name[v].reserved
    after[me.name] = max(me.reserved, measured)
    if action in ("keep", "evict"):
        assert sum(after.values()) <= snap.budget
    else:
        assert action == "retry" and victims == ()
