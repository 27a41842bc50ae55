"""The policy on a virtual clock: scheduling quality against baselines, budget, order, starvation."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuctx import policy
from gpuctx.sim import (SimModel, SimTask, chat_traffic, interleaved, lower_bound_loads, random_dag, simulate,
                        video_pipeline)
from gpuctx.units import GB


def test_interleaved_five_models_load_near_the_minimum_and_far_below_fifo_lru():
    models, tasks = interleaved(5, 20)
    g = simulate(models, tasks, 4 * GB)                 # holds two of the five models
    naive = simulate(models, tasks, 4 * GB, strategy="fifo_lru")
    assert g.loads <= lower_bound_loads(tasks) + 1
    assert naive.loads >= 3 * g.loads
    assert g.makespan < naive.makespan


def test_video_pipeline_from_tight_to_loose_budgets():
    models, tasks = video_pipeline(20)
    for budget in (6, 8, 10, 14, 20):
        g = simulate(models, tasks, budget * GB)
        naive = simulate(models, tasks, budget * GB, strategy="fifo_lru")
        assert g.peak <= budget * GB
        assert g.loads <= naive.loads, budget
        assert g.makespan <= naive.makespan, budget


def test_dependencies_are_respected_and_every_task_runs_once():
    for models, tasks in (video_pipeline(10), chat_traffic(90), random_dag(120)):
        r = simulate(models, tasks, 8 * GB)
        assert set(r.end) == {t.id for t in tasks}
        for t in tasks:
            assert all(r.end[d] <= r.start[t.id] for d in t.deps)


@st.composite
def workloads(draw):
    n_models = draw(st.integers(1, 5))
    models = [SimModel(f"m{i}", draw(st.integers(1, 4)) * GB, draw(st.floats(0.1, 5))) for i in range(n_models)]
    n = draw(st.integers(1, 40))
    tasks = []
    for i in range(n):
        deps = tuple(sorted(set(draw(st.lists(st.integers(0, max(0, i - 1)), max_size=2))))) if i else ()
        tasks.append(SimTask(i, draw(st.sampled_from(models)).name, draw(st.floats(0, 5)),
                             draw(st.floats(0.01, 1)), deps, draw(st.integers(0, 3))))
    return models, tasks, draw(st.integers(4, 10)) * GB


@settings(max_examples=60, derandomize=True, deadline=None)
@given(workloads())
def test_budget_is_never_exceeded_on_random_workloads(w):
    models, tasks, budget = w
    r = simulate(models, tasks, budget)
    assert r.peak <= budget and len(r.end) == len(tasks)


def test_higher_priority_starts_first_across_models():
    models = [SimModel("a", 1 * GB, 0.0), SimModel("b", 1 * GB, 0.0)]
    tasks = [SimTask(0, "a", 0.0, 1.0), SimTask(1, "a", 0.0, 1.0), SimTask(2, "b", 0.0, 1.0, priority=5)]
    r = simulate(models, tasks, 1 * GB)                   # one model at a time
    assert r.start[2] < r.start[0]


def test_no_starvation_bound_behind_a_busy_resident_model():
    params = policy.PolicyParams(max_wait=5.0, aging=1000.0)
    models = [SimModel("hot", 3 * GB, 1.0), SimModel("cold", 3 * GB, 2.0)]
    tasks = [SimTask(i, "hot", i * 0.5, 0.5) for i in range(200)]   # a never-ending stream
    tasks.append(SimTask(999, "cold", 1.0, 0.5))
    r = simulate(models, tasks, 4 * GB, params=params)
    assert r.waits[999] <= params.max_wait + 0.5 + 2.0


def test_chat_traffic_loads_no_more_than_fifo_lru():
    models, tasks = chat_traffic(150)
    g = simulate(models, tasks, 8 * GB)
    naive = simulate(models, tasks, 8 * GB, strategy="fifo_lru")
    assert g.loads <= naive.loads
