"""The user API: `gpu_task`, `model`, `configure`, `wait`, `gather`, contexts, streams.

One scheduler lives per process (per kernel), created on first use with the settings
of `configure()`. Models and contexts are remembered here too, so that after
`shutdown()` the next scheduler knows them again; `reset()` forgets everything.
"""

from __future__ import annotations

import atexit
import inspect
import sys
import threading
from concurrent.futures import ALL_COMPLETED
from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence, TypeVar

import decorator as _decorator

from . import status as _status
from .errors import ConfigError, CycleError, SchedulerClosed
from .models import OVERFLOW_POLICIES, QoS, Slot
from .engine import Config, Scheduler, Session, TaskSpec, current_frame
from .engine.spec import _seconds
from .engine.working import check_sm, check_working
from .task import Task, wait_tasks
from .trace import LoadBars as _LoadBars
from .units import parse_size

__all__ = [
    "configure", "scheduler", "shutdown", "reset", "gpu_task", "model", "current_model", "current_device",
    "wait", "gather", "stats", "status", "evict", "get_stream", "record_event", "wait_event",
    "create_context", "context_session", "get_context_usage", "get_available_vram", "on_memory_pressure",
    "explain", "admit", "session", "timeline", "export_trace", "dashboard", "current_scheduler",
]

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.RLock()
_config = Config()
_sched: Scheduler | None = None
_models: dict[str, dict[str, Any]] = {}      # registrations, replayed into a new scheduler
_contexts: dict[str, dict[str, Any]] = {}
_handlers: list[Callable[..., bool]] = []
_queue_limits: dict[str, tuple] = {}          # @gpu_task(max_queue=..., overflow=...) per model, replayed too
_shut = False                                 # shutdown() called: no new scheduler until configure()/reset()


# --------------------------------------------------------------------------- lifecycle
def current_config() -> Config:
    """The settings in force (what `configure()` last set), for views such as `%config GpuCtx`."""
    return _config


def current_scheduler() -> Scheduler | None:
    """The running scheduler, or None; unlike [`scheduler`][gpuctx.scheduler] it never starts one
    (for views such as the dashboard, which must not start a scheduler by looking)."""
    s = _sched
    return s if s is not None and not s.closed else None


def configure(**settings: Any) -> Config:
    """Change scheduler settings; a running scheduler takes them at once.

    Only the settings named change; the others keep their current values. Every value is
    checked before anything changes, so a refused call changes nothing. After
    [`shutdown`][gpuctx.shutdown], calling this lets the next use start a new scheduler.

    | Setting | Default | Meaning |
    |---|---|---|
    | `budget` | `None` | Bytes of VRAM the scheduler may keep committed (resident weights, context reservations and the working memory of running tasks together): an int, or a string like `"20GB"`. An explicit budget is used as given (no safety factor). `None`: the memory read from the device times `safety_factor` (on a GPU, its memory less what other processes hold; on the CPU, 16 GB). |
    | `safety_factor` | `0.9` | Fraction, in (0, 1], of the memory read from the device that the budget takes; it does not apply to an explicit `budget`. |
    | `device` | `"auto"` | `"auto"` (CUDA device 0 when one is visible, else the CPU), `"cpu"`, `"cuda"` or `"cuda:N"`. Changes only while no model is loaded and no task is live. |
    | `max_wait` | `30.0` | Seconds (a number, or a string like `"500ms"`, `"2s"`, `"1min"`): the floor of the starvation bound between models, and how long a task waits in its model's queue before it goes ahead of higher priorities. |
    | `aging` | `10.0` | Seconds; accepted for compatibility, no longer ranks groups. |
    | `latency_priority` | `10` | Tasks of at least this priority skip batching windows (`batch_wait`). |
    | `keep_alive` | `None` | Seconds a model may stay idle before it is unloaded; `None`: kept until its memory is needed. A model's own `keep_alive` comes first. |
    | `oom_retries` | `1` | How many times a task that runs out of device memory is retried after evicting idle models and emptying the caches (an int >= 0); a task's own `oom_retries` comes first. |
    | `offload` | `True` | On eviction, move a model's weights to pinned host RAM (where the device can) instead of dropping them. |
    | `host_budget` | `None` | Bytes of pinned host RAM that offloaded weights may hold (a size); `None`: no limit. A model that would exceed it is dropped instead. |
    | `prefetch` | `False` | Load (or restore) a model ahead of its work while others compute: when it is the one model not loaded with work waiting on dependencies, and it fits the free memory without evicting anything. Off by default: work that arrives later may need that memory, and evict the prefetched model unused (measured in docs/benchmarks.md). |
    | `trace_capacity` | `100000` | Events the trace keeps (an int >= 1); the oldest go first. |
    | `cpu_workers` | `2` | Threads of the pool that runs CPU-routed tasks (an int >= 1), made at the first such task. |
    | `progress` | `False` | Show tqdm progress bars (`tqdm.auto`: widgets in a notebook, text elsewhere): a model's load from disk and a restore from host RAM (bytes, with the GB/s reached), and [`wait`][gpuctx.wait] (tasks; its default `progress`). Leave it off for scripts and nbval runs. |
    | `share` | `None` | Kernels of this user configured with the same share name keep one budget between them and ask each other to evict idle models (docs: *Sharing a GPU between notebooks*). A name of letters, digits, `.`, `_`, `-`; `None` or `True`: the default share (on a GPU its UUID, on the CPU none); `False`: work alone. |

    Args:
        **settings: the settings to change, by name (see the table); e.g. `budget="20GB"`.

    Returns:
        The settings now in force (a frozen dataclass with one field per setting).

    Raises:
        ConfigError: an unknown setting or a bad value (the message names both); a `device`
            change while models are loaded or tasks are live; a `budget` below the bytes
            committed now (evict models first); a `share` name with path characters.
        ShareError: the share's database is corrupt, owned by another user or readable by
            others (the message names the file and what to do); nothing changed.
    """
    global _config, _shut, _sched
    with _lock:
        new = Config.build(_config, **settings)
        if "device" in settings and new.device != "auto" and new.device != "cpu" and new.cluster is None:
            from .device import make_device

            make_device(new.device, new.budget).close()   # ConfigError now, not at the next call
        if isinstance(settings.get("share"), str):
            from . import share as _share

            _share.probe(settings["share"])   # ShareError now, with nothing changed
        if new.cluster is not None and new.share not in (None, False):
            raise ConfigError(f"configure(cluster={new.cluster!r}, share={new.share!r}): a share is a budget of "
                              "this machine's kernels and a cluster has one engine per GPU; use one or the other")
        running = _sched is not None and not _sched.closed
        if running and _restarts(_config, new):
            fresh = None
            if new.cluster is not None and _config.cluster is None:
                fresh = _start_cluster(new)   # before stopping this process's engine: a failure changes nothing
            old, _sched = _sched, None
            old.shutdown(wait=True)           # a cluster's workers go first: their GPUs are for the new ones
            _sched = fresh
        elif running and new.cluster is None:
            _sched.reconfigure(**settings)
            if "share" in settings:
                _follow_share(_sched, new.share, strict=True)
        if new.cluster is not None and (_sched is None or _sched.closed):
            _sched = _start_cluster(new)      # start the workers now: a bad cluster setting fails here
        _config = new
        _shut = False
        return new


