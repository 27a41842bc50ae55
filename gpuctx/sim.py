"""The scheduling policy on a virtual clock: deterministic replays for benchmarks and what-if planning.

:func:`simulate` drives the very functions the live scheduler uses (:func:`policy.plan`
and :func:`policy.should_yield`) with a discrete-event loop: a task arrives, becomes
ready when its dependencies end, a group loads its model (``load_s`` seconds) after
evicting the victims the plan named, then runs its ready tasks one after another until
its queue is empty or the policy says yield. Different models run concurrently when the
budget holds them. Nothing sleeps; the same inputs give the same result.

Baselines, simulated on the same workload:

``fifo_lru``   one task at a time in submission order; a missing model is loaded after
               evicting least-recently-used ones (what model multiplexing with an LRU
               cache does, e.g. Ray Serve's).
``ollama``     the same order, but a model stays loaded while it has queued work and
               the one idle longest is evicted first (keep-alive ordering).
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from . import policy
from .units import GB

__all__ = ["SimModel", "SimTask", "SimResult", "simulate", "lower_bound_loads",
           "interleaved", "video_pipeline", "chat_traffic", "random_dag"]


@dataclass(frozen=True)
class SimModel:
    """A model: size in bytes and seconds to load it."""

    name: str
    size: int
    load_s: float
    priority: int = 0


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
    """What a simulated run cost."""

    loads: int = 0
    switches: int = 0
    makespan: float = 0.0
    peak: int = 0
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


def simulate(models: list[SimModel], tasks: list[SimTask], budget: int, *, strategy: str = "gpuctx",
             params: policy.PolicyParams | None = None) -> SimResult:
    """Run ``tasks`` under ``budget`` with ``strategy`` ("gpuctx", "fifo_lru" or "ollama")."""
    by_model = {m.name: m for m in models}
    for m in models:
        if m.size > budget:
            raise ValueError(f"model {m.name!r} ({m.size} bytes) can never fit the budget {budget}")
    if strategy == "gpuctx":
        return _Gpuctx(by_model, tasks, budget, params or policy.PolicyParams()).run()
    if strategy in ("fifo_lru", "ollama"):
        return _serial(by_model, tasks, budget, strategy)
    raise ValueError(f"strategy={strategy!r}: expected 'gpuctx', 'fifo_lru' or 'ollama'")


class _Gpuctx:
    """Discrete-event driver of policy.plan / policy.should_yield."""

    def __init__(self, models: dict[str, SimModel], tasks: list[SimTask], budget: int,
                 params: policy.PolicyParams) -> None:
        self.models, self.budget, self.params = models, budget, params
        self.tasks = {t.id: t for t in tasks}
        self.state = {m: policy.ABSENT for m in models}
        self.busy = {m: False for m in models}
        self.last_used = {m: 0.0 for m in models}
        self.queue: dict[str, list] = {m: [] for m in models}
        self.ready_at: dict[int, float] = {}
        self.waiting = {t.id: len(t.deps) for t in tasks}
        self.dependents: dict[int, list[int]] = {t.id: [] for t in tasks}
        for t in tasks:
            for d in t.deps:
                self.dependents[d].append(t.id)
        self.pending = {m: 0 for m in models}
        for t in tasks:
            self.pending[t.model] += 1
        self.events: list = []
        self.seq = itertools.count()
        self.r = SimResult()
        self.last_group: str | None = None

    def push(self, t: float, kind: str, payload: object) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def used(self, m: str) -> int:
        return self.models[m].size if self.state[m] in (policy.RESIDENT, policy.LOADING) else 0

    def snapshot(self, now: float) -> policy.Snapshot:
        views = []
        for name, m in self.models.items():
            q = self.queue[name]
            views.append(policy.SlotView(
                name=name, size=m.size, state=self.state[name], used=self.used(name), busy=self.busy[name],
                priority=m.priority, last_used=self.last_used[name], load_cost=m.load_s, queued=len(q),
                pending=self.pending[name] - len(q), head_priority=max((-p for p, *_ in q), default=0),
                oldest=min((self.ready_at[i] for *_, i in q), default=now)))
        return policy.Snapshot(now=now, budget=self.budget, slots=tuple(views), params=self.params)

    def ready(self, tid: int, now: float) -> None:
        t = self.tasks[tid]
        self.ready_at[tid] = now
        heapq.heappush(self.queue[t.model], (-t.priority, t.arrival, tid))

    def dispatch(self, now: float) -> None:
        for start in policy.plan(self.snapshot(now)):
            for v in start.evict:
                self.state[v] = policy.ABSENT
            m = start.slot
            self.busy[m] = True
            if self.last_group is not None and self.last_group != m:
                self.r.switches += 1
            self.last_group = m
            if self.state[m] == policy.RESIDENT:
                self.next_task(m, now)
            else:
                self.state[m] = policy.LOADING
                self.r.loads += 1
                self.push(now + self.models[m].load_s, "loaded", m)
            self.r.peak = max(self.r.peak, sum(self.used(x) for x in self.models))
            if self.r.peak > self.budget:
                raise AssertionError(f"budget exceeded: {self.r.peak} > {self.budget}")

    def next_task(self, m: str, now: float) -> None:
        q = self.queue[m]
        if not q or policy.should_yield(self.snapshot(now), m):
            self.busy[m] = False
            self.last_used[m] = now
            return
        _, _, tid = heapq.heappop(q)
        self.pending[m] -= 1
        self.r.start[tid] = now
        self.r.waits[tid] = now - self.ready_at[tid]
        self.push(now + self.tasks[tid].run_s, "done", tid)

    def run(self) -> SimResult:
        for t in self.tasks.values():
            self.push(t.arrival, "arrive", t.id)
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                if self.waiting[payload] == 0:
                    self.ready(payload, now)
            elif kind == "loaded":
                self.state[payload] = policy.RESIDENT
                self.next_task(payload, now)
            else:
                tid = payload
                self.r.end[tid] = now
                for d in self.dependents[tid]:
                    self.waiting[d] -= 1
                    if self.waiting[d] == 0 and self.tasks[d].arrival <= now:
                        self.ready(d, now)
                m = self.tasks[tid].model
                self.last_used[m] = now
                self.next_task(m, now)
            self.dispatch(now)
            self.r.makespan = max(self.r.makespan, now)
        if len(self.r.end) != len(self.tasks):
            raise AssertionError(f"{len(self.tasks) - len(self.r.end)} tasks never ran")
        return self.r


def _serial(models: dict[str, SimModel], tasks: list[SimTask], budget: int, strategy: str) -> SimResult:
    """One task at a time in submission order (ready tasks only), LRU or keep-alive eviction."""
    r = SimResult()
    resident: dict[str, float] = {}          # model -> last used
    done: set[int] = set()
    todo = sorted(tasks, key=lambda t: (t.arrival, t.id))
    now, last = 0.0, None
    while todo:
        task = next(t for t in todo if all(d in done for d in t.deps))
        todo.remove(task)
        now = max(now, task.arrival)
        ready = max([task.arrival] + [r.end[d] for d in task.deps])
        if task.model not in resident:
            while sum(models[m].size for m in resident) + models[task.model].size > budget:
                if strategy == "ollama":
                    busy = {t.model for t in todo}
                    victim = min(resident, key=lambda m: (m in busy, resident[m]))
                else:
                    victim = min(resident, key=resident.get)
                del resident[victim]
            now += models[task.model].load_s
            r.loads += 1
        if last is not None and last != task.model:
            r.switches += 1
        last = task.model
        r.start[task.id] = now
        r.waits[task.id] = now - ready
        now += task.run_s
        r.end[task.id] = now
        resident[task.model] = now
        done.add(task.id)
        r.peak = max(r.peak, sum(models[m].size for m in resident))
    r.makespan = now
    return r


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
