"""Switch-cost-aware grouping on the live scheduler (CPU device, declared budgets).

No sleeps wait for threads: gates are threading.Events, results are awaited with gpuctx.wait.
Loaders take a short, fixed time so that a switch has a measurable cost (what the policy weighs).
"""

from __future__ import annotations

import threading

import gpuctx

TIMEOUT = 30
LOAD_S = 0.05


def models(log, sizes):
    for name, vram in sizes.items():
        @gpuctx.model(name, vram=vram)
        def load(_n=name):
            log.append(("load", _n))
            threading.Event().wait(LOAD_S)     # a load costs time, like a real one
            return {"name": _n}


def loads(log):
    return [e[1] for e in log if e[0] == "load"]


def test_backlog_of_three_models_loads_each_once(fresh, gate):
    # a and b (2 GB) never fit together, c (1 GB) fits beside either. 30 calls each, interleaved
    # a, b, c, a, b, c..., all queued while a's first task is held. max_wait=0 removes the floor:
    # the old staleness/aging ranking switched models after almost every task here.
    gpuctx.configure(budget="3GB", max_wait=0.0, aging=0.01)
    log: list = []
    models(log, {"a": "2GB", "b": "2GB", "c": "1GB"})
    release = gate()

    @gpuctx.gpu_task(model="a")
    def hold():
        release.wait(TIMEOUT)

    work = {n: gpuctx.gpu_task(model=n, name=f"work_{n}")(lambda i, _n=n: (_n, i)) for n in "abc"}
    h = hold()
    tasks = [work[n](i) for i in range(30) for n in "abc"]
    release.set()
    done, not_done = gpuctx.wait(tasks + [h], timeout=TIMEOUT)
    assert not not_done
    assert sorted(loads(log)) == ["a", "b", "c"]          # the lower bound: each model once
    assert [t.result() for t in tasks[:3]] == [("a", 0), ("b", 0), ("c", 0)]


def test_three_interleaved_rounds_of_two_models_take_four_loads(fresh, gate):
    # Issue 13: two models that do not fit together, three rounds of one call to each, the round's
    # calls ready together (both wait on a CPU gate task). a b | b a | a b: the resident model
    # serves its queued call before the other is loaded, so 4 loads, not 6.
    gpuctx.configure(budget="3GB")
    log: list = []
    models(log, {"a": "2GB", "b": "2GB"})
    on_a = gpuctx.gpu_task(model="a")(lambda r: ("a", r, gpuctx.current_model()["name"]))
    on_b = gpuctx.gpu_task(model="b")(lambda r: ("b", r, gpuctx.current_model()["name"]))
    for r in range(3):
        open_ = gate()
        g = gpuctx.gpu_task(device="cpu", name=f"gate{r}")(lambda: open_.wait(TIMEOUT))()
        ta, tb = on_a.options(after=[g])(r), on_b.options(after=[g])(r)
        open_.set()
        assert gpuctx.gather(ta, tb, timeout=TIMEOUT) == [("a", r, "a"), ("b", r, "b")]
    assert loads(log) == ["a", "b", "a", "b"]


def test_a_higher_priority_class_pre_empts_a_backlog_at_a_task_boundary(fresh, gate):
    gpuctx.configure(budget="3GB")
    log: list = []
    models(log, {"batch": "2GB", "chat": "2GB"})
    release, running = gate(), threading.Event()
    order = []

    @gpuctx.gpu_task(model="batch")
    def hold():
        order.append("hold")
        running.set()
        release.wait(TIMEOUT)

    @gpuctx.gpu_task(model="batch")
    def step(i):
        order.append(("batch", i))

    @gpuctx.gpu_task(model="chat", priority=5)
    def reply():
        order.append("chat")

    h = hold()
    batch = [step(i) for i in range(10)]
    assert running.wait(TIMEOUT)                # the batch runs its first task
    urgent = reply()
    release.set()
    done, not_done = gpuctx.wait(batch + [h, urgent], timeout=TIMEOUT)
    assert not not_done
    assert order[:2] == ["hold", "chat"]        # the running task finishes; the next boundary yields
    assert order[2:] == [("batch", i) for i in range(10)]
    assert loads(log) == ["batch", "chat", "batch"]


def test_equal_priority_waiting_group_does_not_pre_empt_a_running_backlog(fresh, gate):
    gpuctx.configure(budget="3GB", max_wait=0.0)
    log: list = []
    models(log, {"a": "2GB", "b": "2GB"})
    release = gate()
    order = []

    @gpuctx.gpu_task(model="a")
    def hold():
        release.wait(TIMEOUT)

    run_a = gpuctx.gpu_task(model="a")(lambda i: order.append(("a", i)))
    run_b = gpuctx.gpu_task(model="b")(lambda i: order.append(("b", i)))
    h = hold()
    tasks = [f(i) for i in range(10) for f in (run_a, run_b)]
    release.set()
    assert not gpuctx.wait(tasks + [h], timeout=TIMEOUT)[1]
    assert order == [("a", i) for i in range(10)] + [("b", i) for i in range(10)]
    assert loads(log) == ["a", "b"]



def test_reading_the_scheduler_writes_nothing_the_policy_reads(fresh, gate):
    # status(), a snapshot, the free bytes: reads from a notebook, a dashboard or a cluster's poll
    # must not move the quantum's bookkeeping (a group's start, a wait's start), or how often
    # someone looks would change what the policy decides.
    log = []
    models(log, {"a": "3GB", "b": "3GB"})
    hold, began = gate(), threading.Event()
    run_a = gpuctx.gpu_task(model="a", name="run_a")(lambda: began.set() or hold.wait(TIMEOUT))
    use_b = gpuctx.gpu_task(model="b", name="use_b")(lambda: "b")
    assert use_b().result(TIMEOUT) == "b"   # b is loaded and idle, nothing queued
    running = run_a()
    sched = gpuctx.scheduler()
    assert began.wait(TIMEOUT), "run_a never started"
    fields = ("busy", "group_start", "waiting_since", "last_used")
    before = {n: tuple(getattr(sched.slot(n), f) for f in fields) for n in ("a", "b")}
    views = []
    for _ in range(50):
        gpuctx.status()
        sched.available()
        views.append({v.name: v for v in sched.snapshot().slots})
    after = {n: tuple(getattr(sched.slot(n), f) for f in fields) for n in ("a", "b")}
    assert after == before
    assert all(v["a"].started == before["a"][1] is not None for v in views)   # the running group's start, as kept
    assert all(v["b"].started is None for v in views)                          # b is idle
    hold.set()
    assert running.result(TIMEOUT) is True
