"""The one exception hierarchy of gpuctx.

::

    GpuCtxError
     ├── ConfigError          (also ValueError)  a bad argument or setting
     │    └── CycleError                         gpu_task functions ordered after each other
     ├── BudgetError                             VRAM that is not there
     │    └── AdmissionError                     a context that cannot be admitted
     ├── DependencyError                         a dependency failed or was cancelled
     ├── ModelLoadError                          a loader or unloader raised
     ├── GpuOutOfMemory                          out of memory after the retries
     ├── Overloaded                              a queue limit turned the task away
     ├── BatchError                              a batch function broke its contract
     ├── WorkerLost                              a cluster worker died while the task ran
     ├── ShareError                              a share's database cannot be used (path, what to do)
     ├── SchedulerClosed (also RuntimeError)     submit after shutdown
     └── WaitDeadlock (also RuntimeError)        a wait that could never end

Every message names the argument or model, the value, and what was expected.
"""

from __future__ import annotations

__all__ = [
    "GpuCtxError",
    "ConfigError",
    "CycleError",
    "BudgetError",
    "AdmissionError",
    "DependencyError",
    "ModelLoadError",
    "GpuOutOfMemory",
    "Overloaded",
    "BatchError",
    "WorkerLost",
    "SchedulerClosed",
    "ShareError",
    "WaitDeadlock",
]


class GpuCtxError(Exception):
    """Root of every error gpuctx raises on purpose."""


class ConfigError(GpuCtxError, ValueError):
    """An argument or setting has a value gpuctx cannot use."""


class CycleError(ConfigError):
    """``after=`` between gpu_task functions forms a cycle; the message shows it."""


class BudgetError(GpuCtxError):
    """A request for VRAM that the budget can never (or, per a pressure handler, will not) hold."""


class AdmissionError(BudgetError):
    """A context whose reservation cannot be admitted under the budget."""


class DependencyError(GpuCtxError):
    """A dependency of this task failed or was cancelled; ``__cause__`` is its error."""


class ModelLoadError(GpuCtxError):
    """A model's loader (or unloader) raised; ``__cause__`` is the original error."""


class GpuOutOfMemory(GpuCtxError):
    """The device ran out of memory and the retries did not help."""


class Overloaded(GpuCtxError):
    """A model's queue was full and its overflow policy turned this task away."""


class BatchError(GpuCtxError):
    """A batched function returned something other than one result per input."""


class WorkerLost(GpuCtxError):
    """A cluster worker died (its actor or its node) while this task ran there; the message names it."""
class ShareError(GpuCtxError):
    """A share's database (``configure(share=...)``) cannot be used: corrupt, owned by another
    user, or in a directory others can read; the message names the path and what to do."""


class SchedulerClosed(GpuCtxError, RuntimeError):
    """The scheduler was shut down; no new work is accepted."""


class WaitDeadlock(GpuCtxError, RuntimeError):
    """A task body (or session) waits for a task that needs the model it is holding."""
