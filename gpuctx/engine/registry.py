"""Models and contexts: registration, sizes, QoS admission, and the questions about them."""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Callable

from .. import policy
from ..errors import BudgetError, ConfigError
from ..models import OVERFLOW_POLICIES, QoS, Slot
from ..units import format_size, parse_size
from .working import check_sm, check_working, warn_sm


class _Registry:
    """Mixin of :class:`gpuctx.engine.Scheduler`; see the module docstring."""

    def slot(self, name: str) -> Slot:
        """The slot called ``name`` (KeyError if none)."""
        with self._cond:
            return self._slots[name]

    def _slot_locked(self, name: str) -> Slot:
        s = self._slots.get(name)
        if s is None:
            s = self._slots[name] = Slot(name=name)
        return s

    def register_model(self, name: str, loader: Callable[[], Any] | None, *, vram: int | str | None,
                       priority: int = 0, pin: bool = False, keep_alive: float | None = None,
                       unload: Callable[[Any], Any] | None = None, offload: bool | None = None,
                       max_queue: int | None = None, overflow: str | None = None,
                       origin: tuple | None = None, partial: bool = False, working: int | str | None = None,
                       sm_share: float | None = None, sm_count: int | None = None) -> Slot:
        """Register (or register again) a model's loader and settings.

        ``origin`` is (file, line, module, globals) of the registration in the user's code:
        warnings about the model (its measured size, a reference kept after eviction) point there.

        Everything is checked before anything changes: a refused registration leaves the model
        as it was. Registering again (a notebook cell run twice, edited) replaces the old
        registration: a new loader or size takes effect at the next load, and the old object is
        evicted as soon as it is idle, with a note. ``working`` is the working memory a task
        needs while it runs (None: the measured estimate); ``sm_share``/``sm_count`` its SM share.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"model name={name!r}: expected a non-empty string")
        auto = vram == "auto"
        size = None if (vram is None or auto) else parse_size(vram, arg="vram")
        working_b = check_working(working)
        share, count = check_sm(sm_share, sm_count, f"model {name!r}")
        self._check_sm_count(name, count)
        _check_queue_limits(name, max_queue, overflow)
        if partial is not False and (partial is not True or size is None):
            raise ConfigError(f"model {name!r}: partial={partial!r} with vram={vram!r}: expected partial=True with "
                              "vram= the bytes the model may use on the card, like vram='8GB'")
        note, evict_now, sm_note = None, False, None
        with self._cond:
            s = self._slots.get(name) or Slot(name=name)   # recorded only once every check passed
            if size is not None:
                if s.max_vram is not None and size > s.max_vram:
                    raise BudgetError(f"model {name!r}: vram={format_size(size)} is above its context's "
                                      f"max_vram={format_size(s.max_vram)}")
                self._check_fits_locked(s, size, what=f"model {name!r}", pinned=False)
            self._check_working_locked(s, size if size is not None else s.size, working_b, f"model {name!r}",
                                       pinned=False)
            self._slots[name] = s
            s.working = working_b
            sm_note = self._set_sm_share_locked(s, share, count)
            if origin is not None:
                self._origins[name] = origin
            changed = []
            if size is not None and s.size_source in ("declared", "measured", "task") and size != s.size:
                changed.append(f"size {format_size(s.size)} -> {format_size(size)}")
            if loader is not None and s.loader is not None and loader is not s.loader:
                changed.append("a new loader")
            if size is not None:
                s.size, s.size_source = size, "declared"
            elif auto and s.size_source in ("label", "declared", "task"):
                s.size_source = "auto"
            if loader is not None:
                s.loader = loader
            s.unloader = unload if unload is not None else s.unloader
            s.priority, s.pin = priority, pin
            s.keep_alive = keep_alive if keep_alive is not None else s.keep_alive
            s.offload = offload if offload is not None else s.offload
            s.partial = partial
            _apply_queue_limits(s, max_queue, overflow)
            if changed and s.state in (policy.RESIDENT, policy.LOADING, policy.OFFLOADED):
                note = f"gpuctx: model {name!r} registered again ({', '.join(changed)}): the loaded object is replaced"
                if s.busy or s.state == policy.LOADING:
                    self._stale.add(name)   # evicted when its group ends
                    note += " once its running work ends"
                else:
                    self._mark_evicting_locked(s, "registered again")
                    evict_now = True
            self._cond.notify_all()
        if evict_now:
            self._evict_marked(s, "registered again", keep_host_copy=False)
        if note:
            _warn_at(origin, note)
        if sm_note:
            _warn_at(origin, sm_note)
        return s

    def set_queue_limits(self, name: str, max_queue: int | None, overflow: str | None) -> None:
        """Set model ``name``'s queue limit and overflow policy (see ``@gpu_task(max_queue=...)``)."""
        _check_queue_limits(name, max_queue, overflow)
        with self._cond:
            _apply_queue_limits(self._slot_locked(name), max_queue, overflow)

    def _others_reserved_locked(self, name: str) -> int:
        reserved = self._ledger.reserved
        return sum(v for k, v in reserved.items() if k != name) if reserved else 0

    def _check_fits_locked(self, s: Slot, size: int, *, what: str, pinned: bool = True) -> None:
        """BudgetError now when ``size`` can never fit, with the numbers: the budget less other
        contexts' reservations and (with ``pinned``, for work submitted now) the memory of
        resident pinned models, which are never evicted."""
        reserved = self._ledger.reserved
        others = self._others_reserved_locked(s.name)
        held = others
        if pinned:
            pinned = {}
            for o in self._slots.values():
                if o.pin and o is not s and (o.state == policy.RESIDENT or o.state == policy.LOADING):
                    pinned[o.name] = self._ledger.charge(o.name)
                    held += max(0, pinned[o.name] - reserved.get(o.name, 0))
        if not policy.fits_ever(size, s.name, s.base, self.budget, held):
            pinned = pinned or {}
            pins = "".join(f", pinned {k!r} holds {format_size(v)}" for k, v in pinned.items() if v)
            raise BudgetError(
                f"{what} needs {format_size(size)} but can never fit: budget {format_size(self.budget)} "
                f"({self.budget_source()}), other contexts reserve {format_size(others)}{pins}; largest possible "
                f"{format_size(max(0, self.budget - held))}" + (" (unpin a model to make room)" if pins else "")
            )

    def create_context(self, name: str, *, max_vram: int | str | None = None, base_vram: int | str | None = None,
                       qos: object = QoS.BURSTABLE, max_queue: int | None = None, overflow: str | None = None,
                       sm_share: float | None = None, sm_count: int | None = None) -> Slot:
        """Create an execution context with a QoS tier; GUARANTEED/BURSTABLE reservations are admitted now.
        ``sm_share``/``sm_count``: its share of the GPU's SMs (see :mod:`gpuctx.engine.working`)."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"context name={name!r}: expected a non-empty string")
        tier = QoS.parse(qos)
        mx = None if max_vram is None else parse_size(max_vram, arg="max_vram", allow_zero=False)
        base = None if base_vram is None else parse_size(base_vram, arg="base_vram")
        if tier == QoS.GUARANTEED:
            if mx is None:
                raise ConfigError(f"context {name!r}: qos=GUARANTEED needs max_vram (the bytes to reserve)")
            if base is not None and base != mx:
                raise ConfigError(f"context {name!r}: qos=GUARANTEED reserves max_vram; base_vram={format_size(base)} must equal it or be omitted")
            base = mx
        elif tier == QoS.BEST_EFFORT:
            if base:
                raise ConfigError(f"context {name!r}: qos=BEST_EFFORT reserves nothing; base_vram={format_size(base)} must be 0 or omitted")
            base = 0
        base = base or 0
        if mx is not None and base > mx:
            raise ConfigError(f"context {name!r}: base_vram={format_size(base)} is larger than max_vram={format_size(mx)}")
        _check_queue_limits(name, max_queue, overflow)
        share, count = check_sm(sm_share, sm_count, f"context {name!r}")
        self._check_sm_count(name, count)
        claimed = None   # the share the reservation was claimed from (gpuctx.engine.sharing)
        try:
            while True:
                with self._cond:
                    if mx is not None and mx > self.budget:
                        raise ConfigError(f"context {name!r}: max_vram={format_size(mx)} is larger than the whole budget {format_size(self.budget)}")
                    s = self._slots.get(name) or Slot(name=name)   # recorded only once admitted
                    if s.explicit_context:
                        raise ConfigError(f"context {name!r} exists already; use another name or gpuctx.reset()")
                    if mx is not None and s.size_source != "label" and s.size > mx:
                        raise ConfigError(f"context {name!r}: max_vram={format_size(mx)} is below its model's size {s.describe_size()}")
                    victims = self._reclaim_for_locked(name, tier, base) if base else ()
                    unclaimed = bool(base) and self._share is not None and claimed is not self._share
                    if not victims and not unclaimed:
                        if base:
                            self._ledger.reserve_base(name, base)   # AdmissionError with the numbers
                        self._slots[name] = s
                        s.qos, s.base, s.max_vram, s.explicit_context = tier, base, mx, True
                        _apply_queue_limits(s, max_queue, overflow)
                        sm_note = self._set_sm_share_locked(s, share, count)
                        break
                for v in victims:   # idle best-effort and burst memory goes, so the reservation holds
                    self._evict_marked(self._slots[v], f"room for context {name!r}'s reservation")
                if not victims:   # other kernels' memory: claimed outside the lock; AdmissionError when refused
                    claimed = self._share_reserve(name, base)
        except BaseException:
            if claimed is not None:   # refused here after all: the share gets it back
                with self._cond:
                    claimed.settle(name, self._ledger.reserved.get(name, 0), "base")
            raise
        warn_sm(sm_note)
        return s

    def _reclaim_for_locked(self, name: str, tier: int, base: int) -> tuple[str, ...]:
        """Idle models of tier <= ``tier`` to evict (marked here) so ``base`` bytes can be reserved."""
        extra = max(base, self._ledger.used.get(name, 0)) - self._ledger.charge(name)
        short = extra - self._ledger.free()
        if short <= 0:
            return ()
        snap = self._snapshot_locked()
        victims = policy.choose_victims(snap.slots, short, requester=policy.SlotView(name=name, size=base, qos=tier))
        for v in victims or ():
            self._mark_evicting_locked(self._slots[v], f"room for context {name!r}'s reservation")
        return victims or ()

    def explain(self, name: str, vram: int | str | None = None) -> str:
        """Why a request for ``vram`` in context ``name`` would be admitted now, wait, or fail;
        for a context with an SM share, also whether that share fits beside what runs now."""
        memory = self._explain_memory(name, vram)
        with self._cond:
            s = self._slots.get(name)
            if s is None or not s.sm_share:
                return memory
            snap = self._snapshot_locked()
            view = next(v for v in snap.slots if v.name == name)
            sm = policy.sm_explain(snap, name, s.sm_share)
        if not policy.sm_fits(snap, view) and memory.startswith("admitted"):
            return f"waits: {sm} (memory: {memory})"
        return f"{memory}; {sm}"

    def _explain_memory(self, name: str, vram: int | str | None = None) -> str:
        with self._cond:
            s = self._slots.get(name)
            size = parse_size(vram) if vram is not None else (s.size if s else 0)
            tier = QoS.name(s.qos) if s else "BURSTABLE"
            others = self._others_reserved_locked(name)
            if size > self.budget - others:
                return (f"rejected: {name!r} ({tier}) needs {format_size(size)}; budget {format_size(self.budget)} minus "
                        f"{format_size(others)} reserved by other contexts leaves {format_size(self.budget - others)}")
            snap = self._snapshot_locked()
            free = policy.free_bytes(snap)
            view = next((v for v in snap.slots if v.name == name), policy.SlotView(name=name, size=size))
            view = replace(view, size=size, state=policy.ABSENT if view.state != policy.RESIDENT else view.state)
            need = policy.need_bytes(view)
            if need <= free:
                return f"admitted now: {name!r} ({tier}) needs {format_size(need)} more, {format_size(free)} free"
            victims = policy.choose_victims(snap.slots, need - free, requester=view)
            if victims is not None:
                return (f"admitted after evicting {', '.join(victims)}: {name!r} ({tier}) needs {format_size(need)}, "
                        f"{format_size(free)} free")
            return (f"waits: {name!r} ({tier}) needs {format_size(need)}, {format_size(free)} free, and no idle model "
                    f"of tier <= {tier} can make room until running work ends")

    def on_memory_pressure(self, handler: Callable[[Any, int, int], bool]) -> None:
        """Register ``handler(ctx, requested, available) -> bool``: True lets a request wait, False fails it."""
        if not callable(handler):
            raise ConfigError(f"on_memory_pressure(handler={handler!r}): expected a callable (ctx, requested, available) -> bool")
        with self._cond:
            self._handlers.append(handler)

    def context_usage(self, name: str) -> tuple[int, int | None, int]:
        """(used, max, base) bytes of context ``name``."""
        with self._cond:
            s = self._slots.get(name)
            if s is None:
                raise ConfigError(f"context {name!r}: no such context or model")
            return self._ledger.used.get(name, 0), s.max_vram, s.base

    def available(self) -> int:
        """Bytes free for new work now (budget minus what is counted or promised)."""
        with self._cond:
            return policy.free_bytes(self._snapshot_locked())


def _check_queue_limits(name: str, max_queue: int | None, overflow: str | None) -> None:
    if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1):
        raise ConfigError(f"max_queue={max_queue!r} for {name!r}: expected an int >= 1 (or None for no limit)")
    if overflow is not None and overflow not in OVERFLOW_POLICIES:
        raise ConfigError(f"overflow={overflow!r} for {name!r}: expected one of {', '.join(OVERFLOW_POLICIES)}")


def _apply_queue_limits(s: Slot, max_queue: int | None, overflow: str | None) -> None:
    if max_queue is not None:
        s.max_queue = max_queue
    if overflow is not None:
        s.overflow = overflow


def _warn_at(origin: tuple | None, message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warn at the user's line that registered the model (``origin``), not inside gpuctx: a load
    runs on a worker thread, where no frame of the user's is on the stack for stacklevel to find."""
    if origin is None:
        warnings.warn(message, category, stacklevel=3)
        return
    filename, lineno, module, globs = origin
    warnings.warn_explicit(message, category, filename, lineno, module=module,
                           registry=globs.setdefault("__warningregistry__", {}), module_globals=globs)
