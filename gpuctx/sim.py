"""The engine on a virtual clock: deterministic replays of a workload, for tests and what-if planning.

:func:`simulate` runs a workload through the live engine, :class:`gpuctx.engine.Scheduler`, under
:class:`~gpuctx.engine.VirtualDriver` with a fake device whose loads, unloads and task bodies take
the declared seconds. Nothing here decides anything: the plan, the groups, the evictions and the
waits are the engine's own, so a simulated run and a live one of the same workload make the same
loads and evictions in the same order (``tests/test_sim.py`` checks it against real threads and
real sleeps). Nothing sleeps for real; the same inputs give the same result.

The same :func:`run` takes a real :class:`~gpuctx.engine.ThreadedDriver` and a time scale: that is
the live side of the comparison. The baselines (the seed's policy, Ollama's, Ray Serve's...) are
live re-implementations in ``bench/baselines.py``, not simulations.
"""

from __future__ import annotations

import collections
import functools
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from . import policy
from .device import CpuDevice, ReleaseReport
from .engine import Config, Scheduler, TaskSpec, ThreadedDriver, VirtualDriver
from .task import wait_tasks
from .units import GB

__all__ = ["SimModel", "SimTask", "SimResult", "simulate", "run", "live", "lower_bound_loads",
           "interleaved", "video_pipeline", "chat_traffic", "random_dag"]


@dataclass(frozen=True)
class SimModel:
    """A model: size in bytes, seconds to load it and to unload it, working memory per task in bytes."""

    name: str
    size: int
    load_s: float
    priority: int = 0
    unload_s: float = 0.0
    working: int = 0


@dataclass(frozen=True)
class SimTask:
    """A call: its model, arrival time, run time, dependencies (task ids) and priority."""

    id: int
    model: str
    arrival: float
    run_s: float
    deps: tuple[int, ...] = ()
    priority: int = 0


@dataclass
class SimResult:
    """What a run cost, in the workload's seconds."""

    loads: int = 0
    evictions: int = 0
    switches: int = 0
    makespan: float = 0.0
    peak: int = 0
    sequence: list[tuple[str, str]] = field(default_factory=list)   # (kind, model) of loads and unloads, in order
    overlap: dict[str, float] = field(default_factory=dict)         # stats()["overlap"]: how much runs overlapped
    prefetches: int = 0
    waits: dict[int, float] = field(default_factory=dict)
    start: dict[int, float] = field(default_factory=dict)
    end: dict[int, float] = field(default_factory=dict)

    @property
    def p95_wait(self) -> float:
        """95th percentile of ready-to-start waits."""
        xs = sorted(self.waits.values())
        return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))] if xs else 0.0

    @property
    def max_wait(self) -> float:
        """The longest ready-to-start wait."""
        return max(self.waits.values(), default=0.0)


def lower_bound_loads(tasks: list[SimTask]) -> int:
    """Each model used loaded exactly once."""
    return len({t.model for t in tasks})


class _TimedDevice(CpuDevice):
    """The CPU device, where dropping a model takes its declared unload time."""

    def __init__(self, budget: int, unload_s: dict[str, float], pause: Any) -> None:
        super().__init__(budget)
        self._unload_s, self._pause = unload_s, pause

    def release(self, name: str, holder: list, expected: int) -> ReleaseReport:
        holder.pop()
        self._pause(self._unload_s.get(name, 0.0))
        return ReleaseReport()


def _load(pause: Any, seconds: float, gate: Any, name: str) -> str:
    gate.wait()
    pause(seconds)
    return name


def _body(pause: Any, seconds: float, *deps: Any) -> None:
    pause(seconds)


class _OneGpu:
    """A fair mutex on either driver: the GPU goes to the callers in the order they asked, as
    kernels from several streams share one GPU (a releasing caller cannot take it straight back)."""

    def __init__(self, driver: Any) -> None:
        self._driver, self._lock = driver, threading.Lock()   # the lock guards two fields, never blocks long
        self._busy, self._waiting = False, collections.deque()

    def run(self, pause: Any, seconds: float) -> None:
        with self._lock:
            turn = None
            if self._busy:
                turn = self._driver.event()
                self._waiting.append(turn)
            self._busy = True
        if turn is not None:
            turn.wait()   # handed over by the previous holder
        try:
            pause(seconds)
        finally:
            with self._lock:
                if self._waiting:
                    self._waiting.popleft().set()
                else:
                    self._busy = False


