"""Residency: load, restore, evict or offload a model, and unload the idle ones (keep-alive).

Every eviction is decided under the lock by :meth:`_Transitions._mark_evicting_locked` and
carried out here without it (:meth:`_Residency._evict_marked`), by the thread that decided it.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

from .. import policy
from ..errors import BudgetError, ConfigError, ModelLoadError
from .._holders import holders_of
from ..device.base import _weak
from ..models import Slot
from ..units import format_size
from .execute import _drop_frames
from .registry import _warn_at
from .spec import _Frame, _current
from .state import _QUEUED, _WAITING, _resolve, slot_to


class _Residency:
    """Mixin of :class:`gpuctx.engine.Scheduler`; see the module docstring."""

    def _make_resident(self, slot: Slot) -> bool:
        """Load, restore, or (for a label) just charge ``slot``; False if it failed (tasks already
        failed) or if its measured size does not fit now (unloaded again, its tasks still queued)."""
        with self._cond:
            if slot.state == policy.RESIDENT:
                return True
            size = slot.size
            if slot.size_source == "auto":   # not measured yet: what the plan let it claim, and what came free since
                snap = self._snapshot_locked()
                claim = policy.auto_size_claim(snap, slot.name, free=policy.free_now(snap))
                size = claim if claim is not None else 0   # (None: another is measured; the plan starts one at a time)
                if self._share is not None:   # before it is measured, only what no other kernel holds
                    size = min(size, self._share.free())
        share = self._share
        if not self._share_claim(slot.name, size):   # other kernels' memory: asked for outside the lock
            return False
        with self._cond:
            while not self._ledger.can_activate(slot.name, size):
                if self._closed:
                    return False
                self._cond.wait(0.5)   # victims still unloading; they notify when done
            self._ledger.activate(slot.name, size)
            was_offloaded = slot.state == policy.OFFLOADED
            slot_to(slot, policy.LOADING)
        if slot.is_label:
            with self._cond:
                slot_to(slot, policy.RESIDENT)
            return True
        t0 = self._clock()
        what = "restore" if was_offloaded else "load"
        with self._cond:
            self.trace.record("load_start", model=slot.name, context=slot.name, nbytes=size, t=t0,
                              reason="restore" if was_offloaded else None)
        self._tell_residency("start", what, slot.name, size, None)
        token = _current.set(_Frame(slot.name, None, self._device.name, None))
        place = getattr(self._device, "place_partial", None) if slot.partial else None
        fraction = None
        try:
            measured = None
            if was_offloaded and place is not None:
                obj = slot.obj   # the streamed part stayed pinned on the host: place it again
            elif was_offloaded:
                obj = self._with_oom_retry(slot, self._device.restore, (slot.name, slot.obj))
            else:
                obj, measured = self._with_oom_retry(slot, self._device.load, (slot.name, slot.loader))
            if place is not None:   # its share is what it declared, whatever the load measured
                measured, fraction = None, place(slot.name, obj, size)
                if fraction is None:
                    raise BudgetError(f"partial=True with vram={format_size(size)}: two of its largest layers "
                                      f"(the streaming buffers) do not fit; expected a larger vram=")
        except BaseException as exc:  # noqa: BLE001 - a loader may raise anything
            self._load_failed(slot, exc, was_offloaded)
            self._tell_residency("failed", what, slot.name, size, self._clock() - t0)
            return False
        finally:
            _current.reset(token)
        dt = self._clock() - t0
        warn, victims, unfit = None, (), None
        with self._cond:
            slot.obj = obj
            slot_to(slot, policy.RESIDENT)
            slot.resident_fraction = fraction
            slot.loads += 1
            slot.load_cost = dt if slot.loads == 1 else 0.5 * slot.load_cost + 0.5 * dt
            if not was_offloaded and dt > 0 and size > 0:
                rate = size / dt
                self._load_rate = rate if self._load_rate is None else 0.5 * self._load_rate + 0.5 * rate
            unknown = slot.size_source == "auto"
            if measured is not None or (unknown and not was_offloaded):
                warn, victims, unfit = self._apply_measured_locked(slot, measured)
        if victims:   # the measured size needs more than it claimed: its victims go first, then it is charged
            for v in victims:
                self._evict_marked(self._slots[v], reason=f"room for {slot.name!r}'s measured size")
            with self._cond:
                unfit = self._fit_measured_locked(slot, evict=False)[1]
        with self._cond:
            nbytes = self._ledger.used.get(slot.name, 0)
            self.trace.record("restore" if was_offloaded else "load_end", model=slot.name, context=slot.name,
                              nbytes=nbytes, duration=dt, vram=self._ledger.committed())
            if unknown and unfit is None:   # its size is known now: the loads that waited for it are planned
                self._cond.notify_all()
                self._dispatch_locked()
        self._tell_residency("end", what, slot.name, nbytes, dt)
        if unfit is not None:
            obj = None   # the slot's reference is the only one left: the unload frees it
            self._undo_unfit_load(slot, unfit)
            if warn:
                _warn_at(self._origins.get(slot.name), warn)
            return False
        if self._share is not None and (nbytes != size or self._share is not share):
            # measured at load (the share is charged what it took), or a share joined meanwhile
            self._share_claim(slot.name, nbytes)
        if warn:
            _warn_at(self._origins.get(slot.name), warn)
        return True

    # Listeners of loads and restores (progress bars): a tuple replaced, never mutated, so the
    # worker reads it without the lock; they are called without the lock, on the loading thread.
    _residency_listeners: tuple = ()

    def on_residency(self, listener: Callable[[str, str, str, int, float | None], Any]) -> None:
        """Call ``listener(phase, kind, model, nbytes, seconds)`` when a load or restore
        (``kind``: "load" or "restore") starts (``phase`` "start", ``seconds`` None), ends
        ("end") or fails ("failed"); never under the lock. An error it raises is a warning."""
        with self._cond:
            self._residency_listeners = self._residency_listeners + (listener,)

    def _tell_residency(self, phase: str, kind: str, model: str, nbytes: int, seconds: float | None) -> None:
        for listener in self._residency_listeners:
            try:
                listener(phase, kind, model, nbytes, seconds)
            except Exception as exc:  # noqa: BLE001 - a display hook must not fail a load
                warnings.warn(f"gpuctx: residency listener {listener!r} raised {type(exc).__name__}: {exc}",
                              RuntimeWarning, stacklevel=2)

    def _apply_measured_locked(self, slot: Slot, measured: int | None
                               ) -> tuple[str | None, tuple[str, ...], str | BudgetError | None]:
        """Count what the load really took; warn when the declaration was >10% low.

        Returns (the warning, idle models to evict before the measured size is charged, and
        why the load cannot be kept: a BudgetError when it can never fit, a reason when it does
        not fit now; None when it is charged). The ledger never goes above the budget: the load
        stays charged its claim until its victims are gone (:func:`gpuctx.policy.measured_fit`).
        """
        if measured is None:   # "auto" on a device that cannot measure
            self._ledger.activate(slot.name, 0)
            slot.size, slot.size_source = 0, "measured"
            return (f"model {slot.name!r}: vram='auto' cannot be measured on device {self._device.name!r}; "
                    "counting 0 bytes (declare vram= to budget it)"), (), None
        warn = None
        auto = slot.size_source == "auto"
        if not auto and measured > slot.size * 1.10:
            warn = (f"model {slot.name!r}: measured {format_size(measured)} at load, more than 10% above the declared "
                    f"vram={format_size(slot.size)}; using the measured size")
        if auto or measured > slot.size:
            slot.size, slot.size_source = measured, "measured"
        try:
            what = f"model {slot.name!r} (vram='auto', measured at its first load)" if auto else \
                f"model {slot.name!r} (measured at load)"
            self._check_fits_locked(slot, slot.size, what=what)
        except BudgetError as exc:
            return warn, (), exc
        victims, unfit = self._fit_measured_locked(slot, evict=True)
        return warn, victims, unfit

    def _fit_measured_locked(self, slot: Slot, evict: bool) -> tuple[tuple[str, ...], str | None]:
        """Charge ``slot`` its measured size if it fits now; else (with ``evict``) mark the idle
        models to evict first, its size claimed meanwhile so that no plan gives their memory
        away; else say why it must be unloaded (it is loaded again once there is room)."""
        if not evict:   # its victims are gone: the claim that kept their memory for it is what it takes now
            self._ledger.claims.pop(slot.name, None)
        snap = self._snapshot_locked()
        action, victims = policy.measured_fit(snap, slot.name, slot.size)
        if action == "keep":
            self._ledger.activate(slot.name, slot.size)
            return (), None
        if action == "evict" and evict:
            self._ledger.claims[slot.name] = max(self._ledger.claims.get(slot.name, 0), slot.base, slot.size)
            for v in victims:
                self._mark_evicting_locked(self._slots[v], f"room for {slot.name!r}'s measured size")
            return victims, None
        return (), (f"measured {format_size(slot.size)} at load, {format_size(self._ledger.charge(slot.name))} "
                    f"claimed and {format_size(policy.free_now(snap))} free of {format_size(self.budget)}, "
                    "the rest in use: loaded again once there is room")

    def _undo_unfit_load(self, slot: Slot, unfit: str | BudgetError) -> None:
        """Unload a model whose measured size does not fit. Not now (``unfit`` a reason): its work
        stays queued and the plan loads it again once there is room for its size, known now.
        Never (a BudgetError): its work that has not started fails with it."""
        never = isinstance(unfit, BudgetError)
        reason = "measured above the budget" if never else unfit
        with self._cond:
            self._mark_evicting_locked(slot, reason)
        self._evict_marked(slot, reason, keep_host_copy=not never)
        if not never:
            return
        to_resolve: list = []
        with self._cond:
            for t in sorted(self._live, key=lambda t: t.id):
                if t.model == slot.name and not t._on_cpu and t.state in (_WAITING, _QUEUED):
                    self._fail_locked(t, unfit, to_resolve)
            self._dispatch_locked()
        _resolve(to_resolve)

    def _load_failed(self, slot: Slot, exc: BaseException, was_offloaded: bool) -> None:
        to_resolve: list = []
        with self._cond:
            slot_to(slot, policy.ABSENT)
            slot.obj = None
            self._ledger.release(slot.name)
            self._share_settle_locked(slot.name)
            err = ModelLoadError(
                f"model {slot.name!r}: {'restore' if was_offloaded else 'loader'} raised {type(exc).__name__}: {exc}"
            )
            _drop_frames(exc)
            self._to_scrub.setdefault(slot.name, []).append(exc)
            err.__cause__ = exc
            while True:
                t = slot.pop()
                if t is None:
                    break
                slot.queued += 1  # _fail_locked withdraws it again
                self._fail_locked(t, err, to_resolve)
            self.trace.record("unload", model=slot.name, reason="load failed", vram=self._ledger.committed())
            self._cond.notify_all()
        _resolve(to_resolve)

    def _evict_marked(self, slot: Slot, reason: str, keep_host_copy: bool = True) -> None:
        """Unload (or offload, unless ``keep_host_copy`` is False) a slot already marked EVICTING;
        update the ledger; never raises."""
        obj = slot.obj
        nbytes = self._ledger.used.get(slot.name, 0)
        t0 = self._clock()
        offloaded = False
        warn = None
        try:
            if keep_host_copy and obj is not None and self.config.offload and slot.offload is not False and self._device.can_offload(obj):
                try:
                    obj = self._device.offload(slot.name, obj)
                    offloaded = True
                except BudgetError:
                    offloaded = False   # host budget full: drop it instead
            if not offloaded:
                if slot.unloader is not None and obj is not None:
                    try:
                        slot.unloader(obj)
                    except Exception as exc:  # noqa: BLE001
                        warn = f"model {slot.name!r}: unload raised {type(exc).__name__}: {exc}; its object was dropped anyway"
                slot.obj = None
                if obj is not None:
                    ref = _weak(obj)
                    holder, obj = [obj], None   # the device pops it: no reference left here
                    report = self._device.release(slot.name, holder, nbytes)
                    if report.still_referenced:
                        self._lingering[slot.name] = ref
                        found = ref() if ref is not None else None
                        where = holders_of(found) if found is not None else []
                        found = None
                        held = (f"by {', '.join(where)}; drop it (%gpuctx free clears IPython's output cache)"
                                if where else "elsewhere (a variable, a stored traceback?)")
                        warn = (f"model {slot.name!r} was evicted but its object is still referenced {held}; "
                                f"{format_size(nbytes)} stay allocated until that reference is dropped")
            else:
                self._device.empty_caches()
        finally:
            dt = self._clock() - t0
            with self._cond:
                slot.obj = obj if offloaded else None
                slot_to(slot, policy.OFFLOADED if offloaded else policy.ABSENT)
                slot.unload_cost = dt if not slot.unload_cost else 0.5 * slot.unload_cost + 0.5 * dt
                self._ledger.release(slot.name)
                self._share_settle_locked(slot.name)
                self.trace.record("offload" if offloaded else "unload", model=slot.name, context=slot.name,
                                  nbytes=nbytes, reason=reason, duration=dt, vram=self._ledger.committed())
                self._cond.notify_all()
                self._dispatch_locked()
        if warn:
            _warn_at(self._origins.get(slot.name), warn)

    def evict(self, name: str | None = None, *, reason: str = "asked") -> list[str]:
        """Evict model ``name`` (or every idle, unpinned model when None) now; returns what was evicted."""
        with self._cond:
            if name is not None:
                s = self._slots.get(name)
                if s is None:
                    raise ConfigError(f"evict({name!r}): no such model; known: {', '.join(sorted(self._slots)) or 'none'}")
                if s.busy:
                    raise ConfigError(f"evict({name!r}): the model is in use by a running task; wait for it first")
                if s.state != policy.RESIDENT or s.is_label:
                    return []
                targets = [s]
            else:
                targets = [self._slots[n] for n in policy.evictable_now(self._snapshot_locked().slots)]
            for s in targets:
                self._mark_evicting_locked(s, reason)
        for s in targets:
            self._evict_marked(s, reason)
        return [s.name for s in targets]

    def _housekeep(self) -> None:
        """Unload models idle for longer than their keep_alive (woken at group ends and config changes),
        and make the starts the policy deferred when they fall due (after a shutdown too, until
        the last of them ran: nothing else may come to plan them)."""
        while True:
            with self._cond:
                if self._closed:
                    if self._replan_at is None or not self._live:
                        return
                    names, next_at, now = (), None, 0.0   # closing: only the deferred starts
                elif self.config.keep_alive is None and all(s.keep_alive is None for s in self._slots.values()):
                    names, next_at, now = (), None, 0.0   # nothing can expire: no snapshot per group end
                else:
                    snap = self._snapshot_locked()
                    now = snap.now
                    names, next_at = policy.keep_alive_due(snap.slots, now)
                due = [self._slots[n] for n in names]
                for s in due:
                    ka = s.keep_alive if s.keep_alive is not None else self.config.keep_alive
                    self._mark_evicting_locked(s, f"idle for {ka:g} s (keep_alive)")
                next_at, now = self._replan_due_locked(next_at, now)
            for s in due:
                self._evict_marked(s, "idle past keep_alive")
            if not due:
                self._hk_wake.wait(None if next_at is None else max(0.001, next_at - now))
                self._hk_wake.clear()

    def _replan_due_locked(self, next_at: float | None, now: float) -> tuple[float | None, float]:
        """Plan again if a deferred start (policy.plan_wake) is due; return the housekeeper's
        next wake-up time (the earlier of ``next_at`` and the next deferral) and the time now."""
        if self._replan_at is None:
            return next_at, now
        now = self._clock()
        if self._replan_at <= now:
            self._replan_at = None
            self._dispatch_locked()   # may defer again: sets _replan_at anew
        if self._replan_at is not None:
            next_at = self._replan_at if next_at is None else min(next_at, self._replan_at)
        return next_at, now

    def _free_for_oom(self, slot: Slot) -> None:
        with self._cond:
            snap = self._snapshot_locked()
            victims = policy.order_victims_for_oom(snap.slots, keep=slot.name)
            for v in victims:
                self._mark_evicting_locked(self._slots[v], "out of memory in " + repr(slot.name))
        for v in victims:
            self._evict_marked(self._slots[v], reason="out of memory in " + repr(slot.name))
        self._device.empty_caches()
