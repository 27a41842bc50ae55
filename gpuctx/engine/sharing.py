"""The engine's side of a share (:mod:`gpuctx.share`): it only asks and tells.

A share charges each slot what the kernel's own ledger charges it, max(base, used + working),
in the same three parts, so the cross-process invariant covers everything the local one does:

- **weights** (``used``): claimed before the ledger counts a load (outside the lock: the claim
  may wait while other kernels evict), settled under the lock when the model is released, so a
  release is never written after the next claim of the same model;
- **a context's base reservation** (``base``): claimed by ``create_context`` before the ledger
  reserves it (outside the lock, with :data:`ADMIT_PATIENCE`: an admission asks other kernels
  to evict idle models but does not wait for running work), given back if the ledger refuses;
- **working memory** (``working``): claimed before a task starts, with the lock released
  meanwhile as a wait for working memory releases it, and settled when the task ends, on every
  path (``_end_work_locked`` runs after each task and at every group's end);
- **joining**: whatever the kernel charges already when it joins is claimed before the share is
  attached (:meth:`_Sharing.attach_share`).

Without a share none of this costs anything: every hook is one ``self._share is None`` test,
and a task whose working memory is 0 never reaches the share.
"""

from __future__ import annotations

from typing import Any

from .. import policy
from ..errors import AdmissionError, ShareError
from ..models import Slot
from ..units import format_size
from .state import _QUEUED

# Seconds an admission (a reservation, joining a share) waits for other kernels to evict idle
# models before it is refused; a claim that no idle model can satisfy is refused at once.
ADMIT_PATIENCE = 2.0


class _Sharing:
    """Mixin of :class:`gpuctx.engine.Scheduler`; see the module docstring."""

    def attach_share(self, share: Any) -> None:
        """Take part in a share (``None``: leave it); the budget becomes the smaller of ours and the share's.

        What this kernel charges already (resident models, reservations, running tasks' working
        memory) is claimed from the share first, outside the lock, until a look under the lock
        finds nothing charged beyond what was claimed; the share is attached in that same look.

        Raises:
            ShareError: the share cannot hold what this kernel charges already, even once other
                kernels' idle models are evicted; nothing was attached.
        """
        claimed: dict[tuple[str, str], int] = {}
        while True:
            with self._cond:
                held = self._held_parts_locked() if share is not None else {}
                todo = {k: n for k, n in held.items() if n > claimed.get(k, 0)}
                if not todo:
                    for (name, part), n in claimed.items():   # released meanwhile: give back the difference
                        if held.get((name, part), 0) < n:
                            share.settle(name, held.get((name, part), 0), part)
                    self._share = share
                    budget = self._compute_budget()
                    if share is not None:
                        budget = min(budget, share.budget)
                    if budget < self._ledger.committed():
                        budget = self._ledger.committed()   # never below what is resident; the share waits for it
                    self._ledger.budget = self.trace.budget = budget
                    self._cond.notify_all()
                    return
            for (name, part), n in todo.items():
                if not share.claim(name, n, lambda: self._closed, part, ADMIT_PATIENCE):
                    raise ShareError(
                        f"share {share.name!r} ({share.path}) cannot hold the {format_size(n)} of {part} memory this "
                        f"kernel charges {name!r} already: {format_size(share.free())} of "
                        f"{format_size(share.budget)} free, and no idle model of another kernel frees enough; "
                        "evict models first (gpuctx.evict()) or use another share")
                claimed[(name, part)] = n

    def _held_parts_locked(self) -> dict[tuple[str, str], int]:
        led = self._ledger
        return {(name, part): n for part, table in (("used", led.used), ("working", led.working),
                                                     ("base", led.reserved)) for name, n in table.items() if n}

    def _ledger_part(self, name: str, part: str) -> int:
        led = self._ledger
        table = led.used if part == "used" else led.working if part == "working" else led.reserved
        return table.get(name, 0)

    @property
    def share(self) -> Any:
        """The share this scheduler takes part in (a ``gpuctx.share.ShareClient``), or None."""
        return self._share

    def share_rows(self) -> tuple[int, list[tuple]]:
        """(live tasks, [(model, bytes used, busy, pinned, priority, queued, idle seconds, load seconds)]):
        what a share's heartbeat publishes; "busy" is anything but resident and idle."""
        with self._cond:
            now = self._clock()
            rows = [(s.name, self._ledger.used.get(s.name, 0), s.busy or s.state != policy.RESIDENT or s.is_label,
                     s.pin, s.priority, s.queued + s.pending, max(0.0, now - s.last_used), s.load_cost)
                    for s in self._slots.values() if self._ledger.charge(s.name)]
            return len(self._live), rows

    def evict_for_share(self, name: str, requester: str) -> bool:
        """Evict idle, unpinned model ``name`` because another kernel of the share asked; False
        (nothing done) when it is busy, pinned or not resident any more."""
        with self._cond:
            s = self._slots.get(name)
            if s is None or s.busy or s.pin or s.is_label or s.state != policy.RESIDENT:
                return False
            reason = f"asked by {requester}"
            self._mark_evicting_locked(s, reason)
            self.trace.record("share_evict", model=name, context=name, reason=reason)
        self._evict_marked(s, reason)
        return True

    # ------------------------------------------------------------------ the hooks
    def _share_claim(self, name: str, nbytes: int, part: str = "used", patience: float | None = None) -> bool:
        share = self._share
        return share is None or share.claim(name, nbytes, lambda: self._closed, part, patience)

    def _share_settle_locked(self, name: str, part: str = "used") -> None:
        if self._share is not None:
            self._share.settle(name, self._ledger_part(name, part), part)

    def _share_reserve(self, name: str, base: int) -> Any:
        """Claim context ``name``'s reservation of ``base`` bytes from the share (outside the lock);
        returns the share it was claimed from (None: no share). AdmissionError when it cannot be had."""
        share = self._share
        if share is None or share.claim(name, base, lambda: self._closed, "base", ADMIT_PATIENCE):
            return share
        raise AdmissionError(
            f"context {name!r}: cannot reserve {format_size(base)} in share {share.name!r}: {format_size(share.free())} "
            f"of the share's {format_size(share.budget)} free, and the other kernels' idle models do not free "
            f"enough within {ADMIT_PATIENCE:g} s")

    def _claim_working_locked(self, slot: Slot, head: Any) -> bool:
        """Claim from the share the working memory the ledger has just charged ``slot`` for ``head``.

        The lock is released while the share decides (other kernels may be asked to evict). True:
        granted and ``head`` is still the task to start; False: it was withdrawn, cancelled or
        overtaken meanwhile (or the scheduler closes), and the charge is undone: plan again.
        """
        share, name = self._share, slot.name
        nbytes = self._ledger.working.get(name, 0)
        gone = lambda: head.state is not _QUEUED or (self._closed and self._cancel_on_close)  # noqa: E731
        with self._cond.unlocked():
            granted = share.claim(name, nbytes, gone, "working")
        if granted and not gone() and slot.peek(self._clock, self.config.max_wait) is head:
            return True
        self._ledger.end_work(name)
        slot.working_charged = 0
        if granted and self._share is share:
            share.settle(name, 0, "working")
        self._cond.notify_all()
        return False
