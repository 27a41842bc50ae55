"""GPU benchmarks of gpuctx's CUDA backend; prints one markdown table. Needs CUDA.

    python bench/gpu.py            # about a minute on an H100
    python bench/gpu.py --quick    # fewer repetitions, for a smoke run
    python bench/gpu.py --switch   # only the rows of issue 18, (e) to (i) (bench/gpu_switch.py)

Everything goes through gpuctx's own code (CudaDevice streams, offload/restore/release,
GraphRunner), so the numbers are ours, next to a baseline measured in the same run:

(a) restore of an offloaded ~1 GB module from pinned host memory (CudaDevice.restore), in GB/s,
    next to a raw pinned host-to-device copy (``copy_(non_blocking=True)``); target >= 0.8 of it.
    Offload (device to host) is shown the same way, for information.
(b) release: from CudaDevice.release() being called until the driver shows the memory free.
(c) 4 small launch-bound MLPs (8, then 32 layers of 256x256, batch 32) as 4 contexts: eager serial on one
    stream; eager on 4 context streams from 4 threads; CUDA graphs replayed serially on one stream;
    CUDA graphs on each context's own stream (interleaved from one thread, and from 4 threads).
    Targets: graphs per context >= 8x eager serial, and >= 2x graphs on one stream. Then the same
    4 models through the whole scheduler (4 @gpu_task calls per round, eager and cuda_graph=True),
    wall clock from the first submit to the last result, against eager serial by wall clock.
(d) the same at a compute-bound size (4 layers of 4096x4096, batch 4096): target >= 0.95x (no regression).
(e)-(i) switches (bench/gpu_switch.py): a call on an offloaded model with the pipelined restore against
    resident + raw restore; evicting an unmodified model against a copy back; a partial model against
    diffusers' group offload; the graph recapture a VMM restore would save; host cost per cuda_graph task.

Timings: medians of many runs after warm-up, on random data; (c) and (d) are CUDA-event timings
of whole rounds (the start event waits for nothing, so host launch time is inside), (a) and (b)
wall-clock around calls that synchronise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/gpu_switch.py

GB = 1e9
CONTEXTS = 4


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisier numbers)")
    parser.add_argument("--switch", action="store_true", help="only the switch rows (e)-(i) of bench/gpu_switch.py")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("bench/gpu.py: torch is not installed; these benchmarks need torch with CUDA")
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device visible (torch.cuda.is_available() is False); nothing measured")

    from gpuctx.device.cuda import CudaDevice

    quick = args.quick
    dev = CudaDevice(0)
    props = torch.cuda.get_device_properties(0)
    print(f"# gpuctx GPU benchmarks — {props.name} ({props.total_memory / GB:.0f} GB), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}\n")
    from gpu_switch import switch_rows

    rows: list[tuple[str, str, str, str, str]] = []
    if not args.switch:
        rows += _transfer_rows(torch, dev, reps=3 if quick else 10)
        rows += _release_rows(torch, dev, reps=3 if quick else 7)
        rows += _stream_rows(torch, dev, "launch-bound", width=256, depth=8, batch=32, reps=50 if quick else 300)
        rows += _stream_rows(torch, dev, "launch-bound", width=256, depth=32, batch=32, reps=30 if quick else 150)
        rows += _stream_rows(torch, dev, "compute-bound", width=4096, depth=4, batch=4096, reps=4 if quick else 15)
    rows += switch_rows(torch, dev, quick)
    print("| measurement | value | baseline (same run) | ratio | target |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    dev.close()


# --------------------------------------------------------------------------- timing helpers
def _wall(torch: Any, fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` followed by a device synchronize."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _event_ms(torch: Any, fn: Callable[[], Any], reps: int, warmup: int = 10) -> float:
    """Median milliseconds of one round, between CUDA events recorded on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _mlp(torch: Any, width: int, depth: int) -> Any:
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width, device="cuda"), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


