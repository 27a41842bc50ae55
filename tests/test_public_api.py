"""The public surface is gpuctx.__all__; importing gpuctx pulls in no GPU library."""

import subprocess
import sys

import gpuctx


def test_all_names_exist_and_are_documented():
    for name in gpuctx.__all__:
        obj = getattr(gpuctx, name)
        if callable(obj) and not isinstance(obj, type(gpuctx.GB)):
            assert obj.__doc__, f"gpuctx.{name} has no docstring"


def test_contract_names_from_the_issue_are_public():
    for name in ["configure", "model", "gpu_task", "current_model", "wait", "gather", "stats", "status",
                 "shutdown", "scheduler", "Task", "get_stream", "record_event", "wait_event", "create_context",
                 "context_session", "get_context_usage", "get_available_vram", "on_memory_pressure", "QoS",
                 "GB", "MB", "Overloaded", "DependencyError", "ModelLoadError", "GpuCtxError", "BudgetError",
                 "ConfigError", "timeline", "export_trace"]:
        assert name in gpuctx.__all__, name


def test_import_is_lazy_about_torch_cupy_and_nvml():
    code = ("import sys, gpuctx; gpuctx.configure(device='cpu'); gpuctx.scheduler(); "
            "print(','.join(m for m in ('torch', 'cupy', 'pynvml', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_magics_is_a_subpackage_not_a_top_level_module():
    import importlib.util

    assert importlib.util.find_spec("gpuctx.magics") is not None
    spec = importlib.util.find_spec("magics")
    assert spec is None or "site-packages" not in (spec.origin or "")
