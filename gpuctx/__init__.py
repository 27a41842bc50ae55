"""gpuctx: run several ML models on one GPU from a notebook.

Declare work with ``@gpu_task(model=..., vram=...)``; a kernel-resident scheduler groups
calls by model, keeps resident models within a VRAM budget by evicting idle ones, honours
dependencies and priorities, and runs each context on its own CUDA stream. With no GPU
the same code runs on the CPU with a declared budget. ``%load_ext gpuctx`` adds the
``%%gpuctx`` cell magic and ``%gpuctx`` line magics.

This module is the whole public API (``__all__``); it imports no torch, CuPy or NVML.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:   # annotations only: importing gpuctx does not import IPython's shell
    from IPython.core.interactiveshell import InteractiveShell

from .api import (
    ContextUsage,
    admit,
    configure,
    context_session,
    create_context,
    current_device,
    current_model,
    dashboard,
    evict,
    explain,
    export_trace,
    gather,
    get_available_vram,
    get_context_usage,
    get_stream,
    gpu_task,
    model,
    on_memory_pressure,
    record_event,
    reset,
    scheduler,
    shutdown,
    stats,
    status,
    timeline,
    wait,
    wait_event,
)
from .errors import (
    AdmissionError,
    BatchError,
    BudgetError,
    ConfigError,
    CycleError,
    DependencyError,
    GpuCtxError,
    GpuOutOfMemory,
    ModelLoadError,
    Overloaded,
    SchedulerClosed,
    ShareError,
    WaitDeadlock,
    WorkerLost,
)
from .models import QoS
from .task import Task, TaskState
from .units import GB, GiB, KB, KiB, MB, MiB, TB, TiB, format_size, parse_size

__version__ = "0.1.0"

__all__ = [
    # lifecycle and configuration
    "configure", "scheduler", "shutdown", "reset",
    # declaring work
    "gpu_task", "model", "current_model", "current_device", "Task", "TaskState",
    # waiting
    "wait", "gather",
    # memory
    "evict", "create_context", "context_session", "get_context_usage", "ContextUsage", "get_available_vram",
    "on_memory_pressure", "explain", "admit", "QoS",
    # streams and events
    "get_stream", "record_event", "wait_event",
    # observing
    "stats", "status", "timeline", "export_trace", "dashboard",
    # sizes
    "parse_size", "format_size", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB",
    # errors
    "GpuCtxError", "ConfigError", "CycleError", "BudgetError", "AdmissionError", "DependencyError",
    "ModelLoadError", "GpuOutOfMemory", "Overloaded", "BatchError", "SchedulerClosed", "ShareError", "WaitDeadlock",
    "WorkerLost",
    "load_ipython_extension", "unload_ipython_extension", "__version__",
]


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """`%load_ext gpuctx`: register the magics and attach the scheduler to the shell.

    Args:
        ipython: the IPython shell loading the extension (IPython passes it).
    """
    from .magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """`%unload_ext gpuctx`: remove the magics, shut the scheduler down, release models.

    Args:
        ipython: the IPython shell unloading the extension (IPython passes it).
    """
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)