def simulate(models: list[SimModel], tasks: list[SimTask], budget: int, *,
             params: policy.PolicyParams | None = None, serial: bool = False, prefetch: bool = False) -> SimResult:
    """Run ``tasks`` through the engine on a virtual clock under ``budget`` bytes."""
    return run(models, tasks, budget, params=params, serial=serial, prefetch=prefetch)


def run(models: list[SimModel], tasks: list[SimTask], budget: int, *, driver: Any = None, scale: float = 1.0,
        params: policy.PolicyParams | None = None, serial: bool = False, prefetch: bool = False) -> SimResult:
    """Run a workload through the engine, on ``driver`` (a new virtual one by default).

    With a :class:`~gpuctx.engine.ThreadedDriver`, every declared time is slept for real, times
    ``scale``; the result is given in the workload's seconds either way. Every load waits until
    the whole of what arrives at time 0 is submitted, so that a live run does not start planning
    before the workload is in (the virtual driver gets there by construction). ``serial`` runs
    the task bodies one at a time, in the order they asked for the GPU (one GPU that runs one
    call at a time; loads still overlap), like ``bench/scheduling.py``'s serial mode; ``prefetch`` is
    the engine's setting of that name.
    """
    for m in models:
        if m.size + m.working > budget:
            raise ValueError(f"model {m.name!r} ({m.size} bytes) can never fit the budget {budget}")
    driver = driver if driver is not None else VirtualDriver()
    virtual = isinstance(driver, VirtualDriver)
    params = params or policy.PolicyParams()
    pause = functools.partial(_scaled_sleep, driver.sleep, scale)
    body_pause = pause
    if serial:
        body_pause = functools.partial(_OneGpu(driver).run, pause)
    config = Config(budget=budget, safety_factor=1.0, device="cpu", max_wait=params.max_wait * scale,
                    aging=params.aging * scale, latency_priority=params.latency_priority, offload=False,
                    prefetch=prefetch)
    sched = Scheduler(config, device=_TimedDevice(budget, {m.name: m.unload_s for m in models}, pause), driver=driver)
    gate = driver.event()
    try:
        for m in models:
            sched.register_model(m.name, functools.partial(_load, pause, m.load_s, gate, m.name), vram=m.size,
                                 priority=m.priority, working=m.working or None)
        specs: dict[tuple[str, int], TaskSpec] = {}
        handles: dict[int, Any] = {}
        t0 = driver.clock()
        by_id = {t.id: t for t in tasks}
        arrives: dict[int, float] = {}   # a call cannot be made before the calls it takes as arguments
        topo: dict[int, int] = {}
        for t in tasks:
            stack = [t.id]
            while stack:   # dependencies first, in any id order
                i = stack[-1]
                todo = [d for d in by_id[i].deps if d not in arrives]
                if todo:
                    stack.extend(todo)
                    continue
                stack.pop()
                if i not in arrives:
                    arrives[i] = max([by_id[i].arrival] + [arrives[d] for d in by_id[i].deps])
                    topo[i] = len(topo)
        for tid in sorted(arrives, key=lambda i: (arrives[i], topo[i])):
            t = by_id[tid]
            if arrives[tid] > 0:
                gate.set()
                ahead = arrives[tid] * scale - (driver.clock() - t0)
                if ahead > 0:
                    driver.sleep(ahead)
            spec = specs.get((t.model, t.priority))
            if spec is None:
                spec = specs[(t.model, t.priority)] = TaskSpec(fn=_body, name=t.model, model=t.model,
                                                                priority=t.priority)
            handles[t.id] = sched.submit(spec, (body_pause, t.run_s, *(handles[d] for d in t.deps)), {})
        gate.set()
        if virtual:
            driver.run_until_idle()
        else:
            wait_tasks(list(handles.values()))
        return _result(sched, handles, t0, scale)
    finally:
        gate.set()
        if not (virtual and driver.failure):   # after a livelock the frozen run is left behind
            sched.shutdown()


def _scaled_sleep(sleep: Any, scale: float, seconds: float) -> None:
    if seconds > 0:
        sleep(seconds * scale)


