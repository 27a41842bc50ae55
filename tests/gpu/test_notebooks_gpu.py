"""The example notebooks, run cell by cell in an IPython shell on a real GPU (their cells assert).

nbval runs them in CI on the CPU; this runs the GPU path of the same cells, where the
device is ``auto`` and resolves to CUDA. Outputs are not compared (device names and
timings differ); a cell that raises, or whose assert fails, fails the test.
"""

from __future__ import annotations

import json
import pathlib

import pytest

pytest.importorskip("torch")
IPython = pytest.importorskip("IPython")

pytestmark = pytest.mark.gpu
NOTEBOOKS = sorted((pathlib.Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_gpu(path):
    from IPython.core.interactiveshell import InteractiveShell

    import gpuctx

    shell = InteractiveShell.instance()
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    try:
        for i, cell in enumerate(cells):
            result = shell.run_cell("".join(cell["source"]), store_history=False)
            if not result.success:
                err = result.error_in_exec or result.error_before_exec
                raise AssertionError(f"{path.name}, code cell {i}: {type(err).__name__}: {err}") from err
        assert gpuctx.scheduler().device.name.startswith("cuda"), "the notebook ran on the CPU path"
    finally:
        shell.run_cell("%unload_ext gpuctx", store_history=False)
        gpuctx.reset()
