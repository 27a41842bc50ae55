"""The seed's five real models through gpuctx on a GPU; prints one markdown report. Issue 15, item 6.

    python bench/gpu_models.py               # a GPU: published sizes in bf16 (first run also writes ~6 GB of checkpoints)
    python bench/gpu_models.py --cpu-smoke   # tiny configs on the CPU device: checks the script itself

No downloads: gpuctx.zoo builds Whisper large-v3, VideoMAE-large, CLAP (HTSAT), Qwen3-0.6B and
DINOv3 ViT-L/16 from their config classes with random weights and saves each once to a
safetensors checkpoint (``--cache``, default ``$GPUCTX_ZOO`` or ~/.cache/gpuctx/zoo); every
load below reads it back from disk.

(a) Size: the device's measured bytes at load (CudaDevice.load: the allocator's growth on the
    context's stream) against the module's parameter + buffer bytes, tied weights once.
    Target: within 5%. On the CPU device the measurement *is* the parameter bytes.
(b) Working memory: torch.cuda.max_memory_allocated() during one pipeline step (generate for
    Whisper and Qwen3, a forward for the others) minus the allocation before it. GPU only.
(c) The pipeline (3 clips, 15 tasks; Qwen3 after Whisper and CLAP) under a budget smaller than
    the models' sum, each declared as weights + 1.25 x working memory (gpuctx does not yet charge
    working memory itself): no task may fail, no OOM; loads, evictions and peak are reported.
(d) Qwen3 offload to pinned host memory and restore (CudaDevice.offload/restore): every tensor
    bit-exact and lm_head still the same tensor as embed_tokens. On the CPU, the same rebinding
    code (_module_items, _copies, _rebind) with host copies.
(e) Restore throughput in GB/s next to a raw pinned host-to-device copy of as many bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GB = 1e9


def _fmt(n: float | None) -> str:
    from gpuctx.units import format_size

    return "-" if n is None else format_size(int(n))


def _free(torch: Any, gpu: bool) -> None:
    import gc

    gc.collect()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure_models(zoo: Any, torch: Any, device: Any, size: str, folders: dict, dtype: Any, gpu: bool) -> dict:
    """(a) and (b) for each model, loaded alone through the device's own load()."""
    rows = {}
    for name in zoo.NAMES:
        _free(torch, gpu)
        t0 = time.perf_counter()
        target = f"cuda:{device.index}" if gpu else "cpu"
        model, measured = device.load(name, lambda: zoo.load(name, folders[name], target, dtype))
        load_s = time.perf_counter() - t0
        weights = zoo.param_bytes(model)
        batch = zoo.inputs(name, size, device=target)
        working = None
        if gpu:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(device.index)
            torch.cuda.reset_peak_memory_stats(device.index)
        t0 = time.perf_counter()
        out = zoo.run(name, model, batch)
        step_s = time.perf_counter() - t0
        if gpu:
            working = torch.cuda.max_memory_allocated(device.index) - before
        rows[name] = dict(weights=weights, measured=measured, load_s=load_s, step_s=step_s, working=working,
                          out=(tuple(out.shape), str(out.dtype).replace("torch.", "")))
        del model, out
    return rows


def run_pipeline(zoo: Any, gpuctx: Any, rows: dict, size: str, cache: str, dtype: Any, gpu: bool) -> dict:
    """(c): the whole pipeline under a budget smaller than the declared sum."""
    declared = {n: int(r["weights"] + 1.25 * (r["working"] or 0)) + (64 << 20 if gpu else 0) for n, r in rows.items()}
    total = sum(declared.values())
    budget = max(max(declared.values()), int(0.6 * total))
    gpuctx.reset()
    gpuctx.configure(device="cuda" if gpu else "cpu", budget=budget, safety_factor=1.0)
    loads: list[str] = []
    zoo.register(size, cache, vram=declared, dtype=dtype, on_load=loads.append)
    t0 = time.perf_counter()
    tasks = zoo.submit_clips(3, size)
    gpuctx.wait(tasks, timeout=420)
    wall = time.perf_counter() - t0
    failed = [t for t in tasks if t.exception(0) is not None]
    st = gpuctx.stats()
    evictions = [(e.model, e.reason) for e in gpuctx.scheduler().trace.events if e.kind in ("unload", "offload")]
    out = dict(declared=declared, total=total, budget=budget, tasks=len(tasks), failed=failed, wall=wall,
               loads=len(loads), evictions=evictions, peak=st["peak_vram"],
               whisper=tasks[0].result()[0].tolist() if not failed else None)
    gpuctx.shutdown()
    return out


