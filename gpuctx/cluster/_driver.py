"""The driver's side of a cluster: routing calls to workers, following them, surviving a worker's loss.

State (all under ``_lock``; futures are resolved after it is released, so no user callback runs
under it):

- ``_workers``: each worker as the driver knows it (:class:`_Worker`): its actor, budget, whether
  it is alive (or why it was lost), the tasks sent to it and not ended, and what it last said it
  holds (resident models with their sizes and load times);
- ``_refs``: every ObjectRef the watcher waits for, with what it means: a call's *start* or its
  *end* (the small ``info``; a result itself is never fetched here);
- per model: its size (declared), its run time (an EWMA of what workers report);
- counters for ``stats()``: cross-worker transfers, moved and retried tasks.

A task's life here: WAITING (at the driver, for its dependencies) -> QUEUED (sent: the policy
chose its worker) -> RUNNING (its body started there) -> DONE | FAILED. A task waits at the
driver until its dependencies are done, then goes out with their results as ObjectRefs: the
worker fetches them from the object store (its own node's, or another's), never through here.
Waiting at the driver costs one hop per dependency and buys two things: the route is chosen
when the task can run (knowing where its inputs are and how long each model runs), and a
producer that moves after a worker's loss never strands a consumer holding its old ref.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from .. import _walk, policy
from ..engine import Config, TaskSpec
from ..errors import BudgetError, ConfigError, DependencyError, SchedulerClosed, WorkerLost
from ..task import Task, TaskState
from ..trace import Event, StatsReport
from ..units import format_size, parse_size
from ._worker import _READERS, GpuWorker

__all__ = ["ClusterScheduler", "ClusterTask"]

_VRAM = "gpuctx_vram_gb"      # the custom resource: a node's VRAM in GB, each worker takes its budget
_EWMA = 0.3


class ClusterTask(Task):
    """A [`Task`][gpuctx.Task] run on a cluster worker.

    Its result stays in the cluster's object store until `result()` fetches it (once; later
    calls return the same object). Passed to another task, it travels as its ObjectRef.

    Attributes:
        worker: the worker it was sent to (`None` while it waits for its dependencies); after
            a worker's loss, the one it moved to.
        ref: the ObjectRef of its result once it is done (`None` before).
    """

    worker: str | None = None
    ref: Any = None
    _nbytes: int | None = None
    _retries = 0
    _fetched: Any = None
    _has_value = False
    _error: BaseException | None = None
    _pending: tuple = ()
    _cluster: Any = None

    def result(self, timeout: float | None = None) -> Any:
        """The task's return value, fetched from the object store (see `Task.result`)."""
        ref = Task.result(self, timeout)
        if not self._has_value:
            import ray

            self._fetched = ray.get(ref, timeout=timeout)
            self._has_value = True
        return self._fetched


@dataclass
class _Worker:
    name: str
    actor: Any
    budget: int
    device: str
    alive: bool = True
    lost: str | None = None
    tasks: dict = field(default_factory=dict)       # tid -> ClusterTask sent here, not ended
    holds: dict = field(default_factory=dict)       # model -> (state, bytes, load seconds, busy)
    stats: dict = field(default_factory=dict)       # the last stats it gave
    events: tuple = ()                              # the last (clock offset, events) it gave


