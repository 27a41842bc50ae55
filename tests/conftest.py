"""Shared fixtures: a fresh CPU scheduler with a declared budget, gates for task bodies, and a local
Ray cluster (CPU only) for the cluster tests, kernels in other processes for the share tests."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading

import pytest

import gpuctx

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "share_worker.py")


@pytest.fixture
def fresh():
    """A clean gpuctx on the CPU device with a 10 GB budget and safety factor 1.0."""
    gpuctx.reset()
    gpuctx.configure(device="cpu", budget="10GB", safety_factor=1.0)
    yield gpuctx
    gpuctx.reset()


@pytest.fixture
def gate():
    """A factory of threading.Events that tests open to let a task body finish."""
    events: list[threading.Event] = []

    def make() -> threading.Event:
        ev = threading.Event()
        events.append(ev)
        return ev

    yield make
    for ev in events:   # never leave a worker blocked
        ev.set()


@pytest.fixture
def dashboards():
    """``make(**kw)``: ``gpuctx.dashboard(**kw)``, closed at the end. Skipped without ipywidgets (the
    ``notebook`` extra; the ``test`` extra installs it)."""
    pytest.importorskip("ipywidgets")
    from gpuctx import panel

    made: list[panel.Dashboard] = []

    def make(**kw) -> panel.Dashboard:
        d = gpuctx.dashboard(**kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture(scope="module")
def local_ray(request):
    """Ray, started once for the test module (the slow part: ~10 s on a 2-core box), with 32 GB of the
    ``gpuctx_vram_gb`` resource; the module's functions travel to the workers by value, as a
    notebook's do. Yields the ray module. Skipped where ray is not installed."""
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(request.module)
    ray.init(num_cpus=2, resources={"gpuctx_vram_gb": 32}, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, configure_logging=False)
    yield ray
    gpuctx.reset()
    ray.shutdown()


@pytest.fixture
def cluster(local_ray):
    """``start(workers=3, budget="8GB")``: a fresh gpuctx with that many CPU workers on the module's Ray."""
    def start(workers: int = 3, budget: str = "8GB") -> None:
        gpuctx.reset()
        gpuctx.configure(cluster="ray", workers=workers, budget=budget, device="cpu")

    yield start
    gpuctx.reset()


@pytest.fixture
def share_dir(tmp_path, monkeypatch):
    """A fresh directory for the shares (``GPUCTX_SHARE_DIR``), and a fresh gpuctx."""
    d = tmp_path / "shares"
    monkeypatch.setenv("GPUCTX_SHARE_DIR", str(d))
    gpuctx.reset()
    yield d
    gpuctx.reset()


class Kernel:
    """A worker process in the share: send a command, read its answer."""

    def __init__(self, share: str, budget: int, env: dict | None = None) -> None:
        e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        self.p = subprocess.Popen([sys.executable, WORKER, share, str(budget)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=e, cwd=str(ROOT))
        self.pid = json.loads(self.p.stdout.readline())["pid"]

    def __call__(self, op: str, **kw) -> dict:
        self.p.stdin.write(json.dumps(dict(op=op, **kw)) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, f"worker {self.pid} died"
        return json.loads(line)

    def close(self) -> None:
        if self.p.poll() is None:
            self("exit")
            self.p.wait(30)


@pytest.fixture
def kernels():
    """``make(share, budget, env=None)``: a kernel in another process (tests/share_worker.py) taking part
    in ``share``; each is killed at the end if it has not exited."""
    made: list[Kernel] = []

    def make(share: str, budget: int, **kw) -> Kernel:
        k = Kernel(share, budget, **kw)
        made.append(k)
        return k

    yield make
    for k in made:
        if k.p.poll() is None:
            k.p.kill()
            k.p.wait(10)
