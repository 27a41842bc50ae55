"""Live baseline schedulers on a tiny common harness (real threads, real sleeps).

The harness is a fake GPU with a byte budget. Each loaded model gets a runner thread that
first sleeps the model's load time, then runs the calls dispatched to it one at a time
(parallel = 1 per runner, Ollama's default for most setups); runners of different models
run at once. A finished call resolves its dependants, which join the ready queue in the
order they became ready. Memory in use cannot be freed: a policy evicts only idle runners
(no queued or running call) and otherwise waits. Unloads are instant.

A policy is an object with ``pump(run)``, called under ``run.cv`` whenever something
changed (arrival, completion, load done); it dispatches ready jobs, loads and evicts.
"""

from __future__ import annotations

import collections
import threading
import time

GB = 10**9


class Slot:
    def __init__(self, name: str, nbytes: int) -> None:
        self.name, self.nbytes = name, nbytes
        self.loaded = False
        self.queue: collections.deque = collections.deque()
        self.running = False
        self.closed = False
        self.last_used = time.perf_counter()

    @property
    def idle(self) -> bool:
        return self.loaded and not self.running and not self.queue


class Run:
    """One live run of ``policy`` on workload ``wl`` under ``budget_gb``."""

    def __init__(self, wl, budget_gb: float, policy, *, scale: float, body_lock=None) -> None:
        self.wl, self.policy, self.scale, self.body_lock = wl, policy, scale, body_lock
        self.budget = int(budget_gb * GB)
        self.cv = threading.Condition()
        self.slots: dict[str, Slot] = {}
        self.used = self.peak = 0
        self.loads = self.violations = 0
        self.ready: list = []                         # jobs in the order they became ready
        self.waiting = {j.id: len(j.deps) for j in wl.jobs}
        self.children = collections.defaultdict(list)
        for j in wl.jobs:
            for d in j.deps:
                self.children[d].append(j)
        self.arrived: set = set()
        self.start: dict = {}
        self.end: dict = {}
        self.failed: set = set()
        self.ongoing = 0                               # dispatched, not yet finished
        self.t0 = 0.0

    # ---- the GPU
    def nbytes(self, model: str) -> int:
        return int(self.wl.sizes[model].gb * GB)

    def free(self) -> int:
        return self.budget - self.used

    def load(self, model: str) -> Slot:
        s = self.slots[model] = Slot(model, self.nbytes(model))
        self.used += s.nbytes
        self.peak = max(self.peak, self.used)
        self.violations += self.used > self.budget
        self.loads += 1
        threading.Thread(target=self._runner, args=(s,), daemon=True).start()
        return s

    def evict(self, model: str) -> None:
        s = self.slots.pop(model)
        assert s.idle, model
        s.closed = True
        self.used -= s.nbytes
        self.cv.notify_all()

    def dispatch(self, job) -> None:
        self.ready.remove(job)
        s = self.slots[job.model]
        s.queue.append(job)
        s.last_used = time.perf_counter()
        self.ongoing += 1
        self.cv.notify_all()

    def fail(self, job) -> None:
        """The system gave up on ``job`` (llmux's "Cannot free enough VRAM"): it and its dependants fail."""
        if job in self.ready:
            self.ready.remove(job)
        todo = [job]
        while todo:
            j = todo.pop()
            if j.id in self.failed:
                continue
            self.failed.add(j.id)
            todo.extend(self.children[j.id])

    def loading(self) -> bool:
        return any(not s.loaded for s in self.slots.values())

    # ---- threads
    def _runner(self, s: Slot) -> None:
        time.sleep(self.wl.sizes[s.name].load_s * self.scale)
        with self.cv:
            s.loaded = True
            self.policy.pump(self)
            while True:
                while not s.queue and not s.closed:
                    self.cv.wait()
                if s.closed:
                    return
                job = s.queue.popleft()
                s.running = True
                self.cv.release()
                try:
                    run_body(job, self.scale, self.body_lock, self.start, self.end)
                finally:
                    self.cv.acquire()
                s.running = False
                s.last_used = time.perf_counter()
                self.ongoing -= 1
                for c in self.children[job.id]:
                    self.waiting[c.id] -= 1
                    self._maybe_ready(c)
                self.policy.pump(self)
                self.cv.notify_all()

    def _maybe_ready(self, j) -> None:
        if j.id in self.arrived and self.waiting[j.id] == 0 and j.id not in self.failed:
            self.ready.append(j)

    def done(self) -> bool:
        return len(self.end) + len(self.failed) >= len(self.wl.jobs)

    def go(self) -> float:
        """Feed arrivals at their (scaled) times; returns the makespan in real seconds."""
        self.t0 = time.perf_counter()
        for j in self.wl.jobs:
            delay = self.t0 + j.arrival * self.scale - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            with self.cv:
                self.arrived.add(j.id)
                if all(d not in self.failed for d in j.deps):
                    self._maybe_ready(j)
                else:
                    self.fail(j)
                self.policy.pump(self)
        with self.cv:
            while not self.done():
                self.policy.pump(self)
                self.cv.wait(0.05)
        return max(self.end.values(), default=self.t0) - self.t0


def run_body(job, scale: float, body_lock, start: dict, end: dict) -> None:
    """A task body, shared by every system: sleep the scaled run time (under the GPU lock in serial mode)."""
    if body_lock is not None:
        body_lock.acquire()
    try:
        start[job.id] = time.perf_counter()
        time.sleep(job.run * scale)
        end[job.id] = time.perf_counter()
    finally:
        if body_lock is not None:
            body_lock.release()


