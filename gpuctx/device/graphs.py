"""CUDA graphs per context: capture a task body once per argument signature, replay it after.

Launch-bound work (many small kernels) gains most: a replay is one launch instead of one
per kernel, and replays on separate context streams overlap where eager Python launches
serialise on the host.

How a call runs (``GraphRunner.__call__``):

1. On a CPU device, or with no CUDA tensor among the arguments, ``fn`` runs eagerly.
2. The key is the arguments' signature: shape, dtype, device and requires_grad of every
   tensor, the type and value of everything else, through lists, tuples and dicts; plus
   grad mode, inference mode and autocast. An argument that is neither a tensor nor
   hashable (a NumPy array, say) cannot be keyed: ``fn`` runs eagerly, with one warning.
3. First call for a key: the arguments are copied into static buffers (allocated on the
   context's stream, which reads them at every replay); ``fn`` is warmed up on a side
   stream, as torch requires; then it is captured into a ``torch.cuda.CUDAGraph`` under a
   process-wide lock (one capture at a time, and no ``empty_cache`` during one).
4. Later calls copy the arguments into the static buffers and replay on the context's
   stream (:meth:`GraphRunner.replayable` tells, without running anything, whether a call
   would). Outputs are the graph's static buffers, overwritten by the next replay; with
   ``clone_outputs=True`` (the default) the caller gets clones, which costs one copy per
   output and makes results safe to keep.
5. A body that cannot be captured (a host sync such as ``.item()``, outputs that are not
   CUDA tensors, outputs that require grad, in-place writes to its arguments) runs eagerly
   for that key from then on, with ONE ``RuntimeWarning`` naming the function and the
   reason. An out-of-memory error during capture is raised as is, so the scheduler's
   retry can free memory; an error in the warm-up is the body's own and is raised too.

The cache holds ``cache_size`` graphs, least recently used out first. When the device
reports a new *generation* for the context (its model was loaded, offloaded, restored or
released: weights moved, and graphs bake in their addresses), every graph is dropped.
Non-tensor arguments are baked into a graph: a float that changes every call means a
capture every call (and cache churn), so pass such values as tensors. Python side effects
of ``fn`` happen at warm-up and capture only, never at replay.

torch is imported only when a call has CUDA tensors; importing this module imports neither
torch nor CuPy.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections import OrderedDict
from typing import Any, Callable

from .._walk import collect, replace
from ..errors import ConfigError
from .cuda import _CAPTURE_LOCK, _cupy_view, _torch_stream_calls

__all__ = ["GraphRunner", "make_graph_runner", "WORKER_MODES", "worker_modes"]


class _Unkeyable(TypeError):
    """An argument that is neither a tensor, a list/tuple/dict, nor hashable."""


class _CaptureFailed(Exception):
    """The body cannot stand in as a CUDA graph for this key; the message says why."""


# --------------------------------------------------------------------------- argument structure
def _is_tensor(x: Any) -> bool:
    """Duck-typed torch tensor check, so that keys can be built without importing torch."""
    return hasattr(x, "is_cuda") and hasattr(x, "copy_") and hasattr(x, "shape") and hasattr(x, "dtype")


def _items(d: dict) -> list:
    """A dict's items in a fixed order (by the repr of the key), so that {a, b} and {b, a} key alike."""
    return sorted(d.items(), key=lambda kv: repr(kv[0]))


def _sig(x: Any, tensors: list, tensor_type: Any) -> Any:
    """The key of ``x`` (tensors by shape, dtype, device and requires_grad; other values by type and
    value), appending every tensor to ``tensors`` in visiting order. One walk gives both."""
    if isinstance(x, tensor_type) if tensor_type is not None else _is_tensor(x):
        tensors.append(x)
        return (x.shape, x.dtype, x.get_device() if x.is_cuda else str(x.device), bool(x.requires_grad))
    if isinstance(x, (list, tuple)):
        return (type(x), tuple([_sig(y, tensors, tensor_type) for y in x]))
    if isinstance(x, dict):
        return (type(x), tuple([(k, _sig(v, tensors, tensor_type)) for k, v in _items(x)]))
    try:
        hash(x)
    except TypeError:
        raise _Unkeyable(f"an argument of type {type(x).__name__} is neither a tensor nor hashable") from None
    return ("V", type(x), x)   # the type keeps 1, 1.0 and True apart


