"""The user API: ``gpu_task``, ``model``, ``configure``, ``wait``, ``gather``, contexts, streams.

One scheduler lives per process (per kernel), created on first use with the settings
of :func:`configure`. Models and contexts are remembered here too, so that after
:func:`shutdown` the next scheduler knows them again; :func:`reset` forgets everything.
"""

from __future__ import annotations

import atexit
import inspect
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
from .task import Task, wait_tasks
from .units import parse_size

__all__ = [
    "configure", "scheduler", "shutdown", "reset", "gpu_task", "model", "current_model", "current_device",
    "wait", "gather", "stats", "status", "evict", "get_stream", "record_event", "wait_event",
    "create_context", "context_session", "get_context_usage", "get_available_vram", "on_memory_pressure",
    "explain", "admit", "session", "timeline", "export_trace",
]

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.RLock()
_config = Config()
_sched: Scheduler | None = None
_models: dict[str, dict[str, Any]] = {}      # registrations, replayed into a new scheduler
_contexts: dict[str, dict[str, Any]] = {}
_handlers: list[Callable[..., bool]] = []
_shut = False                                 # shutdown() called: no new scheduler until configure()/reset()


# --------------------------------------------------------------------------- lifecycle
def current_config() -> Config:
    """The settings in force (what :func:`configure` last set), for views such as ``%config GpuCtx``."""
    return _config


def configure(**settings: Any) -> Config:
    """Set scheduler settings; applies to the running scheduler at once where safe.

    ``budget`` (size, default: device memory, or 16 GB on CPU), ``safety_factor`` (0.9),
    ``device`` ("auto", "cpu", "cuda", "cuda:N"), ``max_wait`` (floor of the starvation bound,
    and how long a task waits before it goes ahead of higher priorities in its queue, s),
    ``aging`` (accepted; no longer ranks groups), ``latency_priority``, ``keep_alive`` (s or None),
    ``oom_retries``, ``offload``, ``host_budget``, ``trace_capacity``, ``cpu_workers``,
    ``progress``.
    """
    global _config, _shut
    with _lock:
        new = Config.build(_config, **settings)
        if _sched is not None and not _sched.closed:
            _sched.reconfigure(**settings)
        _config = new
        _shut = False
        return new


def scheduler() -> Scheduler:
    """The kernel's scheduler, created on first use; after :func:`shutdown`, only once configure()/reset() ran."""
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
            s = Scheduler(_config)
            for name, kw in _contexts.items():
                s.create_context(name, **kw)
            for name, kw in _models.items():
                s.register_model(name, **kw)
            for h in _handlers:
                s.on_memory_pressure(h)
            _sched = s
        return _sched


def shutdown(wait: bool = True, cancel_pending: bool = False) -> None:
    """Stop the scheduler: wait for (or cancel) queued work, unload every model. Registrations are kept."""
    global _sched, _shut
    with _lock:
        s, _sched = _sched, None
        _shut = True
    if s is not None:
        s.shutdown(wait=wait, cancel_pending=cancel_pending)


def reset() -> None:
    """Shut down, cancelling queued work, and forget every model, context, handler and setting."""
    global _config, _shut
    shutdown(wait=True, cancel_pending=True)
    with _lock:
        _shut = False
        _models.clear()
        _contexts.clear()
        _handlers.clear()
        _config = Config()


atexit.register(lambda: shutdown(wait=False, cancel_pending=True))


# --------------------------------------------------------------------------- models
def model(name: str, *, vram: int | str | None = None, priority: int = 0, pin: bool = False,
          keep_alive: float | str | None = None, unload: Callable[[Any], Any] | None = None,
          offload: bool | None = None, max_queue: int | None = None,
          overflow: str | None = None) -> Callable[[F], F]:
    """Register the decorated function as the loader of model ``name``; returns it unchanged.

    ``vram``: declared size ("4.5GB", "512MiB", bytes) or "auto" (measured at first load).
    ``pin``: never evicted. ``keep_alive``: seconds idle before it is unloaded.
    ``unload(obj)``: called before the object is dropped. ``offload``: move weights to host RAM
    on eviction (default: when the object is a torch module). ``max_queue``/``overflow``:
    queue limit and policy ("block", "reject", "drop_oldest").
    """
    _check_int(priority, "priority")
    if not isinstance(pin, bool):
        raise ConfigError(f"pin={pin!r}: expected True or False")
    ka = None if keep_alive is None else _seconds(keep_alive, "keep_alive")
    if vram is not None and vram != "auto":
        parse_size(vram, arg="vram")
    if unload is not None and not callable(unload):
        raise ConfigError(f"unload={unload!r}: expected a callable taking the loaded object")

    def register(loader: F) -> F:
        if not callable(loader):
            raise ConfigError(f"@gpuctx.model({name!r}) must decorate a callable loader, got {loader!r}")
        kw = dict(loader=loader, vram=vram, priority=priority, pin=pin, keep_alive=ka, unload=unload,
                  offload=offload, max_queue=max_queue, overflow=overflow)
        with _lock:
            scheduler().register_model(name, **kw)
            _models[name] = kw
        return loader

    return register


