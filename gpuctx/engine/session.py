"""Sessions: a ``with`` body (``context_session``, a foreground ``%%gpuctx`` cell) run as a task.

A session is a task whose body holds its model's slot until the ``with`` block ends: it asks
for its turn when entered (not when made: a session made and never entered holds nothing),
the ``with`` body then runs in the caller's thread on the context's stream, and leaving the
block ends the holding task, so the slot's worker goes on with the next group.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TYPE_CHECKING

from ..errors import ConfigError
from ..task import Task
from ..units import parse_size
from .spec import TaskSpec, _Frame, _current


if TYPE_CHECKING:  # pragma: no cover
    from .scheduler import Scheduler


class Session:
    """A `with`/`async with` body that runs as a task of `model`: the model resident, its stream current.

    Made by `gpuctx.context_session`; nothing is requested until it is entered (or `request`
    is called). Entering waits for the turn and gives the loaded model object; leaving ends
    the holding task, so the model's queue goes on.
    """

    def __init__(self, sched: Scheduler, model: str, *, vram: Any, priority: int, after: Any, name: str | None) -> None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigError(f"context_session({model!r}, priority={priority!r}): expected an int")
        try:
            after = tuple(after)
        except TypeError:
            raise ConfigError(f"context_session({model!r}, after={after!r}): expected a list of gpuctx.Task") from None
        for i, t in enumerate(after):
            if not isinstance(t, Task):
                raise ConfigError(f"context_session({model!r}, after=[...]): item {i} is {t!r}; expected a gpuctx.Task")
        vram_b = None if vram is None else parse_size(vram, arg="vram")
        self._sched = sched
        self._granted: Future = Future()
        self._release = threading.Event()
        self._scope: Any = None
        self._token: Any = None
        self._spec = TaskSpec(fn=self._hold, name=name or f"session:{model}", model=model, vram=vram_b,
                              priority=priority, after=after)
        self.task: Task | None = None

    def request(self) -> Task:
        """Ask for the model's turn now (entering does it too); asking again does nothing.

        Returns:
            The holding `Task`, which runs while the session holds the turn.
        """
        if self.task is None:
            self.task = self._sched.submit(self._spec, (), {})
            self.task.add_done_callback(self._on_task_done)
        return self.task

    def wait_granted(self, timeout: float | None = None) -> bool:
        """Request, then wait for the turn.

        The request's failure (a load error, a failed dependency) is raised when entering.

        Args:
            timeout: seconds to wait at most. Default `None`: no limit.

        Returns:
            `True` once the turn has come (or the request failed); `False` if it has not come yet.
        """
        self.request()
        try:
            self._granted.exception(timeout)
        except (FutureTimeout, TimeoutError):
            return False
        except CancelledError:
            pass
        return True

    def withdraw(self) -> None:
        """Give the turn up: cancel the request if it has not started, else end the hold."""
        if self.task is not None and not self.task.cancel():
            self._release.set()

    def _on_task_done(self, task: Task) -> None:
        # The request failed (load error, dependency failed) or was cancelled before it was granted.
        if not self._granted.done():
            exc = task.exception() if not task.cancelled() else None
            if exc is None:
                exc = CancelledError(f"{task.name}: withdrawn before it started")
            self._granted.set_exception(exc)

    def _hold(self) -> None:
        frame = _current.get()
        self._granted.set_result(frame)
        self._release.wait()

    def _enter(self, frame: _Frame) -> Any:
        self._slot = frame.slot
        self._scope = self._sched.device.stream_scope(frame.slot)
        self._scope.__enter__()
        self._token = _current.set(_Frame(frame.slot, frame.obj, frame.device, self.task))
        return frame.obj

    def __enter__(self) -> Any:
        self.request()
        try:
            frame = self._granted.result()
        except BaseException:
            self.withdraw()   # Ctrl-C while waiting: withdraw the request
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
                device = self._sched.device
                event = device.record_event(self._slot)   # the end of what the body queued ...
                self._scope.__exit__(None, None, None)
                device.join_caller(event)                 # ... comes before what the caller queues next
        finally:
            self._release.set()

    def __exit__(self, *exc: Any) -> None:
        self._exit()
        self.task.exception()   # wait for the hold to end so the slot is free again

    async def __aenter__(self) -> Any:
        self.request()
        try:
            frame = await asyncio.wrap_future(self._granted)
        except BaseException:
            self.withdraw()
            raise
        return self._enter(frame)

    async def __aexit__(self, *exc: Any) -> None:
        self._exit()
        await asyncio.wrap_future(self.task)
