"""Running one task or one batch on a device: streams, events, graphs, OOM retry.

What runs here is user code, never under the lock. A body's exception fails its task only
(BaseException too, as a thread pool does); the exception keeps its lines but not the
engine's frames or the body's locals (:func:`_drop_frames`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from ..errors import BatchError, GpuOutOfMemory
from ..models import Slot
from ..task import Task
from ..units import format_size
from ._walkargs import _substitute
from .spec import TaskSpec


class _Execution:
    """Mixin of :class:`gpuctx.engine.Scheduler`; see the module docstring."""

    def _execute(self, slot: Slot, obj: Any, batch: list[Task]) -> list:
        """Run one task (or one batch) on the slot's stream; returns ("ok", value) / ("err", exc) per task."""
        spec: TaskSpec = batch[0]._spec
        device = self._device
        try:
            if device.name == "cpu":   # no stream to switch to
                value = self._measured_run(slot, spec, batch)
            else:
                with device.stream_scope(slot.name):
                    self._order_inputs(slot.name, batch)
                    value = self._measured_run(slot, spec, batch)
                    event = device.record_event(slot.name)
                for t in batch:
                    t._event = event
        except BaseException as exc:  # noqa: BLE001 - a task may raise anything; it fails that task only
            # SystemExit and KeyboardInterrupt raised by a body too (as a thread pool does): re-raised
            # here they would end this worker thread and leave the task RUNNING for good.
            if device.is_oom(exc):
                exc = self._oom_error(slot, exc, batch[0].name, spec.oom_retries)
            _drop_frames(exc)
            return [("err", exc)] * len(batch)
        if len(batch) == 1 and spec.batch_size <= 1:
            return [("ok", value)]
        if not isinstance(value, (list, tuple)) or len(value) != len(batch):
            got = f"{type(value).__name__} of length {len(value)}" if hasattr(value, "__len__") else type(value).__name__
            err = BatchError(f"{spec.name}: batched over {len(batch)} inputs but returned {got}; expected a list of {len(batch)} results")
            return [("err", err)] * len(batch)
        return [("ok", v) for v in value]

    def _run_bodies(self, slot: Slot, spec: TaskSpec, batch: list[Task]) -> Any:
        if len(batch) == 1 and spec.batch_size <= 1:
            fn, args, kwargs = self._callable(spec, slot.name, batch[0])
        else:
            fn, args, kwargs = spec.fn, ([_substitute(t._args, t._kwargs)[0][0] for t in batch],), {}
        return self._with_oom_retry(slot, fn, args, kwargs, spec.oom_retries)

    def _order_inputs(self, context: str, batch: list[Task]) -> None:
        """Make ``context``'s stream wait for each input's producer (an event, no host sync), and tell
        the allocator the inputs are in use on this stream, so their memory is not handed out again
        before this task's kernels have read them (the producer may drop its reference at once)."""
        device = self._device
        for t in batch:
            device.wait_event(context, t._caller_event)
            for d in t._deps:
                if d._event is not None and d.model != context:
                    device.wait_event(context, d._event)
                    device.record_stream(context, d._value)
            device.record_stream(context, (t._args, t._kwargs))

    def _callable(self, spec: TaskSpec, context: str, task: Task) -> tuple[Callable[..., Any], tuple, dict]:
        """(function, args, kwargs) that run ``task``'s body once."""
        # Only a task with dependencies can have Task arguments to replace by their values.
        args, kwargs = _substitute(task._args, task._kwargs) if task._deps else (task._args, task._kwargs)
        fn = spec.fn
        if spec.cuda_graph and self._device.name != "cpu":
            runner = self._graph_runners.get((spec.fn, context))
            if runner is None:
                from ..device.graphs import make_graph_runner

                runner = self._graph_runners[(spec.fn, context)] = make_graph_runner(fn, device=self._device, context=context)
            return runner, (args, kwargs), {}
        if spec.is_async:
            return _run_coroutine, (fn, args, kwargs), {}
        return fn, args, kwargs

    def _with_oom_retry(self, slot: Slot, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None,
                        retries: int | None = None) -> Any:
        """``fn(*args, **kwargs)``; on out-of-memory, free what can be freed and call it again."""
        kwargs = {} if kwargs is None else kwargs
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            return self._retry_after_oom(slot, exc, fn, args, kwargs, retries)

    def _retry_after_oom(self, slot: Slot, exc: BaseException, fn: Callable[..., Any], args: tuple, kwargs: dict,
                         retries: int | None) -> Any:
        """``fn`` raised ``exc``: re-raise it unless it is out-of-memory; else evict idle models, empty
        the caches and call ``fn`` again, up to ``retries`` times (default: the configured number)."""
        retries = self.config.oom_retries if retries is None else retries
        for _ in range(retries):
            if not self._device.is_oom(exc):
                break
            with self._cond:
                self.trace.record("oom_retry", model=slot.name, context=slot.name, reason=type(exc).__name__)
            self._free_for_oom(slot)
            try:
                return fn(*args, **kwargs)
            except BaseException as again:
                exc = again
        raise exc

    def _oom_error(self, slot: Slot, exc: BaseException, what: str, retries: int | None = None) -> GpuOutOfMemory:
        retries = self.config.oom_retries if retries is None else retries
        with self._cond:
            residents = ", ".join(
                f"{s.name}={format_size(self._ledger.used.get(s.name, 0))}" for s in self._slots.values()
                if self._ledger.used.get(s.name, 0)
            ) or "none"
            budget, committed = self.budget, self._ledger.committed()
        err = GpuOutOfMemory(
            f"{what} (model {slot.name!r}): out of device memory after {retries} retry(ies); "
            f"budget {format_size(budget)}, committed {format_size(committed)}, residents: {residents}"
        )
        err.__cause__ = exc
        return err


def _run_coroutine(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return asyncio.run(fn(*args, **kwargs))


def _drop_frames(exc: BaseException | None, depth: int = 0) -> None:
    """Keep ``exc``'s traceback (its lines) but not what its frames held.

    A stored exception keeps its traceback, the traceback its frames, and the frames their
    locals: the engine's hold the model object and the batch, the body's whatever it named
    (``m = gpuctx.current_model()``). A failed Task kept by the user would keep an evicted
    model allocated. So the engine's own frames are cut off the front, and the locals of the
    frames left are cleared (the file, line and code of each stay for the printed traceback).
    Causes and contexts are treated alike, a few levels deep.
    """
    if exc is None or depth > 8:
        return
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("gpuctx.engine"):
        tb = tb.tb_next
    exc.__traceback__ = tb
    while tb is not None:
        try:
            tb.tb_frame.clear()
        except RuntimeError:
            pass   # a frame still running (cannot happen for a raised-through body; kept safe)
        tb = tb.tb_next
    _drop_frames(exc.__cause__, depth + 1)
    if exc.__context__ is not exc.__cause__:
        _drop_frames(exc.__context__, depth + 1)