def _signature(args: tuple, kwargs: dict, tensor_type: Any = None) -> tuple[tuple, list]:
    """(key, tensors) of a call: the key is hashable, the tensors are in the order :func:`_tensors_in` gives.

    ``tensor_type`` is ``torch.Tensor`` on the hot path (a duck-typed check otherwise). Raises
    ``_Unkeyable`` for an argument that is neither a tensor, a container, nor hashable.
    """
    tensors: list = []
    key = (_sig(tuple(args), tensors, tensor_type), _sig(dict(kwargs), tensors, tensor_type) if kwargs else ())
    return key, tensors


def _graph_key(args: Any, kwargs: Any = None) -> tuple:
    """A hashable signature of the arguments: tensors by shape/dtype/device, other values by type and value."""
    return _signature(tuple(args), dict(kwargs or {}))[0]


def _tensors_in(x: Any) -> list:
    """Every tensor in ``x``, in the order the key visits them (dicts by :func:`_items`)."""
    return collect(x, _is_tensor, items=_items, kinds=(list, tuple, dict))   # what _sig walks


def _map(f: Callable[[Any], Any], x: Any) -> Any:
    """``x`` with every tensor replaced by ``f(tensor)``; containers rebuilt with their own type."""
    return replace(x, _is_tensor, f)


def _current_stream_id(torch: Any, stream: Any) -> int:
    """The id of the current stream on ``stream``'s device, without building a Stream object where torch allows."""
    calls = _torch_stream_calls(torch)
    if calls is not None:
        return calls[0](stream.device_index)[0]
    return torch.cuda.current_stream(stream.device).stream_id


def _clone(t: Any) -> Any:
    return t.clone()


WORKER_MODES = (True, False, (False,))
""":func:`_mode_key` in a fresh thread (a scheduler worker): grad on, no inference mode, no autocast."""


def worker_modes(torch: Any) -> Any:
    """A context that puts this thread in :data:`WORKER_MODES` (a no-op when it is in them already)."""
    if _mode_key(torch) == WORKER_MODES:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.enable_grad())
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


def _mode_key(torch: Any) -> tuple:
    """Grad, inference and autocast modes: a graph captured under one must not replay under another."""
    try:
        autocast: tuple = (torch.is_autocast_enabled("cuda"),)
        if autocast[0]:
            autocast += (torch.get_autocast_dtype("cuda"),)
    except (TypeError, AttributeError):   # torch before the device_type argument
        autocast = (torch.is_autocast_enabled(),)
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast)


def _versions(tensors: list) -> list:
    """Version counters (bumped by in-place writes); None for inference tensors, which keep none."""
    out = []
    for t in tensors:
        try:
            out.append(t._version)
        except RuntimeError:
            out.append(None)
    return out


def _refusal(out: Any, inputs: list, versions: list) -> str | None:
    """Why a captured graph cannot stand in for the body, or None when it can."""
    outs = _tensors_in(out)
    if not outs:
        return f"it returned {type(out).__name__}, not CUDA tensors; a graph can only hand back tensors"
    for t in outs:
        if not t.is_cuda:
            return f"it returned a tensor on {t.device}; graph outputs must be CUDA tensors"
        if t.requires_grad:
            return ("its outputs require grad; graphs here are for inference "
                    "(run the body under torch.no_grad() or torch.inference_mode())")
    if _versions(inputs) != versions:
        return "it modifies its tensor arguments in place; a replay would modify gpuctx's copies instead"
    return None


class _Graph:
    """One captured graph: the graph, its static input buffers (in key order) and its static output."""

    __slots__ = ("graph", "inputs", "output")

    def __init__(self, graph: Any, inputs: list, output: Any) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output


