"""CudaDevice: the CUDA backend, imported only when CUDA is asked for.

Each part, and why it is built the way it is:

* **Streams.** Every execution context gets one CUDA stream, made on first use. Inside
  ``stream_scope(context)`` that stream is current for torch and, when the user has
  already imported CuPy, for CuPy too (a CuPy view of the same
  ``cudaStream_t``), so both libraries queue kernels in one order. We never import CuPy
  just to find out; a context whose CuPy allocations need a hard cap gets its own
  ``cupy.cuda.MemoryPool`` with ``set_limit`` (:meth:`CudaDevice.set_context_limit`).
* **Events.** A task records an event on its stream; a consumer in another context makes
  its stream wait on it (``cudaStreamWaitEvent``), so the host never blocks. Only
  ``synchronize`` (what ``Task.result()`` uses) waits on the host.
* **Capacity.** Total and free memory come from NVML (the card is found by UUID, so
  ``CUDA_VISIBLE_DEVICES`` and device ordering cannot mix up cards), or from
  ``cudaMemGetInfo`` without NVML. What other processes hold = device used minus our own
  usage, where ours = torch's reserved pool + CuPy's pools + our CUDA context (measured at
  start). Per-process NVML lists are not used: containers often hide other PIDs.
* **Measured sizes.** A load's size is the growth of bytes allocated *on the context's
  stream* (plus the default stream), read from the caching allocator's snapshot. Other
  contexts allocate on their own streams at the same time, so their tensors do not leak
  into the figure, which a plain ``memory_allocated()`` difference would. We do not route
  loads into a private ``torch.cuda.MemPool``: memory of a live private pool is not given
  back by ``empty_cache()``, and later allocations of the same model (outside the pool)
  would be measured nowhere. Where the snapshot is unavailable we fall back to the
  ``memory_allocated()`` difference.
* **Release.** Drop the object, collect cycles if it is still alive, empty torch's and
  CuPy's caches, then poll the driver's free memory (bounded, small growing waits) until
  the expected bytes are back. A weak reference tells whether someone else still holds it.
* **Offload.** Parameters, buffers and gradients of a torch module are copied to pinned
  host memory on the context's stream, then rebound (``p.data = host``) only once every
  copy succeeded, so a failure leaves the module untouched on the card. ``restore`` is
  the mirror image. ``host_budget`` bounds the pinned bytes held.
* **Working memory.** :meth:`CudaDevice.working_begin` / ``working_end`` bracket a task: the
  allocator's peak during it minus what was allocated when it started (the weights of every
  resident model and live tensors). torch's peak counter is per card, not per stream, so it is
  reset only when no other task is being measured; a task overlapping another's may read the
  other's allocations too (an over-estimate, which makes tasks wait, never run out of memory).
* **SM partitions.** :meth:`CudaDevice.partition` makes a context's stream from a CUDA green
  context with the asked number of SMs (:mod:`gpuctx.device.green`), or says what is missing.
* **CuPy only.** Without a CUDA-enabled torch, CuPy provides streams, events, sizes and
  memory figures; offload and CUDA graphs need torch.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import sys
import threading
import time
import warnings
import weakref
from typing import Any, Callable, ContextManager, Iterator

from ..errors import BudgetError, ConfigError
from ..units import MiB, format_size, parse_size
from .base import ReleaseReport, _tensors, _weak, object_tensors, span_bytes
from .hostcopy import HostCopies, _checksum, _module_items, offload_module, restore_module
from .partial import PartialHandle, place_partial

__all__ = ["cuda_available", "vmm_support", "CudaDevice", "CONTEXT_ESTIMATE", "RELEASE_TIMEOUT"]

CONTEXT_ESTIMATE = 400 * MiB
"""Bytes assumed for our CUDA context when it existed before :class:`CudaDevice` could measure it."""

RELEASE_TIMEOUT = 2.0
"""Seconds :meth:`CudaDevice.release` waits at most for the driver to show the memory free."""

_CONFIRM_FRACTION = 0.9        # freed >= 90% of expected counts as "came back" (rounding, other processes)
_MIN_CONTEXT = 32 * MiB        # a smaller growth at start means the context already existed
_OOM_PACKAGES = ("torch", "cupy", "cupy_backends")
_OOM_MESSAGES = (
    "CUDA out of memory",           # torch's caching allocator
    "CUDA error: out of memory",    # cudaMalloc outside the allocator (cuBLAS, cuDNN handles, pinned memory)
    "cudaErrorMemoryAllocation",    # CuPy's runtime errors
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
)

# torch allows one CUDA-graph capture at a time per process, and the caching allocator must
# not synchronise (empty_cache) while one is underway in another thread. gpuctx.device.graphs holds
# this lock around a capture; empty_caches() holds it too.
_CAPTURE_LOCK = threading.RLock()


# --------------------------------------------------------------------------- discovery
def cuda_available() -> bool:
    """True when torch (or, without a CUDA-enabled torch, CuPy) sees a CUDA device; never raises."""
    return _torch_with_cuda() is not None or _cupy_device_count() > 0


def _torch_with_cuda() -> Any:
    """torch when it is importable and sees a CUDA device, else None."""
    try:
        import torch

        return torch if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - no torch, a CPU build or a broken driver: no CUDA through torch
        return None


def _cupy_device_count() -> int:
    """CUDA devices CuPy's runtime sees; 0 when CuPy is not installed or has no device."""
    try:
        if "cupy" not in sys.modules and importlib.util.find_spec("cupy") is None:
            return 0   # not installed: do not pay for a failing import
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - CuPy without a driver raises its own runtime errors
        return 0


