"""The CPU device: a declared budget, no streams, no events; torch modules measured by their bytes."""

from __future__ import annotations

import contextlib
import gc
from typing import Any, Callable, ContextManager

from .base import DEFAULT_CPU_BUDGET, ReleaseReport, _weak, host_bytes

__all__ = ["CpuDevice"]


class CpuDevice:
    """No GPU: a declared budget, no streams, no events; torch objects measured by their tensors' bytes."""

    measures_working = False   # working memory is declared only on the CPU

    def __init__(self, budget: int = DEFAULT_CPU_BUDGET) -> None:
        self.name = "cpu"
        self._budget = budget

    def capacity(self) -> int:
        return self._budget

    def get_stream(self, context: str) -> None:
        return None

    def stream_scope(self, context: str) -> ContextManager[None]:
        return contextlib.nullcontext()

    def record_event(self, context: str) -> None:
        return None

    def wait_event(self, context: str, event: Any) -> None:
        return None

    def synchronize(self, event: Any) -> None:
        return None

    def record_caller(self) -> None:
        return None

    def record_stream(self, context: str, value: Any) -> None:
        return None

    def join_caller(self, event: Any) -> None:
        return None

    def load(self, context: str, loader: Callable[[], Any]) -> tuple[Any, int | None]:
        """Run ``loader``; measure what it returned by its tensors' bytes (None when it holds no torch tensors)."""
        obj = loader()
        return obj, host_bytes(obj)

    def release(self, name: str, holder: list, expected: int) -> ReleaseReport:
        ref = _weak(holder.pop())
        if ref is not None and ref() is not None:
            gc.collect()   # reference cycles inside the model
        return ReleaseReport(freed=None, still_referenced=ref is not None and ref() is not None)

    def can_offload(self, obj: Any) -> bool:
        return False

    def offload(self, context: str, obj: Any) -> Any:
        return obj

    def restore(self, context: str, obj: Any) -> Any:
        return obj

    def is_oom(self, exc: BaseException) -> bool:
        return type(exc).__name__ in ("OutOfMemoryError",) or isinstance(exc, MemoryError)

    def empty_caches(self) -> None:
        return None

    def sm_total(self) -> None:
        return None

    def partition(self, context: str, share: float | None, count: int | None) -> tuple[bool, str]:
        """No SMs to partition: an SM share is bookkeeping only."""
        return False, "the CPU device has no SMs (bookkeeping only)"

    def close(self) -> None:
        return None
