"""CUDA graphs per context: capture a task body once per input signature, replay it after.

Launch-bound work (many small kernels) gains most: a replay is one launch, and graphs on
separate context streams overlap where eager Python launches serialise. The first call
for a signature (shapes, dtypes, devices of tensor arguments; values of the others)
warms up on a side stream, captures on the context's stream into static input buffers,
and returns clones of the static outputs (so a later replay never overwrites a result
the caller kept). A body that cannot be captured runs eagerly for that signature, with
one warning naming the function and the reason.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable

__all__ = ["make_graph_runner"]


def _graph_key(args: Any, kwargs: Any = None) -> Any:
    """A hashable signature of the arguments: tensors by shape/dtype/device, other values as they are."""

    def key(x: Any) -> Any:
        if hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "device"):
            return ("T", tuple(x.shape), str(x.dtype), str(x.device))
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, tuple(key(y) for y in x))
        if isinstance(x, dict):
            return ("dict", tuple(sorted((k, key(v)) for k, v in x.items())))
        try:
            hash(x)
            return ("V", x)
        except TypeError:
            return ("id", id(x))

    return (key(tuple(args)), key(dict(kwargs or {})))


def _tensors_in(x: Any) -> list:
    if hasattr(x, "copy_") and hasattr(x, "is_cuda"):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors_in(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in _tensors_in(y)]
    return []


def _clone(x: Any) -> Any:
    if hasattr(x, "clone") and hasattr(x, "is_cuda"):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(y) for y in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _static_copy(x: Any) -> Any:
    if hasattr(x, "clone") and hasattr(x, "is_cuda"):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_static_copy(y) for y in x)
    if isinstance(x, dict):
        return {k: _static_copy(v) for k, v in x.items()}
    return x


class _Graph:
    __slots__ = ("graph", "inputs", "output")

    def __init__(self, graph: Any, inputs: Any, output: Any) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output


def make_graph_runner(fn: Callable[..., Any], *, device: Any, context: str, cache_size: int = 8,
                      warmup: int = 3) -> Callable[[tuple, dict], Any]:
    """A callable ``run(args, kwargs)`` that captures/replays ``fn`` on ``context``'s stream."""
    cache: OrderedDict = OrderedDict()
    eager: set = set()
    name = getattr(fn, "__qualname__", repr(fn))

    def run(args: tuple, kwargs: dict) -> Any:
        if getattr(device, "name", "cpu") == "cpu" or not any(t.is_cuda for t in _tensors_in((args, kwargs))):
            return fn(*args, **kwargs)
        key = _graph_key(args, kwargs)
        if key in eager:
            return fn(*args, **kwargs)
        import torch

        entry = cache.get(key)
        stream = device.get_stream(context)
        if entry is None:
            try:
                entry = _capture(torch, fn, args, kwargs, stream, warmup)
            except Exception as exc:  # noqa: BLE001 - anything that breaks capture: run eagerly
                eager.add(key)
                warnings.warn(f"gpuctx: cuda_graph=True for {name}: capture failed ({type(exc).__name__}: {exc}); "
                              "running it eagerly for these inputs", RuntimeWarning, stacklevel=3)
                torch.cuda.synchronize()
                return fn(*args, **kwargs)
            cache[key] = entry
            if len(cache) > cache_size:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        with torch.cuda.stream(stream):
            for dst, src in zip(_tensors_in(entry.inputs), _tensors_in((args, kwargs))):
                dst.copy_(src, non_blocking=True)
            entry.graph.replay()
            return _clone(entry.output)

    run.cache = cache  # type: ignore[attr-defined]
    return run


def _capture(torch: Any, fn: Callable, args: tuple, kwargs: dict, stream: Any, warmup: int) -> _Graph:
    static = _static_copy((args, kwargs))
    s_args, s_kwargs = static
    side = torch.cuda.Stream()
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(*s_args, **s_kwargs)
    stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn(*s_args, **s_kwargs)
    if not _tensors_in(out):
        raise TypeError("the body returned no CUDA tensor to keep as the graph's output")
    return _Graph(graph, static, out)
