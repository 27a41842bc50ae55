"""One cluster worker: a Ray actor holding a gpuctx engine for one card (or a declared CPU budget).

It runs in the worker process. The driver sends it registrations (cloudpickled by Ray, so a
notebook's loaders and task bodies travel by value) and calls; each call is two actor calls:

- ``submit(tid, spec, call)`` fetches the call's ObjectRef arguments from the object store
  (a producer's result never passes through the driver), submits it to the local engine, and
  returns once the body has *started*; the driver uses that to tell a running task (which a
  worker's death fails, or retries) from a queued one (which it moves to another worker);
- ``result(tid)`` returns ``(value, info)`` as two objects once the task has ended: the value
  stays in this node's object store until someone asks for it; ``info`` is small and tells the
  driver how long the body ran, how big the value is and what this worker now holds.

The actor is async (one event loop, many calls in flight); the engine's own threads run the
bodies, so the loop only waits. Engine callbacks reach the loop by ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any, Callable

from .. import _walk
from ..engine import Config, Scheduler, TaskSpec
from ..errors import DependencyError

__all__ = ["GpuWorker"]

_READERS = 8   # dashboards (and tops) of the driver whose timelines a worker keeps


def _is_ref(x: Any) -> bool:
    import ray

    return isinstance(x, ray.ObjectRef)


def _nbytes(value: Any) -> int | None:
    n = getattr(value, "nbytes", None)
    if isinstance(n, int):
        return n
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    return None


class GpuWorker:
    """The actor's body (the driver wraps it with ``ray.remote``); its methods are the protocol."""

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.sched = Scheduler(config, clock=time.perf_counter)   # a known clock: events() maps it to wall time
        self._calls: dict[int, tuple[asyncio.Future, asyncio.Future]] = {}
        self._watched: dict[Callable, Callable] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: dict[str, Any] = {}   # the driver's dashboard readers: their timelines, kept here

    # -- registrations (the driver replays them to every worker) ---------------------------
    def register_model(self, name: str, kw: dict) -> None:
        """Register a model's loader here (it runs here, at the first load)."""
        self.sched.register_model(name, **kw)

    def set_queue_limits(self, name: str, max_queue: int | None, overflow: str | None) -> None:
        """A model's queue limit on this worker."""
        self.sched.set_queue_limits(name, max_queue, overflow)

    def evict(self, name: str | None) -> list[str]:
        """Evict ``name`` (or every idle model) here."""
        return self.sched.evict(name)

    def budget(self) -> int:
        """This worker's budget in bytes (from its card, or declared)."""
        return self.sched.budget

    def device(self) -> str:
        """The device's name."""
        return self.sched.device.name

    # -- calls -----------------------------------------------------------------------------
    async def submit(self, tid: int, spec: TaskSpec, call: tuple) -> float:
        """Fetch the arguments, submit the call here, return when its body starts (the start time)."""
        self._loop = asyncio.get_running_loop()
        started, done = self._entry(tid)
        loop = self._loop
        args, kwargs = call
        try:
            refs = _walk.collect((args, kwargs), _is_ref)
            if refs:
                values = await asyncio.gather(*refs)
                table = {id(r): v for r, v in zip(refs, values)}
                args, kwargs = _walk.replace((args, kwargs), _is_ref, lambda r: table[id(r)])
        except Exception as exc:  # noqa: BLE001 - a producer failed (on any worker)
            cause = getattr(exc, "cause", None) or exc
            _settle(started, None)
            _settle(done, exc=DependencyError(f"{spec.name}(): a dependency failed: {type(cause).__name__}: {cause}"))
            return 0.0
        watched = spec
        if spec.batch_size == 1 and not spec.cuda_graph:
            watched = replace(spec, fn=self._watch(spec.fn))
            args = (tid,) + tuple(args)
        try:
            local = self.sched.submit(watched, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - refused here (a budget, a closed engine): the call fails
            _settle(started, None)
            _settle(done, exc=exc)
            return 0.0
        local.add_done_callback(lambda t: loop.call_soon_threadsafe(self._ended, tid, t))
        return await started or 0.0

    async def result(self, tid: int) -> tuple[Any, dict]:
        """``(value, info)`` once call ``tid`` has ended; its error raised when it failed."""
        started, done = self._entry(tid)
        try:
            value, ran = await done
        finally:
            del self._calls[tid]
        return value, {"ran": ran, "nbytes": _nbytes(value), "holds": self.holds()}

    def _entry(self, tid: int) -> tuple[asyncio.Future, asyncio.Future]:
        # Ray may start an async actor's calls out of order: whichever of submit and result
        # comes first makes the pair (both run on the loop's thread).
        entry = self._calls.get(tid)
        if entry is None:
            loop = asyncio.get_running_loop()
            entry = self._calls[tid] = (loop.create_future(), loop.create_future())
        return entry

    def holds(self) -> list[tuple[str, str, int, float, bool]]:
        """(model, state, bytes, load seconds, busy) for every slot here, as the router needs them."""
        snap = self.sched.snapshot()
        return [(s.name, s.state, s.size, s.load_cost, s.busy or bool(s.queued or s.pending)) for s in snap.slots]

    def stats(self) -> dict:
        """This worker's stats (loads, switches, per model), as ``gpuctx.stats()`` gives them."""
        return dict(self.sched.trace.stats.as_dict())

    def events(self) -> tuple[float, list]:
        """(wall time minus this engine's clock, the trace's events), for the driver's timeline."""
        return time.time() - time.perf_counter(), self.sched.trace.events

    def panel(self, reader: str, window: float) -> Any:
        """This engine's dashboard panel (a `gpuctx.panel.Panel`) for the driver's reader ``reader``.

        The reader's timeline is kept here between calls, so each call reads only the trace events
        new since its last one and sends a panel of bounded size (``COLUMNS`` cells per lane), however
        many tasks ran meanwhile. The last ``_READERS`` readers are kept.
        """
        from ..panel import PanelReader

        r = self._readers.pop(reader, None)
        if r is None or r.window != window:
            r = PanelReader(lambda: self.sched, window)
        self._readers[reader] = r              # the most recent last
        while len(self._readers) > _READERS:
            self._readers.pop(next(iter(self._readers)))
        return r.read()

    def shutdown(self) -> None:
        """Stop the engine, unloading every model."""
        self.sched.shutdown(wait=True, cancel_pending=True)

    # -- the engine's side (its threads) -------------------------------------------------------
    def _watch(self, fn: Callable) -> Callable:
        """``fn`` taking the call's id first: it tells the loop that the body started."""
        w = self._watched.get(fn)
        if w is not None:
            return w
        if asyncio.iscoroutinefunction(fn):
            async def w(tid: int, *args: Any, **kwargs: Any) -> Any:
                self._started(tid)
                return await fn(*args, **kwargs)
        else:
            def w(tid: int, *args: Any, **kwargs: Any) -> Any:
                self._started(tid)
                return fn(*args, **kwargs)
        w.__name__ = w.__qualname__ = getattr(fn, "__name__", "task")
        self._watched[fn] = w
        return w

    def _started(self, tid: int) -> None:
        # The call was recorded (and the loop known) before it was submitted to the engine.
        started = self._calls[tid][0]
        self._loop.call_soon_threadsafe(_settle, started, time.time())

    def _ended(self, tid: int, local: Any) -> None:
        started, done = self._calls[tid]
        _settle(started, local.started_at)
        if local.cancelled():
            _settle(done, exc=DependencyError(f"task #{tid} was cancelled on worker {self.name}"))
            return
        exc = local.exception()
        if exc is not None:
            _settle(done, exc=exc)
            return
        ran = None if local.run_time is None else float(local.run_time)
        _settle(done, (local.result(), ran))


def _settle(fut: asyncio.Future, value: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)
