"""Host copies of offloaded weights, and eviction without a copy back when the weights are clean.

An offload copies a module's tensors to pinned host memory and points the module at them; a
restore copies them back to the card. Inference does not write weights, so after a restore the
host copy is still a faithful image of what is on the card. :class:`HostCopies` keeps it (a
*clean copy*): the next eviction of that module only points the module back at the host tensors
and lets the device memory go. No device-to-host copy (FastVideo measured 3.3x on a
load-and-unload cycle this way).

**Modified weights.** At restore every moved tensor gets a mark: (owner, attribute, data
pointer, version counter) (:func:`_marks`). torch bumps a tensor's ``_version`` on every in-place
write through it (an optimizer step, ``copy_``, ``load_state_dict``), and a rebinding
(``p.data = other``) changes the data pointer, so equal marks at offload mean the weights were
not written through the module. Writes through a ``.data`` view escape the counter (the view has
its own), and inference tensors have none: ``verify="checksum"`` adds a checksum of the bytes
(:func:`_checksum`, integer sums on the device, so it is exact and deterministic) taken at
restore and compared at offload. A model found modified is copied back as always, bit-exact.

**Accounting.** Every host byte, the only copy of an offloaded model or a clean copy of a
resident one, counts in ``budget`` (``configure(host_budget=...)``). When an offload needs room,
clean copies of *resident* models are dropped, least recently used first (:func:`choose_host_drops`,
a pure function); the only copy of an offloaded model never is.

The copies themselves are the caller's (``to_host``/``to_device`` callbacks): the CUDA backend
queues them on streams, the tests use host clones, so this bookkeeping runs the same in both.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from typing import Any, Callable, Hashable, Protocol, Sequence

from ..errors import BudgetError, ConfigError
from ..units import format_size
from .base import span_bytes
from .pipeline import GROUP_BYTES, GroupWaits, execution_order, plan_groups

__all__ = ["HostCopies", "Transport", "choose_host_drops", "offload_module", "restore_module", "VERIFY_MODES"]

VERIFY_MODES = ("version", "checksum")


def choose_host_drops(candidates: Sequence[tuple[Hashable, int, int]], need: int) -> list[Hashable] | None:
    """Which clean copies to drop to free ``need`` bytes: least recently used first.

    ``candidates`` are (key, bytes, last use tick) of droppable copies. Returns the keys (oldest
    first) whose bytes reach ``need``, ``[]`` when nothing is needed, None when even all of them
    are not enough (then nothing should be dropped).
    """
    if need <= 0:
        return []
    chosen, freed = [], 0
    for key, nbytes, _ in sorted(candidates, key=lambda c: c[2]):
        chosen.append(key)
        freed += nbytes
        if freed >= need:
            return chosen
    return None


def _check_host_budget(what: str, nbytes: int, used: int, budget: int | None) -> None:
    """Raise BudgetError when holding ``nbytes`` more would exceed ``budget`` (None: no limit)."""
    if budget is not None and used + nbytes > budget:
        raise BudgetError(
            f"offload of {what!r}: {format_size(nbytes)} more pinned host memory would exceed "
            f"host_budget={format_size(budget)} ({format_size(used)} already held); expected at most "
            f"{format_size(max(0, budget - used))}"
        )


def _marks(items: list[tuple[Any, str]]) -> tuple:
    """(id of owner, attribute, data pointer, version or None) of each item's tensor."""
    out = []
    for o, a in items:
        t = o if a == "data" else o.grad   # not `o.data`: that view has a fresh counter of its own
        try:
            version: int | None = int(t._version)
        except RuntimeError:   # an inference tensor tracks no version
            version = None
        out.append((id(o), a, t.data_ptr(), version))
    return tuple(out)


def _is_clean(before: tuple | None, after: tuple, same_sums: bool | None) -> bool:
    """Whether the weights are unchanged: the same tensors at the same addresses with the same
    versions, or (where a version is unknown, or a checksum was asked for) the same checksum too."""
    if before is None or before != after:
        return False
    unknown = any(m[3] is None for m in after)
    if same_sums is None:
        return not unknown
    return same_sums


def _checksum(torch: Any, tensors: list) -> Any:
    """Two int64 sums over the tensors' bytes as 32-bit words (plain, and of squares, wrapping):
    exact and order-independent, computed where the tensors are (no copy to the host)."""
    total = None
    for t in tensors:
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        words = flat.view(torch.int32) if flat.numel() % 4 == 0 else flat
        step = 1 << 26   # 256 MB of int64 at a time at most
        for i in range(0, words.numel(), step):
            w = words[i:i + step].to(torch.int64)
            part = torch.stack([w.sum(), (w * w).sum()])
            total = part if total is None else total + part
    return total if total is not None else torch.zeros(2, dtype=torch.int64)