def _result(sched: Scheduler, handles: dict[int, Any], t0: float, scale: float) -> SimResult:
    r = SimResult()
    for tid, task in handles.items():
        if task.exception() is not None:
            raise RuntimeError(f"task {tid} failed in the run: {task.exception()!r}")
        r.start[tid] = (task.started_at - t0) / scale
        r.end[tid] = (task.ended_at - t0) / scale
        r.waits[tid] = (task.started_at - task.ready_at) / scale
    for e in sched.trace.events:
        if e.kind in ("load_end", "restore", "unload", "offload"):
            r.sequence.append(("load" if e.kind in ("load_end", "restore") else "unload", e.model))
    stats = sched.trace.stats.as_dict()
    r.loads = sum(1 for k, _ in r.sequence if k == "load")
    r.evictions = sum(m["evictions"] for m in stats["models"].values())
    r.switches = stats["model_switches"]
    r.peak = max(stats["peak_vram"], sched.peak_committed())
    r.makespan = max(r.end.values(), default=0.0)
    r.overlap = dict(stats["overlap"])
    r.prefetches = sum(1 for e in sched.trace.events if e.kind == "prefetch")
    return r


def live(models: list[SimModel], tasks: list[SimTask], budget: int, *, scale: float = 1.0,
         params: policy.PolicyParams | None = None) -> SimResult:
    """The same workload on real threads, sleeping every declared time x ``scale``."""
    return run(models, tasks, budget, driver=ThreadedDriver(), scale=scale, params=params)


# --------------------------------------------------------------------------- standard workloads
REFERENCE = [SimModel("whisper", int(4.5 * GB), 6.0), SimModel("videomae", 5 * GB, 5.0),
             SimModel("clap", 2 * GB, 2.0), SimModel("qwen3", int(1.5 * GB), 4.0), SimModel("dinov3", 1 * GB, 1.5)]


def interleaved(n_models: int = 5, per_model: int = 20, seed: int = 0) -> tuple[list[SimModel], list[SimTask]]:
    """All tasks at t=0, round-robin across models of 2 GB each."""
    rng = random.Random(seed)
    models = [SimModel(f"m{i}", 2 * GB, 2.0 + i) for i in range(n_models)]
    tasks = [SimTask(k * n_models + i, f"m{i}", 0.0, rng.uniform(0.05, 0.3))
             for k in range(per_model) for i in range(n_models)]
    return models, tasks


def video_pipeline(n_clips: int = 20, seed: int = 0) -> tuple[list[SimModel], list[SimTask]]:
    """The reference pipeline: per clip whisper, videomae, clap, qwen3 (after whisper), dinov3; clips every 0.5 s."""
    rng = random.Random(seed)
    tasks: list[SimTask] = []
    for c in range(n_clips):
        t0 = c * 0.5
        base = len(tasks)
        tasks.append(SimTask(base, "whisper", t0, rng.uniform(0.3, 1.0)))
        tasks.append(SimTask(base + 1, "videomae", t0, rng.uniform(0.2, 0.6)))
        tasks.append(SimTask(base + 2, "clap", t0, rng.uniform(0.05, 0.2)))
        tasks.append(SimTask(base + 3, "qwen3", t0, rng.uniform(0.3, 0.8), deps=(base,)))
        tasks.append(SimTask(base + 4, "dinov3", t0, rng.uniform(0.05, 0.2)))
    return list(REFERENCE), tasks


def chat_traffic(n: int = 200, seed: int = 0) -> tuple[list[SimModel], list[SimTask]]:
    """Interleaved ASR -> LLM -> TTS turns with Poisson arrivals (one turn every 0.4 s on average)."""
    rng = random.Random(seed)
    models = [SimModel("asr", 3 * GB, 3.0, priority=2), SimModel("llm", 6 * GB, 8.0), SimModel("tts", 2 * GB, 2.0, 1)]
    tasks, t = [], 0.0
    for i in range(n // 3):
        t += rng.expovariate(1 / 0.4)
        base = len(tasks)
        tasks += [SimTask(base, "asr", t, rng.uniform(0.05, 0.2)),
                  SimTask(base + 1, "llm", t, rng.uniform(0.2, 0.8), deps=(base,)),
                  SimTask(base + 2, "tts", t, rng.uniform(0.1, 0.3), deps=(base + 1,))]
    return models, tasks


def random_dag(n: int = 200, n_models: int = 6, seed: int = 0) -> tuple[list[SimModel], list[SimTask]]:
    """A random DAG over ``n_models`` models of 1-4 GB; up to two earlier tasks as dependencies."""
    rng = random.Random(seed)
    models = [SimModel(f"d{i}", rng.randint(1, 4) * GB, rng.uniform(1, 6)) for i in range(n_models)]
    tasks = []
    for i in range(n):
        deps = tuple(sorted(rng.sample(range(i), k=min(i, rng.randint(0, 2)))))
        tasks.append(SimTask(i, rng.choice(models).name, 0.0, rng.uniform(0.05, 0.5), deps))
    return models, tasks