_CLUSTER_SETTINGS = ("cluster", "workers", "budget", "device", "safety_factor")


def _restarts(old: Config, new: Config) -> bool:
    """Whether a change of settings needs a new scheduler: into or out of a cluster, or a cluster's
    workers, budget or device."""
    if old.cluster is None and new.cluster is None:
        return False
    return any(getattr(old, k) != getattr(new, k) for k in _CLUSTER_SETTINGS)


def scheduler() -> Scheduler:
    """The kernel's scheduler, created on first use with the settings of [`configure`][gpuctx.configure].

    A new scheduler gets every model, context and memory-pressure handler registered so far.
    The module-level functions call this; user code rarely needs it.

    Returns:
        The running scheduler (its class is internal; its methods are not public API).

    Raises:
        SchedulerClosed: [`shutdown`][gpuctx.shutdown] was called and neither
            [`configure`][gpuctx.configure] nor [`reset`][gpuctx.reset] has been called since.
    """
    global _sched
    s = _sched
    if s is not None and not s.closed:
        return s
    with _lock:
        if _shut:
            raise SchedulerClosed(
                "the gpuctx scheduler was shut down; call gpuctx.configure(...) or gpuctx.reset() to start a new one"
            )
        if _sched is None or _sched.closed:
            if _config.cluster is not None:
                _sched = _start_cluster(_config)
                return _sched
            s = Scheduler(_config)
            for name, kw in _contexts.items():
                s.create_context(name, **kw)
            for name, kw in _models.items():
                s.register_model(name, **kw)
            for h in _handlers:
                s.on_memory_pressure(h)
            for name, (mq, ov) in _queue_limits.items():
                s.set_queue_limits(name, mq, ov)
            _follow_share(s, _config.share, strict=False)
            s.on_residency(_load_bars)
            _sched = s
        return _sched


def _start_cluster(config: Config) -> Any:
    """The cluster's driver (gpuctx.cluster), with every registration replayed to its workers."""
    if _contexts or _handlers:
        raise ConfigError("configure(cluster='ray'): contexts and memory-pressure handlers are per process; "
                          f"registered: {sorted(_contexts) + [getattr(h, '__name__', repr(h)) for h in _handlers]}; "
                          "call gpuctx.reset() first")
    from .cluster import start

    c = start(config)
    try:
        for name, kw in _models.items():
            c.register_model(name, **kw)
        for name, (mq, ov) in _queue_limits.items():
            c.set_queue_limits(name, mq, ov)
    except BaseException:
        c.shutdown(wait=False, cancel_pending=True)
        raise
    return c


def _follow_share(s: Scheduler, setting: Any, strict: bool) -> None:
    """Join (or leave) the share ``setting`` names; gpuctx.share (and sqlite3) is imported only
    when there is one to join or leave."""
    if s.share is None and (setting is False or (setting in (None, True) and s.device.name == "cpu")):
        return
    from . import share as _share

    _share.follow(s, setting, strict)


def shutdown(wait: bool = True, cancel_pending: bool = False) -> None:
    """Stop the scheduler: no new work is accepted, queued work runs (or is cancelled), every model is unloaded.

    Models, contexts, handlers and settings stay registered. Until [`configure`][gpuctx.configure]
    or [`reset`][gpuctx.reset] is called, submitting work raises
    [`SchedulerClosed`][gpuctx.SchedulerClosed]; after either, the next use starts a new scheduler.

    Args:
        wait: `True` (default): return once every task has ended, the workers have stopped and
            the models are unloaded. `False`: return at once; queued work still runs to the end,
            and the last group to end stops the workers and unloads the models. Called from
            inside gpuctx (a task body, a session, a done-callback) it never waits, since it
            would wait for itself.
        cancel_pending: `True`: cancel every task that has not started (waiting for its
            dependencies or queued); running tasks finish. Default `False`: queued work runs.
    """
    global _sched, _shut
    with _lock:
        s, _sched = _sched, None
        _shut = True
    if s is not None:
        s.shutdown(wait=wait, cancel_pending=cancel_pending)
        if s.share is not None:
            from . import share as _share

            _share.leave(s)