class _Entry:
    """One object's host bytes: ``resident`` False: the host holds its only copy; True: a clean copy."""

    __slots__ = ("nbytes", "moved", "host", "marks", "sums", "resident", "tick", "finalizer")

    def __init__(self, nbytes: int, moved: dict[int, Any] | None, tick: int) -> None:
        self.nbytes = nbytes
        self.moved = moved
        self.host: list | None = None
        self.marks: tuple | None = None
        self.sums: Any = None
        self.resident = False
        self.tick = tick
        self.finalizer: Any = None


class HostCopies:
    """The host bytes of offloaded objects and the clean copies of restored modules; thread-safe.

    Args:
        budget: bytes the host copies may hold together (None: no limit).
        keep_clean: keep a module's host copy after a restore, so that an unmodified module is
            evicted without a copy back.
        verify: ``"version"`` (version counters and addresses) or ``"checksum"`` (those plus a
            checksum of the bytes, for writes through ``.data``; costs one read of the weights
            at restore and at offload).
    """

    def __init__(self, budget: int | None = None, *, keep_clean: bool = True, verify: str = "version") -> None:
        if verify not in VERIFY_MODES:
            raise ConfigError(f"verify={verify!r}: expected one of {', '.join(map(repr, VERIFY_MODES))}")
        self.budget = budget
        self.keep_clean = keep_clean
        self.verify = verify
        self.used = 0
        self.free_evictions = 0
        self.copy_backs = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._pending: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._tick = 0

    # ------------------------------------------------------------------ budget
    def reserve(self, what: str, key: int, nbytes: int) -> None:
        """Count ``nbytes`` more, dropping clean copies of other objects (LRU) where the budget needs it.

        Raises BudgetError (nothing dropped, nothing counted) when even that is not enough.
        """
        with self._lock:
            budget = self.budget
            need = 0 if budget is None else self.used + nbytes - budget
            cands = [(k, e.nbytes, e.tick) for k, e in self._entries.items() if e.resident and k != key]
            drops = choose_host_drops(cands, need)
            if drops is None:
                _check_host_budget(what, nbytes, self.used, budget)
            dropped = [self._pop_locked(k) for k in drops]
            self.dropped += len(dropped)
            self.used += nbytes
        for e in dropped:   # outside the lock: a finalizer detach may run user-visible weakref code
            _detach(e)

    def cancel(self, nbytes: int) -> None:
        """Give back bytes reserved for an offload that failed."""
        with self._lock:
            self.used -= nbytes

    # ------------------------------------------------------------------ records
    def get(self, obj: Any) -> _Entry | None:
        return self._entries.get(id(obj))

    def remember(self, obj: Any, nbytes: int, moved: dict[int, Any] | None) -> None:
        """Record that ``obj`` was offloaded, its ``nbytes`` already reserved."""
        key = id(obj)
        with self._lock:
            self._tick += 1
            old = self._entries.get(key)
            if old is not None:   # offloaded again before a restore: one record, the bytes added up
                old.nbytes += nbytes
                old.resident = False
                if moved:
                    old.moved = {**(old.moved or {}), **moved}
                return
            entry = self._entries[key] = _Entry(nbytes, moved, self._tick)
        with contextlib.suppress(TypeError):   # an object dropped unrestored gives its bytes back
            entry.finalizer = weakref.finalize(obj, self._forget_key, key)

    def forget(self, obj: Any) -> None:
        """Drop ``obj``'s record and give its bytes back."""
        e = self._forget_key(id(obj))
        if e is not None:
            _detach(e)

    def _forget_key(self, key: int) -> _Entry | None:
        with self._lock:
            return self._pop_locked(key)

    def _pop_locked(self, key: int) -> _Entry | None:
        e = self._entries.pop(key, None)
        if e is not None:
            self.used -= e.nbytes
            e.host = None
        return e

    # ------------------------------------------------------------------ modules
    def restored(self, module: Any, items: list[tuple[Any, str]], host: list,
                 checksum: Callable[[list], Any] | None) -> None:
        """After ``module``'s ``items`` were rebound to device tensors: keep ``host`` (their former host
        tensors, aligned with ``items``) as a clean copy, or forget the record when ``keep_clean`` is off."""
        entry = self.get(module)
        if entry is None or not self.keep_clean:
            self.forget(module)
            return
        sums = checksum([getattr(o, a) for o, a in items]) if self.verify == "checksum" and checksum else None
        with self._lock:
            self._tick += 1
            entry.host, entry.marks, entry.sums = list(host), _marks(items), sums
            entry.resident, entry.tick = True, self._tick

    def arriving(self, module: Any, waits: GroupWaits, last: Any) -> None:
        """Note that ``module``'s restore copies are still arriving (``last``: the final copy's event)."""
        with self._lock:
            self._pending[module] = (waits, last)

    def settle(self, module: Any, wait: Callable[[Any], None]) -> None:
        """Before ``module`` moves again: remove its group hooks and make the current stream wait for its
        last restore copy (``wait``), so no copy still in flight can race the next one."""
        with self._lock:
            pending = self._pending.pop(module, None)
        if pending is not None:
            pending[0].remove()
            wait(pending[1])

    def take_clean(self, module: Any, items: list[tuple[Any, str]], checksum: Callable[[list], Any] | None,
                   same: Callable[[Any, Any], bool] | None = None) -> list | None:
        """At offload: ``module``'s clean host tensors (aligned with ``items``) when its weights are
        unchanged since the restore, else None (a stale copy is dropped; copy back as always)."""
        entry = self.get(module)
        if entry is None or not entry.resident or entry.host is None:
            return None
        same_sums = None
        if self.verify == "checksum" or any(m[3] is None for m in entry.marks or ()):
            if checksum is None or entry.sums is None:
                same_sums = False
            else:
                now = checksum([getattr(o, a) for o, a in items])
                same_sums = bool(same(entry.sums, now)) if same is not None else entry.sums == now
        clean = _is_clean(entry.marks, _marks(items), same_sums)
        with self._lock:
            if not clean:
                self.copy_backs += 1
                stale = self._pop_locked(id(module))
            else:
                self.free_evictions += 1
                self._tick += 1
                entry.resident, entry.tick, entry.marks, entry.sums = False, self._tick, None, None
                host, entry.host = entry.host, None
        if not clean:
            if stale is not None:
                _detach(stale)
            return None
        return host

    def clean_copies(self) -> int:
        """Bytes held as clean copies of resident modules (droppable)."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values() if e.resident)


def _detach(entry: _Entry) -> None:
    if entry.finalizer is not None:
        entry.finalizer.detach()


# --------------------------------------------------------------------------- moving a module
class Transport(Protocol):
    """How tensors move between a device and the host; the CUDA backend's queues copies on streams."""

    def on_device(self, t: Any) -> bool:
        """True when ``t`` lives on the device (it moves at offload)."""

    def where(self, t: Any) -> Any:
        """Where ``t`` lives (a restore puts it back there)."""

    def to_host(self, t: Any) -> Any:
        """A host copy of device tensor ``t`` (may be queued: see :meth:`fence`)."""

    def to_device(self, t: Any, where: Any) -> Any:
        """A copy of host tensor ``t`` at ``where``, queued on the copy stream."""

    def fence(self) -> None:
        """Block until every queued copy has completed."""

    def mark(self) -> Any:
        """An event after the copies queued so far (None where there are no events)."""

    def wait(self, event: Any) -> None:
        """Make the calling thread's current stream wait for ``event`` (a group's first forward)."""

    def done(self) -> Any:
        """An event on the calling thread's current stream: the work queued there so far (None: none)."""

    def block(self, event: Any) -> None:
        """Block the host until ``event`` completed (None: return at once)."""

    def checksum(self, tensors: list) -> Any:
        """A checksum of the tensors' bytes, computed where they are."""

    def same(self, a: Any, b: Any) -> bool:
        """Whether two checksums are equal."""


