"""Working memory and SM shares: what a running task needs beyond its model's weights and its turn.

**Working memory.** A task needs memory for activations, KV caches and workspaces while it runs.
Before a task starts, its worker asks :func:`gpuctx.policy.admit_working` whether that memory
fits beside what is charged now; the ledger charges it from the task's start to its end (the
next locked section of the worker, or the group's end when anything escapes), so the budget
invariant holds for weights, reservations and running tasks together. A task's working memory
is its ``@gpu_task(working=...)``, else its model's ``@gpuctx.model(working=...)``, else the
model's running estimate: on a device that measures (a GPU) each task's allocator peak minus
what was allocated when it started, folded by :func:`gpuctx.policy.working_estimate`. On the
CPU it is declared only. Graph replays launched at submit and CPU-pool tasks are not charged:
a replay allocates nothing new, and the CPU pool runs outside the budget. With a share
(:mod:`gpuctx.engine.sharing`) the same bytes are claimed from it before the task starts, the
lock released meanwhile, and settled when the task ends.

**SM shares.** A context may ask for a share of the GPU's SMs. :func:`gpuctx.policy.plan`
starts a group only when the shares of the groups running at once stay within 1.0
(:func:`gpuctx.policy.sm_fits`); this module records the share and asks the device to enforce
it (a green context) where it can, warning once where it cannot.
"""

from __future__ import annotations

import warnings
from typing import Any

from .. import policy
from ..errors import ConfigError
from ..models import Slot
from ..units import format_size, parse_size


