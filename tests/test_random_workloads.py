"""Random DAG workloads through the live scheduler: every task ends exactly once, in order, within budget."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

import gpuctx
from gpuctx import TaskState


def _workload(budget: str, sizes: dict[str, str]):
    """Models of ``sizes`` under ``budget`` and a task per model whose body ``(tag, fail, *deps)``
    records that it ran, in which order, and what was committed then."""
    gpuctx.configure(budget=budget)
    s = gpuctx.scheduler()
    ran: Counter = Counter()
    ends: dict[int, int] = {}
    clock = iter(range(10**9))
    lock = threading.Lock()
    peaks: list[int] = []
    for name, size in sizes.items():
        gpuctx.model(name, vram=size)(lambda _n=name: _n)

    def body(tag, fail, *deps):
        with lock:
            ran[tag] += 1
            ends[tag] = next(clock)
            peaks.append(s.committed())
        if fail:
            raise RuntimeError(f"planned failure {tag}")
        return tag

    fns = {n: gpuctx.gpu_task(model=n, name=f"f_{n}")(body) for n in sizes}
    return s, fns, ran, ends, peaks, lock


@pytest.mark.parametrize("seed", range(6))
def test_random_dag_terminal_states_order_and_budget(fresh, seed):
    rng = random.Random(seed)
    sizes = {f"m{i}": rng.choice(["1GB", "2GB", "3GB", "4GB"]) for i in range(5)}
    s, fns, ran, ends, peaks, _ = _workload("6GB", sizes)
    tasks, deps_of = [], {}
    for i in range(60):
        deps = rng.sample(tasks, k=min(len(tasks), rng.randint(0, 2)))
        t = fns[rng.choice(list(sizes))](i, rng.random() < 0.08, *deps)
        deps_of[i] = [d._tag for d in deps]
        t._tag = i
        tasks.append(t)
        if rng.random() < 0.05:
            t.cancel()
    gpuctx.wait(tasks, timeout=30)
    states = Counter()
    for t in tasks:
        assert t.done()
        assert t.state.terminal
        states[t.state] += 1
        i = t._tag
        if t.state is TaskState.DONE:
            assert ran[i] == 1
            assert all(ends[d] < ends[i] for d in deps_of[i]), "ran before a dependency ended"
        elif t.state is TaskState.CANCELLED:
            assert ran[i] == 0 and t.cancelled()
        else:
            assert ran[i] <= 1
            if ran[i] == 0:
                assert isinstance(t.exception(), gpuctx.DependencyError)
    assert sum(states.values()) == 60
    assert max(peaks) <= s.budget
    assert s.tasks() == []


@pytest.mark.parametrize("seed", range(4))
def test_two_submitting_threads_with_dependencies_across_models_and_cancels(fresh, seed):
    """Calls arrive from two threads at once (most of them lock-free, for draining models) while
    models are evicted to make room: each call still ends once, after its dependencies, in budget."""
    rng = random.Random(1000 + seed)
    names = [f"m{i}" for i in range(4)]
    s, fns, ran, ends, peaks, lock = _workload("5GB", dict.fromkeys(names, "2GB"))
    tasks: dict[int, gpuctx.Task] = {}
    deps_of: dict[int, list[int]] = {}
    plans = [[(i, rng.choice(names), rng.random() < 0.03) for i in range(lo, 400, 2)] for lo in (0, 1)]
    start = threading.Barrier(2)

    def submit(plan) -> None:
        start.wait(30)
        for i, name, cancel in plan:
            with lock:
                pool = list(tasks.items())
            deps = rng.sample(pool, k=min(len(pool), rng.randint(0, 2))) if pool else []
            t = fns[name](i, False, *[d for _, d in deps])
            with lock:
                deps_of[i] = [k for k, _ in deps]
                tasks[i] = t
            if cancel:
                t.cancel()

    threads = [threading.Thread(target=submit, args=(p,)) for p in plans]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    done, not_done = gpuctx.wait(list(tasks.values()), timeout=30)
    assert not not_done and len(tasks) == 400
    for i, t in tasks.items():
        if t.state is TaskState.DONE:
            assert ran[i] == 1 and t.result() == i
            assert all(ends[d] < ends[i] for d in deps_of[i]), "ran before a dependency ended"
        else:
            assert ran[i] == 0 and t.state in (TaskState.CANCELLED, TaskState.FAILED)
    assert max(peaks) <= s.budget
    assert s.tasks() == []