def _imported_cupy() -> Any:
    """CuPy if the user imported it (never imported here), else None."""
    cp = sys.modules.get("cupy")
    return cp if cp is not None and hasattr(cp, "cuda") else None


class _StreamHandle:
    """A raw ``cudaStream_t`` behind the CUDA stream protocol (``__cuda_stream__``), for CuPy's ``from_external``."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def _cupy_view(cp: Any, ptr: int, index: int) -> Any:
    """CuPy's Stream over a stream made elsewhere (torch's): ``Stream.from_external`` where CuPy has
    it (CuPy 14 deprecates ``ExternalStream``), else ``ExternalStream``."""
    from_external = getattr(getattr(cp.cuda, "Stream", None), "from_external", None)
    if from_external is not None:
        try:
            return from_external(_StreamHandle(ptr))
        except Exception:  # noqa: BLE001 - an older protocol: the deprecated class still works
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(ptr, index)


def _torch_stream_calls(torch: Any) -> tuple | None:
    """torch's C functions behind ``torch.cuda.stream``/``device``: (current stream of a device as
    (id, index, type), set the current stream by id, exchange the current device). None where
    this torch lacks one of them (or is a test fake): the public context managers are used then."""
    c = getattr(torch, "_C", None)
    calls = tuple(getattr(c, n, None) for n in ("_cuda_getCurrentStream", "_cuda_setStream", "_cuda_exchangeDevice"))
    return None if None in calls else calls


def _is_oom_exception(exc: BaseException) -> bool:
    """torch's or CuPy's OutOfMemoryError (by class name and package), or a RuntimeError saying so."""
    for cls in type(exc).__mro__:
        if cls.__name__ == "OutOfMemoryError" and cls.__module__.split(".")[0] in _OOM_PACKAGES:
            return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


# --------------------------------------------------------------------------- CUDA virtual memory (cuMem*)
_CU_VMM_ATTRIBUTE = 102   # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED


def _driver_library() -> Any:
    """The CUDA driver library through ctypes (libcuda.so.1, nvcuda.dll), or None where it is absent."""
    import ctypes
    import ctypes.util

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll", ctypes.util.find_library("cuda")):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def vmm_support(index: int = 0, lib: Any = None) -> tuple[bool, str]:
    """Whether card ``index``'s driver offers virtual memory management (cuMemCreate/cuMemMap), and why not.

    This is what would let a restore put weights back at the same virtual addresses, so captured
    CUDA graphs replay without a recapture (vLLM's sleep mode, torch_memory_saver). gpuctx only
    detects it so far: a restore still lands at new addresses and graphs are captured again once
    (``graphs`` drops them when the context's generation changes). ``lib``: the driver library
    (tests pass a fake); found through ctypes when None.
    """
    import ctypes

    lib = _driver_library() if lib is None else lib
    if lib is None:
        return False, "no CUDA driver library (libcuda) found"
    try:
        if lib.cuInit(0) != 0:
            return False, "cuInit failed"
        dev, value = ctypes.c_int(0), ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(dev), int(index)) != 0:
            return False, f"cuDeviceGet({index}) failed"
        if lib.cuDeviceGetAttribute(ctypes.byref(value), _CU_VMM_ATTRIBUTE, dev) != 0:
            return False, "the driver does not know the virtual-memory attribute (too old)"
    except (AttributeError, OSError) as exc:
        return False, f"the driver library lacks an entry point ({exc})"
    if value.value != 1:
        return False, "the device does not support virtual memory management"
    return True, "supported by the driver; not used yet: graphs are captured again after a restore"


# --------------------------------------------------------------------------- NVML, initialised once
_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {}


def _nvml() -> Any:
    """The pynvml module after one successful ``nvmlInit()`` in this process, else None."""
    with _nvml_lock:
        if "module" not in _nvml_state:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_state["module"] = pynvml
            except Exception:  # noqa: BLE001 - no NVML (no driver library, or not installed)
                _nvml_state["module"] = None
        return _nvml_state["module"]


def _uuid_string(raw: Any) -> str:
    """A device UUID as NVML spells it: ``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx``."""
    if isinstance(raw, (bytes, bytearray)):
        h = bytes(raw[:16]).hex()
        text = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
    else:
        text = str(raw)
    return text if text.startswith(("GPU-", "MIG-")) else "GPU-" + text


# --------------------------------------------------------------------------- pure arithmetic
def _capacity(total: int, free: int, ours: int, budget: int | None) -> int:
    """Bytes we may plan with: total minus what others hold (used minus ours), capped by ``budget``."""
    others = max(0, (total - free) - ours)
    cap = max(0, total - others)
    return cap if budget is None else min(cap, budget)


# --------------------------------------------------------------------------- the device
class CudaDevice:
    """One CUDA card: a stream per context, events between them, measured loads, real release,
    offload to pinned host RAM. Every method is thread-safe.

    ``budget`` caps :meth:`capacity`; ``host_budget`` caps the pinned bytes that offloaded
    objects may hold (None: no limit). Both are bytes (or a size string like ``"8GB"``).
    """

    def __init__(self, index: int = 0, budget: int | str | None = None, *,
                 host_budget: int | str | None = None) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ConfigError(f"device index={index!r}: expected a card index like 0 (as in device='cuda:0')")
        torch = _torch_with_cuda()
        cp = None
        if torch is None:
            if _cupy_device_count() == 0:
                raise ConfigError(f"device='cuda:{index}': no CUDA device is visible to torch or CuPy; use device='cpu'")
            import cupy as cp
        count = torch.cuda.device_count() if torch is not None else int(cp.cuda.runtime.getDeviceCount())
        if index >= count:
            raise ConfigError(f"device='cuda:{index}': only {count} CUDA device(s) visible; "
                              f"expected one of {', '.join(f'cuda:{i}' for i in range(count))}")
        self._setup(index, torch, cp, budget, host_budget)
        self._context_bytes = self._start()

    def _setup(self, index: int, torch: Any, cp: Any, budget: Any, host_budget: Any) -> None:
        """Plain state, no CUDA calls (tests build a device on fakes through this)."""
        self.index = index
        self.name = f"cuda:{index}"
        self._torch = torch
        self._cp = cp                                    # set only when CuPy is the runtime (no CUDA torch)
        self._budget = None if budget is None else parse_size(budget, arg="budget")
        self.release_timeout = RELEASE_TIMEOUT
        self._lock = threading.Lock()
        self._streams: dict[str, Any] = {}
        self._cupy_streams: dict[str, Any] = {}
        self._limits: dict[str, Any] = {}               # context -> cupy.cuda.MemoryPool with a limit
        self._generations: dict[str, int] = {}
        self._host = HostCopies(None if host_budget is None else parse_size(host_budget, arg="host_budget"))
        # Pipelined restore is opt-in (set it to pipeline.GROUP_BYTES) until a GPU run measures it:
        # code that reads weights outside a forward would have to synchronize first. None: one
        # copy per restore, done before restore returns.
        self.restore_group_bytes: int | None = None
        self._copy_stream: Any = None
        self._copy_lanes: list = []
        self._partials: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # module -> PartialHandle
        self._nvml_handle: Any = None
        self._per_stream = False
        self._context_bytes = CONTEXT_ESTIMATE
        self._fast = _torch_stream_calls(torch)
        self._known_streams: dict[tuple, Any] = {}
        self.measures_working = torch is not None     # the caching allocator's peak counters
        self._probes = 0                              # tasks being measured now
        self._green: dict[str, Any] = {}             # context -> its green context (kept alive)

    def __repr__(self) -> str:
        return f"CudaDevice({self.name!r}, streams={len(self._streams)}, host_used={format_size(self.host_used)})"

    def _start(self) -> int:
        """Create our CUDA context now, so it is counted once, here; return its estimated size."""
        handle = self._find_nvml_handle()
        before = self._nvml_used(handle)
        if self._torch is not None:
            torch = self._torch
            torch.zeros(1, device=torch.device("cuda", self.index))
            self._per_stream = self._stream_bytes((0,)) is not None
        else:
            with self._cp.cuda.Device(self.index):
                self._cp.cuda.runtime.free(self._cp.cuda.runtime.malloc(1))
        self._nvml_handle = handle
        after = self._nvml_used(handle)
        if before is None or after is None:
            return CONTEXT_ESTIMATE
        grown = after - before - self._pools_reserved()
        return grown if grown >= _MIN_CONTEXT else CONTEXT_ESTIMATE

    # ------------------------------------------------------------------ memory figures
    def _find_nvml_handle(self) -> Any:
        nvml = _nvml()
        if nvml is None:
            return None
        try:
            if self._torch is not None:
                raw = self._torch.cuda.get_device_properties(self.index).uuid
            else:
                raw = self._cp.cuda.runtime.getDeviceProperties(self.index)["uuid"]
            return nvml.nvmlDeviceGetHandleByUUID(_uuid_string(raw))
        except Exception:  # noqa: BLE001 - MIG slices and old drivers: use cudaMemGetInfo instead
            return None

    @staticmethod
    def _nvml_used(handle: Any) -> int | None:
        if handle is None:
            return None
        try:
            return int(_nvml().nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:  # noqa: BLE001
            return None

    def _mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of the card, from NVML where it works, else from the CUDA runtime."""
        handle = self._nvml_handle
        if handle is not None:
            try:
                info = _nvml().nvmlDeviceGetMemoryInfo(handle)
                return int(info.free), int(info.total)
            except Exception:  # noqa: BLE001 - NVML went away: use the runtime from now on
                self._nvml_handle = None
        if self._torch is not None:
            free, total = self._torch.cuda.mem_get_info(self.index)
        else:
            with self._cp.cuda.Device(self.index):
                free, total = self._cp.cuda.runtime.memGetInfo()
        return int(free), int(total)

    def _cupy(self) -> Any:
        return self._cp if self._cp is not None else _imported_cupy()

    def _cupy_pools(self, cp: Any) -> list:
        return [cp.get_default_memory_pool(), *list(self._limits.values())]

    def _pools_reserved(self) -> int:
        """Bytes our allocators hold from the driver (in use or cached)."""
        n = 0
        if self._torch is not None:
            n += int(self._torch.cuda.memory_reserved(self.index))
        cp = self._cupy()
        if cp is not None:
            with cp.cuda.Device(self.index):
                n += sum(int(p.total_bytes()) for p in self._cupy_pools(cp))
        return n

    def capacity(self) -> int:
        """Total memory minus what other processes hold (device used minus our pools and context), capped by budget."""
        free, total = self._mem_info()
        return _capacity(total, free, self._pools_reserved() + self._context_bytes, self._budget)

    def free_now(self) -> int:
        """Bytes the driver reports free on the card right now."""
        return self._mem_info()[0]

    @property
    def host_used(self) -> int:
        """Pinned host bytes held by objects offloaded through this device and by clean copies."""
        return self._host.used

    @property
    def host_budget(self) -> int | None:
        """Bytes of pinned host memory the host copies may hold (None: no limit)."""
        return self._host.budget

    @host_budget.setter
    def host_budget(self, value: int | None) -> None:
        self._host.budget = value

    @property
    def host_copies(self) -> HostCopies:
        """The host copies' bookkeeping: clean copies kept, free evictions and copy-backs counted."""
        return self._host

    # ------------------------------------------------------------------ streams and events
    def get_stream(self, context: str) -> Any:
        """The stream of ``context``, created on first use (a torch stream; a CuPy one without torch)."""
        s = self._streams.get(context)
        if s is None:
            with self._lock:
                s = self._streams.get(context)
                if s is None:
                    s = self._streams[context] = self._new_stream()
        return s

    def _new_stream(self) -> Any:
        if self._torch is not None:
            return self._torch.cuda.Stream(device=self.index)
        with self._cp.cuda.Device(self.index):
            return self._cp.cuda.Stream(non_blocking=True)

    def _stream_ptr(self, stream: Any) -> int:
        return int(stream.cuda_stream if self._torch is not None else stream.ptr)

    def _cupy_stream(self, cp: Any, context: str, stream: Any) -> Any:
        """CuPy's view of ``context``'s stream: the stream itself, or an ExternalStream on torch's."""
        if self._torch is None:
            return stream
        s = self._cupy_streams.get(context)
        if s is None or s.ptr != stream.cuda_stream:
            s = self._cupy_streams[context] = _cupy_view(cp, stream.cuda_stream, self.index)
        return s

    def join_caller(self, event: Any) -> None:
        """Make the calling thread's current stream of this card wait for ``event`` (torch's or CuPy's)."""
        if event is None:
            return
        if self._torch is not None and isinstance(event, self._torch.cuda.Event):
            self._current_stream().wait_event(event)
            return
        cp = self._cupy()
        with cp.cuda.Device(self.index):
            cp.cuda.get_current_stream().wait_event(event)

    def _current_stream(self) -> Any:
        """torch's current stream of this card in the calling thread (a cached Stream object per stream:
        building one costs more than the whole event record)."""
        torch = self._torch
        if self._fast is None:
            return torch.cuda.current_stream(self.index)
        ids = self._fast[0](self.index)
        s = self._known_streams.get(ids)
        if s is None:
            s = self._known_streams[ids] = torch.cuda.Stream(stream_id=ids[0], device_index=ids[1], device_type=ids[2])
        return s

    def stream_scope(self, context: str) -> ContextManager[Any]:
        """Make ``context``'s stream (and this card) current for torch, and for CuPy if imported."""
        return self._scope(context)

    @contextlib.contextmanager
    def _scope(self, context: str) -> Iterator[Any]:
        stream = self.get_stream(context)
        torch = self._torch
        cp = self._cupy()
        if cp is None and self._fast is not None:
            # torch only, the common case: switch device and stream through torch's own C calls
            # (what torch.cuda.device/stream do, without their Python objects): ~2 µs, not ~20.
            get_stream, set_stream, exchange_device = self._fast
            sid, didx, dtype = stream.stream_id, stream.device_index, stream.device_type
            prev_device = exchange_device(self.index)
            prev = get_stream(didx)
            set_stream(stream_id=sid, device_index=didx, device_type=dtype)
            try:
                yield stream
            finally:
                set_stream(stream_id=prev[0], device_index=prev[1], device_type=prev[2])
                exchange_device(prev_device)
            return
        with contextlib.ExitStack() as stack:
            if torch is not None:
                stack.enter_context(torch.cuda.device(self.index))
                stack.enter_context(torch.cuda.stream(stream))
            if cp is not None:
                stack.enter_context(cp.cuda.Device(self.index))
                stack.enter_context(self._cupy_stream(cp, context, stream))
                pool = self._limits.get(context)
                if pool is not None:
                    stack.enter_context(cp.cuda.using_allocator(pool.malloc))
            yield stream

    def record_event(self, context: str) -> Any:
        """Record an event on ``context``'s stream and return it."""
        stream = self.get_stream(context)
        if self._torch is not None:
            event = self._torch.cuda.Event()
        else:
            event = self._cp.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        return event

    def wait_event(self, context: str, event: Any) -> None:
        """Make ``context``'s stream wait for ``event`` (torch's or CuPy's) without blocking the host."""
        if event is None:
            return
        stream = self.get_stream(context)
        torch = self._torch
        if torch is not None and not isinstance(event, torch.cuda.Event) and hasattr(event, "ptr"):
            cp = self._cupy()
            if cp is not None:   # a CuPy event: wait through CuPy's view of the same stream
                self._cupy_stream(cp, context, stream).wait_event(event)
                return
        stream.wait_event(event)

    def synchronize(self, event: Any) -> None:
        """Block the calling thread until ``event`` completed; None is a no-op."""
        if event is not None:
            event.synchronize()

    def record_caller(self) -> Any:
        """Record an event on the calling thread's current stream of this card and return it."""
        if self._torch is not None:
            event = self._torch.cuda.Event()
            event.record(self._current_stream())
            return event
        cp = self._cp
        with cp.cuda.Device(self.index):
            event = cp.cuda.Event(block=False, disable_timing=True)
            event.record(cp.cuda.get_current_stream())
        return event

    def record_stream(self, context: str, value: Any) -> None:
        """Mark the CUDA tensors in ``value`` as used on ``context``'s stream.

        Call it when a tensor made on one context's stream is consumed on another's: the
        caching allocator then does not hand its memory to the producer's stream again
        until the consumer's work queued so far has finished.
        """
        torch = self._torch
        if torch is None:
            return
        stream = self.get_stream(context)
        for t in _tensors(torch, value):
            if t.is_cuda:
                t.record_stream(stream)

    def generation(self, context: str) -> int:
        """A counter bumped whenever ``context``'s model is loaded, released, offloaded or restored.

        CUDA graphs bake in weight addresses; :mod:`gpuctx.device.graphs` drops the graphs of a
        context when its generation changes.
        """
        return self._generations.get(context, 0)

    def _bump(self, context: str) -> None:
        with self._lock:
            self._generations[context] = self._generations.get(context, 0) + 1

    def set_context_limit(self, context: str, nbytes: int | str | None) -> None:
        """Hard cap on CuPy allocations made inside ``context`` (a pool with ``set_limit``); None removes it.

        Needs CuPy imported. torch allocations are not capped (the scheduler's budget covers them).
        """
        cp = self._cupy()
        if cp is None:
            raise ConfigError(f"set_context_limit({context!r}, nbytes={nbytes!r}): the cap applies to CuPy "
                              "allocations and CuPy is not imported; expected `import cupy` first")
        if nbytes is None:
            with self._lock:
                pool = self._limits.pop(context, None)
            if pool is not None:
                pool.free_all_blocks()
            return
        size = parse_size(nbytes, arg="nbytes")
        with self._lock:
            pool = self._limits.get(context)
            if pool is None:
                with cp.cuda.Device(self.index):
                    pool = cp.cuda.MemoryPool()
                self._limits[context] = pool
        with cp.cuda.Device(self.index):
            pool.set_limit(size=size)

    # ------------------------------------------------------------------ load and release
    def load(self, context: str, loader: Callable[[], Any]) -> tuple[Any, int | None]:
        """Run ``loader`` on ``context``'s stream; return the object and the bytes it left allocated."""
        stream = self.get_stream(context)
        watched = (self._stream_ptr(stream), 0)   # the context's stream and the legacy default stream
        before = self._footprint(watched)
        with self.stream_scope(context):
            obj = loader()
        stream.synchronize()   # the load is done (and timed by the scheduler) when the weights are there
        after = self._footprint(watched)
        self._bump(context)
        return obj, max(0, after - before)

    def _footprint(self, watched: tuple[int, ...]) -> int:
        """Bytes allocated on the watched streams (torch) plus bytes in use in CuPy's pools."""
        n = 0
        torch = self._torch
        if torch is not None:
            per_stream = self._stream_bytes(watched) if self._per_stream else None
            n += per_stream if per_stream is not None else int(torch.cuda.memory_allocated(self.index))
        cp = self._cupy()
        if cp is not None:
            with cp.cuda.Device(self.index):
                n += sum(int(p.used_bytes()) for p in self._cupy_pools(cp))
        return n

    def _stream_bytes(self, watched: tuple[int, ...]) -> int | None:
        """Bytes allocated on the given streams of this card, from the allocator snapshot; None if unreadable."""
        torch = self._torch
        try:
            try:
                segments = torch.cuda.memory_snapshot(include_traces=False)
            except TypeError:   # torch before include_traces=
                segments = torch.cuda.memory_snapshot()
            return sum(int(s["allocated_size"]) for s in segments
                       if s.get("device", self.index) == self.index and int(s["stream"]) in watched)
        except Exception:  # noqa: BLE001 - a snapshot format we do not know: measure globally
            return None

    def release(self, name: str, holder: list, expected: int) -> ReleaseReport:
        """Pop the object out of ``holder``, drop it, empty the caches, wait until ``expected`` bytes are free."""
        t0 = time.perf_counter()
        free_before = self.free_now()
        ref = _weak(holder.pop()) if holder else None
        if ref is None or ref() is not None:
            gc.collect()   # reference cycles inside the model keep it alive until collected
        still = ref is not None and ref() is not None
        self.empty_caches()
        self._bump(name)
        free = self.free_now()
        if not still and expected > 0:
            # The driver may show freed memory a little later; wait in small growing steps, bounded.
            target = free_before + int(expected * _CONFIRM_FRACTION)
            deadline = t0 + self.release_timeout
            pause, delay = threading.Event(), 0.001
            while free < target and time.perf_counter() < deadline:
                pause.wait(delay)
                delay = min(2 * delay, 0.05)
                free = self.free_now()
        return ReleaseReport(freed=max(0, free - free_before), still_referenced=still,
                             seconds=time.perf_counter() - t0)

    # ------------------------------------------------------------------ offload to pinned host memory
    def can_offload(self, obj: Any) -> bool:
        """True for torch modules and tensors, and for objects with a ``.to(device)`` method."""
        torch = self._torch
        if torch is None or obj is None or isinstance(obj, type):
            return False
        if isinstance(obj, (torch.nn.Module, torch.Tensor)):
            return True
        return callable(getattr(obj, "to", None))

    def offload(self, context: str, obj: Any) -> Any:
        """Copy ``obj``'s CUDA tensors to pinned host memory on the context's stream; return what restore takes.

        A module restored by :meth:`restore` whose weights did not change since is evicted for
        free: it is pointed back at its clean host copy, nothing is copied (:mod:`.hostcopy`).
        Raises BudgetError when ``host_budget`` would be exceeded, or when the copy fails
        (pinning refused, out of memory); ``obj`` is then unchanged, and the scheduler drops it.
        """
        torch = self._need_torch("offload")
        stream = self.get_stream(context)
        try:
            with torch.cuda.device(self.index), torch.cuda.stream(stream):
                if isinstance(obj, torch.nn.Module):
                    partial = self._partials.pop(obj, None)
                    if partial is not None:   # streamed layers are on the host already; the prefix moves
                        partial.remove()
                    offload_module(self._host, self._transport(stream), context, obj)
                    result = obj
                else:
                    result = self._offload_other(torch, context, obj, stream)
        except BudgetError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: nothing was rebound, the caller drops instead
            raise BudgetError(
                f"offload of {context!r}: copying {format_size(_cuda_bytes(torch, obj))} to pinned host memory "
                f"failed ({type(exc).__name__}: {exc}); expected host memory that can be pinned"
            ) from exc
        self._bump(context)
        return result

    def _offload_other(self, torch: Any, context: str, obj: Any, stream: Any) -> Any:
        """Offload a tensor, or an object with ``.to()``: no clean copy is kept for these."""
        nbytes = _cuda_bytes(torch, obj)
        self._host.reserve(context, id(obj), nbytes)   # reserved now, so two offloads cannot both pass the check
        try:
            if isinstance(obj, torch.Tensor):
                result = _pinned_copy(torch, obj) if obj.is_cuda else obj
            else:
                moved_obj = obj.to("cpu")
                result = obj if moved_obj is None else moved_obj   # some .to() work in place
            stream.synchronize()
        except BaseException:
            self._host.cancel(nbytes)
            raise
        self._host.remember(result, nbytes, None)
        return result

    def restore(self, context: str, obj: Any) -> Any:
        """Copy an offloaded object back to the card; bit-exact.

        A module is copied on the device's copy stream in groups of layers in execution order
        when ``restore_group_bytes`` is set (opt-in; :mod:`.pipeline`) and returns before the copies
        are done: each group's first forward waits for its copy on the GPU, not the host. With
        ``restore_group_bytes=None`` (the default) it waits for the whole copy before returning.
        Its host copy is kept as a clean copy (the next eviction may need no copy back).
        """
        torch = self._need_torch("restore")
        dev = torch.device("cuda", self.index)
        if isinstance(obj, torch.nn.Module):
            with torch.cuda.device(self.index):
                restore_module(self._host, self._transport(self.get_stream(context)), context, obj, dev,
                               self.restore_group_bytes)
            self._bump(context)
            return obj
        stream = self.get_stream(context)
        with torch.cuda.device(self.index), torch.cuda.stream(stream):
            if isinstance(obj, torch.Tensor):
                result = obj if obj.is_cuda else _device_copy(torch, obj, dev)
            else:
                moved_obj = obj.to(dev)
                result = obj if moved_obj is None else moved_obj
        stream.synchronize()   # restore time is load time for the scheduler; and the pinned buffers may go
        self._host.forget(obj)
        self._bump(context)
        return result

    def place_partial(self, context: str, obj: Any, nbytes: int) -> float | None:
        """Run ``obj`` (a torch module on the host, or offloaded) with only part of it on the card.

        The longest prefix of its layers that fits in ``nbytes`` together with two streamed
        layers in flight goes to the card; the rest is pinned and streamed per forward on two
        copy streams (:mod:`.partial`). Returns the resident fraction (1.0: all of it fitted),
        or None (``obj`` unchanged) when not even streaming every layer fits, or ``obj`` is no module.
        """
        torch = self._need_torch("place_partial")
        if not isinstance(obj, torch.nn.Module):
            return None
        stream = self.get_stream(context)
        with self._lock:
            while len(self._copy_lanes) < 2:
                self._copy_lanes.append(torch.cuda.Stream(device=self.index))
        lanes = [_CudaTransport(torch, stream, s) for s in self._copy_lanes]
        self._host.forget(obj)   # an offloaded partial model comes back as a placement, not a restore
        with torch.cuda.device(self.index):
            handle = place_partial(obj, nbytes, lanes, torch.device("cuda", self.index),
                                   pin=lambda t: t if t.is_pinned() else t.pin_memory())
        if handle is None:
            return None
        self._partials[obj] = handle
        self._bump(context)
        return handle.plan.resident_fraction

    def partial_of(self, obj: Any) -> PartialHandle | None:
        """The placement of a partial model (its plan, its streamer), or None."""
        return self._partials.get(obj)

    def _transport(self, stream: Any) -> "_CudaTransport":
        """How a module's tensors move: D2H on ``stream`` (the context's), H2D on the copy stream."""
        with self._lock:
            if self._copy_stream is None:
                self._copy_stream = self._torch.cuda.Stream(device=self.index)
        return _CudaTransport(self._torch, stream, self._copy_stream)

    def _need_torch(self, what: str) -> Any:
        if self._torch is None:
            raise ConfigError(f"{what} on {self.name}: needs torch with CUDA; only CuPy was found")
        return self._torch

    # ------------------------------------------------------------------ working memory, SM partitions
    def working_begin(self, context: str) -> int:
        """Start measuring a task's working memory: reset the peak (when nothing else is measured);
        return the bytes allocated now."""
        torch = self._torch
        with self._lock:
            if not self._probes:
                torch.cuda.reset_peak_memory_stats(self.index)
            self._probes += 1
        return int(torch.cuda.memory_allocated(self.index))

    def working_end(self, context: str, before: int) -> int:
        """The task's working memory: the allocator's peak since :meth:`working_begin` minus ``before``."""
        peak = int(self._torch.cuda.max_memory_allocated(self.index))
        with self._lock:
            self._probes -= 1
        return max(0, peak - before)

    def sm_total(self) -> int | None:
        """The card's SM count."""
        from .green import sm_total

        return sm_total(self._torch, self._cp, self.index)

    def partition(self, context: str, share: float | None, count: int | None) -> tuple[str | bool, str]:
        """Run ``context``'s kernels on ``count`` SMs (or ``share`` of them) from now on: its stream is
        made from a green context. Returns ("enforced (...)", "") or (False, what is missing)."""
        from . import green

        why = green.missing(self._torch)
        total = self.sm_total()
        if why is None and not total:
            why = "the card's SM count cannot be read"
        if why is not None:
            return False, why
        n = count if count is not None else max(1, round(share * total))
        try:
            ctx, stream = green.make_stream(self._torch, self.index, n)
        except Exception as exc:  # noqa: BLE001 - the card or driver refused: say so, run unpartitioned
            return False, f"green context of {n} SMs failed: {type(exc).__name__}: {exc}"
        with self._lock:
            old = self._streams.get(context)
            if old is not None:   # work already queued on the old stream comes first
                stream.wait_stream(old)
            self._green[context] = ctx
            self._streams[context] = stream
            self._cupy_streams.pop(context, None)
        return f"enforced (green context, {n} of {total} SMs)", ""

    # ------------------------------------------------------------------ misc
    def is_oom(self, exc: BaseException) -> bool:
        """True when ``exc`` is an out-of-memory error of torch or CuPy."""
        return _is_oom_exception(exc)

    def empty_caches(self) -> None:
        """Return cached, unused blocks of torch's and CuPy's pools to the driver."""
        if self._torch is not None:
            with _CAPTURE_LOCK:
                self._torch.cuda.empty_cache()
        cp = self._cupy()
        if cp is not None:
            with cp.cuda.Device(self.index):
                for pool in self._cupy_pools(cp):
                    pool.free_all_blocks()
            cp.get_default_pinned_memory_pool().free_all_blocks()

    def close(self) -> None:
        """Wait for every context's queued work, then drop streams and CuPy pools."""
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
            self._cupy_streams.clear()
            greens, self._green = self._green, {}
        for s in streams:
            s.synchronize()
        greens.clear()   # after their streams' work is done
        self.empty_caches()
        with self._lock:
            self._limits.clear()


# --------------------------------------------------------------------------- tensors of an object
def _cuda_bytes(torch: Any, obj: Any) -> int:
    """Bytes of CUDA memory ``obj``'s tensors cover (a module's with gradients, a tensor's, or those one
    level inside an object); tied and aliased tensors once."""
    if isinstance(obj, torch.nn.Module):
        return span_bytes([getattr(o, a) for o, a in _module_items(torch, obj, _on_cuda)])
    return span_bytes([t for t in object_tensors(torch, obj) if t.is_cuda])


def _pinned_copy(torch: Any, t: Any) -> Any:
    """A pinned host copy of ``t``, queued on the current stream (same strides)."""
    host = torch.empty_like(t, device="cpu", pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    return host


def _device_copy(torch: Any, t: Any, dev: Any) -> Any:
    """A device copy of host tensor ``t``, queued on the current stream (same strides)."""
    out = torch.empty_like(t, device=dev)
    out.copy_(t.detach(), non_blocking=t.is_pinned())
    return out


def _on_cuda(t: Any) -> bool:
    return bool(t.is_cuda)


class _CudaTransport:
    """:class:`~gpuctx.device.hostcopy.Transport` on CUDA: device-to-host copies on the context's
    stream into pinned memory; host-to-device copies on the device's copy stream, each destination
    marked as used by the context's stream (the allocator then never hands its block to the copy
    stream again before the context's work on it is done)."""

    def __init__(self, torch: Any, stream: Any, copy_stream: Any) -> None:
        self._torch = torch
        self._stream = stream
        self._copy = copy_stream

    on_device = staticmethod(_on_cuda)

    @staticmethod
    def where(t: Any) -> Any:
        return t.device

    def to_host(self, t: Any) -> Any:
        return _pinned_copy(self._torch, t)

    def to_device(self, t: Any, where: Any) -> Any:
        with self._torch.cuda.stream(self._copy):
            out = _device_copy(self._torch, t, where)
        out.record_stream(self._stream)
        return out

    def fence(self) -> None:
        self._stream.synchronize()
        self._copy.synchronize()

    def mark(self) -> Any:
        event = self._torch.cuda.Event()
        event.record(self._copy)
        return event

    def wait(self, event: Any) -> None:
        torch = self._torch
        if torch.cuda.is_current_stream_capturing():
            event.synchronize()   # a capture may not wait on an event from outside it: wait on the host
        else:
            torch.cuda.current_stream().wait_event(event)

    def done(self) -> Any:
        event = self._torch.cuda.Event()
        event.record(self._torch.cuda.current_stream())
        return event

    @staticmethod
    def block(event: Any) -> None:
        if event is not None:
            event.synchronize()

    def checksum(self, tensors: list) -> Any:
        return _checksum(self._torch, tensors).cpu()   # 16 bytes, and no cross-stream use of the result later

    def same(self, a: Any, b: Any) -> bool:
        return bool(self._torch.equal(a, b))
