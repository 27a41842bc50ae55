"""Session."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ..task import Task
from ..units import parse_size
from .spec import TaskSpec, _Frame, _current

if TYPE_CHECKING:  # pragma: no cover
    from .scheduler import Scheduler



class Session:
    """``with``/``async with`` body that runs as a task of ``model``: the model resident, its stream current."""

    def __init__(self, sched: Scheduler, model: str, *, vram: Any, priority: int, after: tuple, name: str | None) -> None:
        self._sched = sched
        self._granted: Future = Future()
        self._release = threading.Event()
        self._scope: Any = None
        self._token: Any = None
        vram_b = None if vram is None else parse_size(vram, arg="vram")
        spec = TaskSpec(fn=self._hold, name=name or f"session:{model}", model=model, vram=vram_b, priority=priority, after=after)
        self.task = sched.submit(spec, (), {})
        self.task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: Task) -> None:
        # The request failed (load error, dependency failed) or was cancelled before it was granted.
        if not self._granted.done():
            exc = task.exception() if not task.cancelled() else None
            if exc is None:
                from concurrent.futures import CancelledError

                exc = CancelledError(f"{task.name}: withdrawn before it started")
            self._granted.set_exception(exc)

    def _hold(self) -> None:
        frame = _current.get()
        self._granted.set_result(frame)
        self._release.wait()

    def _enter(self, frame: _Frame) -> Any:
        self._slot = frame.slot
        self._scope = self._sched._device.stream_scope(frame.slot)
        self._scope.__enter__()
        self._token = _current.set(_Frame(frame.slot, frame.obj, frame.device, self.task))
        return frame.obj

    def _abandon(self) -> None:
        if not self.task.cancel():
            self._release.set()

    def __enter__(self) -> Any:
        try:
            frame = self._granted.result()
        except BaseException:
            self._abandon()   # Ctrl-C while waiting: withdraw the request
            raise
        return self._enter(frame)

    def _exit(self) -> None:
        try:
            if self._token is not None:
                try:
                    _current.reset(self._token)
                except ValueError:
                    # Left from another context than the one entered (IPython's post_run_cell after a
                    # cell that ran as an asyncio task): that context, and our frame in it, is gone.
                    pass
            if self._scope is not None:
                device = self._sched._device
                event = device.record_event(self._slot)   # the end of what the body queued ...
                self._scope.__exit__(None, None, None)
                device.join_caller(event)                 # ... comes before what the caller queues next
        finally:
            self._release.set()

    def __exit__(self, *exc: Any) -> None:
        self._exit()
        self.task.exception()   # wait for the hold to end so the slot is free again

    async def __aenter__(self) -> Any:
        try:
            frame = await asyncio.wrap_future(self._granted)
        except BaseException:
            self._abandon()
            raise
        return self._enter(frame)

    async def __aexit__(self, *exc: Any) -> None:
        self._exit()
        await asyncio.wrap_future(self.task)