class ClusterScheduler:
    """What `gpuctx.scheduler()` is on a cluster: the API's calls, routed to worker engines."""

    share = None        # never in a share (configure refuses cluster= with share=)

    def __init__(self, config: Config) -> None:
        import ray

        self.config = config
        if config.device == "cpu" and (config.budget is None or config.workers is None):
            raise ConfigError(f"configure(cluster='ray', device='cpu'): expected workers=N and budget= (each "
                              f"worker's declared VRAM); got workers={config.workers!r}, budget={config.budget!r}")
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            self._init_ray(config)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._refs: dict[Any, tuple[str, ClusterTask]] = {}
        self._sizes: dict[str, int] = {}
        self._run_s: dict[str, float] = {}
        self._live: dict[int, ClusterTask] = {}
        self._fn_live: dict[Any, set] = {}
        self._counts = {"cross_worker": 0, "cross_worker_bytes": 0, "moved": 0, "retried": 0}
        self._observers: dict[str, tuple[dict, dict]] = {}   # observe(): per dashboard reader
        self._closed = False
        try:
            self._workers = self._start_workers(config)
        except BaseException:
            if self._own_ray:
                ray.shutdown()
            raise
        self._wake = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="gpuctx-cluster-watch", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------ starting
    @staticmethod
    def _init_ray(config: Config) -> None:
        import logging

        import ray

        resources = {}
        if config.device == "cpu" and config.budget is not None:
            resources[_VRAM] = (config.workers or 1) * config.budget / 1e9
        # Small and quiet: the workers mostly wait on their engines' threads.
        ray.init(num_cpus=max(2, (config.workers or 1)), resources=resources, include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False, configure_logging=False)

    def _start_workers(self, config: Config) -> list[_Worker]:
        import ray

        on_cpu = config.device == "cpu"
        count = config.workers
        if count is None:
            count = int(ray.cluster_resources().get("GPU", 0))
            if count == 0:
                raise ConfigError("configure(cluster='ray'): workers=None means one per GPU, and the Ray cluster "
                                  "has none; give workers=N (with device='cpu' and a budget on a machine without GPUs)")
        opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 10_000}
        if not on_cpu:
            opts["num_gpus"] = 1    # Ray makes the worker's card its cuda:0
        if config.budget is not None and ray.cluster_resources().get(_VRAM, 0) > 0:
            opts["resources"] = {_VRAM: config.budget / 1e9}
        local = replace(config, cluster=None, workers=None, device="cpu" if on_cpu else "cuda:0")
        cls = ray.remote(GpuWorker).options(**opts)
        actors = [cls.remote(f"w{i}", local) for i in range(count)]
        budgets = ray.get([a.budget.remote() for a in actors])
        devices = ray.get([a.device.remote() for a in actors])
        return [_Worker(f"w{i}", a, b, d) for i, (a, b, d) in enumerate(zip(actors, budgets, devices))]

    def _poll(self, method: str, timeout: float) -> list[tuple[_Worker, Any]]:
        """(worker, its answer to ``method``) for each live worker; every answer None when one of
        them died or did not answer within ``timeout`` seconds (each caller keeps what it had)."""
        import ray

        live = [w for w in self._workers if w.alive]
        try:
            answers = ray.get([getattr(w.actor, method).remote() for w in live], timeout=timeout)
        except Exception:  # noqa: BLE001 - a worker died while asked, or was slow: nothing fresh this time
            answers = [None] * len(live)
        return list(zip(live, answers))

    # ------------------------------------------------------------------ registrations
    def _broadcast(self, method: str, *args: Any) -> list:
        import ray

        live = [w for w in self._workers if w.alive]
        try:
            return ray.get([getattr(w.actor, method).remote(*args) for w in live])
        except ray.exceptions.RayTaskError as exc:
            raise (exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc) from None

    def register_model(self, name: str, loader: Any = None, *, vram: Any = None, origin: Any = None,
                       **kw: Any) -> None:
        """Register a model on every worker (the loader runs in the worker, at its first load)."""
        size = None if vram in (None, "auto") else parse_size(vram, arg="vram")
        if size is not None:
            self._check_fits(size, f"model {name!r}")
        self._broadcast("register_model", name, dict(loader=loader, vram=vram, **kw))
        if size is not None:
            self._sizes[name] = size

    def set_queue_limits(self, name: str, max_queue: int | None, overflow: str | None) -> None:
        """A model's queue limit, on every worker."""
        self._broadcast("set_queue_limits", name, max_queue, overflow)

    def evict(self, name: str | None = None) -> list[str]:
        """Evict ``name`` (or every idle model) on every worker; the names evicted anywhere."""
        return sorted({n for names in self._broadcast("evict", name) for n in names})

    def _check_fits(self, size: int, what: str) -> None:
        big = policy.largest_worker(self._views())
        if big is None:
            raise WorkerLost(f"{what}: every worker of the cluster was lost")
        if size > big.budget:
            raise BudgetError(f"{what}: vram={format_size(size)} is larger than every worker's budget; the "
                              f"largest is worker {big.name} with {format_size(big.budget)}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise ConfigError(f"gpuctx.{name}(): not available with configure(cluster='ray'); use it on one "
                          "process (configure(cluster=None))")

    # ------------------------------------------------------------------ submitting
    def submit(self, spec: TaskSpec, args: tuple, kwargs: dict, *, block: bool = True,
               timeout: float | None = None) -> ClusterTask:
        """One call of ``spec``: a task sent to a worker now, or once its dependencies are done."""
        deps = _walk.collect((args, kwargs), lambda x: isinstance(x, Task))
        order = []
        for item in spec.after:
            if isinstance(item, Task):
                order.append(item)
            else:
                with self._lock:
                    order.extend(t for t in self._fn_live.get(item.__gpuctx_spec__.fn, ()) if not t.state.terminal)
        for d in deps + order:
            if not isinstance(d, ClusterTask) or d._cluster is not self:
                raise ConfigError(f"{spec.name}(): a dependency {d!r} does not belong to this cluster")
        size = spec.vram if spec.vram is not None else self._sizes.get(spec.model, 0)
        self._check_fits(size, f"{spec.name}() on model {spec.model!r}")
        task = ClusterTask(next(self._ids), spec.name, spec.model, spec.priority, self)
        task._cluster = self
        task.submitted_at = time.time()
        task._job, task._call, task._data = replace(spec, after=()), (args, kwargs), list(dict.fromkeys(deps))
        task._waits = list(dict.fromkeys(deps + order))
        task._retries = spec.max_retries
        ends: list = []
        with self._lock:
            if self._closed:
                raise SchedulerClosed(f"{spec.name}(): the gpuctx cluster was shut down")
            if spec.vram is not None:
                self._sizes.setdefault(spec.model, spec.vram)
            self._live[task.id] = task
            self._fn_live.setdefault(spec.fn, set()).add(task)
            task._ndeps = 0
            for d in task._waits:
                # The driver's state, not the future's: one that ended in another thread's critical
                # section is resolved only after it, and its dependents were taken already.
                if not d.state.terminal:
                    task._ndeps += 1
                    d.__dict__.setdefault("_dependents", []).append(task)
            if task._ndeps == 0:
                self._ready_locked(task, ends)
        _resolve(ends)
        return task

    def _ready_locked(self, task: ClusterTask, ends: list) -> None:
        """All of ``task``'s dependencies ended: fail it if one failed, else send it."""
        # Read the driver's states, not the futures: a producer ended in this same critical
        # section is resolved only once the lock is released.
        bad = next((d for d in task._waits if d.state in (TaskState.FAILED, TaskState.CANCELLED)), None)
        if bad is not None:
            cause = bad._error
            root = cause.__cause__ if isinstance(cause, DependencyError) and cause.__cause__ else cause
            what = "was cancelled" if cause is None else f"failed: {type(root).__name__}"
            err = DependencyError(f"{task.name}(): its dependency Task #{bad.id} {bad.name} {what}")
            err.__cause__ = root
            self._end_locked(task, ends, error=err)
            return
        self._send_locked(task, ends)

    def _send_locked(self, task: ClusterTask, ends: list) -> None:
        size = task._job.vram if task._job.vram is not None else self._sizes.get(task.model, 0)
        name = policy.route(self._views(), task.model, size, self._load_s(task.model))
        if name is None:
            self._end_locked(task, ends, error=WorkerLost(
                f"{task.name}() (Task #{task.id}): no live worker can hold model {task.model!r}; lost: "
                + ", ".join(f"{w.name} ({w.lost})" for w in self._workers if not w.alive)))
            return
        w = next(x for x in self._workers if x.name == name)
        for d in task._data:
            if d.worker != w.name:
                self._counts["cross_worker"] += 1
                self._counts["cross_worker_bytes"] += d._nbytes or 0
        args, kwargs = _walk.replace(task._call, lambda x: isinstance(x, ClusterTask), lambda t: t.ref)
        task.worker, task.state = w.name, TaskState.QUEUED
        w.tasks[task.id] = task
        start = w.actor.submit.remote(task.id, task._job, (args, kwargs))
        value, info = w.actor.result.options(num_returns=2).remote(task.id)
        task._pending = (start, value, info)
        self._refs[start] = ("start", task)
        self._refs[info] = ("end", task)
        self._wake.set()

    def _end_locked(self, task: ClusterTask, ends: list, *, error: BaseException | None = None,
                    cancel: bool = False) -> None:
        task.state = TaskState.CANCELLED if cancel else TaskState.FAILED if error is not None else TaskState.DONE
        task._error = error
        task.ended_at = time.time()
        self._live.pop(task.id, None)
        self._fn_live.get(task._job.fn, set()).discard(task)
        ends.append((task, "cancel" if cancel else error))
        for dep in task._dependents:
            dep._ndeps -= 1
            if dep._ndeps == 0 and dep.state is TaskState.WAITING:
                self._ready_locked(dep, ends)
        task._dependents = ()
        task._call = task._data = task._waits = ()

    # ------------------------------------------------------------------ routing views
    def _load_s(self, model: str) -> float:
        known = [h[2] for w in self._workers for m, h in w.holds.items() if m == model and h[2] > 0]
        return max(known, default=1.0)

    def _views(self) -> list[policy.WorkerView]:
        views = []
        default_run = sum(self._run_s.values()) / len(self._run_s) if self._run_s else 1.0
        for w in self._workers:
            queued = {t.model for t in w.tasks.values()}
            resident = {m for m, h in w.holds.items() if h[0] in (policy.RESIDENT, policy.LOADING)}
            held = resident | queued
            used = sum(w.holds[m][1] if m in w.holds else self._sizes.get(m, 0) for m in held)
            idle = tuple((m, w.holds[m][1], w.holds[m][2]) for m in sorted(resident - queued))
            backlog = (sum(self._run_s.get(t.model, default_run) for t in w.tasks.values())
                       + sum(self._load_s(m) for m in queued - resident))
            views.append(policy.WorkerView(w.name, w.budget, w.budget - used, backlog, tuple(sorted(held)), idle,
                                           w.alive))
        return views

    # ------------------------------------------------------------------ following the calls
    def _watch(self) -> None:
        import ray

        while True:
            with self._lock:
                refs = list(self._refs)
                if self._closed and not refs:
                    return
            if not refs:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            # Back at once when one is ready (then take every other ready one too); else every
            # 50 ms, to add the refs of calls sent meanwhile. fetch_local=False: only notes.
            ready, rest = ray.wait(refs, num_returns=1, timeout=0.05, fetch_local=False)
            if ready and rest:
                ready += ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)[0]
            for ref in ready:
                self._arrived(ref)

    def _arrived(self, ref: Any) -> None:
        import ray

        with self._lock:
            entry = self._refs.pop(ref, None)
        if entry is None:
            return
        kind, task = entry
        try:
            info = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._lose(task.worker, _why(exc))
            return
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
            self._finish(task, error=cause)
            return
        if kind == "start":
            with self._lock:
                if task.state is TaskState.QUEUED:
                    task.state, task.started_at = TaskState.RUNNING, time.time()
            return
        self._finish(task, info=info)

    def _finish(self, task: ClusterTask, info: dict | None = None, error: BaseException | None = None) -> None:
        ends: list = []
        with self._lock:
            w = next((x for x in self._workers if x.name == task.worker), None)
            if w is None or w.tasks.pop(task.id, None) is None:
                return                    # moved already (its worker was lost)
            start = task._pending[0]
            self._refs.pop(start, None)
            if task.started_at is None:
                task.started_at = time.time()
            if info is not None:
                w.holds = {m: (st, size, load_s, busy) for m, st, size, load_s, busy in info["holds"]}
                if info["ran"] is not None:
                    old = self._run_s.get(task.model)
                    self._run_s[task.model] = info["ran"] if old is None else old + _EWMA * (info["ran"] - old)
                task.ref, task._nbytes = task._pending[1], info["nbytes"]
            task._pending = ()
            self._end_locked(task, ends, error=error)
        _resolve(ends)

    def _lose(self, name: str | None, reason: str) -> None:
        """Worker ``name`` died: its running tasks fail with WorkerLost (or retry), the others move."""
        import ray

        ends: list = []
        with self._lock:
            w = next((x for x in self._workers if x.name == name), None)
            if w is None or not w.alive:
                return
            w.alive, w.lost = False, reason
            orphans = list(w.tasks.values())
            w.tasks.clear()
            w.holds = {}
        # A start that reached the driver before the death counts: that body was running.
        starts = [t._pending[0] for t in orphans if t._pending]
        ready, _ = ray.wait(starts, num_returns=len(starts), timeout=0) if starts else ([], [])
        began = set()
        for ref in ready:
            try:
                ray.get(ref, timeout=0)
                began.add(ref)
            except Exception:  # noqa: BLE001 - died before it started
                pass
        with self._lock:
            for t in orphans:
                start, _, info = t._pending or (None, None, None)
                self._refs.pop(start, None)
                self._refs.pop(info, None)
                t._pending = ()
                running = t.state is TaskState.RUNNING or start in began
                if running and t._retries <= 0:
                    self._end_locked(t, ends, error=WorkerLost(
                        f"{t.name}() (Task #{t.id}) was running on worker {name}, which was lost ({reason}); "
                        f"give @gpu_task(max_retries=N) to run it again elsewhere"))
                    continue
                if running:
                    t._retries -= 1
                    self._counts["retried"] += 1
                else:
                    self._counts["moved"] += 1
                t.state, t.started_at = TaskState.WAITING, None
                self._send_locked(t, ends)
        _resolve(ends)

    # ------------------------------------------------------------------ the Task protocol
    def cancel_task(self, task: Task) -> bool:
        """Withdraw a task still waiting at the driver for its dependencies (once sent, it runs)."""
        ends: list = []
        with self._lock:
            if task.state is not TaskState.WAITING:
                return False
            self._end_locked(task, ends, cancel=True)
        _resolve(ends)
        return True

    def synchronize(self, event: Any) -> None:
        """Nothing to do on the driver: a worker returns a result once its stream has finished."""

    def before_wait(self, task: Task) -> None:
        """No wait on the driver can deadlock a worker: nothing to check."""

    # ------------------------------------------------------------------ observing
    def tasks(self) -> list[ClusterTask]:
        """The live tasks (waiting at the driver, queued or running on a worker), oldest first."""
        with self._lock:
            return sorted(self._live.values(), key=lambda t: t.id)

    def actors(self) -> dict[str, Any]:
        """The Ray actor handle of each worker, by name (to call one, or kill one in a test)."""
        return {w.name: w.actor for w in self._workers}

    def workers(self) -> list[dict]:
        """A row per worker (name, device, budget, alive, lost, resident, queued, running)."""
        fresh = {w.name: h for w, h in self._poll("holds", 10)}   # a worker that died: shown by its next call
        with self._lock:
            for w in self._workers:
                h = fresh.get(w.name)
                if h is not None:
                    w.holds = {m: (st, size, load_s, busy) for m, st, size, load_s, busy in h}
            return [self._row_locked(w) for w in self._workers]

    def _row_locked(self, w: _Worker) -> dict:
        """Worker ``w``'s row from what the driver knows (its last report of what it holds; the calls sent to it)."""
        resident = tuple((m, v[1]) for m, v in sorted(w.holds.items()) if v[0] in (policy.RESIDENT, policy.LOADING))
        running = sum(1 for t in w.tasks.values() if t.state is TaskState.RUNNING)
        return dict(name=w.name, device=w.device, budget=w.budget, alive=w.alive, lost=w.lost,
                    resident=resident, queued=len(w.tasks) - running, running=running)

    def observe(self, reader: str, window: float, patience: float = 0.0) -> list[tuple[dict, Any]]:
        """A row per worker (as `workers` gives, from what the driver knows) with that worker's
        last dashboard panel for ``reader`` (a `gpuctx.panel.Panel`; None before its first).

        Never blocks for long: each live worker is asked for a fresh panel only when this reader's
        last request to it has been answered (one in flight per worker and reader), and the
        answers are waited for at most ``patience`` seconds; one that comes later serves the next
        call. Each worker keeps the reader's timeline and reads only its new trace events, so an
        answer is small whatever ran. A worker found dead while asked is marked lost, as a call's
        loss would. The last ``_READERS`` readers are kept.

        Args:
            reader: the reader's name (`gpuctx.panel.PanelReader.key`).
            window: seconds of timeline the panels cover.
            patience: the most seconds to wait for the answers (0: take only those already in).

        Returns:
            ``(row, panel)`` per worker, in the workers' order.
        """
        import ray

        with self._lock:
            seen = self._observers.pop(reader, None) or ({}, {})   # (worker -> ref in flight, worker -> panel)
            self._observers[reader] = seen                         # the most recent last
            while len(self._observers) > _READERS:
                self._observers.pop(next(iter(self._observers)))
            flights, panels = seen
            for w in self._workers:
                if w.alive and w.name not in flights:
                    flights[w.name] = w.actor.panel.remote(reader, window)
            asked = list(flights.items())
        refs = [ref for _, ref in asked]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=patience)[0]) if refs else set()
        lost = []
        for name, ref in asked:
            if ref not in ready:
                continue
            panel = None
            try:
                panel = ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError as exc:
                lost.append((name, _why(exc)))
            except Exception:  # noqa: BLE001 - one bad reading: the last panel stays, the next call asks again
                pass
            with self._lock:
                if flights.get(name) is ref:
                    del flights[name]
                if panel is not None:
                    panels[name] = panel
        for name, reason in lost:
            self._lose(name, reason)
        with self._lock:
            return [(self._row_locked(w), panels.get(w.name) if w.alive else None) for w in self._workers]

    def events(self) -> list[Event]:
        """Every worker's trace events on one clock (wall time), each lane named ``worker/model``,
        for `gpuctx.timeline` and `gpuctx.export_trace` (a lost worker's: the last ones fetched)."""
        for w, ev in self._poll("events", 30):
            if ev is not None:   # else keep what it gave last
                w.events = ev
        out = []
        for w in self._workers:
            offset, events = w.events or (0.0, [])
            lane = lambda x, w=w: None if x is None else f"{w.name}/{x}"  # noqa: E731
            out.extend(replace(e, t=e.t + offset, model=lane(e.model), context=lane(e.context), stream=lane(e.stream))
                       for e in events)
        out.sort(key=lambda e: e.t)
        return out

    @property
    def budget(self) -> int:
        """The sum of the workers' budgets (what the timeline's VRAM panel stacks up against)."""
        return sum(w.budget for w in self._workers)

    def stats(self) -> StatsReport:
        """The sums over the workers, as on one process, plus ``workers`` (each worker's own stats,
        with ``lost``: why it was lost, or None) and ``cluster`` (cross-worker transfers and bytes,
        tasks moved off a lost worker before they started, tasks retried after one)."""
        for w, st in self._poll("stats", 10):
            if st is not None:   # else keep what it said last
                w.stats = st
        per = {w.name: dict(w.stats, lost=w.lost) for w in self._workers}
        models: dict[str, dict] = {}
        for st in per.values():
            for name, m in st.get("models", {}).items():
                into = models.setdefault(name, dict.fromkeys(m, 0))
                for k, v in m.items():
                    into[k] = max(into[k], v) if k.startswith(("wait_", "run_")) else into[k] + v
        total = lambda key: sum(st.get(key, 0) for st in per.values())  # noqa: E731
        return StatsReport(budget=sum(w.budget for w in self._workers),
                           peak_vram=max((st.get("peak_vram", 0) for st in per.values()), default=0),
                           model_switches=total("model_switches"), tasks=total("tasks"), failed=total("failed"),
                           models=models, workers=per, cluster=dict(self._counts))

    # ------------------------------------------------------------------ shutting down
    @property
    def closed(self) -> bool:
        """True once shut down."""
        return self._closed

    def shutdown(self, wait: bool = True, cancel_pending: bool = False, unload: bool = True) -> None:
        """Wait for (or cancel) the tasks, stop every worker, and Ray itself when gpuctx started it."""
        import ray

        if self._closed:
            return
        if not ray.is_initialized():   # Ray went first (its own exit hook): nothing left to stop
            self._closed = True
            return
        if cancel_pending:
            for t in list(self._live.values()):
                t.cancel()
        if wait:
            for t in list(self._live.values()):
                try:
                    Task.exception(t)
                except BaseException:  # noqa: BLE001 - cancelled: ended all the same
                    pass
        with self._lock:
            self._closed = True
            self._wake.set()
        for w in self._workers:
            if w.alive:
                try:
                    ray.get(w.actor.shutdown.remote(), timeout=30)
                    ray.kill(w.actor)
                except Exception:  # noqa: BLE001 - dead already
                    pass
        self._watcher.join(timeout=5)
        if self._own_ray:
            ray.shutdown()


def _why(exc: BaseException) -> str:
    """Why a worker was lost, in one line, from Ray's error."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _resolve(ends: list) -> None:
    """Resolve the ended tasks' futures (outside the lock) and tell their watches."""
    for task, error in ends:
        if error == "cancel":
            if Future.cancel(task):
                Future.set_running_or_notify_cancel(task)
            kind = "cancel"
        elif error is not None:
            Future.set_exception(task, error)
            kind = "exception"
        else:
            task._set_result(task.ref)
            kind = "result"
        if task._watches:
            task._tell_watches(kind)

