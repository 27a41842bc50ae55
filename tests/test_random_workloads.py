"""Random DAG workloads through the live scheduler: every task ends exactly once, in order, within budget."""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

import gpuctx
from gpuctx import TaskState


@pytest.mark.parametrize("seed", range(6))
def test_random_dag_terminal_states_order_and_budget(fresh, seed):
    rng = random.Random(seed)
    gpuctx.configure(budget="6GB")
    s = gpuctx.scheduler()
    ran: Counter = Counter()
    ends: dict[int, int] = {}
    clock = iter(range(10**9))
    lock = threading.Lock()
    peaks = []
    sizes = {f"m{i}": rng.choice(["1GB", "2GB", "3GB", "4GB"]) for i in range(5)}
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