def current_model() -> Any:
    """The loaded object of the running task's model (None for a label or a CPU-routed task)."""
    frame = current_frame()
    if frame is None:
        raise ConfigError("gpuctx.current_model() called outside a gpu_task, %%gpuctx cell or context_session")
    return frame.obj


def current_device() -> str:
    """``"cpu"`` or ``"cuda:N"``: where the running task's work should go."""
    frame = current_frame()
    if frame is None:
        raise ConfigError("gpuctx.current_device() called outside a gpu_task, %%gpuctx cell or context_session")
    return frame.device


def evict(name: str | None = None) -> list[str]:
    """Evict model ``name`` now (or every idle, unpinned model); returns the names evicted."""
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
             max_queue: int | None = None, overflow: str | None = None) -> Any:
    """Turn a function into schedulable work: calling it returns a :class:`Task` at once.

    ``model``: the model/context it runs in (``current_model()`` gives the loaded object).
    ``vram``: the model's size, for a model not registered with ``@gpuctx.model``.
    ``priority``: higher first. ``after``: Tasks or gpu_task functions to run after.
    ``device="cpu"``: run in the CPU pool outside the budget; ``fallback="cpu"``: go there when
    the model cannot fit. ``batch_size``/``batch_wait``: the function takes a list of inputs and
    returns a list. ``cuda_graph``: capture and replay the body as a CUDA graph.
    The wrapper keeps the exact signature: a bad call raises TypeError at the call.
    Per-call overrides: ``fn.options(priority=..., after=[...])(args)``; ``fn.try_submit(args)``
    never blocks on a full queue.
    """
    if fn is not None and not callable(fn):
        raise ConfigError(f"gpu_task({fn!r}): expected a function, or keyword arguments only")
    if model is not None and (not isinstance(model, str) or not model):
        raise ConfigError(f"model={model!r}: expected a model name (a non-empty string)")
    vram_b = None if vram is None else parse_size(vram, arg="vram")
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
    if overflow is not None and overflow not in OVERFLOW_POLICIES:
        raise ConfigError(f"overflow={overflow!r}: expected one of {', '.join(OVERFLOW_POLICIES)}")

    def wrap(f: Callable) -> Any:
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
                        batch_size=bs, batch_wait=bw, cuda_graph=cuda_graph, oom_retries=oom_retries)
        if max_queue is not None or overflow is not None:
            scheduler().set_queue_limits(spec.model, max_queue, overflow)

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
                    vram: int | str | None = None, device: str | None = None) -> Callable[..., Task]:
            """This function with per-call overrides: ``fn.options(priority=5)(x)``."""
            changes: dict[str, Any] = {}
            if priority is not None:
                changes["priority"] = _check_int(priority, "priority")
            if after is not None:
                changes["after"] = spec.after + _check_after(after, f"{spec.name}.options")
            if vram is not None:
                changes["vram"] = parse_size(vram, arg="vram")
            if device is not None:
                if device not in ("cpu",):
                    raise ConfigError(f"device={device!r}: expected 'cpu'")
                changes["device"] = device
            over = replace(spec, **changes)

            def call(*args: Any, **kwargs: Any) -> Task:
                _bind(sig, spec.name, args, kwargs)
                return _submit(wrapper, over, args, kwargs)

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


def _submit(wrapper: Any, spec: TaskSpec, args: tuple, kwargs: dict, block: bool = True) -> Task:
    if spec.after:
        cycle = _find_cycle(wrapper, spec.after)
        if cycle:
            raise CycleError(f"{spec.name}: after= forms a cycle between gpu_task functions: {' -> '.join(cycle)}")
    return scheduler().submit(spec, args, kwargs, block=block)


