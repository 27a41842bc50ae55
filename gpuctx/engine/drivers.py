"""Drivers: what runs the engine's transitions, on real threads or on a virtual clock.

The engine never makes a thread, a lock, a queue or a clock itself; it asks its driver.

:class:`ThreadedDriver` hands out the real things: ``threading`` threads, the guard on a
``threading.Lock``, ``SimpleQueue`` inboxes, ``time.perf_counter``. It is what a notebook runs.

:class:`VirtualDriver` runs the *same* engine as a process-based discrete-event simulation
(SimPy's model): every engine thread (a worker, the housekeeper, a CPU-pool job) is still a
Python thread, but exactly one of them runs at any moment, and it runs until it blocks on one of
the driver's primitives (the guard, an inbox, an event, :meth:`VirtualDriver.sleep`). Then the
next runnable thread, in the order they became runnable, takes the baton; when none is runnable,
the clock jumps to the earliest timer. A fake device whose loads, unloads and task bodies call
``sleep`` with declared durations then gives the loads, evictions and waits the live engine would
make with those durations, deterministically and in no real time. Nothing of the engine is written
twice: :mod:`gpuctx.sim` is this driver plus such a device.

Under the virtual driver the engine's lock-free intake is trivially safe: no two threads ever run
at once. The thread that built the driver (the one that submits the workload) is a process too;
it gives the baton away in :meth:`VirtualDriver.sleep` and :meth:`VirtualDriver.run_until_idle`.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from queue import SimpleQueue
from typing import Any, Callable

from ._guard import _Guard


__all__ = ["ThreadedDriver", "VirtualDriver", "Deadlock"]


class ThreadedDriver:
    """Real threads and the real clock (the default)."""

    clock = staticmethod(time.perf_counter)
    sleep = staticmethod(time.sleep)

    def guard(self, ingest: Callable[[], None]) -> _Guard:
        """The engine's lock and condition with its lock-free intake."""
        return _Guard(ingest)

    def inbox(self) -> SimpleQueue:
        """A worker's queue of jobs."""
        return SimpleQueue()

    def event(self) -> threading.Event:
        """A flag threads can wait for."""
        return threading.Event()

    def spawn(self, target: Callable[..., Any], args: tuple = (), name: str = "gpuctx") -> threading.Thread:
        """Start a daemon thread running ``target(*args)``."""
        th = threading.Thread(target=target, args=args, name=name, daemon=True)
        th.start()
        return th

    @staticmethod
    def join(handle: threading.Thread, timeout: float | None = None) -> None:
        """Wait for thread ``handle`` to end."""
        handle.join(timeout)

    @staticmethod
    def is_current(handle: threading.Thread) -> bool:
        """True when the calling thread is ``handle``."""
        return handle is threading.current_thread()

    def pool(self, workers: int) -> ThreadPoolExecutor:
        """The CPU pool (``device="cpu"`` tasks)."""
        return ThreadPoolExecutor(workers, thread_name_prefix="gpuctx-cpu")


class Deadlock(RuntimeError):
    """The virtual driver found every process blocked with no timer left while work was pending."""


class _Proc:
    __slots__ = ("name", "go", "done", "joiners", "token", "thread")

    def __init__(self, name: str) -> None:
        self.name = name
        self.go = threading.Semaphore(0)   # the baton: released by whoever hands it over
        self.done = False
        self.joiners: list[_Proc] = []
        self.token: list | None = None     # [alive] of its pending timed wait
        self.thread: threading.Thread | None = None


