"""GPU rows of issue 18 (switches that cost almost nothing), run by ``bench/gpu.py``. Needs CUDA.

Each figure next to its baseline from the same run, all through gpuctx's own CudaDevice:

(e) switch: a call on an offloaded ~4 GB model (32 fp16 layers of 8192x8192, a synthetic stand-in
    for the 4 GB-class real model: the GPU machine has no network to fetch one) with the pipelined
    restore, against the same call on the resident model plus a raw pinned H2D copy of its bytes;
    target <= 1.15x. The serial restore-then-compute (``restore_group_bytes=None``) is shown too.
(f) evict: offloading the unmodified model (its clean host copy is kept: no copy back), then the
    caches emptied, against a full copy back of the same model; target <= 5 ms for 4 GB. A
    modified model is still copied back: checked bit-exact.
(g) partial: a model 1.5x its share of the card, streamed (``place_partial``), against diffusers'
    group offload (leaf level, with streams) on the same model, in forwards per second; target >= 1x.
(h) graphs: the recapture after a restore that CUDA VMM would save (VMM detection shown; gpuctx
    recaptures either way so far).
(i) host cost: host microseconds per ``cuda_graph=True`` task of a tiny model through the task API,
    against a bare graph replay; target <= 40 us.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

from gpuctx.device.pipeline import GROUP_BYTES

GB = 1e9
MiB = 2**20


def switch_rows(torch: Any, dev: Any, quick: bool) -> list:
    """Every row of (e) to (i)."""
    rows: list = []
    rows += _switch_and_evict_rows(torch, dev, layers=8 if quick else 32, reps=2 if quick else 5)
    rows += _partial_rows(torch, dev, reps=3 if quick else 10)
    rows += _graph_rows(torch, dev)
    rows += _host_cost_rows(torch, n=200 if quick else 2000)
    return rows


def _sync_wall(torch: Any, fn: Any) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _stack(torch: Any, width: int, layers: int, dtype: Any) -> Any:
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False, device="cuda", dtype=dtype)
                                 for _ in range(layers)]).eval()


# --------------------------------------------------------------------------- (e) switch, (f) evict
def _switch_and_evict_rows(torch: Any, dev: Any, layers: int, reps: int) -> list:
    width, ctx = 8192, "bench-switch"
    model = _stack(torch, width, layers, torch.float16)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randn(2048, width, device="cuda", dtype=torch.float16)

    def call() -> Any:
        with torch.no_grad(), dev.stream_scope(ctx):
            return model(x)

    call()
    resident = statistics.median(_sync_wall(torch, call) for _ in range(reps))
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    raw = statistics.median(_sync_wall(torch, lambda: dst.copy_(host, non_blocking=True)) for _ in range(reps))
    host = dst = None   # drop the buffers (a del would leave the lambdas above naming nothing)
    dev.empty_caches()

    store = dev.host_copies
    switch, serial, free_evict, copy_back = [], [], [], []
    for group_bytes, out in ((GROUP_BYTES, switch), (None, serial)):
        saved = dev.restore_group_bytes
        dev.restore_group_bytes = group_bytes
        try:
            for _ in range(reps):
                dev.offload(ctx, model)
                dev.empty_caches()
                out.append(_sync_wall(torch, lambda: (dev.restore(ctx, model), call())))
                free_evict.append(_sync_wall(torch, lambda: (dev.offload(ctx, model), dev.empty_caches())))
                dev.restore(ctx, model)
        finally:
            dev.restore_group_bytes = saved
    free_count = store.free_evictions
    store.keep_clean = False
    try:
        for _ in range(reps):
            dev.restore(ctx, model)                    # with keep_clean off: no clean copy, a real copy back
            copy_back.append(_sync_wall(torch, lambda: (dev.offload(ctx, model), dev.empty_caches())))
        dev.restore(ctx, model)
    finally:
        store.keep_clean = True
    dev.offload(ctx, model)
    dev.restore(ctx, model)
    torch.cuda.synchronize()
    with torch.no_grad():
        model[0].weight.add_(1)                        # modified: must be copied back
    expected = [p.detach().cpu() for p in model.parameters()]
    backs = store.copy_backs
    dev.offload(ctx, model)
    exact = store.copy_backs == backs + 1 and all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))
    model = None   # drop the stack before the next rows (the closures above are done with it)
    dev.empty_caches()

    t_switch, t_serial = statistics.median(switch), statistics.median(serial)
    t_free, t_back = statistics.median(free_evict), statistics.median(copy_back)
    size = f"{nbytes / GB:.1f} GB, {layers} fp16 layers {width}x{width}"
    base = resident + raw
    return [
        (f"switch: call on an offloaded model, pipelined restore ({size})", f"{t_switch * 1e3:.1f} ms",
         f"resident call {resident * 1e3:.1f} ms + raw restore {raw * 1e3:.1f} ms", f"{t_switch / base:.2f}", "<= 1.15"),
        (f"switch: restore then call, serial ({size})", f"{t_serial * 1e3:.1f} ms",
         f"resident call + raw restore {base * 1e3:.1f} ms", f"{t_serial / base:.2f}", "(information)"),
        (f"evict an unmodified model, no copy back ({size})", f"{t_free * 1e3:.2f} ms",
         f"full copy back {t_back * 1e3:.1f} ms", f"{t_free / t_back:.3f}",
         f"<= 5 ms ({free_count} free evictions counted)"),
        (f"evict a modified model: copied back, bit-exact ({size})", "yes" if exact else "NO", "", "", "yes"),
    ]


# --------------------------------------------------------------------------- (g) partial
def _partial_rows(torch: Any, dev: Any, reps: int) -> list:
    width, layers = 8192, 24
    x = torch.randn(512, width, device="cuda", dtype=torch.float16)

    def host_model() -> Any:
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False, dtype=torch.float16)
                                     for _ in range(layers)]).eval()

    def per_second(model: Any, ctx: str | None) -> float:
        def call() -> Any:
            with torch.no_grad():
                if ctx is None:
                    return model(x)
                with dev.stream_scope(ctx):
                    return model(x)

        call()
        return 1.0 / statistics.median(_sync_wall(torch, call) for _ in range(reps))

    ours = host_model()
    nbytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    share = int(nbytes / 1.5)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(0)
    torch.cuda.reset_peak_memory_stats(0)
    fraction = dev.place_partial("bench-partial", ours, share)
    ours_rate = per_second(ours, "bench-partial")
    peak = torch.cuda.max_memory_allocated(0) - base
    del ours
    dev.empty_caches()
    size = f"{nbytes / GB:.1f} GB model, share {share / GB:.1f} GB"
    rows = [(f"partial: streamed model, forwards/s ({size}, {fraction:.0%} resident)", f"{ours_rate:.2f}/s",
             "", "", f"peak {peak / GB:.2f} GB <= share + activations")]
    try:
        from diffusers.hooks import apply_group_offloading
    except ImportError:
        rows.append(("partial: diffusers group offload baseline", "not measured: diffusers not installed", "", "", ""))
        return rows
    theirs = host_model()
    apply_group_offloading(theirs, onload_device=torch.device("cuda"), offload_type="leaf_level", use_stream=True)
    theirs_rate = per_second(theirs, None)
    rows[0] = (rows[0][0], rows[0][1], f"diffusers group offload (leaf, streams) {theirs_rate:.2f}/s",
               f"{ours_rate / theirs_rate:.2f}x", ">= 1x; " + rows[0][4])
    del theirs
    dev.empty_caches()
    return rows


# --------------------------------------------------------------------------- (h) graphs after a restore
def _graph_rows(torch: Any, dev: Any) -> list:
    from gpuctx.device.cuda import vmm_support
    from gpuctx.device.graphs import make_graph_runner

    ctx = "bench-graph"
    net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, device="cuda") for _ in range(16)]).eval()
    run = make_graph_runner(lambda v: net(v), device=dev, context=ctx)
    x = torch.randn(64, 1024, device="cuda")

    def call() -> Any:
        with torch.no_grad(), dev.stream_scope(ctx):
            return run((x,), {})

    call()
    replay = statistics.median(_sync_wall(torch, call) for _ in range(20))
    dev.offload(ctx, net)
    dev.restore(ctx, net)
    recapture = _sync_wall(torch, call)                # the generation changed: captured again
    ok, why = vmm_support(dev.index)
    return [("graphs: first call after an offload/restore (recapture)", f"{recapture * 1e3:.2f} ms",
             f"replay {replay * 1e3:.3f} ms", f"{recapture / replay:.0f}x",
             f"what VMM would save; VMM: {'yes' if ok else 'no'} ({why})")]


# --------------------------------------------------------------------------- (i) host cost per task
def _host_cost_rows(torch: Any, n: int) -> list:
    import gpuctx
    from gpuctx.device.cuda import CudaDevice
    from gpuctx.device.graphs import make_graph_runner

    net = torch.nn.Linear(64, 64, device="cuda").eval()
    x = torch.randn(8, 64, device="cuda")
    bare_dev = CudaDevice(0)
    run = make_graph_runner(lambda v: net(v), device=bare_dev, context="bare")
    with torch.no_grad(), bare_dev.stream_scope("bare"):
        run((x,), {})
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            run((x,), {})
        bare = (time.perf_counter() - t0) / n
        torch.cuda.synchronize()
    bare_dev.close()

    gpuctx.reset()
    gpuctx.configure(device="cuda:0")
    try:
        gpuctx.model("host-cost", vram="64MB", offload=False)(lambda: net)

        @gpuctx.gpu_task(model="host-cost", cuda_graph=True)
        def body(v: Any) -> Any:
            with torch.no_grad():
                return gpuctx.current_model()(v)

        for t in [body(x) for _ in range(20)]:
            t.result()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tasks = [body(x) for _ in range(n)]
        for t in tasks:
            t.result()
        per_task = (time.perf_counter() - t0) / n
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            gpuctx.reset()
    return [("host cost per cuda_graph=True task (tiny model, submit to result, pipelined)",
             f"{per_task * 1e6:.0f} us", f"bare graph replay {bare * 1e6:.0f} us", f"{per_task / bare:.1f}x", "<= 40 us")]
