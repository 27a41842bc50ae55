"""GPU tests: every test in this folder is skipped, visibly, where torch sees no CUDA device."""

from __future__ import annotations

import pytest


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, or a broken driver: no GPU tests
        return False


def pytest_runtest_setup(item: pytest.Item) -> None:
    # A conftest's runtest hooks apply to the items under its folder only.
    if not _cuda():
        pytest.skip("no CUDA device: GPU test not run")


@pytest.fixture
def cuda():
    """gpuctx on cuda:0 with the whole card as budget; forgotten afterwards."""
    import gpuctx

    gpuctx.reset()
    gpuctx.configure(device="cuda:0", budget=None)
    yield gpuctx
    gpuctx.reset()