class _Working:
    """Mixin of :class:`gpuctx.engine.Scheduler`; see the module docstring."""

    # ----------------------------------------------------------------------- working memory
    def _working_of_locked(self, slot: Slot, task: Any) -> int:
        """Bytes of working memory ``task`` (of ``slot``) needs while it runs."""
        declared = task._spec.working
        if declared is not None:
            return declared
        need = slot.working if slot.working is not None else slot.working_est
        return min(need, self._working_cap_locked(slot)) if need else 0

    def _working_cap_locked(self, slot: Slot) -> int:
        """The most working memory ``slot`` can ever get (an estimate above it is charged this much)."""
        held = self._others_reserved_locked(slot.name)
        for o in self._slots.values():
            if o.pin and o is not slot and o.state in (policy.RESIDENT, policy.LOADING):
                held += max(0, self._ledger.charge(o.name) - self._ledger.reserved.get(o.name, 0))
        return policy.working_cap(slot.size, slot.base, self.budget, held)

    def _next_working_locked(self, slot: Slot) -> int:
        """Working memory of ``slot``'s next ready task, for the plan (0 when none is queued)."""
        if not slot.queued or (slot.working is None and not slot.working_est and not self._task_working):
            return 0
        head = slot._head()
        return self._working_of_locked(slot, head) if head is not None else 0

    def _start_work_locked(self, slot: Slot, head: Any) -> Any:
        """Charge the working memory of ``slot``'s next task (``head``) before it starts.

        Returns the task to start (the head again, or a new one after a wait: the queue may
        change meanwhile), or None when the group should end: the policy says yield, or the
        queue emptied while it waited.
        """
        if head is None or slot.working_charged:
            return head
        working = self._working_of_locked(slot, head)
        if not working:
            return head
        waiters = self._working_waiters
        try:
            while True:
                ahead = tuple(waiters[:waiters.index(slot.name)]) if slot.name in waiters else tuple(waiters)
                d = policy.admit_working(self._snapshot_locked(), slot.name, working, ahead)
                if d.action == "start" and self._ledger.can_work(slot.name, d.charge):
                    self._ledger.start_work(slot.name, d.charge)
                    slot.working_charged = d.charge
                    # with a share, other kernels' memory too (the lock released while it decides)
                    if self._share is None or self._claim_working_locked(slot, head):
                        return head
                    if self._closed and self._cancel_on_close:
                        return None   # the claim was withdrawn for the shutdown
                elif d.action == "yield" or (self._closed and self._cancel_on_close):
                    self.trace.record("working_yield", model=slot.name, nbytes=working, reason=d.reason)
                    return None
                else:
                    if slot.name not in waiters:
                        waiters.append(slot.name)
                        self.trace.record("working_wait", model=slot.name, nbytes=working, reason=d.reason)
                    self._cond.wait(0.5)   # woken when working memory is released, a load or an eviction ends
                head = slot.peek(self._clock, self.config.max_wait)
                if head is None:
                    return None
                working = self._working_of_locked(slot, head)
                if not working:
                    return head
        finally:
            if slot.name in waiters:
                waiters.remove(slot.name)
                self._cond.notify_all()

    def _end_work_locked(self, slot: Slot) -> None:
        """The task of ``slot`` that ran last has ended: stop charging its working memory, and fold
        in what it measured."""
        sample, slot.working_sample = slot.working_sample, None
        if sample is not None:
            slot.note_working(sample)
        charged = self._ledger.end_work(slot.name) if slot.working_charged else 0
        slot.working_charged = 0
        if charged and self._share is not None:   # every path ends here: a body's failure, a cancel, a signal
            self._share.settle(slot.name, 0, "working")
        if sample is not None:
            self.trace.record("working_measured", model=slot.name, nbytes=sample)
        if charged:
            slot.working_peak = max(slot.working_peak, charged)
            self.trace.record("working", model=slot.name, nbytes=charged)
        if charged and self._cond._waiters:
            self._cond.notify_all()

    def _measured_run(self, slot: Slot, spec: Any, batch: list) -> Any:
        """Run the bodies; on a device that measures working memory, record the peak on the slot."""
        device = self._device
        if not getattr(device, "measures_working", False):
            return self._run_bodies(slot, spec, batch)
        token = device.working_begin(slot.name)
        try:
            return self._run_bodies(slot, spec, batch)
        finally:
            slot.working_sample = device.working_end(slot.name, token)

    def _check_working_locked(self, slot: Slot, size: int, working: int | None, what: str,
                              pinned: bool = True) -> None:
        """BudgetError now when ``size`` plus declared ``working`` can never fit (see _check_fits_locked)."""
        if working:
            self._check_fits_locked(slot, size + working, what=f"{what} with working={format_size(working)}",
                                    pinned=pinned)

    # ----------------------------------------------------------------------- SM shares
    def _set_sm_share_locked(self, slot: Slot, share: float | None, count: int | None) -> str | None:
        """Record ``slot``'s SM share and ask the device to enforce it; the warning to give, if any."""
        if share is None and count is None:
            return None
        total = self._device_sm_total()
        if share is None and total:
            share = count / total
        slot.sm_share, slot.sm_count = share, count
        partition = getattr(self._device, "partition", None)
        enforced, why = partition(slot.name, share, count) if partition is not None else (
            False, f"device {self._device.name!r} cannot partition SMs")
        slot.sm_enforced = enforced if enforced else f"not enforced: {why}"
        self.trace.record("sm_share", model=slot.name, context=slot.name,
                          reason=f"{_share_text(share, count)} ({slot.sm_enforced})")
        if enforced or self._sm_warned:
            return None
        self._sm_warned = True
        return (f"gpuctx: sm_share for {slot.name!r} is accepted but not enforced ({why}); contexts still "
                "take turns so that the shares running at once stay within 1.0")

    def _check_sm_count(self, name: str, count: int | None) -> None:
        """ConfigError when ``sm_count`` is more SMs than the card has (checked before anything changes)."""
        total = self._device_sm_total()
        if count is not None and total and count > total:
            raise ConfigError(f"sm_count={count} for {name!r}: the card has only {total} SMs")

    def _device_sm_total(self) -> int | None:
        total = getattr(self._device, "sm_total", None)
        return total() if callable(total) else None


def _share_text(share: float | None, count: int | None) -> str:
    if share is None:
        return f"sm_count {count}"
    return f"sm_share {share:.2f}" + (f" ({count} SMs)" if count else "")


def check_working(working: Any, arg: str = "working") -> int | None:
    """``working=`` as bytes (None stays None); ConfigError naming the value otherwise."""
    return None if working is None else parse_size(working, arg=arg)


def check_sm(share: Any, count: Any, where: str) -> tuple[float | None, int | None]:
    """Validate ``sm_share=`` (a fraction in (0, 1]) and ``sm_count=`` (an int >= 1); one of them at most."""
    if share is not None and count is not None:
        raise ConfigError(f"{where}: sm_share={share!r} and sm_count={count!r}: give one of them")
    if share is not None:
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not (0 < share <= 1):
            raise ConfigError(f"{where}: sm_share={share!r}: expected a fraction of the GPU's SMs in (0, 1], like 0.5")
        return float(share), None
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{where}: sm_count={count!r}: expected an int >= 1 (a number of SMs)")
    return None, count


def warn_sm(message: str | None) -> None:
    """Give the one "not enforced" warning, at the user's line."""
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=4)