def wait(tasks: Iterable[Task] | Task, timeout: float | None = None, return_when: str = ALL_COMPLETED,
         progress: bool | None = None) -> tuple[set[Task], set[Task]]:
    """Wait for tasks like ``concurrent.futures.wait``; ``progress=True`` shows a tqdm bar."""
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
    """Results of ``tasks`` in order; raises the first error met."""
    if len(tasks) == 1 and isinstance(tasks[0], (list, tuple)):
        tasks = tuple(tasks[0])
    for i, t in enumerate(tasks):
        if not isinstance(t, Task):
            raise ConfigError(f"gather(): argument {i} is {t!r} ({type(t).__name__}); expected a gpuctx.Task")
    return [t.result(timeout) for t in tasks]


# --------------------------------------------------------------------------- contexts (PyGPUkit names)
def create_context(name: str, *, max_vram: int | str | None = None, base_vram: int | str | None = None,
                   qos: Any = QoS.BURSTABLE, max_queue: int | None = None, overflow: str | None = None) -> Slot:
    """Create an execution context; GUARANTEED reserves ``max_vram`` now, BURSTABLE ``base_vram``."""
    kw = dict(max_vram=max_vram, base_vram=base_vram, qos=qos, max_queue=max_queue, overflow=overflow)
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
    """``with``/``async with``: wait for the context's turn, run the body on its stream with its model resident."""
    return scheduler().session(_ctx_name(ctx), vram=vram, priority=priority, after=after)


session = context_session


def get_context_usage(ctx: Any) -> "ContextUsage":
    """Used, max and base bytes of a context."""
    used, mx, base = scheduler().context_usage(_ctx_name(ctx))
    return ContextUsage(used, mx, base)


class ContextUsage:
    """``used``, ``max`` (None: no cap) and ``base`` bytes of a context."""

    __slots__ = ("used", "max", "base")

    def __init__(self, used: int, mx: int | None, base: int) -> None:
        self.used, self.max, self.base = used, mx, base

    def __repr__(self) -> str:
        return f"ContextUsage(used={self.used}, max={self.max}, base={self.base})"


def get_available_vram() -> int:
    """Bytes free in the budget now."""
    return scheduler().available()


def on_memory_pressure(handler: Callable[[Any, int, int], bool]) -> Callable[[Any, int, int], bool]:
    """Register ``handler(ctx, requested, available) -> bool`` (True: the request waits; False: it fails)."""
    with _lock:
        scheduler().on_memory_pressure(handler)
        _handlers.append(handler)
    return handler


def explain(ctx: Any, vram: int | str | None = None) -> str:
    """Say whether a request of ``vram`` in ``ctx`` would be admitted now, wait, or be rejected, and why."""
    return scheduler().explain(_ctx_name(ctx), vram)


def admit(ctx: Any, vram: int | str | None = None) -> bool:
    """True when a request of ``vram`` in ``ctx`` would start now (see :func:`explain`)."""
    return explain(ctx, vram).startswith("admitted")


# --------------------------------------------------------------------------- streams
def get_stream(ctx: Any) -> Any:
    """The CUDA stream of a context (torch.cuda.Stream), or None on CPU."""
    return scheduler().device.get_stream(_ctx_name(ctx))


def record_event(ctx: Any) -> Any:
    """Record an event on the context's stream (None on CPU)."""
    return scheduler().device.record_event(_ctx_name(ctx))


def wait_event(ctx: Any, event: Any) -> None:
    """Make the context's stream wait for ``event`` (no host sync)."""
    scheduler().device.wait_event(_ctx_name(ctx), event)


# --------------------------------------------------------------------------- observing
def stats() -> Any:
    """Loads, unloads, offloads, evictions, switches, per-model task counts, wait/run percentiles
    (of the tasks that have ended; a task's wait and run times are counted when it ends)."""
    return scheduler().trace.stats.as_dict()


def status() -> "_status.Status":
    """Budget, residents, queues and running tasks, as text (``print``) and HTML (notebook)."""
    return _status.Status.of(scheduler())


def timeline(**kwargs: Any) -> Any:
    """A matplotlib figure: tasks per context over time, loads/evictions, VRAM stacked per model."""
    from .trace import timeline as _timeline

    s = scheduler()
    return _timeline(s.trace, budget=s.budget, **kwargs)


def export_trace(path: str) -> None:
    """Write the trace as Chrome trace-event JSON (open in ui.perfetto.dev or chrome://tracing)."""
    from .trace import export_chrome

    export_chrome(scheduler().trace, path)
