"""What every device backend is: the :class:`Device` protocol, and how objects are measured.

The bottom layer of the device package: it imports nothing of gpuctx but units, so the
backends (``cpu``, ``cuda``) and ``graphs`` import it and never each other's package.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol, runtime_checkable

from ..units import GB

__all__ = ["Device", "ReleaseReport", "DEFAULT_CPU_BUDGET", "host_bytes", "object_tensors", "span_bytes"]

DEFAULT_CPU_BUDGET = 16 * GB


@dataclass(frozen=True)
class ReleaseReport:
    """What an unload gave back: bytes confirmed free, and bytes still held by outside references."""

    freed: int | None = None
    still_referenced: bool = False
    seconds: float = 0.0


@runtime_checkable
class Device(Protocol):
    """What the scheduler needs from a device. Every method is thread-safe."""

    name: str

    def capacity(self) -> int:
        """Bytes the scheduler may plan with before the safety factor (declared, or total minus other processes)."""

    def get_stream(self, context: str) -> Any:
        """The stream of ``context`` (created lazily), or ``None`` where streams do not exist."""

    def stream_scope(self, context: str) -> ContextManager[Any]:
        """Make ``context``'s stream current for torch and CuPy in this thread for the ``with`` body."""

    def record_event(self, context: str) -> Any:
        """Record an event on ``context``'s stream and return it (``None`` on CPU)."""

    def wait_event(self, context: str, event: Any) -> None:
        """Make ``context``'s stream wait for ``event`` without blocking the host."""

    def synchronize(self, event: Any) -> None:
        """Block the calling thread until ``event`` has completed."""

    def record_caller(self) -> Any:
        """Record an event on the calling thread's current stream (None on CPU).

        Taken at submit: the task's stream waits on it, so work the caller queued before the
        call (tensors it is still producing on the default stream) is done before the task reads it.
        """

    def record_stream(self, context: str, value: Any) -> None:
        """Mark the device tensors in ``value`` as in use on ``context``'s stream (allocator safety)."""

    def join_caller(self, event: Any) -> None:
        """Make the calling thread's current stream wait for ``event`` (no host sync); None is a no-op.

        Used when a session (``context_session``, a foreground ``%%gpuctx`` cell) ends: what the
        body queued on the context's stream comes before what the caller queues next.
        """

    def load(self, context: str, loader: Callable[[], Any]) -> tuple[Any, int | None]:
        """Run ``loader`` on ``context``'s stream; return the object and the bytes it measurably took."""

    def release(self, name: str, holder: list, expected: int) -> ReleaseReport:
        """Pop the object out of the one-element list ``holder`` (so the caller keeps no reference),
        drop it, free caches, confirm that ``expected`` bytes came back."""

    def can_offload(self, obj: Any) -> bool:
        """True when ``obj`` can be moved to host RAM and back."""

    def offload(self, context: str, obj: Any) -> Any:
        """Move ``obj``'s weights to (pinned) host memory; return what :meth:`restore` takes.

        A device may keep a clean host copy of a restored module and evict it unmodified without
        copying (CudaDevice: :mod:`gpuctx.device.hostcopy`); a modified one is copied back bit-exact.
        """

    def restore(self, context: str, obj: Any) -> Any:
        """Move an offloaded object back to the device.

        It may return before every byte arrived, when the object's own forwards wait for their
        layers on the device (CudaDevice's pipelined restore, :mod:`gpuctx.device.pipeline`).
        A device that can stream part of a model also has ``place_partial(context, obj, nbytes)``
        (returning the resident fraction, or None when it cannot); the engine uses it for
        ``partial=True`` models where it exists, and loads them whole where it does not.
        """

    def is_oom(self, exc: BaseException) -> bool:
        """True when ``exc`` is an out-of-memory error of torch or CuPy."""

    def empty_caches(self) -> None:
        """Return cached but unused blocks of torch and CuPy to the driver."""

    def close(self) -> None:
        """Release streams and pools."""

    # Optional, looked up with getattr (a backend without them neither measures working memory nor
    # partitions SMs): ``measures_working`` (bool) with ``working_begin(context) -> token`` and
    # ``working_end(context, token) -> bytes``, a task's working memory; ``sm_total() -> int | None``;
    # ``partition(context, share, count) -> (enforced description | False, why not)``.


def _weak(obj: Any) -> Any:
    """A weak reference to ``obj``, or None for objects that cannot have one (then nothing is reported)."""
    import weakref

    try:
        return weakref.ref(obj)
    except TypeError:
        return None


# --------------------------------------------------------------------------- tensors of an object
def host_bytes(obj: Any) -> int | None:
    """Bytes of the torch tensors ``obj`` holds (a module's parameters and buffers, a tensor, or tensors
    in a list, tuple, dict or one level inside an object), each memory range counted once: tied
    weights and views share bytes. None when ``obj`` is no torch object (torch is then not imported:
    a module or tensor can only exist once torch is in ``sys.modules``)."""
    torch = sys.modules.get("torch")
    if torch is None or obj is None or isinstance(obj, type):
        return None
    found = object_tensors(torch, obj)
    if not found and not isinstance(obj, torch.nn.Module):
        return None
    return span_bytes(found)


def object_tensors(torch: Any, obj: Any) -> list:
    """Tensors of ``obj``: its own (see :func:`_tensors`), else those one level inside its attributes."""
    found = _tensors(torch, obj)
    if not found and not isinstance(obj, torch.nn.Module) and hasattr(obj, "__dict__"):
        found = [t for v in vars(obj).values() for t in _tensors(torch, v, 3)]
    return found


def _tensors(torch: Any, value: Any, depth: int = 0) -> list:
    """Tensors in ``value``: itself, a module's parameters and buffers, or inside lists, tuples, dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, torch.nn.Module):
        return [*value.parameters(), *value.buffers()]
    if depth > 3:
        return []
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(torch, v, depth + 1)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(torch, v, depth + 1)]
    return []


def span_bytes(tensors: list) -> int:
    """Bytes of memory the tensors cover, each byte once: the union of their address ranges.

    Tied weights (one tensor reachable by two names), aliases (two tensor objects on the same
    memory) and views count once; meta tensors and empty tensors count zero.
    """
    spans = []
    for t in tensors:
        n = t.numel()
        if n == 0 or t.device.type == "meta":
            continue
        ptr = t.data_ptr()
        extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        spans.append((ptr, ptr + extent * t.element_size()))
    total, end = 0, -1
    for lo, hi in sorted(spans):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total
