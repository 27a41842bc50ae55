"""The CUDA backend's pure parts, on a machine without CUDA."""

from __future__ import annotations

import sys

import pytest

import gpuctx
from gpuctx import _cuda
from gpuctx.device import make_device
from gpuctx.graphs import _graph_key, make_graph_runner


def test_cuda_available_never_raises():
    assert _cuda.cuda_available() in (True, False)


@pytest.mark.skipif(_cuda.cuda_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(gpuctx.ConfigError, match="device='cpu'"):
        make_device("cuda:0", None)
    assert make_device("auto", None).name == "cpu"


def test_bad_cuda_index_spelling():
    with pytest.raises(gpuctx.ConfigError, match="cuda:x"):
        make_device("cuda:x", None)


def test_oom_recognition_by_class_name_and_message():
    torch_oom = type("OutOfMemoryError", (RuntimeError,), {"__module__": "torch"})
    cupy_oom = type("OutOfMemoryError", (MemoryError,), {"__module__": "cupy.cuda.memory"})
    other = type("OutOfMemoryError", (RuntimeError,), {"__module__": "mylib"})
    assert _cuda._is_oom_exception(torch_oom("x"))
    assert _cuda._is_oom_exception(cupy_oom("x"))
    assert _cuda._is_oom_exception(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not _cuda._is_oom_exception(other("x"))
    assert not _cuda._is_oom_exception(ValueError("CUDA out of memory"))


def test_graph_key_depends_on_shapes_and_dtypes():
    torch = pytest.importorskip("torch")
    a = torch.zeros(2, 3)
    assert _graph_key((a,), {}) == _graph_key((torch.ones(2, 3),), {})
    assert _graph_key((a,), {}) != _graph_key((torch.zeros(3, 2),), {})
    assert _graph_key((a,), {}) != _graph_key((a.double(),), {})
    assert _graph_key((a, 1), {"k": [a]}) != _graph_key((a, 2), {"k": [a]})


def test_graph_runner_on_cpu_runs_eagerly():
    run = make_graph_runner(lambda x, y=1: x + y, device=gpuctx.device.CpuDevice(), context="c")
    assert run((1,), {"y": 2}) == 3


def test_importing_the_backend_does_not_import_cupy():
    assert "cupy" not in sys.modules
