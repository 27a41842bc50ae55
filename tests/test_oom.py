"""Out-of-memory inside a task or a loader, on the CPU device (MemoryError stands for the GPU's).

The GPU tests (tests/gpu/) do the same with real over-allocations; these run everywhere.
"""

from __future__ import annotations

import pytest

import gpuctx

TIMEOUT = 10


def _idle_model(name: str, log: list) -> None:
    @gpuctx.model(name, vram="2GB", unload=lambda obj: log.append(("unload", name)))
    def load():
        log.append(("load", name))
        return name

    @gpuctx.gpu_task(model=name)
    def touch():
        return gpuctx.current_model()

    assert touch().result(TIMEOUT) == name


def test_oom_in_a_task_evicts_idle_models_and_the_retry_succeeds(fresh):
    log: list = []
    _idle_model("idle", log)
    attempts = []

    @gpuctx.gpu_task(model="busy", vram="1GB")
    def hungry():
        attempts.append(1)
        if len(attempts) == 1:
            raise MemoryError("first try: no room")
        return "ok"

    assert hungry().result(TIMEOUT) == "ok"
    assert len(attempts) == 2
    assert ("unload", "idle") in log
    kinds = [(e.kind, e.model) for e in gpuctx.scheduler().trace.events]
    assert ("oom_retry", "busy") in kinds


def test_oom_that_persists_fails_only_that_task_with_the_numbers(fresh):
    log: list = []
    _idle_model("resident", log)

    @gpuctx.gpu_task(model="busy", vram="1GB", oom_retries=2)
    def always():
        raise MemoryError("never enough")

    @gpuctx.gpu_task(model="busy", vram="1GB")
    def fine():
        return 7

    t = always()
    with pytest.raises(gpuctx.GpuOutOfMemory, match=r"after 2 retry\(ies\); budget 10 GB, committed 1 GB, residents: busy=1 GB") as info:
        t.result(TIMEOUT)
    assert isinstance(info.value.__cause__, MemoryError)
    assert fine().result(TIMEOUT) == 7      # the scheduler goes on
    events = gpuctx.scheduler().trace.events
    assert sum(e.kind == "oom_retry" for e in events) == 2


def test_no_retry_when_oom_retries_is_zero(fresh):
    attempts = []

    @gpuctx.gpu_task(model="busy", vram="1GB", oom_retries=0)
    def once():
        attempts.append(1)
        raise MemoryError("no room")

    with pytest.raises(gpuctx.GpuOutOfMemory, match=r"after 0 retry\(ies\)"):
        once().result(TIMEOUT)
    assert attempts == [1]


def test_other_exceptions_are_not_retried(fresh):
    attempts = []

    @gpuctx.gpu_task(model="busy", vram="1GB")
    def wrong():
        attempts.append(1)
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        wrong().result(TIMEOUT)
    assert attempts == [1]


def test_oom_in_a_loader_is_retried_once_after_evicting(fresh):
    log: list = []
    _idle_model("idle", log)
    attempts = []

    @gpuctx.model("big", vram="1GB")
    def load_big():
        attempts.append(1)
        if len(attempts) == 1:
            raise MemoryError("loader: no room")
        return "big"

    @gpuctx.gpu_task(model="big")
    def use():
        return gpuctx.current_model()

    assert use().result(TIMEOUT) == "big"
    assert len(attempts) == 2 and ("unload", "idle") in log
