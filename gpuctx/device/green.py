"""SM partitions for contexts: CUDA green contexts through torch, and why they may be missing.

A green context owns a group of the card's SMs; kernels queued on a stream made from it run on
those SMs only. torch exposes them as ``torch.cuda.green_contexts.GreenContext`` (beta; streams
from it since 2.12), on CUDA 12.4+ drivers. :func:`missing` says in one phrase what is lacking
(torch, its build, its API, the driver), so the "not enforced" note names the cause, never a
false promise. Nothing here is imported unless a context asks for an SM share on CUDA.

Written and guarded, but not run here: the CI machine has no GPU (tests/gpu/test_sm_partition.py
checks disjoint SM sets where one is lent). Separately created green contexts may overlap
(pytorch#195378); that test is what shows whether they do on a given stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["missing", "make_stream", "sm_total", "MIN_DRIVER"]

MIN_DRIVER = 12040   # CUDA 12.4, the first driver API with green contexts


def missing(torch: Any) -> str | None:
    """What the stack lacks for green contexts, or None when torch and the driver have them."""
    if torch is None:
        return "no CUDA-enabled torch (CuPy alone has no green contexts in gpuctx)"
    green_contexts = _module(torch)
    if green_contexts is None:
        return f"torch {torch.__version__} has no torch.cuda.green_contexts (torch 2.10+)"
    if not getattr(green_contexts, "SUPPORTED", False):
        return f"torch {torch.__version__} was built without green context support"
    if not hasattr(green_contexts.GreenContext, "Stream"):
        return f"torch {torch.__version__}'s GreenContext makes no streams (torch 2.12+)"
    driver = _driver_version(torch)
    if driver is not None and driver < MIN_DRIVER:
        return f"the CUDA driver is {driver // 1000}.{driver % 1000 // 10}; green contexts need 12.4+"
    return None


def _module(torch: Any) -> Any:
    """``torch.cuda.green_contexts`` of this torch, or None."""
    found = getattr(torch.cuda, "green_contexts", None)
    if found is not None:
        return found
    try:
        import importlib

        return importlib.import_module(f"{torch.__name__}.cuda.green_contexts")
    except Exception:  # noqa: BLE001 - an older torch
        return None


def _driver_version(torch: Any) -> int | None:
    try:
        return int(torch._C._cuda_getDriverVersion())
    except Exception:  # noqa: BLE001 - a private call: its absence is not a verdict
        return None


def sm_total(torch: Any, cp: Any, index: int) -> int | None:
    """The card's SM count (multiprocessors), or None where it cannot be read."""
    try:
        if torch is not None:
            return int(torch.cuda.get_device_properties(index).multi_processor_count)
        return int(cp.cuda.runtime.getDeviceProperties(index)["multiProcessorCount"])
    except Exception:  # noqa: BLE001
        return None


def make_stream(torch: Any, index: int, num_sms: int) -> tuple[Any, Any]:
    """(green context, its stream) with ``num_sms`` SMs on card ``index``; raises what torch raises."""
    ctx = _module(torch).GreenContext.create(num_sms=num_sms, device_id=index)
    return ctx, ctx.Stream()
