"""GPU tests: skipped, visibly, where torch sees no CUDA device."""

from __future__ import annotations

import pytest


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="no CUDA device: GPU test not run")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda(fresh):
    """gpuctx on cuda:0 with the whole card as budget."""
    import gpuctx

    gpuctx.configure(device="cuda:0", budget=None, safety_factor=0.9)
    yield gpuctx