def _module_items(torch: Any, module: Any, keep: Callable[[Any], bool]) -> list[tuple[Any, str]]:
    """(tensor, "data" | "grad") for each parameter, buffer and gradient of ``module`` that ``keep`` accepts."""
    items: list[tuple[Any, str]] = []
    seen: set[int] = set()
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        if keep(t):
            items.append((t, "data"))
        grad = t.grad if isinstance(t, torch.nn.Parameter) else None
        if grad is not None and keep(grad):
            items.append((t, "grad"))
    return items


def _copies(items: list[tuple[Any, str]], copy: Callable[[Any, Any], Any], made: dict | None = None) -> list:
    """``copy(owner, tensor)`` of each item's tensor, made once per memory view: two tensor objects that
    alias the same memory (same address, shape, strides, dtype) get one copy, so they stay aliased.
    ``made`` carries the copies across calls (a restore in groups)."""
    made = {} if made is None else made
    out = []
    for o, a in items:
        t = getattr(o, a)
        key = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) if t.numel() else (id(t),)
        if key not in made:
            made[key] = copy(o, t)
        out.append(made[key])
    return out


def _rebind(items: list[tuple[Any, str]], copies: list) -> None:
    """Point each tensor (or gradient) at its copy; gradients after data, so devices always match."""
    grads = [(o, c) for (o, a), c in zip(items, copies) if a == "grad"]
    for o, _ in grads:
        o.grad = None
    for (o, a), c in zip(items, copies):
        if a == "data":
            o.data = c
    for o, c in grads:
        o.grad = c


