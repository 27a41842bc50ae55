"""The pure policy: properties over random snapshots (hypothesis) and whole decisions on known ones."""

from __future__ import annotations

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
        view("b", 3, queued=1, oldest=9),
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


def test_aging_raises_effective_priority():
    p = PolicyParams(aging=1.0, max_wait=1000)
    young_hi = view("a", 1, queued=1, head_priority=3, oldest=99.5)
    old_lo = view("b", 1, queued=1, head_priority=0, oldest=95)
    assert policy.rank_key(old_lo, 100, p) < policy.rank_key(young_hi, 100, p)