def offload_round_trip(zoo: Any, torch: Any, folder: Any, dtype: Any, gpu: bool, index: int) -> dict:
    """(d) and (e) on Qwen3."""
    from gpuctx.device import cuda as _cuda
    from gpuctx.device import hostcopy as _moves

    target = f"cuda:{index}" if gpu else "cpu"
    model = zoo.load("qwen3", folder, target, dtype)
    reference = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    tied = lambda: (model.lm_head.weight is model.model.embed_tokens.weight  # noqa: E731
                    and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
    nbytes = zoo.param_bytes(model)
    res: dict[str, Any] = dict(nbytes=nbytes, tied_before=tied())
    if gpu:
        dev = _cuda.CudaDevice(index)
        restores, raws = [], []
        for _ in range(3):
            dev.offload("qwen3", model)
            res["tied_offloaded"] = tied() and not model.lm_head.weight.is_cuda and model.lm_head.weight.is_pinned()
            t0 = time.perf_counter()
            dev.restore("qwen3", model)
            torch.cuda.synchronize()   # a restore returns before its copies land (pipelined): time them all
            restores.append(time.perf_counter() - t0)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=target)
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            raws.append(time.perf_counter() - t0)
        res["restore_gbs"] = nbytes / statistics.median(restores) / GB
        res["raw_gbs"] = nbytes / statistics.median(raws) / GB
        del host, dst
    else:   # the CPU device does not offload: exercise the same rebinding with host copies
        items = _moves._module_items(torch, model, lambda t: not t.is_cuda)
        copies = _moves._copies(items, lambda o, t: t.detach().clone())
        _moves._rebind(items, copies)
        res["tied_offloaded"] = tied()
    state = model.state_dict()
    res["bit_exact"] = all(torch.equal(state[k].cpu(), v) for k, v in reference.items())
    res["tied_after"] = tied()
    res["on_device"] = all(str(p.device).startswith(target) for p in model.parameters())
    model = None   # drop it (the closures above are done with it)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU device (no GPU needed)")
    parser.add_argument("--cache", default=None, help="checkpoint folder (default: $GPUCTX_ZOO or ~/.cache/gpuctx/zoo)")
    args = parser.parse_args(argv)
    try:
        import torch

        import gpuctx
        from gpuctx import zoo
    except ImportError as exc:
        sys.exit(f"bench/gpu_models.py: {exc}; needs torch and the models extra (pip install 'gpuctx[models]')")
    if not zoo.available():
        sys.exit("bench/gpu_models.py: needs transformers and safetensors (pip install 'gpuctx[models]')")
    gpu = not args.cpu_smoke
    if gpu and not torch.cuda.is_available():
        sys.exit("bench/gpu_models.py: no CUDA device visible; use --cpu-smoke to check the script on the CPU")
    from gpuctx.device import CpuDevice

    size, dtype = ("real", torch.bfloat16) if gpu else ("tiny", torch.float32)
    cache = str(args.cache or zoo.default_cache())
    t_start = time.perf_counter()
    if gpu:
        from gpuctx.device.cuda import CudaDevice

        device = CudaDevice(0)
        props = torch.cuda.get_device_properties(0)
        where = f"{props.name} ({props.total_memory / GB:.0f} GB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        device = CpuDevice()
        where = f"CPU smoke run (tiny configs), torch {torch.__version__}"
    import transformers

    print(f"# gpuctx with real models — {where}, transformers {transformers.__version__}\n")

    t0 = time.perf_counter()
    folders = {n: zoo.checkpoint(n, size, cache, dtype=dtype, device="cuda" if gpu else "cpu") for n in zoo.NAMES}
    print(f"checkpoints ready in {time.perf_counter() - t0:.1f} s (built and saved only when missing), in {cache}\n")

    rows = measure_models(zoo, torch, device, size, folders, dtype, gpu)
    print("## (a) measured size vs parameter bytes, (b) working memory\n")
    print("| model | weights (params + buffers) | measured at load | measured / weights | load s | peak working | step s | output |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for name, r in rows.items():
        ratio = r["measured"] / r["weights"] if r["measured"] is not None and r["weights"] else None
        within = ratio is not None and abs(ratio - 1) <= 0.05
        ok &= within
        print(f"| {name} | {_fmt(r['weights'])} | {_fmt(r['measured'])} | "
              f"{'-' if ratio is None else f'{ratio:.3f}'}{'' if within else ' **off by >5%**'} | {r['load_s']:.2f} | "
              f"{_fmt(r['working']) if gpu else 'n/a (CPU)'} | {r['step_s']:.2f} | {r['out'][0]} {r['out'][1]} |")
    _free(torch, gpu)

    p = run_pipeline(zoo, gpuctx, rows, size, cache, dtype, gpu)
    ok &= not p["failed"] and p["peak"] <= p["budget"] and bool(p["evictions"])
    print(f"\n## (c) pipeline under a budget smaller than the sum\n\n"
          f"declared (weights + 1.25 x working): {', '.join(f'{n} {_fmt(v)}' for n, v in p['declared'].items())}; "
          f"sum {_fmt(p['total'])}, budget {_fmt(p['budget'])}.\n"
          f"{p['tasks']} tasks in {p['wall']:.2f} s, {len(p['failed'])} failed; {p['loads']} loads, "
          f"{len(p['evictions'])} evictions; peak counted {_fmt(p['peak'])} of {_fmt(p['budget'])}.")
    for t in p["failed"][:3]:
        print(f"- failed: {t.name}: {type(t.exception(0)).__name__}: {t.exception(0)}")
    for model, reason in p["evictions"]:
        print(f"- evicted {model} ({reason})")
    print(f"- whisper token ids, clip 0: {p['whisper']}")
    _free(torch, gpu)

    o = offload_round_trip(zoo, torch, folders["qwen3"], dtype, gpu, 0)
    exact = o["bit_exact"] and o["tied_before"] and o["tied_offloaded"] and o["tied_after"] and o["on_device"]
    ok &= exact
    print(f"\n## (d) Qwen3 offload/restore, (e) restore throughput\n\n"
          f"{_fmt(o['nbytes'])}: bit-exact {o['bit_exact']}; lm_head is embed_tokens before {o['tied_before']}, "
          f"offloaded {o['tied_offloaded']}, after {o['tied_after']}; back on the device {o['on_device']}.")
    if gpu:
        print(f"restore {o['restore_gbs']:.1f} GB/s vs raw pinned H2D copy {o['raw_gbs']:.1f} GB/s "
              f"({o['restore_gbs'] / o['raw_gbs']:.2f}x).")
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - t_start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