def offload_module(store: HostCopies, tr: Transport, what: str, module: Any) -> bool:
    """Move ``module``'s device tensors to the host: for free (True) when its clean copy is still
    valid, else copied (False). Raises BudgetError past the host budget and whatever a copy raised;
    ``module`` is unchanged then (nothing is rebound before every copy completed)."""
    torch = sys.modules["torch"]
    store.settle(module, tr.wait)
    items = _module_items(torch, module, tr.on_device)
    host = store.take_clean(module, items, tr.checksum, tr.same)
    if host is not None:
        _rebind(items, host)
        return True
    nbytes = span_bytes([getattr(o, a) for o, a in items])
    store.reserve(what, id(module), nbytes)
    try:
        copies = _copies(items, lambda o, t: tr.to_host(t))
        tr.fence()   # every byte is on the host before anything is rebound
    except BaseException:
        store.cancel(nbytes)
        raise
    moved = {id(o): tr.where(getattr(o, a)) for o, a in items} if items else None
    _rebind(items, copies)
    store.remember(module, nbytes, moved)
    return False


def restore_module(store: HostCopies, tr: Transport, what: str, module: Any, default: Any,
                   group_bytes: int | None = GROUP_BYTES) -> GroupWaits | None:
    """Copy ``module``'s offloaded tensors back (to where they were, else ``default``) and keep the
    host tensors as a clean copy (:class:`HostCopies`).

    ``group_bytes`` None: one copy, waited for on the host before returning. Otherwise the copies
    are queued in groups of at least ``group_bytes`` in execution order, an event after each, the
    module is rebound at once, and the returned :class:`GroupWaits` makes each group's first
    forward wait for its copy; the host does not wait.
    """
    torch = sys.modules["torch"]
    entry = store.get(module)
    moved = entry.moved if entry is not None else None
    if moved is not None:
        items = _module_items(torch, module, lambda t: not tr.on_device(t))
        items = [(o, a) for o, a in items if id(o) in moved]
    else:
        items = _module_items(torch, module, lambda t: not tr.on_device(t))
    if not items:
        return None   # nothing on the host (already resident): a clean copy kept stays as it is
    host = [getattr(o, a) for o, a in items]

    def target(o: Any) -> Any:
        return moved[id(o)] if moved is not None else default

    made: dict = {}
    if store.verify == "checksum":
        group_bytes = None   # the checksum reads the arrived bytes: wait for them
    if group_bytes is None:
        copies = _copies(items, lambda o, t: tr.to_device(t, target(o)), made)
        tr.fence()
        _rebind(items, copies)
        store.restored(module, items, host, tr.checksum)
        return None
    groups, events, group_items = _groups(module, items, group_bytes), [], []
    for mods, its in groups:
        copies = _copies(its, lambda o, t: tr.to_device(t, target(o)), made)
        events.append(tr.mark())
        group_items.append((mods, its, copies))
    order = [it for _, its, _ in group_items for it in its]
    waits = GroupWaits([mods for mods, _, _ in group_items], events, tr.wait, root=module)
    _rebind(order, [c for _, _, cs in group_items for c in cs])
    host_of = {(id(o), a): h for (o, a), h in zip(items, host)}
    store.restored(module, order, [host_of[id(o), a] for o, a in order], tr.checksum)
    if waits.active:
        store.arriving(module, waits, events[-1])
    return waits


def _groups(module: Any, items: list[tuple[Any, str]], group_bytes: int) -> list[tuple[list, list]]:
    """``items`` split into (modules, items) groups of at least ``group_bytes``, in execution order.

    An item is copied with the first module in that order that owns it (tied weights once); a
    module waits in the group of the last of its tensors to be copied, so a module whose tied
    weight came with an earlier module still waits for it, whichever of the two runs first.
    """
    of_tensor: dict[int, list] = {}
    for it in items:
        of_tensor.setdefault(id(it[0]), []).append(it)
    layers: list[tuple[Any, list]] = []
    owners: list[tuple[Any, list[int]]] = []
    for m in execution_order(module):
        own = [id(t) for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]]
        its = [it for t in own for it in of_tensor.pop(t, ())]
        if its:
            layers.append((m, its))
        owners.append((m, own))
    leftover = [it for its in of_tensor.values() for it in its]   # tensors no module owns directly
    if leftover:
        layers.append((module, leftover))
        owners.append((module, [id(o) for o, _ in leftover]))
    sizes = [span_bytes([getattr(o, a) for o, a in its]) for _, its in layers]
    plan = plan_groups(sizes, group_bytes)
    group_of = {id(o): g for g, r in enumerate(plan) for i in r for o, _ in layers[i][1]}
    hooked: list[list] = [[] for _ in plan]
    for m, own in owners:
        gs = [group_of[t] for t in own if t in group_of]
        if gs:
            hooked[max(gs)].append(m)
    return [(hooked[g], [it for i in r for it in layers[i][1]]) for g, r in enumerate(plan)]
