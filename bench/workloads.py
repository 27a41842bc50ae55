"""Workloads shared by every system in bench/scheduling.py (all times in unscaled seconds).

A workload is a list of models (name, GB, load seconds, llmux tier) and a list of jobs
(id, model, run seconds, priority, dependencies, arrival, class). Jobs are listed in
arrival order and every job's dependencies come before it. Seeds are fixed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

LOAD_S_PER_GB = 1.0          # load time proportional to size


@dataclass(frozen=True)
class Model:
    name: str
    gb: float
    tier: str = "llm"        # llmux tier: "asr" (protected) > "tts" > "llm"

    @property
    def load_s(self) -> float:
        return self.gb * LOAD_S_PER_GB


@dataclass
class Job:
    id: int
    model: str
    run: float
    priority: int = 0
    deps: tuple = ()
    arrival: float = 0.0
    cls: str = "batch"


@dataclass
class Workload:
    title: str
    models: list
    jobs: list
    budgets: dict             # "tight"/"medium"/"loose" -> GB
    sizes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sizes = {m.name: m for m in self.models}

    def lower_bound_loads(self) -> int:
        return len({j.model for j in self.jobs})


# the seed's models (000_*.txt), with a run time per call
WHISPER = Model("whisper", 4.5, "asr")
VIDEOMAE = Model("videomae", 5.0)
CLAP = Model("clap", 2.0, "tts")
QWEN3 = Model("qwen3", 1.5)
DINOV3 = Model("dinov3", 1.0)
RUN = {"whisper": 2.0, "videomae": 1.5, "clap": 0.5, "qwen3": 1.0, "dinov3": 0.3}


def video_pipeline(clips: int = 20) -> Workload:
    jobs: list = []
    for _ in range(clips):
        ids = {}
        for m in ("whisper", "videomae", "clap", "dinov3"):
            ids[m] = len(jobs)
            jobs.append(Job(len(jobs), m, RUN[m]))
        jobs.append(Job(len(jobs), "qwen3", RUN["qwen3"], deps=(ids["whisper"], ids["clap"])))
    return Workload(f"seed's video pipeline ({clips} clips)", [WHISPER, VIDEOMAE, CLAP, QWEN3, DINOV3], jobs,
                    {"tight": 5.4, "medium": 7.2, "loose": 14.4})


def chat(conversations: int = 40, mean_gap: float = 3.0, seed: int = 1) -> Workload:
    rng = random.Random(seed)
    tts = Model("tts", 2.0, "tts")
    jobs: list = []
    t = 0.0
    for _ in range(conversations):
        t += rng.expovariate(1.0 / mean_gap)
        a = len(jobs)
        jobs.append(Job(a, "whisper", 1.0, arrival=t))
        jobs.append(Job(a + 1, "qwen3", 1.5, deps=(a,), arrival=t))
        jobs.append(Job(a + 2, "tts", 0.8, deps=(a + 1,), arrival=t))
    return Workload(f"chat ASR -> LLM -> TTS ({conversations} Poisson arrivals, mean gap {mean_gap:g} s)",
                    [WHISPER, QWEN3, tts], jobs, {"tight": 5.0, "medium": 6.5, "loose": 8.5})


def random_dag(n: int = 200, seed: int = 7) -> Workload:
    rng = random.Random(seed)
    models = [Model(f"m{i}", gb) for i, gb in enumerate((0.5, 1.0, 1.5, 2.0, 2.5, 3.0))]
    jobs: list = []
    for i in range(n):
        deps = tuple(sorted(rng.sample(range(i), k=min(i, rng.choice((0, 0, 1, 2)))))) if i else ()
        jobs.append(Job(i, rng.choice(models).name, rng.uniform(0.2, 1.0), deps=deps))
    return Workload(f"random DAG ({n} tasks, 6 models)", models, jobs, {"tight": 3.5, "medium": 6.0, "loose": 11.0})


def interactive(batch: int = 60, calls: int = 10, gap: float = 4.0) -> Workload:
    a, b = Model("batch_a", 4.0), Model("chat_b", 3.0)
    jobs = [Job(i, (a.name, b.name)[i % 2], 1.0) for i in range(batch)]
    for k in range(calls):
        jobs.append(Job(len(jobs), b.name, 0.5, priority=5, arrival=2.0 + k * gap, cls="interactive"))
    jobs.sort(key=lambda j: (j.arrival, j.id))
    for i, j in enumerate(jobs):
        j.id = i
    return Workload(f"interactive priority-5 calls against a {batch}-task batch", [a, b], jobs,
                    {"tight": 4.5, "medium": 6.0, "loose": 7.5})


def trickle(calls: int = 36, gap: float = 1.0, seed: int = 3) -> Workload:
    rng = random.Random(seed)
    models = [Model("a", 3.0), Model("b", 2.5), Model("c", 1.0)]
    jobs, t = [], 0.0
    while len(jobs) < calls:                     # rounds: a few calls to one model, then another
        m = rng.choice(models).name
        for _ in range(rng.randint(1, 4)):
            if len(jobs) < calls:
                jobs.append(Job(len(jobs), m, 0.5, arrival=t))
                t += gap
    return Workload(f"calls trickling in one at a time ({calls} calls, {gap:g} s apart)", models, jobs,
                    {"tight": 3.5, "medium": 5.0, "loose": 7.0})


def near_full(tasks: int = 45, seed: int = 5) -> Workload:
    rng = random.Random(seed)
    models = [Model("big", 6.5), Model("s1", 1.0), Model("s2", 1.5)]
    jobs = [Job(i, rng.choice(models).name, rng.uniform(0.3, 1.2)) for i in range(tasks)]
    return Workload(f"a model that nearly fills the budget (6.5 GB, {tasks} tasks)", models, jobs,
                    {"tight": 7.0, "medium": 8.0, "loose": 9.5})


def all_workloads(quick: bool = False) -> list:
    if quick:
        return [video_pipeline(6), chat(12), random_dag(60), interactive(20, 4), trickle(16), near_full(18)]
    return [video_pipeline(20), chat(40), random_dag(200), interactive(60, 10), trickle(36), near_full(45)]
