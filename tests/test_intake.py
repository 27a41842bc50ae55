"""Calls submitted without the scheduler lock (a model whose worker is draining its queue).

Such a call is appended to the scheduler's intake and taken in by the next lock holder.
These tests hold a model's worker inside a task (so its slot is busy and resident), submit,
and check that what a locked submit guarantees still holds: order, priority, dependencies,
cancellation, shutdown, and no call left behind when the worker goes idle meanwhile.
"""

from __future__ import annotations

import threading
import weakref

import pytest

import gpuctx
from gpuctx import TaskState
from gpuctx.engine import Scheduler

TIMEOUT = 10


@pytest.fixture
def lockfree(monkeypatch):
    """Counts the calls that took the lock-free path."""
    taken: list = []
    original = Scheduler._submit_to_draining

    def spy(self, slot, task):
        taken.append(task)
        return original(self, slot, task)

    monkeypatch.setattr(Scheduler, "_submit_to_draining", spy)
    return taken


def _holding(model: str, release: threading.Event):
    """A task of ``model`` that runs until ``release``; returns it once it runs."""
    inside = threading.Event()

    @gpuctx.gpu_task(model=model, name=f"hold-{model}")
    def hold():
        inside.set()
        release.wait(TIMEOUT)

    task = hold()
    assert inside.wait(TIMEOUT)
    return task


def test_calls_for_a_draining_model_skip_the_lock_and_run_in_submission_order(fresh, gate, lockfree):
    release, order = gate(), []

    @gpuctx.gpu_task(model="m")
    def job(i):
        order.append(i)
        return i * 2

    h = _holding("m", release)
    ts = [job(i) for i in range(50)]
    assert lockfree == ts
    assert all(t.state is TaskState.QUEUED for t in ts)
    release.set()
    gpuctx.wait(ts + [h], timeout=TIMEOUT)
    assert order == list(range(50))
    assert [t.result() for t in ts] == [i * 2 for i in range(50)]
    assert gpuctx.stats()["models"]["m"]["tasks"] == 51


def test_priority_orders_calls_taken_in_from_the_intake(fresh, gate, lockfree):
    release, order = gate(), []

    @gpuctx.gpu_task(model="m")
    def job(tag):
        order.append(tag)

    h = _holding("m", release)
    ts = [job.options(priority=p)(f"p{p}") for p in (0, 5, 1, 9)]
    assert len(lockfree) == 4
    release.set()
    gpuctx.wait(ts + [h], timeout=TIMEOUT)
    assert order == ["p9", "p5", "p1", "p0"]


def test_every_reader_sees_calls_still_in_the_intake(fresh, gate, lockfree):
    release = gate()

    @gpuctx.gpu_task(model="m")
    def job(i):
        return i

    h = _holding("m", release)
    sched = gpuctx.scheduler()
    readers = {
        "tasks": lambda: sum(t.name == "job" for t in sched.tasks()),
        "snapshot": lambda: next(v for v in sched.snapshot().slots if v.name == "m").queued,
        "status": lambda: next(m for m in gpuctx.status().models if m.name == "m").queued,
    }
    ts = []
    for n, (name, read) in enumerate(readers.items(), start=1):
        ts.append(job(n))
        assert sched._cond.intake, name   # not taken in yet: the worker is held in its task
        assert read() == n, name
    assert len(lockfree) == 3
    release.set()
    gpuctx.wait(ts + [h], timeout=TIMEOUT)


def test_cancel_a_call_still_in_the_intake(fresh, gate, lockfree):
    release, ran = gate(), []

    @gpuctx.gpu_task(model="m")
    def job(i=None):
        ran.append(i)

    h = _holding("m", release)
    t = job(1)
    dependent = job(t)
    assert lockfree == [t, dependent]
    assert t.cancel()
    assert t.cancelled() and t.state is TaskState.CANCELLED
    release.set()
    h.result(TIMEOUT)
    with pytest.raises(gpuctx.DependencyError, match="cancelled"):
        dependent.result(TIMEOUT)
    assert ran == []