# --------------------------------------------------------------------------- (a) offload / restore bandwidth
def _raw_copies(torch: Any, nbytes: int, reps: int) -> tuple[float, float]:
    """GB/s of plain pinned-host-to-device and device-to-pinned-host copies of ``nbytes``."""
    host = torch.randn(nbytes // 4, pin_memory=True)
    dst = torch.empty(nbytes // 4, device="cuda")
    h2d = nbytes / _wall(torch, lambda: dst.copy_(host, non_blocking=True), reps) / GB
    d2h = nbytes / _wall(torch, lambda: host.copy_(dst, non_blocking=True), reps) / GB
    return h2d, d2h


def _transfer_rows(torch: Any, dev: Any, reps: int) -> list:
    model = torch.nn.Sequential(*[torch.nn.Linear(8192, 8192, bias=False, device="cuda") for _ in range(4)])
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())   # 1.07 GB of fp32
    h2d, d2h = _raw_copies(torch, nbytes, reps)
    dev.empty_caches()

    # Bandwidth rows: every offload a real copy (no clean copy kept), every restore blocking.
    keep, groups = dev.host_copies.keep_clean, dev.restore_group_bytes
    dev.host_copies.keep_clean, dev.restore_group_bytes = False, None
    offload_s, restore_cold, restore_warm = [], [], []
    for i in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.offload("bench-transfer", model)
        offload_s.append(time.perf_counter() - t0)
        cold = i % 2 == 0
        if cold:
            dev.empty_caches()   # what the scheduler does after an eviction: the restore must cudaMalloc again
        t0 = time.perf_counter()
        dev.restore("bench-transfer", model)   # synchronises the context's stream before returning
        (restore_cold if cold else restore_warm).append(time.perf_counter() - t0)
    dev.host_copies.keep_clean, dev.restore_group_bytes = keep, groups
    del model
    dev.empty_caches()
    off = nbytes / statistics.median(offload_s[1:]) / GB
    cold_gbs = nbytes / statistics.median(restore_cold[1:] or restore_cold) / GB
    warm_gbs = nbytes / statistics.median(restore_warm) / GB
    size = f"{nbytes / GB:.2f} GB module"
    return [
        (f"restore from pinned host, after eviction ({size})", f"{cold_gbs:.1f} GB/s", f"raw pinned H2D copy {h2d:.1f} GB/s",
         f"{cold_gbs / h2d:.2f}", ">= 0.8"),
        (f"restore from pinned host, allocator cache warm ({size})", f"{warm_gbs:.1f} GB/s",
         f"raw pinned H2D copy {h2d:.1f} GB/s", f"{warm_gbs / h2d:.2f}", ">= 0.8"),
        (f"offload to pinned host ({size})", f"{off:.1f} GB/s", f"raw D2H copy into pinned {d2h:.1f} GB/s",
         f"{off / d2h:.2f}", "(information)"),
    ]


# --------------------------------------------------------------------------- (b) release latency
def _release_rows(torch: Any, dev: Any, reps: int) -> list:
    seconds, freed = [], []
    for _ in range(reps):
        model, measured = dev.load("bench-release", lambda: torch.nn.Sequential(
            *[torch.nn.Linear(8192, 8192, bias=False, device="cuda") for _ in range(4)]))
        holder = [model]
        del model
        report = dev.release("bench-release", holder, measured)
        seconds.append(report.seconds)
        freed.append(report.freed / max(1, measured))
    return [(f"release of a {measured / GB:.2f} GB module until the driver shows it free",
             f"{statistics.median(seconds) * 1e3:.1f} ms", f"freed {statistics.median(freed):.0%} of it", "",
             "(Ollama-style unload waits 0.5-1.5 s)")]


# --------------------------------------------------------------------------- (c, d) contexts, streams, graphs
def _stream_rows(torch: Any, dev: Any, label: str, *, width: int, depth: int, batch: int, reps: int) -> list:
    from gpuctx.device.graphs import make_graph_runner

    nets = [_mlp(torch, width, depth) for _ in range(CONTEXTS)]
    xs = [torch.randn(batch, width, device="cuda") for _ in range(CONTEXTS)]
    tag = f"{label}-d{depth}"
    contexts = [f"{tag}-{i}" for i in range(CONTEXTS)]
    streams = [dev.get_stream(c) for c in contexts]
    serial_ctx = f"{tag}-serial"
    serial_stream = dev.get_stream(serial_ctx)
    graph_serial = [make_graph_runner(lambda x, n=n: n(x), device=dev, context=serial_ctx) for n in nets]
    graph_ctx = [make_graph_runner(lambda x, n=n: n(x), device=dev, context=c) for n, c in zip(nets, contexts)]
    pool = ThreadPoolExecutor(CONTEXTS)
    torch.cuda.synchronize()

    def fork() -> Any:
        cur = torch.cuda.current_stream()
        for s in streams:
            s.wait_stream(cur)
        return cur

    def join(cur: Any) -> None:
        for s in streams:
            cur.wait_stream(s)

    def eager_serial() -> None:
        for net, x in zip(nets, xs):
            net(x)

    def eager_one(i: int) -> None:
        with torch.no_grad(), dev.stream_scope(contexts[i]):
            nets[i](xs[i])

    def eager_threads() -> None:
        cur = fork()
        list(pool.map(eager_one, range(CONTEXTS)))
        join(cur)

    def graphs_one_stream() -> None:
        cur = torch.cuda.current_stream()
        serial_stream.wait_stream(cur)
        with dev.stream_scope(serial_ctx):
            for run, x in zip(graph_serial, xs):
                run((x,), {})
        cur.wait_stream(serial_stream)

    def graphs_interleaved() -> None:
        cur = fork()
        for run, c, x in zip(graph_ctx, contexts, xs):
            with dev.stream_scope(c):
                run((x,), {})
        join(cur)

    def graph_one(i: int) -> None:
        with torch.no_grad(), dev.stream_scope(contexts[i]):
            graph_ctx[i]((xs[i],), {})

    def graphs_threads() -> None:
        cur = fork()
        list(pool.map(graph_one, range(CONTEXTS)))
        join(cur)

    with torch.no_grad():
        t_eager_wall = _wall(torch, eager_serial, reps, warmup=10) * 1e3
        t_sched = {g: _scheduler_ms(torch, nets, xs, tag, graph=g, reps=reps) for g in (False, True)}
        t_eager = _event_ms(torch, eager_serial, reps)
        t_eager_threads = _event_ms(torch, eager_threads, reps)
        t_graph_one = _event_ms(torch, graphs_one_stream, reps)
        t_graph_inter = _event_ms(torch, graphs_interleaved, reps)
        t_graph_threads = _event_ms(torch, graphs_threads, reps)
    pool.shutdown()
    captured = sum(len(r.cache) for r in graph_serial + graph_ctx)
    assert captured == 2 * CONTEXTS, f"{label}: expected every body captured once, got {captured} graphs"

    shape = f"{CONTEXTS} MLPs, {depth} layers {width}x{width}, batch {batch}"
    launch_bound = label.startswith("launch-bound")

    def row(what: str, t: float, versus_one_stream: bool = False, baseline: bool = False) -> tuple:
        ratio = f"{t_eager / t:.2f}x"
        if versus_one_stream:
            ratio += f" ({t_graph_one / t:.2f}x graphs on one stream)"
        if not launch_bound:
            target = "" if baseline else ">= 0.95x"
        else:
            target = ">= 8x, and >= 2x graphs on one stream" if versus_one_stream else ""
        return (f"{label} ({shape}): {what}", f"{t:.3f} ms/round", f"eager serial {t_eager:.3f} ms", ratio, target)

    def sched_row(graph: bool) -> tuple:
        t = t_sched[graph]
        what = "gpuctx tasks, 4 models, " + ("cuda_graph=True" if graph else "eager")
        target = (">= 8x" if graph else "") if launch_bound else ">= 0.95x"
        return (f"{label} ({shape}): {what} (wall clock, submit to result)", f"{t:.3f} ms/round",
                f"eager serial {t_eager_wall:.3f} ms (wall clock)", f"{t_eager_wall / t:.2f}x", target)

    return [
        row("eager, serial on one stream", t_eager, baseline=True),
        row("eager, a stream per context (4 threads)", t_eager_threads),
        row("CUDA graphs, serial on one stream", t_graph_one),
        row("CUDA graphs, a stream per context (interleaved, 1 thread)", t_graph_inter, True),
        row("CUDA graphs, a stream per context (4 threads)", t_graph_threads, True),
        sched_row(False),
        sched_row(True),
    ]


def _scheduler_ms(torch: Any, nets: list, xs: list, label: str, *, graph: bool, reps: int) -> float:
    """Median wall-clock ms of one round through the full scheduler: 4 tasks, one per model, then their results.

    Each model is its own context (own stream, own worker thread); ``Task.result()`` waits for
    the producing stream, so a round ends when the GPU work has.
    """
    import gpuctx

    gpuctx.reset()
    gpuctx.configure(device="cuda:0")
    fns = []
    for i, net in enumerate(nets):
        name = f"sched-{label}-{i}-{'graph' if graph else 'eager'}"
        gpuctx.model(name, vram="1GB", offload=False)(lambda net=net: net)

        def body(x: Any, i: int = i) -> Any:
            with torch.no_grad():
                return gpuctx.current_model()(x)

        fns.append(gpuctx.gpu_task(model=name, cuda_graph=graph, name=f"mlp{i}")(body))

    def round_() -> None:
        for t in [f(x) for f, x in zip(fns, xs)]:
            t.result()

    try:
        return _wall(torch, round_, reps, warmup=10) * 1e3
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # "still referenced": the bench keeps the nets
            gpuctx.reset()

if __name__ == "__main__":
    main()
