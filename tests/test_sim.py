"""The engine on a virtual clock (gpuctx.sim): the same engine as live, so the same decisions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuctx import policy
from gpuctx.engine import Deadlock, IllegalTransition, VirtualDriver
from gpuctx.engine.state import slot_to
from gpuctx.models import Slot
from gpuctx.task import TaskState
from gpuctx.sim import SimModel, SimTask, chat_traffic, live, random_dag, simulate, video_pipeline
from gpuctx.units import GB


def _mixed_workload():
    """Three models, interleaved calls, dependencies across models and a second wave later on."""
    models = [SimModel("a", 4 * GB, 0.05, unload_s=0.01), SimModel("b", 4 * GB, 0.08, unload_s=0.01),
              SimModel("c", 3 * GB, 0.03, unload_s=0.01)]
    tasks = []
    for i in range(12):
        m = "abc"[i % 3]
        tasks.append(SimTask(i, m, 0.0, 0.01 + 0.005 * (i % 2), (i - 2,) if m == "c" and i >= 2 else ()))
    tasks += [SimTask(12, "b", 0.3, 0.01), SimTask(13, "a", 0.3, 0.01, deps=(12,))]
    return models, tasks


@pytest.mark.parametrize("budget", [5 * GB, 8 * GB])   # one model at a time; two at once
def test_virtual_and_threaded_drivers_make_the_same_loads_and_evictions_in_the_same_order(budget):
    models, tasks = _mixed_workload()
    virtual = simulate(models, tasks, budget)
    real = live(models, tasks, budget)             # real threads, real sleeps of the same seconds
    assert real.sequence == virtual.sequence
    assert virtual.loads == sum(1 for k, _ in virtual.sequence if k == "load") >= 3
    assert abs(real.makespan - virtual.makespan) <= 0.25 * virtual.makespan
    assert set(real.end) == set(virtual.end) == {t.id for t in tasks}


def test_a_simulated_run_is_deterministic_and_takes_no_real_time():
    models, tasks = video_pipeline(10)
    first, second = simulate(models, tasks, 10 * GB), simulate(models, tasks, 10 * GB)
    assert first.sequence == second.sequence and first.start == second.start
    assert first.makespan > 5.0                    # seconds of virtual time, in a fraction of one real


def test_dependencies_are_respected_and_every_task_runs_once():
    for models, tasks in (video_pipeline(10), chat_traffic(90), random_dag(120)):
        r = simulate(models, tasks, 8 * GB)
        assert set(r.end) == {t.id for t in tasks}
        for t in tasks:
            assert all(r.end[d] <= r.start[t.id] for d in t.deps)


@st.composite
def workloads(draw):
    models = [SimModel(f"m{i}", draw(st.integers(1, 4)) * GB, draw(st.floats(0, 3))) for i in range(draw(st.integers(1, 4)))]
    n = draw(st.integers(1, 30))
    tasks = []
    for i in range(n):
        deps = tuple(sorted(set(draw(st.lists(st.integers(0, max(0, i - 1)), max_size=2))))) if i else ()
        tasks.append(SimTask(i, draw(st.sampled_from(models)).name, draw(st.floats(0, 5)),
                             draw(st.floats(0.01, 1)), deps, draw(st.integers(0, 3))))
    return models, tasks, draw(st.integers(4, 10)) * GB


@settings(max_examples=40, derandomize=True, deadline=None)
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


def test_a_spinning_engine_is_reported_as_a_livelock_not_a_hang():
    driver = VirtualDriver()
    driver.spin_limit = 1000
    guard = driver.guard(lambda: None)

    def spin() -> None:
        while True:
            with guard:
                pass

    driver.spawn(spin, name="spinner")
    with pytest.raises(Deadlock, match="spinner took the engine's lock 1000 times"):
        driver.run_until_idle()


def test_illegal_slot_and_task_moves_raise_naming_both_states(fresh):
    s = Slot(name="m", loader=lambda: 1)
    with pytest.raises(IllegalTransition, match=r"model 'm': cannot move from 'absent' to 'resident'"):
        slot_to(s, policy.RESIDENT)
    slot_to(s, policy.LOADING)
    slot_to(s, policy.RESIDENT)
    with pytest.raises(IllegalTransition, match="from 'resident' to 'absent'"):
        slot_to(s, policy.ABSENT)                         # a model is evicted, not dropped
    t = fresh.gpu_task(model="x", vram="1GB")(lambda: 1)()
    assert t.result(10) == 1
    sched = fresh.scheduler()
    with sched._cond, pytest.raises(IllegalTransition, match=r"Task #\d+\): cannot move from 'done' to 'running'"):
        sched._start_locked("x", t)
    with sched._cond, pytest.raises(IllegalTransition, match="from 'done' to 'failed'"):
        sched._end_locked(t, TaskState.FAILED, "exception", RuntimeError("late"), [], "failed")
    assert t.state.value == "done" and t.result(0) == 1    # nothing changed


def test_no_starvation_bound_behind_a_busy_resident_model():
    params = policy.PolicyParams(max_wait=5.0, aging=1000.0)
    models = [SimModel("hot", 3 * GB, 1.0), SimModel("cold", 3 * GB, 2.0)]
    tasks = [SimTask(i, "hot", i * 0.5, 0.5) for i in range(200)]   # a never-ending stream
    tasks.append(SimTask(999, "cold", 1.0, 0.5))
    r = simulate(models, tasks, 4 * GB, params=params)
    # Documented bound: cold's patience max(max_wait, k x switch cost), one hot task, cold's load.
    bound = policy.patience(policy.SlotView("cold", 3 * GB, load_cost=2.0), params)
    assert r.waits[999] <= bound + 0.5 + 2.0


def test_the_video_pipeline_runs_at_every_budget_without_a_livelock():
    models, tasks = video_pipeline(20)
    for budget in (6, 8, 10, 14, 20):               # 6 GB livelocked before (issue 14, entry 1)
        r = simulate(models, tasks, budget * GB)
        assert r.peak <= budget * GB and len(r.end) == len(tasks)
        assert r.loads <= 8