def test_dependencies_of_lock_free_calls_are_linked_when_taken_in(fresh, gate, lockfree):
    release = gate()

    @gpuctx.gpu_task(model="m")
    def inc(x):
        return x + 1

    h = _holding("m", release)
    t = inc(0)
    for _ in range(99):
        t = inc(t)
    assert len(lockfree) == 100
    release.set()
    assert t.result(TIMEOUT) == 100
    h.result(TIMEOUT)


def test_a_lock_free_call_whose_dependency_failed_fails_once_taken_in(fresh, gate, lockfree):
    release = gate()

    @gpuctx.gpu_task(model="other")
    def broken():
        raise ValueError("bad input")

    @gpuctx.gpu_task(model="m")
    def use(x):
        return x

    bad = broken()
    assert isinstance(bad.exception(TIMEOUT), ValueError)
    h = _holding("m", release)
    t = use(bad)
    assert lockfree == [t]
    gpuctx.scheduler().tasks()   # a lock holder takes it in; its future is resolved on release
    assert t.done() and t.state is TaskState.FAILED   # while the worker is still held
    with pytest.raises(gpuctx.DependencyError, match="bad input"):
        t.result(0)
    release.set()
    h.result(TIMEOUT)


def test_a_call_published_as_the_worker_goes_idle_is_not_left_behind(fresh, lockfree):
    """The submitter saw the slot busy, then the worker finished its group before the call was
    in the intake: the submitter must notice (the slot is idle now) and dispatch it itself."""

    gpuctx.model("m", vram="1GB")(object)

    @gpuctx.gpu_task(model="m")
    def job(i):
        return i

    assert job(0).result(TIMEOUT) == 0   # "m" resident and idle
    sched = gpuctx.scheduler()
    slot = sched.slot("m")
    with sched._cond:
        slot.busy = True   # as seen at the submitter's first look

    class WorkerEndsFirst(type(sched._cond.intake)):
        def append(self, task):
            with sched._cond:   # the worker ends its group: takes the intake in, marks the slot idle
                slot.busy = False
                sched._dispatch_locked()
            super().append(task)

    sched._cond.intake = WorkerEndsFirst()
    t = job(1)
    assert lockfree == [t]
    assert t.result(TIMEOUT) == 1


def test_a_call_published_after_shutdown_began_is_refused_and_not_kept(fresh, gate, lockfree):
    gpuctx.model("m", vram="1GB")(object)

    @gpuctx.gpu_task(model="m")
    def job(i):
        return i

    assert job(0).result(TIMEOUT) == 0
    sched = gpuctx.scheduler()
    slot = sched.slot("m")
    with sched._cond:
        slot.busy = True

    class ShutdownFirst(type(sched._cond.intake)):
        def append(self, task):
            with sched._cond:
                slot.busy = False
            sched.shutdown(wait=True)
            super().append(task)

    sched._cond.intake = ShutdownFirst()
    with pytest.raises(gpuctx.SchedulerClosed, match="shut down during this call"):
        job(1)
    assert len(lockfree) == 1
    assert not sched._cond.intake and not sched.tasks()


@pytest.mark.parametrize("cancel_pending", [False, True])
def test_shutdown_takes_in_what_was_submitted_without_the_lock(fresh, gate, lockfree, cancel_pending):
    release, ran = gate(), []

    @gpuctx.gpu_task(model="m")
    def job(i):
        ran.append(i)

    h = _holding("m", release)
    ts = [job(i) for i in range(5)]
    assert len(lockfree) == 5
    done = threading.Event()
    sched = gpuctx.scheduler()

    def stop():
        sched.shutdown(wait=True, cancel_pending=cancel_pending)
        done.set()

    threading.Thread(target=stop).start()
    release.set()
    assert done.wait(TIMEOUT)
    h.result(TIMEOUT)
    if cancel_pending:
        assert ran == [] and all(t.cancelled() for t in ts)
    else:
        assert ran == list(range(5)) and all(t.done() and not t.cancelled() for t in ts)