# --------------------------------------------------------------------------- policies
class SeedNextBatch:
    """The seed's ``GPUScheduler.get_next_batch`` (000_*.txt): one model resident at a time.

    Per-model ready queues in priority order (stable); the current model's queue first,
    else the queue with the most ready items; up to ``max_batch`` items per batch, run one
    after the other on the resident model; the next batch is picked when it is done.
    """

    name = "seed get_next_batch"

    def __init__(self, max_batch: int = 8) -> None:
        self.max_batch = max_batch

    def pump(self, run: Run) -> None:
        if run.ongoing or run.loading():
            return
        queues: dict = {m.name: [] for m in run.wl.models}
        for j in run.ready:
            q = queues[j.model]
            pos = next((i for i, o in enumerate(q) if o.priority < j.priority), len(q))
            q.insert(pos, j)
        current = next(iter(run.slots), None)
        if current is None or not queues[current]:
            best = max((m for m in queues if queues[m]), key=lambda m: len(queues[m]), default=None)
            if best is None:
                return
            if current is not None:
                run.evict(current)
            current = best
            run.load(current)
        for j in queues[current][: self.max_batch]:
            run.dispatch(j)


class FifoEvict:
    """A FIFO of ready requests; the head goes to its model's runner, loading it if needed.

    To make room it evicts idle runners, least recently used first; when none is idle it
    waits (head-of-line). ``max_loaded`` caps the number of loaded models (Ollama's
    OLLAMA_MAX_LOADED_MODELS, default 3); ``keep_alive`` unloads runners idle that long
    (Ollama: 5 min; checked whenever the scheduler wakes). ``max_ongoing`` caps dispatched
    requests (Ray Serve's max_ongoing_requests, default 5).
    """

    def __init__(self, name: str, *, max_loaded: int | None = None, keep_alive: float | None = None,
                 max_ongoing: int | None = None, by_count: bool = False) -> None:
        self.name, self.max_loaded, self.keep_alive, self.max_ongoing = name, max_loaded, keep_alive, max_ongoing
        self.by_count = by_count

    def cap(self, run: Run) -> int | None:
        return self.max_loaded

    def pump(self, run: Run) -> None:
        if self.keep_alive is not None:
            now = time.perf_counter()
            for s in list(run.slots.values()):
                if s.idle and now - s.last_used > self.keep_alive * run.scale:
                    run.evict(s.name)
        cap = self.cap(run)
        while run.ready and (self.max_ongoing is None or run.ongoing < self.max_ongoing):
            job = run.ready[0]
            if job.model not in run.slots:
                need = run.nbytes(job.model)
                while (cap is not None and len(run.slots) >= cap) or (not self.by_count and run.free() < need):
                    idle = [s for s in run.slots.values() if s.idle]
                    if not idle:
                        return                                   # head-of-line: wait for a runner to go idle
                    run.evict(min(idle, key=lambda s: s.last_used).name)
                run.load(job.model)
            run.dispatch(job)


class RayServeLRU(FifoEvict):
    """Ray Serve model multiplexing on one replica: an LRU cache of ``max_num_models_per_replica``
    models (by count, not bytes), requests in arrival order, ``max_ongoing_requests`` = 5.

    The count is chosen as a user would: the most models that fit the budget whichever
    ones are loaded (the k largest sum to at most the budget), at least 1.
    """

    def __init__(self) -> None:
        super().__init__("Ray Serve LRU", max_ongoing=5, by_count=True)

    def cap(self, run: Run) -> int:
        sizes = sorted((run.nbytes(m.name) for m in run.wl.models), reverse=True)
        k, total = 0, 0
        for s in sizes:
            if total + s > run.budget:
                break
            total, k = total + s, k + 1
        return max(k, 1)


class LlmuxTiers:
    """llmux's VRAM manager (004_*.txt): requests run concurrently, each first ensures its model
    is loaded under one lock (so loads are serialised and other requests wait behind them).
    To make room it evicts by tier, lowest first (llm < tts < asr), never evicting the ASR
    tier for a lower-tier request; same-tier replacement is allowed. When the room cannot
    be freed it raises ("Cannot free enough VRAM"): the request fails, with its dependants.
    Memory in use is not freed: a busy candidate is waited for.
    """

    name = "llmux tiers"
    RANK = {"llm": 0, "tts": 1, "asr": 2}

    def pump(self, run: Run) -> None:
        for job in list(run.ready):
            if run.loading():
                return                                           # the lock is held by a load
            if job.model in run.slots:
                run.dispatch(job)
                continue
            need, mine = run.nbytes(job.model), self.RANK[run.wl.sizes[job.model].tier]
            cands = sorted(run.slots.values(), key=lambda s: self.RANK[run.wl.sizes[s.name].tier])
            cands = [s for s in cands if not (self.RANK[run.wl.sizes[s.name].tier] > mine
                                              and run.wl.sizes[s.name].tier == "asr")]
            if run.free() + sum(s.nbytes for s in cands) < need:
                run.fail(job)
                continue
            free, victims = run.free(), []
            for s in cands:
                if free >= need:
                    break
                if not s.idle:
                    return                                       # holds the lock until it is idle
                victims.append(s)
                free += s.nbytes
            for s in victims:
                run.evict(s.name)
            run.load(job.model)
            run.dispatch(job)


def baselines() -> list:
    return [
        SeedNextBatch(),
        FifoEvict("Ollama", max_loaded=3, keep_alive=300.0),
        RayServeLRU(),
        LlmuxTiers(),
        FifoEvict("FIFO + LRU (bytes)"),
    ]