def reset() -> None:
    """Shut down, cancelling queued work, and forget every model, context, handler and setting.

    Waits for running tasks to end. The next use starts a new scheduler with the default settings.
    """
    global _config, _shut
    shutdown(wait=True, cancel_pending=True)
    with _lock:
        _shut = False
        _models.clear()
        _contexts.clear()
        _handlers.clear()
        _queue_limits.clear()
        _config = Config()


atexit.register(lambda: shutdown(wait=False, cancel_pending=True))


def _show_progress() -> bool:
    return _config.progress


_load_bars = _LoadBars(_show_progress)   # every scheduler's residency listener: bars while progress=True


# --------------------------------------------------------------------------- models
def model(name: str, *, vram: int | str | None = None, priority: int = 0, pin: bool = False,
          keep_alive: float | str | None = None, unload: Callable[[Any], Any] | None = None,
          offload: bool | None = None, max_queue: int | None = None,
          overflow: str | None = None, partial: bool = False, working: int | str | None = None,
          sm_share: float | None = None, sm_count: int | None = None) -> Callable[[F], F]:
    """Register the decorated function as the loader of model `name`; it is returned unchanged.

    The loader takes no arguments and returns the model object; it runs when a task of the
    model first needs it resident, not here. Registering a name again (a cell run twice)
    replaces the registration; an object loaded from the old one is evicted once idle.

    Args:
        name: the model's name, which `@gpu_task(model=name)` and contexts refer to.
        vram: the model's size: an int of bytes or a string like `"4.5GB"` or `"512MiB"`;
            `"auto"`: measured at the first load. Default `None`: a task's `vram=`, else what
            the load measures.
        priority: among idle models, the lower priority is evicted first. Default `0`.
        pin: `True`: never evicted (until shutdown). Default `False`.
        keep_alive: seconds idle (a number, or a string like `"5min"`) before the model is
            unloaded. Default `None`: the configured `keep_alive`.
        unload: called with the loaded object before it is dropped (not when it is offloaded);
            an error it raises is a warning. Default `None`.
        offload: whether eviction moves the weights to pinned host RAM instead of dropping
            them. `False`: never. Default `None` (or `True`): when `configure(offload=...)`
            allows it and the device can offload the object (a torch module on a GPU).
        max_queue: the most tasks of this model waiting at once (an int >= 1). Default `None`:
            no limit.
        overflow: what a submit does when the queue is full: `"block"` (wait for room),
            `"reject"` (raise [`Overloaded`][gpuctx.Overloaded]) or `"drop_oldest"` (the oldest
            queued task fails with `Overloaded`). Default `None`: unchanged (initially `"block"`).
        partial: `True`: the model may be larger than what it gets on the card. `vram=` is then
            the bytes it may use there (required): the longest prefix of its layers that fits
            with two streamed layers in flight stays resident, the rest is streamed from pinned
            host memory per forward on two copy streams; `status()` shows the resident
            fraction. The loader returns the model on the host (CPU). For inference: a
            backward pass would keep every streamed layer alive. Where the device cannot
            stream (the CPU device) the whole model is loaded and counted at its measured
            size. Default `False`.
        working: the working memory one task of the model needs while it runs, beyond the
            weights (activations, KV caches): an int of bytes or a string like `"1.5GB"`. The
            ledger charges it from the task's start to its end, so tasks of co-resident models
            that would not fit together take turns. Default `None`: the model's running
            estimate, measured per task on a GPU (the allocator's peak minus what was allocated
            when the task started); on the CPU, 0. A task's own `working=` comes first.
        sm_share: the fraction of the GPU's SMs, in (0, 1], the model's tasks run on. Groups
            whose shares would add up to more than 1.0 do not run at once; models without a
            share use the rest. Enforced with a CUDA green context where torch and the driver
            have them, else accepted with one warning and shown as "not enforced" in
            [`status`][gpuctx.status]. Default `None`: no share.
        sm_count: the same as a number of SMs instead of a fraction (give one of the two).

    Returns:
        A decorator that registers the loader and returns it unchanged.

    Raises:
        ConfigError: a bad argument, or a decorated object that is not callable.
        BudgetError: a declared `vram` (plus `working`) that can never fit in the budget, or
            above the context's `max_vram` (raised when decorating).
    """
    _check_int(priority, "priority")
    if not isinstance(pin, bool):
        raise ConfigError(f"pin={pin!r}: expected True or False")
    ka = None if keep_alive is None else _seconds(keep_alive, "keep_alive")
    if vram is not None and vram != "auto":
        parse_size(vram, arg="vram")
    if unload is not None and not callable(unload):
        raise ConfigError(f"unload={unload!r}: expected a callable taking the loaded object")
    working_b = check_working(working)
    check_sm(sm_share, sm_count, f"model {name!r}")

    def register(loader: F) -> F:
        if not callable(loader):
            raise ConfigError(f"@gpuctx.model({name!r}) must decorate a callable loader, got {loader!r}")
        caller = sys._getframe(1)   # the user's @gpuctx.model line: where warnings about this model point
        origin = (caller.f_code.co_filename, caller.f_lineno, caller.f_globals.get("__name__"), caller.f_globals)
        del caller
        kw = dict(loader=loader, vram=vram, priority=priority, pin=pin, keep_alive=ka, unload=unload,
                  offload=offload, max_queue=max_queue, overflow=overflow, origin=origin, partial=partial,
                  working=working_b, sm_share=sm_share, sm_count=sm_count)
        with _lock:
            scheduler().register_model(name, **kw)
            _models[name] = kw
        return loader

    return register


