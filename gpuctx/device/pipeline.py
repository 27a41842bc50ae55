"""Restores that overlap compute, and models that run with only part of them resident.

**Pipelined restore** (PipeSwitch, OSDI'20). A module's tensors are copied back in groups of
layers, in execution order, on a copy stream, one event recorded after each group. The first
forward does not wait for the whole model: each module of group *i* gets a forward pre-hook that
makes the computing stream wait on event *i* (no host wait), and every hook is removed once each
group has been waited on. Copies on one stream complete in order, so event *i* implies every
group before it: a forward that runs layers out of registration order is still safe.

*Group size*, :func:`plan_groups`: consecutive layers are added to a group until it holds at
least ``min_bytes`` (:data:`GROUP_BYTES`, 32 MB). PipeSwitch measured that a synchronisation per
layer costs more than it hides; at ~50 GB/s a 32 MB group arrives in ~0.6 ms, long against the
~10 µs of an event wait and a hook call, short against the restore of a GB-class model (so the
first group is computing after ~1% of the copy). A trailing group under half ``min_bytes`` joins
the one before. The constant is a first guess to be set from ``bench/gpu.py``'s ``switch`` rows.

*Execution order*, :func:`execution_order`: the modules that own tensors, in registration order
(``named_modules``: an ``nn.Sequential`` or a transformer's layer list registers layers in the order
they run), or the order a traced forward first called them (:func:`traced_order`).

**Partial loading** (ComfyUI, InvokeAI, diffusers' group offload). A model larger than the free
budget runs with a prefix of its layers resident and the rest streamed per forward from pinned
memory. :func:`plan_partial` is the accounting: the longest prefix such that prefix bytes plus the
in-flight buffers (two copy streams, each holding at most the largest streamed layer) fit the
budget; both are charged, so the budget is never exceeded while a streamed layer is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..units import MiB

__all__ = ["GROUP_BYTES", "STREAM_BUFFERS", "plan_groups", "execution_order", "traced_order", "GroupWaits",
           "PartialPlan", "plan_partial"]

GROUP_BYTES = 32 * MiB
"""Least bytes in one restore group (see the module docstring for the rule)."""

STREAM_BUFFERS = 2
"""Streamed layers in flight at once in a partial model: one computing while the next is copied."""


def plan_groups(sizes: Sequence[int], min_bytes: int = GROUP_BYTES) -> list[range]:
    """Split layers of ``sizes`` bytes (in execution order) into consecutive groups of at least
    ``min_bytes``; a trailing group under half of it joins the previous one. Every layer lands in
    exactly one group, in order; no layers, no groups."""
    if min_bytes <= 0:
        return [range(i, i + 1) for i in range(len(sizes))]
    groups: list[range] = []
    start, acc = 0, 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= min_bytes:
            groups.append(range(start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes):
        if groups and acc < min_bytes / 2:
            groups[-1] = range(groups[-1].start, len(sizes))
        else:
            groups.append(range(start, len(sizes)))
    return groups


def _owns_tensors(module: Any) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def execution_order(module: Any) -> list:
    """The modules of ``module`` (itself included) that own parameters or buffers, in registration order."""
    return [m for _, m in module.named_modules() if _owns_tensors(m)]


def traced_order(module: Any, run: Callable[[], Any]) -> list:
    """The modules that own tensors in the order ``run()`` first calls them (forward pre-hooks, removed
    after); those never called follow in registration order."""
    seen: dict[int, Any] = {}
    owners = execution_order(module)

    def first_call(mod: Any, args: Any) -> None:   # returns None: a pre-hook's value would replace the args
        seen.setdefault(id(mod), mod)

    handles = [m.register_forward_pre_hook(first_call) for m in owners]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return [*seen.values(), *[m for m in owners if id(m) not in seen]]


class GroupWaits:
    """Forward pre-hooks that make each group's first forward wait on its copy's event.

    ``groups`` are lists of modules, ``events`` one per group, ``wait(event)`` what a hook calls
    (the CUDA backend: the current stream waits on the event). Each group waits once; when every
    group has, all hooks are removed. ``waited`` lists the group indices in the order they waited.
    """

    def __init__(self, groups: Sequence[Sequence[Any]], events: Sequence[Any], wait: Callable[[Any], None],
                 root: Any = None) -> None:
        if len(groups) != len(events):
            raise ValueError(f"GroupWaits: {len(groups)} groups but {len(events)} events; expected one event per group")
        self.waited: list[int] = []
        self._events = list(events)
        self._wait = wait
        self._handles: list = []
        for i, mods in enumerate(groups):
            for m in mods:
                self._handles.append(m.register_forward_pre_hook(self._hook(i)))
        self._done = not self._handles
        if root is not None and self._handles:
            # state_dict() reads every weight without a forward (a checkpoint saved in a task): the
            # reading stream waits for the last copy. Reads through .parameters() cannot be hooked.
            self._handles.append(root.register_state_dict_pre_hook(lambda m, prefix, keep: wait(self._events[-1])))

    def _hook(self, i: int) -> Callable:
        def pre_hook(module: Any, args: Any) -> None:
            if i not in self.waited:
                self.waited.append(i)
                self._wait(self._events[i])
                if len(self.waited) == len(self._events):
                    self.remove()
        return pre_hook

    @property
    def active(self) -> bool:
        """True while some hook is still installed."""
        return not self._done

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._done = True


@dataclass(frozen=True)
class PartialPlan:
    """Which layers of a partial model stay resident and what the streamed rest costs in flight."""

    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    resident_bytes: int
    buffer_bytes: int
    total_bytes: int

    @property
    def charged(self) -> int:
        """Bytes the ledger charges: the resident layers plus the in-flight buffers."""
        return self.resident_bytes + self.buffer_bytes

    @property
    def resident_fraction(self) -> float:
        """Share of the model's bytes that stay on the card (1.0: fully resident)."""
        return self.resident_bytes / self.total_bytes if self.total_bytes else 1.0


def plan_partial(sizes: Sequence[int], budget: int, buffers: int = STREAM_BUFFERS) -> PartialPlan | None:
    """The longest prefix of layers (``sizes`` in execution order) that stays resident such that its
    bytes plus ``buffers`` x the largest streamed layer fit in ``budget``; None when not even
    streaming every layer fits (the buffers alone exceed it)."""
    if budget < 0 or buffers < 1:
        raise ValueError(f"plan_partial(budget={budget!r}, buffers={buffers!r}): expected budget >= 0 and buffers >= 1")
    n = len(sizes)
    total = sum(sizes)
    # suffix_max[k]: the largest layer among k..n-1 (0 for the empty suffix)
    suffix_max = [0] * (n + 1)
    for k in range(n - 1, -1, -1):
        suffix_max[k] = max(sizes[k], suffix_max[k + 1])
    best: PartialPlan | None = None
    prefix = 0
    for k in range(n + 1):   # k layers resident
        buf = 0 if k == n else min(buffers, n - k) * suffix_max[k]
        if prefix + buf <= budget:
            best = PartialPlan(tuple(range(k)), tuple(range(k, n)), prefix, buf, total)
        if k < n:
            prefix += sizes[k]
    return best
