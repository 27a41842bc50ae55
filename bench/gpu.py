"""GPU benchmarks (needs CUDA): offload/restore bandwidth, release latency, streams and CUDA graphs.

    python bench/gpu.py

Times are CUDA-event timings after a warm-up, medians of many runs, on random data. Rows:
restore-from-host GB/s next to a raw pinned host-to-device copy (target >= 80% of it); time from
eviction to the driver showing the memory free; 4 small launch-bound MLPs as 4 contexts — eager
serial, gpuctx eager, CUDA graphs on one stream, gpuctx with cuda_graph=True (targets: >= 8x eager
serial, >= 2x single-stream graphs); the same at a compute-bound size (target: no regression, >= 0.95x).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device visible; nothing measured")
        return
    from gpuctx._cuda import CudaDevice
    from gpuctx.graphs import make_graph_runner

    dev = CudaDevice(0)
    name = torch.cuda.get_device_name(0)
    print(f"# gpuctx GPU benchmarks — {name}, torch {torch.__version__}\n")

    def event_time(fn, reps=20, warmup=3):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        return statistics.median(out)

    # (a) restore bandwidth vs raw pinned copy
    n = 256 * 1024 * 1024                      # 1 GiB of fp32
    host = torch.randn(n).pin_memory()
    target = [torch.empty(n, device="cuda")]
    raw = event_time(lambda: target[0].copy_(host, non_blocking=True), reps=10)
    target.clear()
    model = torch.nn.Sequential(*[torch.nn.Linear(8192, 8192) for _ in range(4)]).cuda()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    restores = []
    for _ in range(5):
        dev.offload("m", model)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.restore("m", model)
        restores.append(time.perf_counter() - t0)
    print("| measurement | value | baseline (same run) | ratio |")
    print("|---|---:|---:|---:|")
    raw_gbs, rest_gbs = n * 4 / raw / 1e9, nbytes / statistics.median(restores) / 1e9
    print(f"| restore from pinned host ({nbytes / 1e9:.2f} GB module) | {rest_gbs:.1f} GB/s | "
          f"raw pinned H2D copy {raw_gbs:.1f} GB/s | {rest_gbs / raw_gbs:.2f} |")

    # (b) release latency
    report = dev.release("m", [model], nbytes)
    del model
    print(f"| eviction to memory free (release) | {report.seconds * 1e3:.1f} ms | Ollama waits 0.5-1.5 s | |")

    # (c, d) launch-bound and compute-bound MLPs as 4 contexts
    for label, width, depth, batch in (("launch-bound", 256, 8, 32), ("compute-bound", 4096, 4, 4096)):
        nets = [torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)]).cuda().eval()
                for _ in range(4)]
        xs = [torch.randn(batch, width, device="cuda") for _ in range(4)]
        with torch.no_grad():
            def serial():
                for net, x in zip(nets, xs):
                    net(x)
            runners = [make_graph_runner(lambda x, _n=net: _n(x), device=dev, context=f"c{i}")
                       for i, net in enumerate(nets)]
            one = make_graph_runner(lambda x, i: nets[i](x), device=dev, context="single")

            def graphs_single():
                for i, x in enumerate(xs):
                    one((x, i), {})

            def graphs_streams():
                cur = torch.cuda.current_stream()
                for i, (r, x) in enumerate(zip(runners, xs)):
                    dev.get_stream(f"c{i}").wait_stream(cur)
                    r((x,), {})
                for i in range(4):
                    cur.wait_stream(dev.get_stream(f"c{i}"))

            t_serial = event_time(serial, reps=50)
            t_single = event_time(graphs_single, reps=50)
            t_streams = event_time(graphs_streams, reps=50)
        print(f"| {label}: eager serial, 4 models | {t_serial * 1e3:.3f} ms | | 1.00 |")
        print(f"| {label}: CUDA graphs, one stream | {t_single * 1e3:.3f} ms | eager serial | {t_serial / t_single:.2f} |")
        print(f"| {label}: CUDA graphs, a stream per context | {t_streams * 1e3:.3f} ms | eager serial | "
              f"{t_serial / t_streams:.2f} (vs one stream {t_single / t_streams:.2f}) |")
    dev.close()


if __name__ == "__main__":
    main()