class VirtualDriver:
    """One process at a time on a virtual clock; see the module docstring."""

    #: Lock acquisitions allowed while no virtual time passes: past this, the engine is
    #: spinning (a livelock), which a live run would burn a core on; the run stops with Deadlock.
    spin_limit = 200_000

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.failure: Deadlock | None = None
        self._spins = 0
        self._timers: list = []                  # (time, seq, proc, token)
        self._ready: deque[_Proc] = deque()
        self._seq = itertools.count()
        self._by_thread: dict[int, _Proc] = {}
        self._idle_waiter: _Proc | None = None
        self.main = self._adopt("main")
        self._running: _Proc | None = self.main

    # -- the baton -----------------------------------------------------------------------------
    def _adopt(self, name: str) -> _Proc:
        p = _Proc(name)
        self._by_thread[threading.get_ident()] = p
        return p

    def _me(self) -> _Proc:
        return self._by_thread[threading.get_ident()]

    def _make_ready(self, p: _Proc) -> None:
        self._ready.append(p)

    def _timer(self, p: _Proc, delay: float) -> list:
        token = [True]
        p.token = token
        heapq.heappush(self._timers, (self.now + max(0.0, delay), next(self._seq), p, token))
        return token

    def _next(self) -> _Proc | None:
        if self._ready:
            return self._ready.popleft()
        while self._timers:
            t, _, p, token = heapq.heappop(self._timers)
            if token[0]:
                token[0] = False
                if t > self.now:
                    self.now, self._spins = t, 0
                return p
        idle, self._idle_waiter = self._idle_waiter, None
        return idle

    def _block(self) -> None:
        """Give the baton to the next runnable process and wait until someone hands it back."""
        me = self._me()
        nxt = self._next()
        if nxt is None:
            raise Deadlock(f"virtual driver: {me.name} blocks, nothing else can run and no timer is set")
        if nxt is not me:
            self._running = nxt
            nxt.go.release()
            me.go.acquire()
        self._running = me

    def _cancel_timer(self, p: _Proc) -> None:
        if p.token is not None:
            p.token[0] = False
            p.token = None

    def _wake(self, p: _Proc) -> None:
        self._cancel_timer(p)
        self._make_ready(p)

    # -- what the engine asks for ----------------------------------------------------------------
    def clock(self) -> float:
        """The virtual time in seconds."""
        return self.now

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass for the calling process."""
        self._timer(self._me(), seconds)
        self._block()
        self._me().token = None

    def run_until_idle(self) -> None:
        """Run every other process until none is runnable and no timer is left (the workload ended)."""
        me = self._me()
        self._idle_waiter = me
        self._block()
        if self.failure is not None:
            raise self.failure

    def _spin(self) -> None:
        """One more lock acquisition at this virtual time; freeze the process past the limit."""
        self._spins += 1
        if self._spins <= self.spin_limit:
            return
        me = self._me()
        self.failure = Deadlock(f"virtual driver: {me.name} took the engine's lock {self.spin_limit} times while no "
                                f"virtual time passed (a livelock) at t={self.now:g}")
        nxt, self._idle_waiter = self._idle_waiter, None
        if nxt is not None:
            nxt.go.release()
        threading.Event().wait()   # this process never runs again; the run is over

    def guard(self, ingest: Callable[[], None]) -> "_VirtualGuard":
        """The engine's lock and condition, on the baton."""
        return _VirtualGuard(self, ingest)

    def inbox(self) -> "_VirtualQueue":
        """A worker's queue of jobs."""
        return _VirtualQueue(self)

    def event(self) -> "_VirtualEvent":
        """A flag processes can wait for."""
        return _VirtualEvent(self)

    def spawn(self, target: Callable[..., Any], args: tuple = (), name: str = "gpuctx") -> _Proc:
        """A new process running ``target(*args)``; it runs once the current one blocks."""
        p = _Proc(name)

        def body() -> None:
            self._by_thread[threading.get_ident()] = p
            p.go.acquire()
            try:
                target(*args)
            finally:
                p.done = True
                for j in p.joiners:
                    self._wake(j)
                p.joiners.clear()
                nxt = self._next()
                if nxt is not None:
                    self._running = nxt
                    nxt.go.release()

        p.thread = threading.Thread(target=body, name=f"sim-{name}", daemon=True)
        p.thread.start()
        self._make_ready(p)
        return p

    def is_current(self, handle: _Proc) -> bool:
        """True when the calling process is ``handle``."""
        return self._by_thread.get(threading.get_ident()) is handle

    def join(self, handle: _Proc, timeout: float | None = None) -> None:
        """Wait for process ``handle`` to end."""
        if handle.done or self.is_current(handle):
            return
        me = self._me()
        handle.joiners.append(me)
        if timeout is not None:
            self._timer(me, timeout)
        self._block()
        if me in handle.joiners:
            handle.joiners.remove(me)

    def pool(self, workers: int) -> "_VirtualPool":
        """The CPU pool: one process per job."""
        return _VirtualPool(self)


class _VirtualGuard:
    """The engine's guard (see :class:`gpuctx.engine._guard._Guard`) on the driver's baton."""

    def __init__(self, driver: VirtualDriver, ingest: Callable[[], None]) -> None:
        self._d = driver
        self._ingest = ingest
        self.intake: deque = deque()
        self.late: list = []
        self._owner: _Proc | None = None
        self._lock_waiters: deque[_Proc] = deque()
        self._waiters: list[_Proc] = []

    def _acquire(self) -> None:
        me = self._d._me()
        self._d._spin()
        if self._owner is None:
            self._owner = me
            return
        self._lock_waiters.append(me)
        self._d._block()   # the releaser handed the lock to this process

    def _release(self) -> None:
        if self._lock_waiters:
            nxt = self._lock_waiters.popleft()
            self._owner = nxt
            self._d._make_ready(nxt)
        else:
            self._owner = None

    def __enter__(self) -> bool:
        self._acquire()
        if self.intake:
            self._ingest()
        return True

    def __exit__(self, *exc: Any) -> None:
        from .state import _resolve

        late, self.late = self.late, []
        self._release()
        if late:
            _resolve(late)

    def wait(self, timeout: float | None = None) -> bool:
        d = self._d
        me = d._me()
        self._waiters.append(me)
        if timeout is not None:
            d._timer(me, timeout)
        self._release()
        d._block()
        notified = me not in self._waiters
        if not notified:
            self._waiters.remove(me)
        me.token = None
        self._acquire()
        if self.intake:
            self._ingest()
        return notified

    def notify_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for p in waiters:
            self._d._wake(p)

    def notify(self, n: int = 1) -> None:
        for p in self._waiters[:n]:
            self._waiters.remove(p)
            self._d._wake(p)


class _VirtualQueue:
    def __init__(self, driver: VirtualDriver) -> None:
        self._d = driver
        self._items: deque = deque()
        self._getters: deque[_Proc] = deque()

    def put(self, item: Any) -> None:
        self._items.append(item)
        if self._getters:
            self._d._wake(self._getters.popleft())

    def get(self) -> Any:
        while not self._items:
            self._getters.append(self._d._me())
            self._d._block()
        return self._items.popleft()


class _VirtualEvent:
    def __init__(self, driver: VirtualDriver) -> None:
        self._d = driver
        self._flag = False
        self._waiters: list[_Proc] = []

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        waiters, self._waiters = self._waiters, []
        for p in waiters:
            self._d._wake(p)

    def clear(self) -> None:
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        me = self._d._me()
        self._waiters.append(me)
        if timeout is not None:
            self._d._timer(me, timeout)
        self._d._block()
        if me in self._waiters:
            self._waiters.remove(me)
        me.token = None
        return self._flag


class _VirtualPool:
    def __init__(self, driver: VirtualDriver) -> None:
        self._d = driver
        self._procs: list[_Proc] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._procs.append(self._d.spawn(fn, args, name="cpu"))

    def shutdown(self, wait: bool = True) -> None:
        if wait:
            for p in self._procs:
                self._d.join(p)