def current_model() -> Any:
    """The loaded object of the running task's model.

    Returns:
        What the model's loader returned; `None` for a label (a model with no loader) or a
            task routed to the CPU.

    Raises:
        ConfigError: called outside a `@gpu_task` body, a `%%gpuctx` cell or a
            [`context_session`][gpuctx.context_session].
    """
    frame = current_frame()
    if frame is None:
        raise ConfigError("gpuctx.current_model() called outside a gpu_task, %%gpuctx cell or context_session")
    return frame.obj


def current_device() -> str:
    """Where the running task's work should go.

    Returns:
        `"cpu"` or `"cuda:N"`.

    Raises:
        ConfigError: called outside a `@gpu_task` body, a `%%gpuctx` cell or a
            [`context_session`][gpuctx.context_session].
    """
    frame = current_frame()
    if frame is None:
        raise ConfigError("gpuctx.current_device() called outside a gpu_task, %%gpuctx cell or context_session")
    return frame.device


def evict(name: str | None = None) -> list[str]:
    """Evict a model now, or every idle one.

    Args:
        name: the model to evict. Default `None`: every resident model that is idle, not pinned
            and not a label.

    Returns:
        The names evicted; empty when `name` is not resident.

    Raises:
        ConfigError: no model is called `name`, or it is running a task.
    """
    return scheduler().evict(name)


