"""Dispatch: from the engine's state to a snapshot, from :func:`gpuctx.policy.plan` to the workers.

There is no dispatcher thread. Whoever changes the state (a submit, a worker ending a group, an
eviction) calls :meth:`_Dispatch._dispatch_locked`: it asks the policy what to start, marks the
victims and the claims, and puts each group in its slot's worker inbox.
"""

from __future__ import annotations

import weakref
from typing import Any

from .. import policy
from ..models import Slot
from .group import _GROUP, _PREFETCH, _worker_main


class _Dispatch:
    """Mixin of :class:`gpuctx.engine.Scheduler`; see the module docstring."""

    def _snapshot_locked(self) -> policy.Snapshot:
        now = self._clock()
        views = []
        for s in self._slots.values():
            oldest = s.oldest_queued() if s.queued else None
            ready_at = oldest._ready_at if oldest is not None else now
            # The policy's quantum: an idle slot's wait starts at the later of its oldest ready
            # task and the end of its last group; a busy one keeps the wait it had when its group
            # started (_mark_busy_locked). Nothing is written here: a read (status, a dashboard,
            # a cluster's poll) never moves a decision.
            if s.busy:
                waiting_since, started = s.waiting_since, s.group_start
            else:
                waiting_since, started = _wait_start(s, oldest, now), None
            views.append(policy.SlotView(
                name=s.name, size=s.size, state=s.state, used=self._ledger.used.get(s.name, 0),
                reserved=self._ledger.reserved.get(s.name, 0), claim=self._ledger.claims.get(s.name, 0),
                busy=s.busy, pinned=s.pin, priority=s.priority, qos=s.qos, last_used=s.last_used,
                load_cost=s.load_cost if s.loads else policy.estimated_load_cost(s.size, self._load_rate),
                queued=s.queued, pending=s.pending, head_priority=s.head_priority(),
                oldest=ready_at, unload_cost=s.unload_cost, waiting_since=waiting_since,
                started=started,
                next_use=policy.next_use(s.queued, s.pending, policy.expected(s.last_arrival, s.arrival_gap, now)),
                keep_alive=s.keep_alive if s.keep_alive is not None else self.config.keep_alive, label=s.is_label,
                working=s.working_charged, next_working=self._next_working_locked(s), sm_share=s.sm_share,
                run_cost=s.run_cost, size_known=s.size_source != "auto",
            ))
        return policy.Snapshot(now=now, budget=self.budget, slots=tuple(views), params=self.params(),
                               concurrency=self.trace.stats.real_concurrency())

    def _mark_busy_locked(self, slot: Slot, now: float, waiting_since: float | None = None) -> None:
        """``slot``'s group starts at ``now``: the quantum counts from here, and the wait it had
        (``waiting_since``; by default as an idle snapshot would date it now) is kept while it runs."""
        slot.busy = True
        slot.group_start = now
        if waiting_since is None:
            oldest = slot.oldest_queued() if slot.queued else None
            waiting_since = _wait_start(slot, oldest, now)
        slot.waiting_since = waiting_since

    def _dispatch_locked(self) -> None:
        if self._closed and (self._stopped or not self._live):
            return
        prefetch = self.config.prefetch
        for s in self._slots.values():
            if not s.busy and (s.queued or (prefetch and s.pending and s.state in (policy.ABSENT, policy.OFFLOADED))):
                break
        else:
            return   # every slot with work is running it already (or has it loading)
        snap = self._snapshot_locked()
        views = {v.name: v for v in snap.slots}
        starts, wake = policy.plan_wake(snap)
        if wake is not None and (self._replan_at is None or wake < self._replan_at):
            self._replan_at = wake   # a start deferred until then: the housekeeper plans again
            self._hk_wake.set()
        for start in starts:
            slot = self._slots[start.slot]
            self._mark_busy_locked(slot, snap.now, views[start.slot].waiting_since)
            for v in start.evict:
                victim = self._slots[v]
                self._mark_evicting_locked(victim, f"room for {start.slot!r}: {policy.victim_reason(views[v])}")
            if start.need:   # the charge the group will have: held for it until its group ends
                self._ledger.claims[start.slot] = policy.charge(views[start.slot]) + start.need
            self._worker(slot.name).put((_GROUP, start.evict, start.need))
        ahead = policy.prefetch(snap, starts) if self.config.prefetch else None
        if ahead is not None:   # load a model whose work waits on running tasks, while they run
            self._mark_busy_locked(self._slots[ahead.slot], snap.now, views[ahead.slot].waiting_since)
            self._ledger.claims[ahead.slot] = ahead.need
            self._worker(ahead.slot).put((_PREFETCH, (), ahead.need))
        self._cond.notify_all()

    def _worker(self, name: str) -> Any:
        entry = self._workers.get(name)
        if entry is None:
            inbox = self._driver.inbox()
            th = self._driver.spawn(_worker_main, (weakref.ref(self), name, inbox), name=f"gpuctx-{name}")
            entry = self._workers[name] = (th, inbox)
        return entry[1]

    def _others_waiting_locked(self, slot: Slot) -> bool:
        """Whether any other slot has ready work it is not running: when none has,
        ``policy.should_yield`` is False (tests/test_policy.py checks it), so the running group
        skips the snapshot. A shortcut, not a decision."""
        for s in self._slots.values():
            if s.queued and not s.busy and s is not slot:
                return True
        return False


def _wait_start(slot: Slot, oldest: Any, now: float) -> float:
    """When an idle slot's wait began: the later of its oldest ready task and its last use (now
    when nothing is ready)."""
    return max(oldest._ready_at, slot.last_used) if oldest is not None else now
