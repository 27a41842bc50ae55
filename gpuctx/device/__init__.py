"""Device backends: where memory comes from and where task bodies run.

The scheduler talks to one :class:`Device` (``base``). :class:`CpuDevice` (``cpu``) is the
fallback used with no CUDA (or ``device="cpu"``): the budget is declared, streams and events are
no-ops, and a loaded torch module is measured by its parameter and buffer bytes (shared tensors
once), since there is no allocator to read. ``CudaDevice`` (``cuda``, imported only when CUDA is
asked for) gives each execution context its own CUDA stream shared by torch and CuPy,
records/waits CUDA events between contexts, measures model sizes, releases memory for real on
eviction and offloads weights to pinned host RAM. ``graphs`` captures and replays CUDA graphs.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import DEFAULT_CPU_BUDGET, Device, ReleaseReport, host_bytes, object_tensors, span_bytes
from .cpu import CpuDevice

__all__ = ["Device", "CpuDevice", "ReleaseReport", "make_device", "DEFAULT_CPU_BUDGET", "host_bytes",
           "object_tensors", "span_bytes"]


def make_device(spec: str, budget: int | None) -> Device:
    """Build the device named by ``spec`` (``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``)."""
    if not isinstance(spec, str):
        raise ConfigError(f"device={spec!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if spec == "cpu":
        return CpuDevice(DEFAULT_CPU_BUDGET if budget is None else budget)
    if spec == "auto" or spec == "cuda" or spec.startswith("cuda:"):
        index = 0
        if spec.startswith("cuda:"):
            try:
                index = int(spec[5:])
            except ValueError:
                raise ConfigError(f"device={spec!r}: expected 'cuda:N' with N a card index like 'cuda:0'") from None
        from . import cuda as _cuda

        if not _cuda.cuda_available():
            if spec == "auto":
                return CpuDevice(DEFAULT_CPU_BUDGET if budget is None else budget)
            raise ConfigError(f"device={spec!r}: no CUDA device is visible to torch or CuPy; use device='cpu'")
        return _cuda.CudaDevice(index, budget)
    raise ConfigError(f"device={spec!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
