"""The CUDA backend on a machine without CUDA: discovery, errors, pure helpers, and CudaDevice on fakes."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import sys
import warnings
from types import SimpleNamespace

import pytest

import gpuctx
from gpuctx.device import cuda as _cuda
from gpuctx.device import CpuDevice, make_device
from gpuctx.device.graphs import (
    GraphRunner,
    _graph_key,
    _tensors_in,
    _Unkeyable,
    make_graph_runner,
)

no_cuda = pytest.mark.skipif(_cuda.cuda_available(), reason="this machine has CUDA")


# --------------------------------------------------------------------------- discovery and errors
def test_cuda_available_never_raises():
    assert _cuda.cuda_available() in (True, False)


@no_cuda
def test_cuda_available_is_false_here():
    assert _cuda.cuda_available() is False


def test_cuda_available_survives_a_broken_torch(monkeypatch):
    torch = pytest.importorskip("torch")

    def broken() -> bool:
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    assert _cuda._torch_with_cuda() is None
    assert _cuda.cuda_available() in (True, False)   # CuPy may still answer; nothing raises


@no_cuda
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(gpuctx.ConfigError, match="device='cpu'"):
        make_device("cuda:0", None)
    with pytest.raises(gpuctx.ConfigError, match="device='cpu'"):
        make_device("cuda", None)
    assert make_device("auto", None).name == "cpu"


def test_bad_cuda_index_spelling():
    with pytest.raises(gpuctx.ConfigError, match="cuda:x"):
        make_device("cuda:x", None)


@pytest.mark.parametrize("index", [-1, "0", 1.0, True])
def test_bad_index_for_cuda_device(index):
    with pytest.raises(gpuctx.ConfigError, match="index="):
        _cuda.CudaDevice(index)


def test_importing_the_backend_imports_neither_cupy_nor_torch():
    code = ("import sys, gpuctx, gpuctx.device.cuda, gpuctx.device.graphs, gpuctx.device; "
            "print(sorted(m for m in ('cupy', 'torch', 'pynvml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- pure helpers
def test_oom_recognition_by_class_name_and_message():
    torch_oom = type("OutOfMemoryError", (RuntimeError,), {"__module__": "torch"})
    torch_cuda_oom = type("OutOfMemoryError", (RuntimeError,), {"__module__": "torch.cuda"})
    cupy_oom = type("OutOfMemoryError", (MemoryError,), {"__module__": "cupy.cuda.memory"})
    subclass = type("MyOom", (cupy_oom,), {"__module__": "mylib"})
    other = type("OutOfMemoryError", (RuntimeError,), {"__module__": "mylib"})
    assert _cuda._is_oom_exception(torch_oom("x"))
    assert _cuda._is_oom_exception(torch_cuda_oom("x"))
    assert _cuda._is_oom_exception(cupy_oom("x"))
    assert _cuda._is_oom_exception(subclass("x"))
    assert _cuda._is_oom_exception(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _cuda._is_oom_exception(RuntimeError("CUDA error: out of memory"))
    assert _cuda._is_oom_exception(RuntimeError("cudaErrorMemoryAllocation: out of memory"))
    assert not _cuda._is_oom_exception(other("x"))
    assert not _cuda._is_oom_exception(ValueError("CUDA out of memory"))
    assert not _cuda._is_oom_exception(RuntimeError("CUDA error: an illegal memory access"))


def test_real_torch_oom_class_is_recognised():
    torch = pytest.importorskip("torch")
    assert _cuda._is_oom_exception(torch.OutOfMemoryError("x"))
    assert _cuda._is_oom_exception(torch.cuda.OutOfMemoryError("x"))


def test_capacity_is_total_minus_what_others_hold():
    gb = 10**9
    # 80 GB card, 30 GB used of which 10 GB are ours: others hold 20 GB.
    assert _cuda._capacity(total=80 * gb, free=50 * gb, ours=10 * gb, budget=None) == 60 * gb
    assert _cuda._capacity(total=80 * gb, free=50 * gb, ours=10 * gb, budget=16 * gb) == 16 * gb
    # Our own estimate may exceed what the driver shows used: nobody else then holds anything.
    assert _cuda._capacity(total=80 * gb, free=79 * gb, ours=2 * gb, budget=None) == 80 * gb


def test_host_budget_error_names_the_numbers():
    from gpuctx.device.hostcopy import _check_host_budget

    _check_host_budget("m", 10**9, 0, None)
    _check_host_budget("m", 10**9, 10**9, 2 * 10**9)
    with pytest.raises(gpuctx.BudgetError, match=r"offload of 'm': 1 GB .*host_budget=1.5 GB \(1 GB already"):
        _check_host_budget("m", 10**9, 10**9, 15 * 10**8)


def test_uuid_spelled_as_nvml_does():
    raw = bytes(range(16))
    assert _cuda._uuid_string(raw) == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert _cuda._uuid_string("00010203-0405-0607-0809-0a0b0c0d0e0f") == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert _cuda._uuid_string("MIG-abc") == "MIG-abc"


# --------------------------------------------------------------------------- graph keys
def test_graph_key_depends_on_shapes_and_dtypes_not_values():
    torch = pytest.importorskip("torch")
    a = torch.randn(2, 3)
    assert _graph_key((a,), {}) == _graph_key((torch.randn(2, 3),), {})
    assert _graph_key((a,), {}) != _graph_key((torch.randn(3, 2),), {})
    assert _graph_key((a,), {}) != _graph_key((a.double(),), {})
    assert _graph_key((a,), {}) != _graph_key((a.requires_grad_(),), {})


def test_graph_key_non_tensors_by_type_and_value_through_containers():
    torch = pytest.importorskip("torch")
    a = torch.randn(4)
    assert _graph_key((a, 1), {"k": [a]}) != _graph_key((a, 2), {"k": [a]})
    assert _graph_key((1,), {}) != _graph_key((1.0,), {}) != _graph_key((True,), {})
    assert _graph_key(([a, a],), {}) != _graph_key(((a, a),), {})
    assert _graph_key((), {"x": a, "y": 2}) == _graph_key((), {"y": 2, "x": torch.randn(4)})
    assert _graph_key(({"p": [a, {"q": 3}]},), {}) == _graph_key(({"p": [torch.randn(4), {"q": 3}]},), {})
    with pytest.raises(_Unkeyable, match="bytearray"):
        _graph_key((bytearray(b"x"),), {})


def test_tensors_are_found_in_key_order_whatever_the_dict_order():
    torch = pytest.importorskip("torch")
    x, y = torch.randn(1), torch.randn(2)
    assert [t.shape for t in _tensors_in(((), {"b": y, "a": x}))] == [x.shape, y.shape]
    assert [t.shape for t in _tensors_in(((), {"a": x, "b": y}))] == [x.shape, y.shape]


def test_version_counters_tolerate_inference_tensors():
    torch = pytest.importorskip("torch")
    from gpuctx.device.graphs import _versions

    with torch.inference_mode():
        frozen = torch.randn(3)
    plain = torch.randn(3)
    plain.add_(1.0)
    assert _versions([frozen, plain]) == [None, 1]


# --------------------------------------------------------------------------- graph runner without CUDA
def test_graph_runner_on_cpu_runs_eagerly():
    run = make_graph_runner(lambda x, y=1: x + y, device=CpuDevice(), context="c")
    assert isinstance(run, GraphRunner)
    assert run((1,), {"y": 2}) == 3
    assert not run.cache


def test_graph_runner_without_cuda_tensors_runs_eagerly_without_warning():
    torch = pytest.importorskip("torch")
    fake_cuda = SimpleNamespace(name="cuda:0")   # would be asked for streams only with CUDA tensors
    x = torch.randn(5)
    run = make_graph_runner(lambda t, scale: t * scale, device=fake_cuda, context="c")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(run((x,), {"scale": 2.0}), x * 2.0)
    assert not run.cache and not run.eager_keys


@pytest.mark.parametrize("kwargs, arg", [({"cache_size": 0}, "cache_size"), ({"warmup": 0}, "warmup"),
                                         ({"clone_outputs": 1}, "clone_outputs"), ({"context": 3}, "context")])
def test_graph_runner_checks_its_settings(kwargs, arg):
    settings = {"device": CpuDevice(), "context": "c", **kwargs}
    with pytest.raises(gpuctx.ConfigError, match=arg):
        make_graph_runner(lambda: None, **settings)


# --------------------------------------------------------------------------- CudaDevice on fakes
class _Recorder:
    """Context-manager factory that logs what was entered and left."""

    def __init__(self, log: list, label: str) -> None:
        self.log, self.label = log, label

    def __call__(self, *args):
        @contextlib.contextmanager
        def cm():
            self.log.append(("enter", self.label, args))
            try:
                yield
            finally:
                self.log.append(("exit", self.label, args))

        return cm()


class _FakeStream:
    _next = 100

    def __init__(self, device=None) -> None:
        _FakeStream._next += 1
        self.cuda_stream = _FakeStream._next
        self.waited: list = []

    def wait_event(self, event) -> None:
        self.waited.append(event)

    def synchronize(self) -> None:
        pass


class _FakeEvent:
    def record(self, stream) -> None:
        self.stream = stream

    def synchronize(self) -> None:
        self.synced = True


def _fake_device(log: list, free: list, segments: list | None = None) -> _cuda.CudaDevice:
    """A CudaDevice whose torch is a fake: streams, events and memory figures we control."""
    fake_torch = SimpleNamespace(cuda=SimpleNamespace(
        Stream=_FakeStream, Event=_FakeEvent,
        device=_Recorder(log, "torch.device"), stream=_Recorder(log, "torch.stream"),
        mem_get_info=lambda index: (free[0], 80 * 10**9),
        memory_reserved=lambda index: 0, memory_allocated=lambda index: 0,
        memory_snapshot=lambda include_traces=True: list(segments or []),
        empty_cache=lambda: log.append(("empty_cache",)),
    ))
    dev = object.__new__(_cuda.CudaDevice)
    dev._setup(0, fake_torch, None, None, None)
    dev._per_stream = segments is not None
    return dev


def test_stream_scope_makes_one_stream_current_for_torch_and_cupy(monkeypatch):
    log: list = []
    pool = SimpleNamespace(malloc=object(), set_limit=lambda size: log.append(("limit", size)),
                           used_bytes=lambda: 0, total_bytes=lambda: 0, free_all_blocks=lambda: None)

    class ExternalStream:
        def __init__(self, ptr, device_id):
            self.ptr, self.device_id = ptr, device_id

        def __enter__(self):
            log.append(("enter", "cupy.stream", (self.ptr, self.device_id)))

        def __exit__(self, *exc):
            log.append(("exit", "cupy.stream", (self.ptr, self.device_id)))

    fake_cupy = SimpleNamespace(cuda=SimpleNamespace(
        Device=_Recorder(log, "cupy.device"), ExternalStream=ExternalStream,
        using_allocator=_Recorder(log, "cupy.allocator"), MemoryPool=lambda: pool))
    dev = _fake_device(log, [0])
    a, b = dev.get_stream("a"), dev.get_stream("b")
    assert a is dev.get_stream("a") and a.cuda_stream != b.cuda_stream

    monkeypatch.delitem(sys.modules, "cupy", raising=False)   # where CuPy is installed, an earlier test imported it
    with dev.stream_scope("a") as s:   # no CuPy imported: torch only, CuPy never imported for this
        assert s is a
    assert [e[1] for e in log] == ["torch.device", "torch.stream", "torch.stream", "torch.device"]

    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    dev.set_context_limit("a", "1MB")
    log.clear()
    with dev.stream_scope("a"):
        pass
    entered = [(e[1], e[2]) for e in log if e[0] == "enter"]
    assert entered == [("torch.device", (0,)), ("torch.stream", (a,)), ("cupy.device", (0,)),
                       ("cupy.stream", (a.cuda_stream, 0)), ("cupy.allocator", (pool.malloc,))]
    assert next(e for e in log if e[0] == "exit")[1] == "cupy.allocator"   # left in reverse order


def test_set_context_limit_without_cupy_is_a_config_error(monkeypatch):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)   # "not imported", also where it is installed
    dev = _fake_device([], [0])
    with pytest.raises(gpuctx.ConfigError, match="CuPy is not imported"):
        dev.set_context_limit("a", 10**6)


def test_events_wait_on_the_consumer_stream_without_host_sync():
    dev = _fake_device([], [0])
    ev = dev.record_event("producer")
    assert ev.stream is dev.get_stream("producer")
    dev.wait_event("consumer", ev)
    assert dev.get_stream("consumer").waited == [ev] and not hasattr(ev, "synced")
    dev.wait_event("consumer", None)
    dev.synchronize(None)
    dev.synchronize(ev)
    assert ev.synced


def test_load_measures_only_the_context_streams_allocations():
    segments: list = []
    dev = _fake_device([], [0], segments)
    mine = dev.get_stream("m").cuda_stream

    def loader():
        segments.append({"device": 0, "stream": mine, "allocated_size": 300})
        segments.append({"device": 0, "stream": 0, "allocated_size": 20})       # default stream: counted
        segments.append({"device": 0, "stream": 999, "allocated_size": 5000})   # another context, same time
        segments.append({"device": 1, "stream": mine, "allocated_size": 7000})  # another card
        return "model"

    obj, measured = dev.load("m", loader)
    assert (obj, measured) == ("model", 320)
    assert dev.generation("m") == 1


def test_release_reports_free_memory_and_outside_references():
    log: list = []
    free = [10]
    dev = _fake_device(log, free)

    class Model:
        pass

    def drop_frees_memory(_):
        free[0] += 1000

    model = Model()
    import weakref

    weakref.finalize(model, drop_frees_memory, None)
    report = dev.release("m", [model], expected=1000)
    assert report.still_referenced and report.freed == 0   # our local `model` still holds it
    assert ("empty_cache",) in log and dev.generation("m") == 1

    holder = [model]
    del model
    report = dev.release("m", holder, expected=1000)
    assert not report.still_referenced and report.freed == 1000 and holder == []


def test_release_waits_a_bounded_time_for_memory_that_never_shows_up():
    dev = _fake_device([], [10])
    dev.release_timeout = 0.05
    report = dev.release("m", [object.__new__(type("M", (), {}))], expected=10**9)
    assert report.freed == 0 and not report.still_referenced
    assert 0.04 <= report.seconds < 1.0


def test_worker_modes_put_a_thread_in_a_fresh_threads_grad_and_inference_modes():
    torch = pytest.importorskip("torch")
    from gpuctx.device.graphs import WORKER_MODES, _mode_key, worker_modes

    seen = []
    t = threading.Thread(target=lambda: seen.append(_mode_key(torch)))
    t.start()
    t.join()
    assert seen == [WORKER_MODES]
    with torch.inference_mode():
        with worker_modes(torch):
            assert _mode_key(torch) == WORKER_MODES and torch.randn(2).requires_grad_().sum().requires_grad
        assert torch.is_inference_mode_enabled()
    with torch.no_grad(), worker_modes(torch):
        assert torch.is_grad_enabled()