def test_many_submitters_and_a_worker_that_keeps_going_idle_lose_nothing(fresh):
    """Two threads submit while the worker drains, empties its queue and restarts many times."""
    counts = [0] * 4000

    @gpuctx.gpu_task(model="m")
    def job(i):
        counts[i] += 1
        return i

    tasks: list = [None] * 4000
    start = threading.Barrier(2)

    def submit(lo: int) -> None:
        start.wait(TIMEOUT)
        for i in range(lo, 4000, 2):
            tasks[i] = job(i)
            if i % 97 == 0:   # let the worker catch up and go idle now and then
                tasks[i].result(TIMEOUT)

    threads = [threading.Thread(target=submit, args=(lo,)) for lo in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    done, not_done = gpuctx.wait(tasks, timeout=TIMEOUT)
    assert not not_done
    assert counts == [1] * 4000
    assert [t.result() for t in tasks] == list(range(4000))
    assert not gpuctx.scheduler().tasks()


def test_a_finished_task_keeps_neither_its_inputs_nor_its_producers(fresh):
    class Blob:
        pass

    @gpuctx.gpu_task(model="m")
    def size(blob):
        return 1

    @gpuctx.gpu_task(model="m")
    def plus(x):
        return x + 1

    blob = Blob()
    ref = weakref.ref(blob)
    first = size(blob)
    second = plus(first)
    del blob
    assert second.result(TIMEOUT) == 2
    assert ref() is None            # first no longer holds its argument
    producer = weakref.ref(first)
    del first
    assert producer() is None       # second no longer holds its producer


def test_a_dropped_finished_task_and_its_result_are_freed(fresh):
    class Result:
        pass

    @gpuctx.gpu_task(model="m")
    def make():
        return Result()

    t = make()
    ref = weakref.ref(t.result(TIMEOUT))
    del t
    sched = gpuctx.scheduler()
    sched.shutdown(wait=True)   # the worker is past its last reference to the task
    assert ref() is None        # and no queue or FIFO of the slot keeps it


def test_running_reflects_the_task_state(fresh, gate):
    release = gate()
    h = _holding("m", release)
    assert h.running() and h.state is TaskState.RUNNING
    release.set()
    h.result(TIMEOUT)
    assert not h.running()


def test_work_submitted_by_a_done_callback_keeps_the_group_going(fresh):
    """A callback on the worker thread submits the next call (a pipeline driven by callbacks):
    the worker takes it in and runs it in the same group instead of ending it and starting anew."""

    @gpuctx.gpu_task(model="m")
    def inc(x):
        return x + 1

    finished = threading.Event()
    out = []

    def step(f):
        value = f.result()
        if value == 50:
            out.append(value)
            finished.set()
        else:
            inc(value).add_done_callback(step)

    inc(0).add_done_callback(step)
    assert finished.wait(TIMEOUT) and out == [50]
    groups = [e for e in gpuctx.scheduler().trace.events if e.kind == "group_start" and e.model == "m"]
    assert len(groups) == 1


def test_a_call_published_between_the_workers_last_look_and_its_idle_mark_is_not_left_behind(fresh, lockfree):
    """The lost wake-up of issue 14 (entry 15), injected deterministically: the worker, ending its
    group, looks at the intake (empty); a submitter then publishes a call and sees the slot still
    busy, so it leaves; only then does the worker mark the slot idle. The worker must look again."""
    gpuctx.model("m", vram="1GB")(object)
    sched = gpuctx.scheduler()
    calls = []

    @gpuctx.gpu_task(model="m")
    def job(i):
        return i

    class LateArrival(type(sched._cond.intake)):
        armed = False
        looks = 0

        def __len__(self):
            n = super().__len__()
            if self.armed and threading.current_thread().name == "gpuctx-m":
                self.looks += 1
                if self.looks == 3:   # the look as the group's last locked section begins, before busy=False
                    self.armed = False
                    calls.append(job(99))   # published now: sees the slot busy, does not dispatch
            return n

    assert job(0).result(TIMEOUT) == 0
    sched._cond.intake = intake = LateArrival()

    @gpuctx.gpu_task(model="m")
    def arm():
        intake.armed = True

    arm().result(TIMEOUT)
    assert len(calls) == 1 and lockfree[-1] is calls[0]   # it went the lock-free way
    assert calls[0].result(TIMEOUT) == 99
