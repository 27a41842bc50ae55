"""A Task is a concurrent.futures.Future that is cheap when nobody looks at it.

Its condition and lists are made on first use, a task nobody waits on is resolved without
them, and gpuctx.wait() watches tasks without a lock per task. These tests check that every
standard way of looking at a future still works, whether it looks before, during or after
the resolution, and that gpuctx.wait() keeps concurrent.futures.wait()'s semantics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import sys
import threading

import pytest

import gpuctx
from gpuctx import task as task_module

TIMEOUT = 10


@pytest.fixture(params=["lazy", "standard"])
def both_futures(request, monkeypatch, fresh):
    """Run the test with the lazily built future and with Future.__init__ (the fallback)."""
    if request.param == "standard":
        monkeypatch.setattr(task_module, "_LAZY_FUTURE", False)
    return request.param


def _gated(release: threading.Event):
    @gpuctx.gpu_task(model="m")
    def job(i, fail=False):
        release.wait(TIMEOUT)
        if fail:
            raise ValueError(f"job {i} failed")
        return i

    return job


@pytest.mark.skipif(not task_module._LAZY_FUTURE, reason="this Python's Future is built eagerly (no GIL, or other fields)")
def test_a_task_nobody_looked_at_never_makes_its_condition(fresh):
    @gpuctx.gpu_task(model="m")
    def job(i):
        return i

    ts = [job(i) for i in range(20)]
    ts[-1].result(TIMEOUT)   # the worker runs them in order: all done now
    assert all(t.done() and not t.cancelled() for t in ts)
    untouched = [t for t in ts[:-1] if "_condition" not in t.__dict__]
    assert untouched, "every task made its condition although nobody waited on it"
    assert [t.result() for t in ts] == list(range(20))
    assert all("_condition" not in t.__dict__ for t in untouched)   # result() of a done task takes no lock


def test_standard_wait_and_as_completed_before_and_after_resolution(both_futures, gate):
    release = gate()
    job = _gated(release)
    early = [job(i) for i in range(5)]
    seen = []
    waiter = threading.Thread(target=lambda: seen.append(cf.wait(early, timeout=TIMEOUT)))
    waiter.start()                                     # waits before they finish
    release.set()
    waiter.join(TIMEOUT)
    done, not_done = seen[0]
    assert done == set(early) and not not_done
    late = [job(i) for i in range(5, 10)]
    assert sorted(f.result() for f in cf.as_completed(late, timeout=TIMEOUT)) == list(range(5, 10))
    assert cf.wait(early + late, timeout=0).not_done == set()   # after: all done already


def test_done_callbacks_run_once_whenever_they_are_added(both_futures, gate):
    release = gate()
    job = _gated(release)
    calls: list = []
    before = job(1)
    before.add_done_callback(lambda f: calls.append(("before", f.result())))
    release.set()
    after = job(2)
    after.result(TIMEOUT)
    after.add_done_callback(lambda f: calls.append(("after", f.result())))
    before.result(TIMEOUT)
    assert sorted(calls) == [("after", 2), ("before", 1)]


def test_failures_and_cancellation_read_the_same_as_a_plain_future(both_futures, gate):
    release = gate()
    job = _gated(release)
    bad = job(1, fail=True)
    queued = job(2)
    assert queued.cancel()
    release.set()
    with pytest.raises(ValueError, match="job 1 failed"):
        bad.result(TIMEOUT)
    assert isinstance(bad.exception(TIMEOUT), ValueError)
    assert queued.cancelled() and queued.done()
    with pytest.raises(cf.CancelledError):
        queued.result(TIMEOUT)


def test_await_and_wrap_future(both_futures):
    @gpuctx.gpu_task(model="m")
    def job(i):
        return i + 1

    async def main():
        return await job(1), await asyncio.wrap_future(job(2))

    assert asyncio.run(main()) == (2, 3)


def test_waiters_racing_the_resolution_never_miss_it(both_futures):
    """Threads start waiting (result, cf.wait, callbacks) while the worker resolves the same tasks."""

    @gpuctx.gpu_task(model="m")
    def job(i):
        return i

    for _ in range(20):
        ts = [job(i) for i in range(200)]
        got: list = []
        called = threading.Semaphore(0)
        threads = [
            threading.Thread(target=lambda: got.append([t.result(TIMEOUT) for t in ts])),
            threading.Thread(target=lambda: got.append(len(cf.wait(ts, timeout=TIMEOUT).done))),
            threading.Thread(target=lambda: got.append(len(gpuctx.wait(ts, timeout=TIMEOUT)[0]))),
        ]
        for th in threads:
            th.start()
        for t in ts[::7]:
            t.add_done_callback(lambda f: called.release())
        for th in threads:
            th.join(TIMEOUT)
        assert sorted(map(str, got)) == sorted(map(str, [list(range(200)), 200, 200]))
        assert all(called.acquire(timeout=TIMEOUT) for _ in ts[::7])


def test_gpuctx_wait_return_when_and_timeout(both_futures, gate):
    release = gate()
    job = _gated(release)

    @gpuctx.gpu_task(model="quick")
    def quick(fail=False):
        if fail:
            raise KeyError("quick failed")
        return "q"

    slow = [job(i) for i in range(3)]
    done, not_done = gpuctx.wait(slow, timeout=0.01)
    assert not done and not_done == set(slow)

    q = quick()
    done, not_done = gpuctx.wait(slow + [q], return_when=cf.FIRST_COMPLETED, timeout=TIMEOUT)
    assert done == {q} and not_done == set(slow)

    bad = quick(fail=True)
    done, not_done = gpuctx.wait(slow + [bad], return_when=cf.FIRST_EXCEPTION, timeout=TIMEOUT)
    assert bad in done and not_done == set(slow)

    release.set()
    done, not_done = gpuctx.wait(slow + slow, timeout=TIMEOUT)   # duplicates count once
    assert done == set(slow) and not not_done
    with pytest.raises(ValueError, match="return_when='SOMETIMES'"):
        gpuctx.wait(slow, return_when="SOMETIMES")


def test_two_waits_on_the_same_tasks_both_wake_and_leave_nothing_behind(fresh, gate):
    release = gate()
    job = _gated(release)
    ts = [job(i) for i in range(10)]
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(gpuctx.wait(ts, timeout=TIMEOUT)))
               for _ in range(2)]
    for th in threads:
        th.start()
    release.set()
    for th in threads:
        th.join(TIMEOUT)
    assert [len(done) for done, _ in results] == [10, 10]
    assert all(not t._watches for t in ts)   # each wait removed its watch


def test_without_the_gil_the_standard_ways_are_taken(fresh, monkeypatch, gate):
    """On a free-threaded Python the lock-free steps are off: plain futures, locked submits,
    the standard wait."""
    monkeypatch.setattr(task_module, "GIL", False)
    monkeypatch.setattr(task_module, "_LAZY_FUTURE", False)
    monkeypatch.setattr(sys.modules["gpuctx.engine._guard"], "_GIL", False)
    release = gate()
    job = _gated(release)
    first = job(0)
    rest = [job(i) for i in range(1, 20)]
    assert all("_condition" in t.__dict__ for t in [first] + rest)   # Future.__init__ ran
    assert not gpuctx.scheduler()._cond.intake
    release.set()
    done, not_done = gpuctx.wait([first] + rest, timeout=TIMEOUT)
    assert len(done) == 20 and not not_done