# --------------------------------------------------------------------------- the runner
class GraphRunner:
    """``runner(args, kwargs)``: ``fn(*args, **kwargs)``, captured and replayed as CUDA graphs on ``context``'s stream.

    ``cache``: the captured graphs by key, least recently used first. ``eager_keys``:
    keys whose body could not be captured.
    """

    def __init__(self, fn: Callable[..., Any], *, device: Any, context: str, cache_size: int = 8,
                 clone_outputs: bool = True, warmup: int = 3) -> None:
        if not callable(fn):
            raise ConfigError(f"fn={fn!r}: expected a callable to capture as a CUDA graph")
        if not isinstance(context, str):
            raise ConfigError(f"context={context!r}: expected the context's name (a str)")
        for arg, value in (("cache_size", cache_size), ("warmup", warmup)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{arg}={value!r}: expected an int >= 1")
        if not isinstance(clone_outputs, bool):
            raise ConfigError(f"clone_outputs={clone_outputs!r}: expected True or False")
        self.fn = fn
        self.device = device
        self.context = context
        self.cache_size = cache_size
        self.clone_outputs = clone_outputs
        self.warmup = warmup
        self.cache: OrderedDict[Any, _Graph] = OrderedDict()
        self.eager_keys: set = set()
        self._name = getattr(fn, "__qualname__", None) or repr(fn)
        self._generation: Any = None
        self._side: Any = None
        self._warned_unkeyable = False
        self._cpu = getattr(device, "name", "cpu") == "cpu"
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"GraphRunner({self._name}, context={self.context!r}, graphs={len(self.cache)})"

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        # The hot path of every replay: one walk over the arguments, no stream switch when the
        # caller already runs on the context's stream (the scheduler's case).
        torch = sys.modules.get("torch")
        try:
            found = self._cuda_signature(torch, args, kwargs)
        except _Unkeyable as exc:
            if not any(getattr(t, "is_cuda", False) for t in _tensors_in((args, kwargs))):
                return self.fn(*args, **kwargs)
            if not self._warned_unkeyable:
                self._warned_unkeyable = True
                warnings.warn(f"gpuctx: cannot run {self._name} as a CUDA graph ({exc}); it runs eagerly",
                              RuntimeWarning, stacklevel=2)
            return self.fn(*args, **kwargs)
        if found is None:
            return self.fn(*args, **kwargs)
        sig, tensors = found
        key = (sig, _mode_key(torch))
        with self._lock:
            self._check_generation()
            stream = self.device.get_stream(self.context)
            if _current_stream_id(torch, stream) == stream.stream_id:
                return self._run(torch, key, args, kwargs, tensors, stream)
            caller = torch.cuda.current_stream(stream.device)
            # Called from another stream: order our work after the caller's, and back.
            stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                out = self._run(torch, key, args, kwargs, tensors, stream)
            caller.wait_stream(stream)
            for t in _tensors_in(out):
                if t.is_cuda:
                    t.record_stream(caller)   # its memory is not reused before the caller is done
            return out

    def replayable(self, args: tuple, kwargs: dict, modes: tuple | None = None) -> bool:
        """True when a call with these arguments would only replay a captured graph (no body code runs).

        ``modes``: the grad/inference/autocast modes the call will run under (default: this
        thread's). The scheduler launches such a call in the submitting thread, under the modes
        of a worker thread (:data:`WORKER_MODES`): a replay is one asynchronous launch, not worth
        a hand-off to a worker.
        """
        torch = sys.modules.get("torch")
        try:
            found = self._cuda_signature(torch, args, kwargs)
        except _Unkeyable:
            return False
        if found is None:
            return False
        sig, _ = found
        with self._lock:
            self._check_generation()
            return (sig, _mode_key(torch) if modes is None else modes) in self.cache

    def _cuda_signature(self, torch: Any, args: tuple, kwargs: dict) -> tuple[tuple, list] | None:
        """(key without modes, tensors) of a call that a graph could run; None when it runs eagerly
        anyway (a CPU device, torch never imported, no CUDA tensor). Raises ``_Unkeyable``."""
        if torch is None or self._cpu:
            return None
        sig, tensors = _signature(args, kwargs, torch.Tensor)
        return (sig, tensors) if any(t.is_cuda for t in tensors) else None

    def _check_generation(self) -> None:
        generation = getattr(self.device, "generation", None)
        g = generation(self.context) if generation is not None else 0
        if g != self._generation:
            self.cache.clear()   # the weights moved: addresses baked into the graphs are stale
            self._generation = g

    def _run(self, torch: Any, key: Any, args: tuple, kwargs: dict, tensors: list, stream: Any) -> Any:
        entry = self.cache.get(key)
        if entry is None:
            if key in self.eager_keys:
                return self.fn(*args, **kwargs)
            try:
                entry = self._capture(torch, args, kwargs, stream)
            except _CaptureFailed as exc:
                self.eager_keys.add(key)
                warnings.warn(f"gpuctx: cannot run {self._name} as a CUDA graph for these arguments: {exc}; "
                              "it runs eagerly for them from now on", RuntimeWarning, stacklevel=4)
                return self.fn(*args, **kwargs)
            self.cache[key] = entry
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        else:
            if len(self.cache) > 1:
                self.cache.move_to_end(key)
            for dst, src in zip(entry.inputs, tensors):
                dst.copy_(src, non_blocking=True)
        entry.graph.replay()
        out = entry.output
        if not self.clone_outputs:
            return out
        return out.clone() if _is_tensor(out) else _map(_clone, out)

    def _side_stream(self, torch: Any, stream: Any) -> Any:
        if self._side is None:
            self._side = torch.cuda.Stream(device=stream.device)
        return self._side

    def _capture(self, torch: Any, args: tuple, kwargs: dict, stream: Any) -> _Graph:
        # Static inputs are allocated on the context's stream (current here): replays read them there.
        s_args, s_kwargs = _map(lambda t: t.detach().clone(), (tuple(args), dict(kwargs)))
        inputs = _tensors_in((s_args, s_kwargs))
        versions = _versions(inputs)
        side = self._side_stream(torch, stream)
        side.wait_stream(stream)
        with torch.cuda.stream(side), _cupy_on(side):
            for _ in range(self.warmup):   # errors here are the body's own: they propagate
                self.fn(*s_args, **s_kwargs)
        graph = torch.cuda.CUDAGraph()
        pool = torch.cuda.graph_pool_handle()   # our own id, so a failed capture's pool can be let go
        raised: list[BaseException] = []
        captured = False
        with _CAPTURE_LOCK, warnings.catch_warnings():
            # A body with no kernels captures an empty graph; torch warns, we refuse it with a reason.
            warnings.filterwarnings("ignore", message="The CUDA Graph is empty")
            try:
                # The outer stream scope restores the current stream even when capture_end()
                # raises inside torch.cuda.graph's __exit__ (which then skips its own restore).
                with torch.cuda.stream(side), _cupy_on(side):
                    with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                        try:
                            out = self.fn(*s_args, **s_kwargs)
                        except BaseException as exc:
                            raised.append(exc)
                            raise
                    captured = True   # from here on the graph owns its pool: never release it twice
            except BaseException as exc:
                if not captured:
                    _recover_from_failed_capture(torch, side, pool)
                if not isinstance(exc, Exception):   # KeyboardInterrupt and friends: cleaned up, re-raised
                    raise
                cause = raised[0] if raised else exc
                is_oom = getattr(self.device, "is_oom", None)
                if is_oom is not None and is_oom(cause):
                    raise cause from None   # the scheduler frees memory and retries
                raise _CaptureFailed(f"capture failed ({type(cause).__name__}: {cause})") from exc
        stream.wait_stream(side)
        reason = _refusal(out, inputs, versions)
        if reason is not None:
            raise _CaptureFailed(reason)
        return _Graph(graph, inputs, out)


def _recover_from_failed_capture(torch: Any, side: Any, pool: Any) -> None:
    """Undo what a failed capture leaves behind, so the process keeps working.

    ``CUDAGraph.capture_end()`` raises on a failed ``cudaStreamEndCapture`` before it tells the
    caching allocator that the capture is over, and the graph's destructor releases its
    pool only after a successful capture. Left alone, the allocator believes a capture is
    underway for good and the next ``empty_cache()`` fails an internal assert. So: end any
    capture still open on the side stream, end allocation to the pool, release the pool
    once, and clear the runtime's pending error with a synchronize. Best effort: each step
    may already have happened.
    """
    device = side.device.index
    with torch.cuda.stream(side), contextlib.suppress(Exception):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.CUDAGraph().capture_end()   # ends the open capture, then complains: ignored
    for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        step = getattr(torch._C, name, None)
        if step is not None:
            with contextlib.suppress(Exception):
                step(device, pool)
    with contextlib.suppress(Exception):
        torch.cuda.synchronize(device)
    _reset_generators(torch, side)


def _reset_generators(torch: Any, side: Any) -> None:
    """End the capture mode that a failed capture leaves the CUDA RNG generators in.

    ``capture_begin()`` puts the device's default generator in capture mode and only a
    successful ``capture_end()`` takes it out again; after a failed one every later random
    op in the process fails ("Offset increment outside graph capture encountered
    unexpectedly"). An empty capture that succeeds runs the missing epilogue.
    """
    with torch.cuda.device(side.device), torch.cuda.stream(side), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "the CUDA graph is empty": that is the point
        with contextlib.suppress(Exception):
            empty = torch.cuda.CUDAGraph()
            empty.capture_begin(capture_error_mode="thread_local")
            empty.capture_end()
            del empty


def _cupy_on(stream: Any) -> Any:
    """Make ``stream`` CuPy's current stream too, when CuPy is imported, so CuPy kernels are captured."""
    cp = sys.modules.get("cupy")
    if cp is None or not hasattr(cp, "cuda"):
        return contextlib.nullcontext()
    return _cupy_view(cp, stream.cuda_stream, stream.device.index)


def make_graph_runner(fn: Callable[..., Any], *, device: Any, context: str, cache_size: int = 8,
                      clone_outputs: bool = True, warmup: int = 3) -> GraphRunner:
    """A :class:`GraphRunner` for ``fn`` on ``context``'s stream of ``device``; call it as ``runner(args, kwargs)``."""
    return GraphRunner(fn, device=device, context=context, cache_size=cache_size,
                       clone_outputs=clone_outputs, warmup=warmup)
