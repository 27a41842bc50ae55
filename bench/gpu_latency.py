"""Host-side costs of gpuctx's GPU paths, and where a round of 4 tasks through the scheduler goes.

    python bench/gpu_latency.py          # needs CUDA; about 20 s

Part 1 times single calls on the host (median of many, after warm-up): the stream scope every
task runs in, a GraphRunner replay next to torch's raw ``CUDAGraph.replay()``, the event calls.
A replay issued back to back is bounded by the GPU time of the graph (the launch queue fills),
so the GPU time of one replay is printed too.

Part 2 sends rounds of 4 ``cuda_graph=True`` tasks (4 models, 8 layers of 256x256, batch 32)
through the scheduler and splits a round with the trace's timestamps: submitting, hand-off
to a worker (submit to start), running (start to end) and end to ``result()`` returning.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _us(torch: Any, fn: Callable[[], Any], n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def _mlp(torch: Any, depth: int = 8, width: int = 256) -> Any:
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width, device="cuda"), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


def host_costs(torch: Any) -> list[tuple[str, float]]:
    from gpuctx.device.cuda import CudaDevice
    from gpuctx.device.graphs import make_graph_runner

    dev = CudaDevice(0)
    net, x = _mlp(torch), torch.randn(32, 256, device="cuda")
    run = make_graph_runner(lambda x: net(x), device=dev, context="a")

    def scope() -> None:
        with dev.stream_scope("a"):
            pass

    rows = []
    with torch.no_grad():
        rows.append(("eager call of the 8-layer MLP (16 kernels)", _us(torch, lambda: net(x), 500)))
        rows.append(("stream_scope enter + exit", _us(torch, scope)))
        with dev.stream_scope("a"):
            run((x,), {})
            graph = next(iter(run.cache.values())).graph
            rows.append(("GraphRunner call, back to back (GPU-bound)", _us(torch, lambda: run((x,), {}))))
            rows.append(("torch CUDAGraph.replay(), back to back (GPU-bound)", _us(torch, graph.replay)))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(100):
                graph.replay()
            end.record()
            end.synchronize()
            rows.append(("GPU time of one replay (100 back to back, events)", start.elapsed_time(end) * 10))
        rows.append(("record_caller() (the event every submit records)", _us(torch, dev.record_caller)))
        event = dev.record_event("a")
        rows.append(("wait_event", _us(torch, lambda: dev.wait_event("b", event))))
        rows.append(("synchronize on a finished event", _us(torch, lambda: dev.synchronize(event))))
    dev.close()
    return rows


def round_split(torch: Any, rounds: int = 300) -> list[tuple[str, float]]:
    import gpuctx

    gpuctx.reset()
    gpuctx.configure(device="cuda:0")
    fns = []
    for i in range(4):
        net = _mlp(torch)
        gpuctx.model(f"m{i}", vram="1GB", offload=False)(lambda net=net: net)

        def body(x: Any) -> Any:
            with torch.no_grad():
                return gpuctx.current_model()(x)

        fns.append(gpuctx.gpu_task(model=f"m{i}", cuda_graph=True, name=f"f{i}")(body))
    xs = [torch.randn(32, 256, device="cuda") for _ in range(4)]
    trace = gpuctx.scheduler().trace
    parts: dict[str, list[float]] = {}
    for r in range(rounds):
        torch.cuda.synchronize()
        trace.clear()
        t0 = time.perf_counter()
        tasks = [f(x) for f, x in zip(fns, xs)]
        t1 = time.perf_counter()
        returned = []
        for t in tasks:
            t.result()
            returned.append(time.perf_counter())
        t2 = time.perf_counter()
        at = {(e.kind, e.task): e.t for e in trace.events}
        sub = [at[("submit", t.id)] for t in tasks]
        start = [at[("start", t.id)] for t in tasks]
        end = [at[("end", t.id)] for t in tasks]
        if r < 20:
            continue   # warm-up: captures, first replays
        for key, value in (("round, first submit to last result()", t2 - t0),
                           ("submitting the 4 tasks", t1 - t0),
                           ("per task: submit to start (hand-off to its worker)", statistics.mean(s - b for b, s in zip(sub, start))),
                           ("per task: start to end (running, GIL shared by 5 threads)", statistics.mean(e - s for s, e in zip(start, end))),
                           ("per task: end to result() returning (includes GPU tail)", statistics.mean(r_ - e for r_, e in zip(returned, end)))):
            parts.setdefault(key, []).append(value * 1e6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the bench keeps the nets: "still referenced"
        gpuctx.reset()
    return [(k, statistics.median(v)) for k, v in parts.items()]


def main() -> None:
    try:
        import torch
    except ImportError:
        sys.exit("bench/gpu_latency.py: torch is not installed; this benchmark needs torch with CUDA")
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_latency.py: no CUDA device visible; nothing measured")
    print(f"# gpuctx GPU host costs — {torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
    print("| host cost of one call | µs (median) |\n|---|---:|")
    for name, v in host_costs(torch):
        print(f"| {name} | {v:.1f} |")
    print("\n| a round of 4 cuda_graph=True tasks on 4 models, through the scheduler | µs (median) |\n|---|---:|")
    for name, v in round_split(torch):
        print(f"| {name} | {v:.1f} |")


if __name__ == "__main__":
    main()
