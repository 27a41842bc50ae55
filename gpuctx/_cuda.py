"""CudaDevice: a CUDA stream per execution context, events between them, measured sizes,
real memory release on eviction, and offload of torch modules to pinned host memory.

Imported only when CUDA is asked for (``device="auto"`` with CUDA present, or ``"cuda:N"``);
torch is required, CuPy is used only when the user has imported it (we never import it
just to find out), NVML only for the budget.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
from typing import Any, Callable, ContextManager, Iterator

from .device import ReleaseReport, _weak
from .errors import BudgetError
from .units import format_size

__all__ = ["cuda_available", "CudaDevice"]


def cuda_available() -> bool:
    """True when torch sees a CUDA device; never raises."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, or a broken driver: no CUDA
        return False


def _is_oom_exception(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, CuPy's OutOfMemoryError, or a RuntimeError saying 'CUDA out of memory'."""
    for cls in type(exc).__mro__:
        if cls.__name__ == "OutOfMemoryError" and cls.__module__.split(".")[0] in ("torch", "cupy", "cupy_backends"):
            return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def _cupy() -> Any:
    """CuPy if the user imported it, else None."""
    return sys.modules.get("cupy")


class CudaDevice:
    """One CUDA card: streams, events, measured loads, real release, offload to pinned host RAM."""

    def __init__(self, index: int = 0, budget: int | None = None, host_budget: int | None = None) -> None:
        import torch

        if index >= torch.cuda.device_count():
            from .errors import ConfigError

            raise ConfigError(f"device='cuda:{index}': only {torch.cuda.device_count()} CUDA device(s) visible")
        self.index = index
        self.name = f"cuda:{index}"
        self._torch = torch
        self._dev = torch.device("cuda", index)
        self._budget = budget
        self.host_budget = host_budget
        self._host_used = 0
        self._lock = threading.Lock()
        self._streams: dict[str, Any] = {}
        self._limits: dict[str, Any] = {}
        torch.cuda.init()
        torch.zeros(1, device=self._dev)   # create the CUDA context now, so it is counted once, here
        self._nvml = self._init_nvml()

    # ------------------------------------------------------------------ memory view
    def _init_nvml(self) -> Any:
        try:
            import pynvml

            pynvml.nvmlInit()
            return pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:  # noqa: BLE001 - no NVML: fall back to cudaMemGetInfo
            return None

    def _total_and_used(self) -> tuple[int, int]:
        if self._nvml is not None:
            import pynvml

            info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml)
            return int(info.total), int(info.used)
        free, total = self._torch.cuda.mem_get_info(self._dev)
        return int(total), int(total - free)

    def _ours(self) -> int:
        ours = int(self._torch.cuda.memory_reserved(self._dev))
        cp = _cupy()
        if cp is not None:
            ours += int(cp.get_default_memory_pool().total_bytes())
        return ours

    def capacity(self) -> int:
        """Total memory minus what other processes hold (device used minus our own pools)."""
        total, used = self._total_and_used()
        others = max(0, used - self._ours())
        cap = total - others
        return cap if self._budget is None else min(cap, self._budget)

    def free_now(self) -> int:
        """Bytes the driver reports free on the card."""
        free, _ = self._torch.cuda.mem_get_info(self._dev)
        return int(free)

    # ------------------------------------------------------------------ streams and events
    def get_stream(self, context: str) -> Any:
        with self._lock:
            s = self._streams.get(context)
            if s is None:
                s = self._streams[context] = self._torch.cuda.Stream(device=self._dev)
            return s

    @contextlib.contextmanager
    def _scope(self, context: str) -> Iterator[Any]:
        stream = self.get_stream(context)
        torch = self._torch
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.cuda.device(self._dev))
            stack.enter_context(torch.cuda.stream(stream))
            cp = _cupy()
            if cp is not None:
                stack.enter_context(cp.cuda.Device(self.index))
                stack.enter_context(cp.cuda.ExternalStream(stream.cuda_stream))
                pool = self._limits.get(context)
                if pool is not None:
                    stack.enter_context(cp.cuda.using_allocator(pool.malloc))
            yield stream

    def stream_scope(self, context: str) -> ContextManager[Any]:
        return self._scope(context)

    def record_event(self, context: str) -> Any:
        ev = self._torch.cuda.Event()
        ev.record(self.get_stream(context))
        return ev

    def wait_event(self, context: str, event: Any) -> None:
        if event is not None:
            self.get_stream(context).wait_event(event)

    def synchronize(self, event: Any) -> None:
        if event is not None:
            event.synchronize()

    def set_context_limit(self, context: str, nbytes: int) -> None:
        """Hard cap for CuPy allocations made inside ``context`` (needs CuPy imported)."""
        cp = _cupy()
        if cp is None:
            raise BudgetError(f"set_context_limit({context!r}): CuPy is not imported; the cap applies to CuPy only")
        pool = cp.cuda.MemoryPool()
        pool.set_limit(size=nbytes)
        self._limits[context] = pool

    # ------------------------------------------------------------------ load, release
    def load(self, context: str, loader: Callable[[], Any]) -> tuple[Any, int | None]:
        """Run the loader on the context's stream; measured = growth of allocated bytes (torch + CuPy)."""
        torch = self._torch
        torch.cuda.synchronize(self._dev)
        before = self._allocated()
        with self._scope(context) as stream:
            obj = loader()
        stream.synchronize()
        return obj, max(0, self._allocated() - before)

    def _allocated(self) -> int:
        n = int(self._torch.cuda.memory_allocated(self._dev))
        cp = _cupy()
        if cp is not None:
            n += int(cp.get_default_memory_pool().used_bytes())
        return n

    def release(self, name: str, holder: list, expected: int) -> ReleaseReport:
        """Drop the object, gc, empty torch and CuPy caches, then poll until the memory is free again."""
        t0 = time.perf_counter()
        free_before = self.free_now()
        ref = _weak(holder.pop())
        gc.collect()
        self.empty_caches()
        target = free_before + int(expected * 0.9)
        wait = 0.001
        waiter = threading.Event()
        while self.free_now() < target and time.perf_counter() - t0 < 2.0:
            waiter.wait(wait)   # the driver returns memory asynchronously
            wait = min(wait * 2, 0.05)
            self.empty_caches()
        still = ref is not None and ref() is not None
        return ReleaseReport(freed=self.free_now() - free_before, still_referenced=still,
                             seconds=time.perf_counter() - t0)

    # ------------------------------------------------------------------ offload
    def can_offload(self, obj: Any) -> bool:
        return isinstance(obj, self._torch.nn.Module)

    def _tensors(self, module: Any) -> list:
        return list(module.parameters()) + list(module.buffers())

    def offload(self, context: str, obj: Any) -> Any:
        """Copy parameters and buffers to pinned host memory on the context's stream; rebind them."""
        torch = self._torch
        tensors = [t for t in self._tensors(obj) if t.is_cuda]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if self.host_budget is not None and self._host_used + nbytes > self.host_budget:
            raise BudgetError(f"offload: {format_size(nbytes)} would exceed host_budget "
                              f"{format_size(self.host_budget)} ({format_size(self._host_used)} used)")
        stream = self.get_stream(context)
        with torch.cuda.stream(stream):
            for t in tensors:
                host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                host.copy_(t.data, non_blocking=True)
                t.data = host
        stream.synchronize()
        self._host_used += nbytes
        obj._gpuctx_host_bytes = nbytes
        gc.collect()
        self.empty_caches()
        return obj

    def restore(self, context: str, obj: Any) -> Any:
        """Copy an offloaded module back to this card on the context's stream."""
        torch = self._torch
        stream = self.get_stream(context)
        with torch.cuda.stream(stream):
            for t in self._tensors(obj):
                if not t.is_cuda:
                    t.data = t.data.to(self._dev, non_blocking=True)
        stream.synchronize()
        self._host_used -= getattr(obj, "_gpuctx_host_bytes", 0)
        return obj

    # ------------------------------------------------------------------ misc
    def is_oom(self, exc: BaseException) -> bool:
        return _is_oom_exception(exc)

    def empty_caches(self) -> None:
        self._torch.cuda.empty_cache()
        cp = _cupy()
        if cp is not None:
            cp.get_default_memory_pool().free_all_blocks()
            cp.get_default_pinned_memory_pool().free_all_blocks()

    def close(self) -> None:
        with self._lock:
            for s in self._streams.values():
                s.synchronize()
            self._streams.clear()
            self._limits.clear()
