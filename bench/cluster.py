"""The seed's video pipeline on a local Ray cluster: gpuctx workers vs Ray Serve multiplexing vs plain Ray tasks.

One Ray cluster, one run, every system on the same workload (bench/workloads.py's
``video_pipeline``: Whisper 4.5 GB, VideoMAE 5.0, CLAP 2.0, DINOv3 1.0 per clip, and Qwen3 1.5
after Whisper and CLAP). Loads and runs are sleeps of their declared seconds times ``--scale``;
each of the 4 "GPUs" has an 8 GB budget and runs one thing at a time.

- **gpuctx**: ``configure(cluster="ray", workers=N, budget="8GB", device="cpu")``; the same
  decorated functions as on one process. Run with 4 workers and with 1 (for the scaling).
- **Ray Serve**: one deployment, 4 replicas, ``@serve.multiplexed`` with
  ``max_num_models_per_replica`` set as the docs suggest, to what fits whichever models are
  loaded (the largest k summing to at most 8 GB: k = 1 here, since 5.0 + 4.5 > 8);
  ``max_ongoing_requests=5``; an asyncio lock per replica stands for its one GPU. Qwen3 calls
  take the Whisper and CLAP responses as arguments (Serve resolves them).
- **Ray tasks**: one task per call with a custom resource of 4 "GPU slots"; each loads its
  model, runs, and drops it.

Every system first runs one clip that is not counted (gpuctx's router learns each model's run
and load times from it; the others gain nothing but are treated alike).

    python bench/cluster.py [--clips 100] [--scale 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ray  # noqa: E402
from workloads import RUN, video_pipeline  # noqa: E402

import gpuctx  # noqa: E402

BUDGET_GB = 8.0
WORKERS = 4
ORDER = ("whisper", "videomae", "clap", "dinov3")


def _models() -> dict[str, float]:
    return {m.name: m.gb for m in video_pipeline(1).models}


# --------------------------------------------------------------------------- gpuctx
def _on_gpu(seconds: float) -> None:
    """Sleep holding this process's one "GPU": an engine runs each model on its own thread, and
    sleeps would overlap where a GPU's work would not (Serve's replicas take a lock alike)."""
    import builtins
    import threading

    with builtins.__dict__.setdefault("_bench_gpu_lock", threading.Lock()):
        time.sleep(seconds)


def run_gpuctx(clips: int, scale: float, workers: int) -> dict:
    gpuctx.reset()
    gpuctx.configure(cluster="ray", workers=workers, budget=f"{BUDGET_GB}GB", device="cpu")
    sizes, run = _models(), dict(RUN)
    for name, gb in sizes.items():
        gpuctx.model(name, vram=f"{gb}GB")(lambda gb=gb: _on_gpu(gb * scale) or gb)
    fns = {m: gpuctx.gpu_task(model=m, name=m)(lambda clip, *deps, s=run[m] * scale: _on_gpu(s) or clip)
           for m in sizes}

    def clip_tasks(c: int) -> list:
        t = {m: fns[m](c) for m in ORDER}
        return list(t.values()) + [fns["qwen3"](c, t["whisper"], t["clap"])]

    gpuctx.wait(clip_tasks(-1))                     # warm-up, not counted
    before = gpuctx.stats()
    loads0 = sum(m["loads"] for m in before["models"].values())
    t0 = time.perf_counter()
    tasks = [t for c in range(clips) for t in clip_tasks(c)]
    done, _ = gpuctx.wait(tasks)
    makespan = time.perf_counter() - t0
    failed = sum(1 for t in tasks if t.exception() is not None)
    st = gpuctx.stats()
    loads = sum(m["loads"] for m in st["models"].values()) - loads0
    per = {w: sum(m["loads"] for m in s["models"].values()) for w, s in st["workers"].items()}
    gpuctx.reset()
    return dict(system=f"gpuctx, {workers} worker{'s' * (workers > 1)}", loads=loads, makespan=makespan,
                failed=failed, per_worker_loads=per, transfers=st["cluster"]["cross_worker"])


# --------------------------------------------------------------------------- Ray Serve
@ray.remote(num_cpus=0)
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def inc(self) -> None:
        self.n += 1

    def get(self) -> int:
        return self.n


def _fits_by_count(sizes: dict[str, float], budget: float) -> int:
    k, total = 0, 0.0
    for gb in sorted(sizes.values(), reverse=True):
        if total + gb > budget:
            break
        k, total = k + 1, total + gb
    return max(k, 1)


def run_serve(clips: int, scale: float) -> dict:
    from ray import serve

    sizes, k = _models(), _fits_by_count(_models(), BUDGET_GB)
    counter = Counter.remote()

    @serve.deployment(num_replicas=WORKERS, max_ongoing_requests=5, ray_actor_options={"num_cpus": 0})
    class Pipeline:
        def __init__(self, counter) -> None:
            self.gpu = asyncio.Lock()      # one GPU per replica: one load or run at a time
            self.counter = counter

        @serve.multiplexed(max_num_models_per_replica=k)
        async def get_model(self, model_id: str) -> str:
            async with self.gpu:
                await asyncio.sleep(sizes[model_id] * scale)
            self.counter.inc.remote()
            return model_id

        async def __call__(self, clip: int, *deps: int) -> int:
            model = await self.get_model(serve.get_multiplexed_model_id())
            async with self.gpu:
                await asyncio.sleep(RUN[model] * scale)
            return clip

    serve.start(proxy_location="Disabled")
    handle = serve.run(Pipeline.bind(counter), name="video", route_prefix=None)

    def clip_calls(c: int) -> list:
        r = {m: handle.options(multiplexed_model_id=m).remote(c) for m in ORDER}
        return list(r.values()) + [handle.options(multiplexed_model_id="qwen3").remote(c, r["whisper"], r["clap"])]

    for r in clip_calls(-1):
        r.result()
    loads0 = ray.get(counter.get.remote())
    t0 = time.perf_counter()
    calls = [r for c in range(clips) for r in clip_calls(c)]
    failed = 0
    for r in calls:
        try:
            r.result(timeout_s=600)
        except Exception:  # noqa: BLE001 - counted
            failed += 1
    makespan = time.perf_counter() - t0
    loads = ray.get(counter.get.remote()) - loads0
    serve.shutdown()
    return dict(system=f"Ray Serve, {WORKERS} replicas, multiplexed (max {k} per replica)", loads=loads,
                makespan=makespan, failed=failed)


# --------------------------------------------------------------------------- plain Ray tasks
def run_ray_tasks(clips: int, scale: float) -> dict:
    sizes = _models()

    @ray.remote(num_cpus=0, resources={"bench_gpu": 1})
    def call(model: str, clip: int, *deps: int) -> int:
        time.sleep(sizes[model] * scale)      # load, every call
        time.sleep(RUN[model] * scale)
        return clip

    def clip_calls(c: int) -> list:
        r = {m: call.remote(m, c) for m in ORDER}
        return list(r.values()) + [call.remote("qwen3", c, r["whisper"], r["clap"])]

    ray.get(clip_calls(-1))
    t0 = time.perf_counter()
    refs = [r for c in range(clips) for r in clip_calls(c)]
    ray.get(refs)
    makespan = time.perf_counter() - t0
    return dict(system=f"Ray tasks, {WORKERS} GPU slots, load per call", loads=len(refs), makespan=makespan, failed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--scale", type=float, default=0.05, help="real seconds per workload second")
    a = ap.parse_args()
    ray.init(num_cpus=2, resources={"gpuctx_vram_gb": WORKERS * BUDGET_GB, "bench_gpu": WORKERS},
             include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False, configure_logging=False)
    t_all = time.perf_counter()
    rows = [run_gpuctx(a.clips, a.scale, WORKERS), run_gpuctx(a.clips, a.scale, 1),
            run_serve(a.clips, a.scale), run_ray_tasks(a.clips, a.scale)]
    ideal = sum(RUN[j.model] for j in video_pipeline(a.clips).jobs) * a.scale / WORKERS
    print(f"video pipeline, {a.clips} clips, {WORKERS} workers of {BUDGET_GB:g} GB, scale {a.scale:g} "
          f"(busy-time bound {ideal:.1f} s on {WORKERS}); {os.cpu_count()} cores; "
          f"whole run {time.perf_counter() - t_all:.0f} s")
    print(f"{'system':<55}{'loads':>7}{'makespan s':>12}{'clips/s':>9}{'failed':>8}")
    for r in rows:
        print(f"{r['system']:<55}{r['loads']:>7}{r['makespan']:>12.1f}{a.clips / r['makespan']:>9.2f}{r['failed']:>8}")
    g4, g1, sv, rt = rows
    print(f"gpuctx per-worker loads {g4['per_worker_loads']}, cross-worker transfers {g4['transfers']}")
    print(f"scaling 1 -> {WORKERS} workers: {g1['makespan'] / g4['makespan']:.2f}x "
          f"({g1['makespan'] / g4['makespan'] / WORKERS:.2f} of linear); "
          f"throughput vs Serve {sv['makespan'] / g4['makespan']:.2f}x, vs Ray tasks {rt['makespan'] / g4['makespan']:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
