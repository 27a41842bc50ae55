"""Failures hold nothing: a failed Task keeps no model, input or engine frame alive (issue 14.5, 15.5)."""

from __future__ import annotations

import gc

import pytest
import warnings
import weakref

import gpuctx

TIMEOUT = 10


class _Model:
    """A model object that can be watched with a weak reference."""

    def __call__(self, x):
        raise ValueError(f"bad input {x!r}")


def test_a_failed_task_does_not_keep_its_evicted_model_alive(fresh):
    made: list = []

    @gpuctx.model("m", vram="1GB")
    def load():
        made.append(weakref.ref(obj := _Model()))
        return obj

    @gpuctx.gpu_task(model="m")
    def infer(x):
        m = gpuctx.current_model()   # the body names the model in a local, as users do
        return m(x)

    t = infer([1, 2, 3])
    assert isinstance(t.exception(TIMEOUT), ValueError)   # the user keeps the failed Task
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # no "still referenced" warning either
        assert gpuctx.evict("m") == ["m"]
    assert made[0]() is None
    text = "".join(__import__("traceback").format_exception(t.exception()))
    assert "m(x)" in text and "bad input" in text          # the printed traceback keeps its lines
    assert "gpuctx/engine" not in text                     # and not the engine's frames


def test_a_failed_loader_keeps_nothing_of_what_it_built(fresh):
    made: list = []

    @gpuctx.model("m", vram="1GB")
    def load():
        half = _Model()
        made.append(weakref.ref(half))
        raise RuntimeError("checkpoint truncated")

    t = gpuctx.gpu_task(model="m")(lambda: 1)()
    err = t.exception(TIMEOUT)
    assert isinstance(err, gpuctx.ModelLoadError) and "checkpoint truncated" in str(err)
    assert made[0]() is None


def test_the_still_referenced_warning_names_out_and_gpuctx_free_drops_it(fresh):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext gpuctx")
    try:
        gpuctx.configure(device="cpu", budget="10GB", safety_factor=1.0)
        made: list = []

        @gpuctx.model("m", vram="1GB")
        def load():
            made.append(weakref.ref(obj := _Model()))
            return obj

        shell.user_ns["use"] = gpuctx.gpu_task(model="m")(lambda: gpuctx.current_model())
        res = shell.run_cell("use().result(10)")          # the cell's value: Out[n] holds the model
        n = shell.execution_count - 1
        with pytest.warns(RuntimeWarning, match=rf"still referenced by Out\[{n}\], _; drop it \(%gpuctx free"):
            gpuctx.evict("m")
        assert res.result is not None and made[0]() is not None
        res = None
        shell.run_cell("%gpuctx free")
        gc.collect()
        assert made[0]() is None
    finally:
        shell.run_cell("%unload_ext gpuctx")