# --------------------------------------------------------------------------- tasks
def _check_int(value: Any, arg: str, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise ConfigError(f"{arg}={value!r}: expected an int" + (f" >= {low}" if low is not None else ""))
    return value


def _check_after(after: Any, where: str) -> tuple:
    if after is None:
        return ()
    if isinstance(after, Task) or hasattr(after, "__gpuctx_spec__"):
        after = [after]
    if not isinstance(after, (list, tuple)):
        raise ConfigError(f"{where}: after={after!r}: expected a list of gpuctx.Task or @gpu_task functions")
    for i, item in enumerate(after):
        if not (isinstance(item, Task) or hasattr(item, "__gpuctx_spec__")):
            raise ConfigError(
                f"{where}: after[{i}]={item!r} ({type(item).__name__}): expected a gpuctx.Task or a @gpu_task function"
            )
    return tuple(after)


def _find_cycle(start: Callable, after: tuple) -> list[str] | None:
    """A cycle of gpu_task functions through ``after=`` edges, starting at ``start``, or None."""
    def edges(fn_after: tuple) -> list:
        return [a for a in fn_after if hasattr(a, "__gpuctx_spec__")]

    path: list = [start]
    seen: set = set()

    def dfs(nodes: list) -> list[str] | None:
        for n in nodes:
            if n.__gpuctx_spec__.fn is start.__gpuctx_spec__.fn:
                return [p.__gpuctx_spec__.name for p in path] + [n.__gpuctx_spec__.name]
            key = id(n.__gpuctx_spec__.fn)
            if key in seen:
                continue
            seen.add(key)
            path.append(n)
            found = dfs(edges(n.__gpuctx_spec__.after))
            if found:
                return found
            path.pop()
        return None

    return dfs(edges(after))


def gpu_task(fn: Callable | None = None, *, model: str | None = None, vram: int | str | None = None,
             priority: int = 0, after: Sequence[Any] | None = None, name: str | None = None,
             device: str | None = None, fallback: str | None = None, batch_size: int | None = None,
             batch_wait: float | str = 0.0, cuda_graph: bool = False, oom_retries: int | None = None,
             max_queue: int | None = None, overflow: str | None = None, working: int | str | None = None,
             max_retries: int = 0) -> Any:
    """Turn a function into schedulable work: calling it returns a [`Task`][gpuctx.Task] at once.

    Use it bare (`@gpu_task`) or with options (`@gpu_task(model="llm", vram="4GB")`). The
    wrapper keeps the function's exact signature: a call with bad arguments raises `TypeError`
    at the call. It also has `fn.options(priority=..., after=[...], vram=..., device=...)`,
    which returns the function with those per-call overrides, and `fn.try_submit(*args)`,
    which never blocks on a full queue (it raises [`Overloaded`][gpuctx.Overloaded] at once).

    Args:
        fn: the function, when used bare as `@gpu_task`; leave it out to give options.
        model: the model or context the task runs in; the body gets the loaded object from
            [`current_model`][gpuctx.current_model]. Default `None`: the context `"default"`.
        vram: the model's size (an int of bytes or a string like `"4GB"`), for a model not
            registered with [`model`][gpuctx.model]. Default `None`: the size known already.
        priority: higher runs first in the model's queue. Default `0`.
        after: Tasks, or `@gpu_task` functions (meaning their calls not yet ended when this
            one is submitted), that must end before this task starts. Default `None`.
        name: the task's name in status, trace and errors. Default `None`: the function's name.
        device: `"cpu"`: run in the CPU pool, outside the VRAM budget. Default `None`: in the
            model's context on the scheduler's device.
        fallback: `"cpu"`: go to the CPU pool when the model cannot fit in the budget (or,
            with a memory-pressure handler registered, cannot be made room for now).
            Default `None`: no fallback.
        batch_size: the most inputs per call of a batched function (an int >= 1). Above 1,
            the function takes exactly one required argument, the list of inputs, and returns
            one result per input; each call `fn(x)` submits one input. Default `None`: 1.
        batch_wait: seconds (a number, or a string like `"5ms"`) to wait for a batch to fill;
            tasks of priority >= `latency_priority` do not wait. Default `0.0`.
        cuda_graph: capture the body as a CUDA graph at the first call and replay it after;
            on the CPU the body just runs. Default `False`.
        oom_retries: retries after an out-of-memory error (an int >= 0). Default `None`: the
            configured `oom_retries`.
        max_queue: the model's queue limit, as in [`model`][gpuctx.model]. Default `None`: unchanged.
        overflow: the model's overflow policy, as in [`model`][gpuctx.model]. Default `None`: unchanged.
        working: the working memory one call needs while it runs, beyond the model's weights
            (an int of bytes or a string like `"1.5GB"`); it overrides the model's `working=`
            and its measured estimate. A batched call is charged it once per batch. Default
            `None`: the model's.
        max_retries: on a cluster (`configure(cluster="ray")`), how many times a call whose
            worker died while it ran is run again on another worker (an int >= 0); `0`: it fails
            with [`WorkerLost`][gpuctx.WorkerLost]. Calls still queued there always move.
            Default `0`, as in Ray.

    Returns:
        The wrapped function, or, without `fn`, a decorator that makes it.

    Raises:
        ConfigError: a bad option, or `batch_size` above 1 for a function that does not take
            exactly one required argument.
    """
    if fn is not None and not callable(fn):
        raise ConfigError(f"gpu_task({fn!r}): expected a function, or keyword arguments only")
    if model is not None and (not isinstance(model, str) or not model):
        raise ConfigError(f"model={model!r}: expected a model name (a non-empty string)")
    vram_b = None if vram is None else parse_size(vram, arg="vram")
    working_b = check_working(working)
    _check_int(priority, "priority")
    after_t = _check_after(after, "gpu_task")
    if device not in (None, "cpu", "gpu"):
        raise ConfigError(f"device={device!r}: expected None (the model's GPU context) or 'cpu'")
    if fallback not in (None, "cpu"):
        raise ConfigError(f"fallback={fallback!r}: expected None or 'cpu'")
    bs = 1 if batch_size is None else _check_int(batch_size, "batch_size", 1)
    bw = _seconds(batch_wait, "batch_wait")
    if not isinstance(cuda_graph, bool):
        raise ConfigError(f"cuda_graph={cuda_graph!r}: expected True or False")
    if oom_retries is not None:
        _check_int(oom_retries, "oom_retries", 0)
    if max_queue is not None:
        _check_int(max_queue, "max_queue", 1)
    _check_int(max_retries, "max_retries", 0)
    if overflow is not None and overflow not in OVERFLOW_POLICIES:
        raise ConfigError(f"overflow={overflow!r}: expected one of {', '.join(OVERFLOW_POLICIES)}")

    def wrap(f: Callable) -> Any:
        if not callable(f):
            raise ConfigError(f"gpu_task(model={model!r})({f!r}): expected a function to decorate")
        if inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f):
            raise ConfigError(f"gpu_task: {getattr(f, '__name__', f)!r} is a generator function; its body would run "
                              "outside the task, when the caller iterates. Return a list (or the result) instead")
        if not inspect.isfunction(f) and not inspect.ismethod(f):
            f = _as_function(f)   # a functools.partial, a callable object: give it a name and a signature
        if bs > 1:
            params = [p for p in inspect.signature(f).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
            if len(params) != 1:
                raise ConfigError(
                    f"gpu_task({f.__name__}, batch_size={bs}): a batched function takes exactly one required "
                    f"argument (the list of inputs); it has {len(params)}"
                )
        spec = TaskSpec(fn=f, name=name or f.__name__, model=model or "default", vram=vram_b, priority=priority,
                        after=after_t, device="cpu" if device == "cpu" else None, fallback=fallback,
                        batch_size=bs, batch_wait=bw, cuda_graph=cuda_graph, oom_retries=oom_retries,
                        working=working_b, max_retries=max_retries)
        if max_queue is not None or overflow is not None:
            with _lock:
                scheduler().set_queue_limits(spec.model, max_queue, overflow)
                old = _queue_limits.get(spec.model, (None, None))
                _queue_limits[spec.model] = (max_queue if max_queue is not None else old[0],
                                             overflow if overflow is not None else old[1])

        sig = inspect.signature(f)
        params = list(sig.parameters.values())
        plain = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        n_max = len(params)
        n_min = sum(1 for p in params if p.default is p.empty)

        def caller(func: Callable, *args: Any, **kwargs: Any) -> Task:
            # The common call (positional arguments only, a count the signature takes) needs no
            # full bind; anything else is bound, so a bad call raises TypeError here, at the call.
            if kwargs or not plain or not (n_min <= len(args) <= n_max):
                _bind(sig, spec.name, args, kwargs)
            return _submit(wrapper, spec, args, kwargs)

        # kwsyntax=True: decorator passes the arguments through untouched (we check them above).
        wrapper = _decorator.decorate(f, caller, kwsyntax=True)
        wrapper.__gpuctx_spec__ = spec

        def options(*, priority: int | None = None, after: Sequence[Any] | None = None,
                    vram: int | str | None = None, device: str | None = None,
                    timeout: float | str | None = None, working: int | str | None = None) -> Callable[..., Task]:
            """This function with per-call overrides: ``fn.options(priority=5)(x)``.

            ``timeout`` (seconds, or a string like ``"2s"``): with ``overflow="block"``, how long a
            call waits for room in a full queue before it raises ``Overloaded``.
            """
            changes: dict[str, Any] = {}
            if priority is not None:
                changes["priority"] = _check_int(priority, "priority")
            if after is not None:
                changes["after"] = spec.after + _check_after(after, f"{spec.name}.options")
            if vram is not None:
                changes["vram"] = parse_size(vram, arg="vram")
            if working is not None:
                changes["working"] = check_working(working)
            if device is not None:
                if device not in ("cpu",):
                    raise ConfigError(f"device={device!r}: expected 'cpu'")
                changes["device"] = device
            over = replace(spec, **changes)
            wait_s = None if timeout is None else _seconds(timeout, "timeout")

            def call(*args: Any, **kwargs: Any) -> Task:
                _bind(sig, spec.name, args, kwargs)
                return _submit(wrapper, over, args, kwargs, timeout=wait_s)

            return call

        def try_submit(*args: Any, **kwargs: Any) -> Task:
            """Submit without ever blocking: raises gpuctx.Overloaded at once when the queue is full."""
            _bind(sig, spec.name, args, kwargs)
            return _submit(wrapper, spec, args, kwargs, block=False)

        wrapper.options = options
        wrapper.try_submit = try_submit
        return wrapper

    return wrap(fn) if fn is not None else wrap


def _bind(sig: inspect.Signature, name: str, args: tuple, kwargs: dict) -> None:
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{name}(): {exc}") from None


def _submit(wrapper: Any, spec: TaskSpec, args: tuple, kwargs: dict, block: bool = True,
            timeout: float | None = None) -> Task:
    if spec.after:
        cycle = _find_cycle(wrapper, spec.after)
        if cycle:
            raise CycleError(f"{spec.name}: after= forms a cycle between gpu_task functions: {' -> '.join(cycle)}")
    try:
        s = scheduler()
    except SchedulerClosed as exc:
        raise SchedulerClosed(f"{spec.name}(): {exc}") from None
    return s.submit(spec, args, kwargs, block=block, timeout=timeout)


def wait(tasks: Iterable[Task] | Task, timeout: float | None = None, return_when: str = ALL_COMPLETED,
         progress: bool | None = None) -> tuple[set[Task], set[Task]]:
    """Wait for tasks, like `concurrent.futures.wait`.

    Args:
        tasks: a [`Task`][gpuctx.Task] or an iterable of them.
        timeout: seconds to wait at most. Default `None`: no limit.
        return_when: `concurrent.futures.ALL_COMPLETED` (default), `FIRST_COMPLETED` or
            `FIRST_EXCEPTION`.
        progress: `True`: show a tqdm progress bar (with `ALL_COMPLETED` only). Default `None`:
            the configured `progress`.

    Returns:
        `(done, not_done)`: two sets of tasks.

    Raises:
        ConfigError: an item is not a [`Task`][gpuctx.Task].
        ValueError: `return_when` is none of the three.
    """
    items = [tasks] if isinstance(tasks, Task) else list(tasks)
    for i, t in enumerate(items):
        if not isinstance(t, Task):
            raise ConfigError(f"wait(): item {i} is {t!r} ({type(t).__name__}); expected a gpuctx.Task")
    show = _config.progress if progress is None else progress
    if show and return_when == ALL_COMPLETED:
        from .trace import progress as _progress

        _progress(items, enabled=True, timeout=timeout)
    return wait_tasks(items, timeout=timeout, return_when=return_when)


def gather(*tasks: Task, timeout: float | None = None) -> list[Any]:
    """The results of tasks, in order.

    Args:
        *tasks: the tasks, or one list or tuple of them.
        timeout: seconds to wait for each task at most. Default `None`: no limit.

    Returns:
        One result per task, in the order given.

    Raises:
        ConfigError: an argument is not a [`Task`][gpuctx.Task].
        TimeoutError: a task did not end within `timeout`.
        WaitDeadlock: called in a task body or session that holds the model a task not yet
            started needs, so the wait could never end.
        Exception: the error of the first failed task, in the order given.
    """
    if len(tasks) == 1 and isinstance(tasks[0], (list, tuple)):
        tasks = tuple(tasks[0])
    for i, t in enumerate(tasks):
        if not isinstance(t, Task):
            raise ConfigError(f"gather(): argument {i} is {t!r} ({type(t).__name__}); expected a gpuctx.Task")
    return [t.result(timeout) for t in tasks]


# --------------------------------------------------------------------------- contexts (PyGPUkit names)
def create_context(name: str, *, max_vram: int | str | None = None, base_vram: int | str | None = None,
                   qos: Any = QoS.BURSTABLE, max_queue: int | None = None, overflow: str | None = None,
                   sm_share: float | None = None, sm_count: int | None = None) -> Slot:
    """Create an execution context (a named slot with a QoS tier) and admit its reservation now.

    A `GUARANTEED` context reserves `max_vram` now; a `BURSTABLE` one reserves `base_vram` and may
    use more up to `max_vram` while there is room; a `BEST_EFFORT` one reserves nothing. Idle
    models of the same or a lower tier are evicted to make room for the reservation.

    Args:
        name: the context's name; tasks run in it with `@gpu_task(model=name)`.
        max_vram: the most bytes the context may use (an int or a string like `"8GB"`); required
            for `GUARANTEED`. Default `None`: no cap.
        base_vram: bytes reserved for a `BURSTABLE` context. Default `None`: 0 (`GUARANTEED`
            reserves `max_vram`; `BEST_EFFORT` must leave it at 0).
        qos: a [`QoS`][gpuctx.QoS] tier or its name. Default `QoS.BURSTABLE`.
        max_queue: the context's queue limit, as in [`model`][gpuctx.model]. Default `None`: no limit.
        overflow: the overflow policy, as in [`model`][gpuctx.model]. Default `None`: `"block"`.
        sm_share: the fraction of the GPU's SMs, in (0, 1], the context's tasks run on. The
            shares of contexts that run at once never add up to more than 1.0 (a group that
            would pass it waits; [`explain`][gpuctx.explain] gives the numbers); contexts
            without a share use the rest. On CUDA the context's stream comes from a green
            context with that many SMs where torch, the driver and the card have them;
            elsewhere (always on the CPU) the share is accepted with one warning, kept for
            admission only, and [`status`][gpuctx.status] shows it as "not enforced".
            Default `None`: no share.
        sm_count: the same as a number of SMs (give one of the two). On a device that does
            not report its SM count (the CPU) it is recorded only, not admitted.

    Returns:
        The context (pass it, or its name, to the other context functions).

    Raises:
        ConfigError: a bad argument, a context of that name exists already, or `max_vram` is
            larger than the budget or below its model's size.
        AdmissionError: the reservation cannot be admitted under the budget.
    """
    kw = dict(max_vram=max_vram, base_vram=base_vram, qos=qos, max_queue=max_queue, overflow=overflow,
              sm_share=sm_share, sm_count=sm_count)
    with _lock:
        ctx = scheduler().create_context(name, **kw)
        _contexts[name] = kw
        return ctx


def _ctx_name(ctx: Any) -> str:
    name = ctx.name if isinstance(ctx, Slot) else ctx
    if not isinstance(name, str):
        raise ConfigError(f"context={ctx!r}: expected a context (from create_context) or its name")
    return name


def context_session(ctx: Any, *, vram: int | str | None = None, priority: int = 0,
                    after: Iterable[Task] = ()) -> Session:
    """A session for `with` or `async with`: the body runs as a task of the context.

    Nothing is requested when the session is made: entering it asks for the context's turn and
    waits for it; the body then runs in the caller's thread, with the context's model resident
    and its stream current, and [`current_model`][gpuctx.current_model] gives the object. Leaving
    the block ends the turn, so the context's queue goes on.

    Args:
        ctx: a context from [`create_context`][gpuctx.create_context], or a model or context name.
        vram: the bytes the body needs (an int or a string like `"2GB"`). Default `None`:
            the size known already.
        priority: the turn's priority in the queue; higher first. Default `0`.
        after: tasks that must end before the turn starts. Default: none.

    Returns:
        The session, to use as `with gpuctx.context_session(ctx) as m:`.

    Raises:
        ConfigError: `ctx` is not a context or a name, or a bad `vram`, `priority` or `after`.
    """
    return scheduler().session(_ctx_name(ctx), vram=vram, priority=priority, after=after)


session = context_session


def get_context_usage(ctx: Any) -> "ContextUsage":
    """The memory use of a context.

    Args:
        ctx: a context from [`create_context`][gpuctx.create_context], or a model or context name.

    Returns:
        The bytes used now, the cap (`max`) and the reservation (`base`).

    Raises:
        ConfigError: no context or model is called that.
    """
    used, mx, base = scheduler().context_usage(_ctx_name(ctx))
    return ContextUsage(used, mx, base)


class ContextUsage:
    """The memory use of a context, from [`get_context_usage`][gpuctx.get_context_usage].

    Attributes:
        used: bytes the context uses now.
        max: the most bytes it may use; `None`: no cap.
        base: bytes reserved for it.
    """

    __slots__ = ("used", "max", "base")

    def __init__(self, used: int, mx: int | None, base: int) -> None:
        self.used, self.max, self.base = used, mx, base

    def __repr__(self) -> str:
        return f"ContextUsage(used={self.used}, max={self.max}, base={self.base})"


def get_available_vram() -> int:
    """Bytes free in the budget now.

    Returns:
        The budget less what is counted or promised to models and contexts now.
    """
    return scheduler().available()


def on_memory_pressure(handler: Callable[[Any, int, int], bool]) -> Callable[[Any, int, int], bool]:
    """Register a handler asked when a request cannot get its memory now, even by evicting.

    Handlers are asked at submit, in the order registered, before anything of the request is
    recorded; they may call gpuctx. Usable as a decorator.

    Args:
        handler: called as `handler(ctx, requested, available)` with the context, the bytes
            requested and the bytes free; `True`: the request waits for room; `False`: it fails
            with [`BudgetError`][gpuctx.BudgetError] at submit.

    Returns:
        `handler`, unchanged.

    Raises:
        ConfigError: `handler` is not callable.
    """
    with _lock:
        scheduler().on_memory_pressure(handler)
        _handlers.append(handler)
    return handler


def explain(ctx: Any, vram: int | str | None = None) -> str:
    """Say whether a request for memory in a context would be admitted now, wait, or be rejected, and why.

    Args:
        ctx: a context from [`create_context`][gpuctx.create_context], or a model or context name.
        vram: the bytes requested (an int or a string like `"4GB"`). Default `None`: the
            context's known size.

    Returns:
        One line that starts with `"admitted now"`, `"admitted after evicting ..."`, `"waits"`
            or `"rejected"`, with the numbers. For a context with an SM share it also gives the
            shares running now and whether this one fits beside them (a share that would take
            the sum above 1.0 makes the answer `"waits"`).
    """
    return scheduler().explain(_ctx_name(ctx), vram)


def admit(ctx: Any, vram: int | str | None = None) -> bool:
    """Whether a request for memory in a context would be admitted now (see [`explain`][gpuctx.explain]).

    Args:
        ctx: a context from [`create_context`][gpuctx.create_context], or a model or context name.
        vram: the bytes requested (an int or a string like `"4GB"`). Default `None`: the
            context's known size.

    Returns:
        `True` when it would be admitted now, or after evicting idle models.
    """
    return explain(ctx, vram).startswith("admitted")


# --------------------------------------------------------------------------- streams
def get_stream(ctx: Any) -> Any:
    """The CUDA stream of a context.

    Args:
        ctx: a context from [`create_context`][gpuctx.create_context], or a model or context name.

    Returns:
        Its `torch.cuda.Stream` (made on first use), or `None` on the CPU.
    """
    return scheduler().device.get_stream(_ctx_name(ctx))


def record_event(ctx: Any) -> Any:
    """Record an event on a context's stream.

    Args:
        ctx: a context from [`create_context`][gpuctx.create_context], or a model or context name.

    Returns:
        The CUDA event, for [`wait_event`][gpuctx.wait_event]; `None` on the CPU.
    """
    return scheduler().device.record_event(_ctx_name(ctx))


def wait_event(ctx: Any, event: Any) -> None:
    """Make a context's stream wait for an event, without blocking the host.

    Args:
        ctx: a context from [`create_context`][gpuctx.create_context], or a model or context name.
        event: an event from [`record_event`][gpuctx.record_event].
    """
    scheduler().device.wait_event(_ctx_name(ctx), event)


# --------------------------------------------------------------------------- observing
def stats() -> Any:
    """Loads, unloads, offloads, evictions, switches, per-model task counts, wait/run percentiles
    (of the tasks that have ended; a task's wait and run times are counted when it ends), and
    ``"overlap"``: how much task runs overlapped, measured (run, busy and overlap seconds,
    ``concurrency`` = run / busy, and ``effective_concurrency``, about 1.0 when runs that looked
    concurrent were serialised underneath; see docs/concepts.md)."""
    s = scheduler()
    return s.stats() if _config.cluster is not None else s.trace.stats.as_dict()


def status() -> "_status.Status":
    """Budget, residents, queues and running tasks, as text (``print``) and HTML (notebook)."""
    s = scheduler()
    return _status.ClusterStatus.of(s) if _config.cluster is not None else _status.Status.of(s)


def timeline(**kwargs: Any) -> Any:
    """Draw the trace as a matplotlib figure: tasks per context over time, loads and evictions, VRAM per model.

    On a cluster, one lane per worker and model (`w0/whisper`), every worker's events on one clock.

    Args:
        **kwargs: passed on to the drawing: `ax` (a matplotlib Axes for the task rows, or a pair
            `(tasks_ax, vram_ax)`; default: a new figure) and `title` (the task panel's title).

    Returns:
        The matplotlib Figure.
    """
    from .trace import timeline as _timeline

    s = scheduler()
    return _timeline(s.events() if _config.cluster is not None else s.trace, budget=s.budget, **kwargs)


def export_trace(path: str) -> None:
    """Write the trace as Chrome trace-event JSON (open it in ui.perfetto.dev or chrome://tracing).

    Args:
        path: the file to write.
    """
    from .trace import export_chrome

    s = scheduler()
    export_chrome(s.events() if _config.cluster is not None else s.trace, path)


def dashboard(interval: float = 0.3, window: float = 30.0) -> Any:
    """A live view of the scheduler in the notebook, refreshed from a background thread.

    The cell returns at once and the view keeps updating while other cells run: the budget as a
    bar coloured by model, each model's state, size, pin, QoS, queue and oldest wait, the last
    loads (bytes, GB/s) and evictions (with their reasons), a timeline of the last `window`
    seconds, and the other kernels or workers when a shared budget or a cluster reports them.
    Refreshes are coalesced: at most one message to the frontend per `interval`, however many
    tasks run. It stops when closed (`d.close()`) and at `%unload_ext gpuctx`. Looking starts no
    scheduler: until one runs, the view says so.

    Args:
        interval: seconds between refreshes (> 0). Default `0.3`.
        window: seconds of history in the timeline (> 0). Default `30`.

    Returns:
        A [`Dashboard`][gpuctx.panel.Dashboard] (Jupyter shows its widget); without
            ipywidgets (the `notebook` extra), a one-line note is printed and the
            [`status`][gpuctx.status] is returned instead.

    Raises:
        ConfigError: `interval` or `window` is not a number of seconds above 0.
    """
    from .panel import open_dashboard

    return open_dashboard(current_scheduler, status, interval, window)


def _as_function(obj: Callable) -> Callable:
    """A plain function calling ``obj``, with its signature and a name (for partials and callable objects)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return obj(*args, **kwargs)

    inner = getattr(obj, "func", obj)
    call.__name__ = call.__qualname__ = getattr(inner, "__name__", type(obj).__name__)
    call.__doc__ = getattr(obj, "__doc__", None)
    try:
        call.__signature__ = inspect.signature(obj)   # type: ignore[attr-defined]
    except (TypeError, ValueError):
        pass
    return call
