"""VRAM accounting: the one place that knows how many bytes are spoken for.

Each slot (a model or execution context) is charged ``max(reserved, used + working)``:
``reserved`` is its QoS base reservation (held even while nothing is loaded), ``used`` what its
resident model or running label work takes, ``working`` the working memory (activations, KV
caches) of its task while that task runs. The sum of charges never exceeds the
budget: :meth:`Ledger.activate` refuses a charge that would break that, so the caller
waits (the victims of an eviction may still be unloading). Memory promised to a load
that waits for its victims is a *claim*; the policy counts claims, the invariant does
not need to.

Not thread-safe on its own: the scheduler calls it under its lock.
"""

from __future__ import annotations

from .errors import AdmissionError
from .units import format_size

__all__ = ["Ledger"]


class Ledger:
    """Per-slot reserved/used/claim bytes under a fixed budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.reserved: dict[str, int] = {}
        self.used: dict[str, int] = {}
        self.claims: dict[str, int] = {}
        self.working: dict[str, int] = {}   # working memory of running tasks, per slot
        self.peak = 0
        self._committed = 0   # kept in step by every change: read on every task end (the trace's VRAM line)

    def charge(self, name: str) -> int:
        """Bytes counted for ``name`` now."""
        working = self.working
        return max(self.reserved.get(name, 0), self.used.get(name, 0) + (working.get(name, 0) if working else 0))

    def committed(self) -> int:
        """Bytes counted for every slot (never above the budget)."""
        return self._committed

    def _recount(self) -> None:
        names = self.reserved.keys() | self.used.keys() | self.working.keys()
        self._committed = sum(self.charge(n) for n in names)
        if self._committed > self.peak:
            self.peak = self._committed

    def free(self) -> int:
        """Budget minus committed bytes."""
        return self.budget - self.committed()

    def reserve_base(self, name: str, nbytes: int) -> None:
        """Hold ``nbytes`` for ``name`` from now on (QoS admission); AdmissionError when it does not fit."""
        extra = max(nbytes, self.used.get(name, 0) + self.working.get(name, 0)) - self.charge(name)
        other_reserved = sum(v for k, v in self.reserved.items() if k != name)
        if nbytes > self.budget - other_reserved or extra > self.free():
            raise AdmissionError(
                f"context {name!r}: cannot reserve {format_size(nbytes)}; budget {format_size(self.budget)}, "
                f"committed {format_size(self.committed())}, reserved by other contexts {format_size(other_reserved)}, "
                f"free {format_size(self.free())}"
            )
        self.reserved[name] = nbytes
        self._recount()

    def drop_base(self, name: str) -> None:
        """Stop holding ``name``'s base reservation."""
        self.reserved.pop(name, None)
        self._recount()

    def can_activate(self, name: str, nbytes: int) -> bool:
        """True when ``name`` may count ``nbytes`` as used without exceeding the budget."""
        delta = max(self.reserved.get(name, 0), nbytes) - self.charge(name)
        return delta <= self.free()

    def activate(self, name: str, nbytes: int) -> None:
        """Count ``nbytes`` as used by ``name`` (its claim, if any, is settled; a claim that also
        promised its first task's working memory stays until the group ends)."""
        if not self.can_activate(name, nbytes):
            raise AssertionError(f"ledger: {name!r} would exceed the budget")  # callers check first
        if self.claims.get(name, 0) <= nbytes:
            self.claims.pop(name, None)
        self.used[name] = nbytes
        self._recount()

    def release(self, name: str) -> None:
        """``name`` uses nothing any more (its base reservation stays)."""
        self.used.pop(name, None)
        self.claims.pop(name, None)
        self._recount()

    # -- working memory: charged while a task runs (see gpuctx.policy.admit_working)
    def can_work(self, name: str, nbytes: int) -> bool:
        """True when ``name`` may be charged ``nbytes`` more of working memory within the budget."""
        now = self.charge(name)
        after = max(self.reserved.get(name, 0), self.used.get(name, 0) + self.working.get(name, 0) + nbytes)
        return after - now <= self.free()

    def start_work(self, name: str, nbytes: int) -> None:
        """Charge ``nbytes`` of working memory to ``name`` until :meth:`end_work`."""
        if not self.can_work(name, nbytes):
            raise AssertionError(f"ledger: working memory of {name!r} would exceed the budget")  # callers check first
        self.working[name] = self.working.get(name, 0) + nbytes
        self._recount()

    def end_work(self, name: str) -> int:
        """Stop charging ``name``'s working memory; return the bytes it was charged (0 if none)."""
        nbytes = self.working.pop(name, 0)
        if nbytes:
            self._recount()
        return nbytes

    def within_budget(self) -> bool:
        """The invariant: resident + reserved + working bytes never above the budget."""
        names = self.reserved.keys() | self.used.keys() | self.working.keys()
        return sum(self.charge(n) for n in names) <= self.budget
