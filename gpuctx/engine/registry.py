"""Models and contexts: registration, sizes, QoS admission, and the questions about them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from .. import policy
from ..errors import (
    BudgetError,
    ConfigError,
)
from ..models import OVERFLOW_POLICIES, QoS, Slot
from ..units import format_size, parse_size


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
                       max_queue: int | None = None, overflow: str | None = None) -> Slot:
        """Register (or update) a model's loader and settings; sizes that disagree raise ConfigError."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"model name={name!r}: expected a non-empty string")
        auto = vram == "auto"
        size = None if (vram is None or auto) else parse_size(vram, arg="vram")
        with self._cond:
            s = self._slot_locked(name)
            if size is not None:
                self._check_size_locked(s, size, "declared")
            if size is not None and s.size_source in ("label", "auto", "task"):
                s.size, s.size_source = size, "declared"
            elif auto and s.size_source == "label":
                s.size_source = "auto"
            if loader is not None:
                s.loader = loader
            s.unloader = unload if unload is not None else s.unloader
            s.priority, s.pin = priority, pin
            s.keep_alive = keep_alive if keep_alive is not None else s.keep_alive
            s.offload = offload if offload is not None else s.offload
            self._set_queue_limits_locked(s, max_queue, overflow)
            self._check_fits_locked(s, s.size, what=f"model {name!r}")
            self._cond.notify_all()
            return s

    def _set_queue_limits_locked(self, s: Slot, max_queue: int | None, overflow: str | None) -> None:
        if max_queue is not None:
            if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
                raise ConfigError(f"max_queue={max_queue!r} for {s.name!r}: expected an int >= 1 (or None for no limit)")
            s.max_queue = max_queue
        if overflow is not None:
            if overflow not in OVERFLOW_POLICIES:
                raise ConfigError(f"overflow={overflow!r} for {s.name!r}: expected one of {', '.join(OVERFLOW_POLICIES)}")
            s.overflow = overflow

    def _check_size_locked(self, s: Slot, size: int, source: str) -> None:
        if s.size_source in ("declared", "task") and size != s.size:
            raise ConfigError(
                f"model {s.name!r} declared with two sizes: {format_size(s.size)} ({s.size_source}) and "
                f"{format_size(size)} ({source}); give one size"
            )
        if s.max_vram is not None and size > s.max_vram:
            raise BudgetError(
                f"model {s.name!r}: vram={format_size(size)} is above its context's max_vram={format_size(s.max_vram)}"
            )

    def _others_reserved_locked(self, name: str) -> int:
        return sum(v for k, v in self._ledger.reserved.items() if k != name)

    def _check_fits_locked(self, s: Slot, size: int, *, what: str) -> None:
        """BudgetError now when ``size`` can never fit, with the numbers."""
        others = self._others_reserved_locked(s.name)
        if not policy.fits_ever(size, s.name, s.base, self.budget, others):
            raise BudgetError(
                f"{what} needs {format_size(size)} but can never fit: budget {format_size(self.budget)} "
                f"(capacity x safety_factor {self.config.safety_factor}), of which other contexts reserve "
                f"{format_size(others)}; largest possible {format_size(self.budget - others)}"
            )

    def create_context(self, name: str, *, max_vram: int | str | None = None, base_vram: int | str | None = None,
                       qos: object = QoS.BURSTABLE, max_queue: int | None = None, overflow: str | None = None) -> Slot:
        """Create an execution context with a QoS tier; GUARANTEED/BURSTABLE reservations are admitted now."""
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
        with self._cond:
            if mx is not None and mx > self.budget:
                raise ConfigError(f"context {name!r}: max_vram={format_size(mx)} is larger than the whole budget {format_size(self.budget)}")
            s = self._slot_locked(name)
            if s.explicit_context:
                raise ConfigError(f"context {name!r} exists already; use another name or gpuctx.reset()")
            if mx is not None and s.size_source != "label" and s.size > mx:
                raise ConfigError(f"context {name!r}: max_vram={format_size(mx)} is below its model's size {s.describe_size()}")
            if base:
                self._ledger.reserve_base(name, base)   # AdmissionError with the numbers
            s.qos, s.base, s.max_vram, s.explicit_context = tier, base, mx, True
            self._set_queue_limits_locked(s, max_queue, overflow)
            return s

    def explain(self, name: str, vram: int | str | None = None) -> str:
        """Why a request for ``vram`` in context ``name`` would be admitted now, wait, or fail."""
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
