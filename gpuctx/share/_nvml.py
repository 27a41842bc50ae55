"""NVML's view of the device, set against the share's charges (on a CUDA device only).

The share counts what its kernels *charge*: weights, reservations and working memory, as each
kernel's ledger does. The card holds more than that: processes that are not in the share (a
training script, another user's notebook, a kernel with ``share=False``), and what the kernels
of the share use beyond their charges (their CUDA contexts, the allocator's cache, working
memory nobody declared). Each heartbeat of a kernel on a GPU asks NVML which processes use the
card and how much (``nvmlDeviceGetComputeRunningProcesses``), and :func:`reconcile` (pure)
sets that against the charges per pid:

- memory of processes outside the share shrinks the share's room: claims see at most
  ``total x safety_factor - outside`` (:meth:`Reconciled.room`), written to the database so
  every kernel's next claim sees it;
- a kernel of the share whose real use exceeds its charges by more than ``tolerance`` is named
  in a warning (once, until it is back within it).

NVML reports pids of the host's pid namespace. When this kernel's own pid is not among the
processes NVML lists (a container with its own pid namespace), the pids cannot be matched:
nothing is counted as outside and one warning says so. ``pynvml`` is imported only here, only
for a CUDA device, and only when it is installed; the CPU device never gets this far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["Reconciled", "TOLERANCE", "device_uuid", "nvml_probe", "reconcile"]

# A kernel's real use above its charges that is expected, not a warning: its CUDA context
# (300-600 MB on recent cards) plus the caching allocator's slack.
TOLERANCE = 1024 * 2**20
_NOT_AVAILABLE = (1 << 64) - 1   # NVML_VALUE_NOT_AVAILABLE, as older pynvml versions pass it through


@dataclass(frozen=True)
class Reconciled:
    """What NVML shows against the share's charges."""

    outside: int                                  # bytes used by processes that are not kernels of the share
    over: tuple[tuple[int, int, int], ...] = ()   # (pid, charged, used): real use above charge + tolerance
    matched: bool = True                          # False: this kernel's pid is not in NVML's list (pid namespace)

    def room(self, total: int, safety_factor: float) -> int:
        """Bytes the share may charge on a card of ``total`` bytes: ``total x safety_factor - outside``."""
        return max(0, int(total * safety_factor) - self.outside)


def reconcile(charged: Mapping[int, int], used: Mapping[int, int | None], me: int,
              tolerance: int = TOLERANCE) -> Reconciled:
    """Set NVML's per-process use (``used``: pid -> bytes, None where NVML cannot tell) against the
    share's charges per pid (``charged``: every live kernel of the share, 0 when it charges nothing).

    Args:
        charged: bytes the share charges to each kernel's pid.
        used: bytes NVML reports per pid on the card (``usedGpuMemory``).
        me: this kernel's pid; when NVML does not list it, pids cannot be matched (see the module).
        tolerance: real use above a kernel's charge that is not reported (its context, the cache).

    Returns:
        The bytes used outside the share and the kernels above their charges, pid order.
    """
    if used and me not in used:
        return Reconciled(0, (), matched=False)
    outside = sum(n for pid, n in used.items() if pid not in charged and n)
    over = tuple((pid, charged[pid], n) for pid, n in sorted(used.items())
                 if pid in charged and n is not None and n > charged[pid] + tolerance)
    return Reconciled(outside, over)


def device_uuid(device: Any, nvml: Any = None) -> str | None:
    """The UUID (``GPU-...``) of CUDA ``device`` (its ``name`` is ``cuda:N``): from torch, whose
    index counts ``CUDA_VISIBLE_DEVICES`` as the device's name does, else from NVML (``nvml``, the
    pynvml module initialised, or imported here; its index is the physical one). None when
    neither can tell."""
    name = getattr(device, "name", "")
    if not isinstance(name, str) or not name.startswith("cuda"):
        return None
    index = int(name.partition(":")[2] or 0)
    try:
        import torch

        return "GPU-" + str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # noqa: BLE001 - no CUDA torch: ask NVML
        pass
    nvml = nvml if nvml is not None else load_nvml()
    if nvml is None:
        return None
    try:
        raw = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(index))
    except Exception:  # noqa: BLE001 - no UUID
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def load_nvml() -> Any:
    """The pynvml module, initialised, or None (not installed, or no driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML: nothing to reconcile
        return None
    return pynvml


def nvml_probe(device: Any, nvml: Any = None) -> Callable[[], tuple[int, dict[int, int | None]]] | None:
    """For a CUDA ``device``: a function returning (the card's total bytes, {pid: bytes used}) from
    NVML; None on any other device, or where NVML or the card's handle cannot be had.

    ``nvml`` is the pynvml module (tests pass a fake); by default it is imported here.
    """
    name = getattr(device, "name", "")
    if not isinstance(name, str) or not name.startswith("cuda"):
        return None   # the CPU device: never import pynvml
    nvml = nvml if nvml is not None else load_nvml()
    if nvml is None:
        return None
    uuid = device_uuid(device, nvml)
    try:
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:  # noqa: BLE001 - a MIG slice, an old driver: no per-process view
        return None

    def probe() -> tuple[int, dict[int, int | None]]:
        total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        used: dict[int, int | None] = {}
        for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            n = getattr(p, "usedGpuMemory", None)
            n = None if n is None or n == _NOT_AVAILABLE else int(n)
            pid = int(p.pid)
            if pid in used:   # listed twice (one entry per context): add, unknown stays unknown
                n = None if n is None or used[pid] is None else used[pid] + n
            used[pid] = n
        return total, used

    return probe
