"""``python -m gpuctx demo``: the reference video pipeline on the default device.

Five models (Whisper 4.5 GB, VideoMAE 5.0, CLAP 2.0, Qwen3 1.5 after Whisper, DINOv3 1.0)
share a budget smaller than their sum; clips arrive interleaved. With no GPU this runs
on the CPU with a declared budget and stand-in models; with CUDA and torch it builds
small real torch modules on the GPU. It prints what was loaded and evicted, how long
tasks waited, and how many loads a naive in-order loop would have needed.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import gpuctx
from gpuctx.units import GB, format_size

MODELS = {"whisper": 4.5, "videomae": 5.0, "clap": 2.0, "qwen3": 1.5, "dinov3": 1.0}
LOAD_SECONDS = {"whisper": 0.12, "videomae": 0.10, "clap": 0.05, "qwen3": 0.08, "dinov3": 0.03}


class _StandIn:
    """A CPU stand-in for a model: a name and a tiny computation."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, x: str) -> str:
        return f"{self.name}({x})"


def _loader(name: str, use_torch: bool):
    def load():
        # A load costs time in real life (reading weights); keep the demo's short.
        threading.Event().wait(LOAD_SECONDS[name])
        if use_torch:
            import torch

            layer = torch.nn.Linear(256, 256).to(gpuctx.current_device()).requires_grad_(False)
            return lambda x: f"{name}({x}, {float(layer(torch.randn(1, 256, device=layer.weight.device)).sum()):+.2f})"
        return _StandIn(name)

    return load


def _naive_loads(order: list[str], budget_gb: float) -> int:
    """Loads of an in-order loop with LRU eviction (what hand-written code does)."""
    resident: list[str] = []
    loads = 0
    for m in order:
        if m in resident:
            resident.remove(m)
            resident.append(m)
            continue
        while sum(MODELS[r] for r in resident) + MODELS[m] > budget_gb:
            resident.pop(0)
        resident.append(m)
        loads += 1
    return loads


def demo(clips: int = 6, budget: str = "8GB", device: str = "auto") -> int:
    """Run the pipeline; return 0 when every task succeeded."""
    gpuctx.reset()
    use_torch = False
    if device != "cpu":
        try:
            import torch  # noqa: F401

            use_torch = torch.cuda.is_available()
        except ImportError:
            pass
    gpuctx.configure(device=device if use_torch else "cpu", budget=budget, safety_factor=1.0)
    s = gpuctx.scheduler()
    print(f"gpuctx demo on {s.device.name}: budget {format_size(s.budget)}, models need "
          f"{sum(MODELS.values()):.1f} GB together")
    for name, gb in MODELS.items():
        gpuctx.model(name, vram=int(gb * GB))(_loader(name, use_torch))

    def task(model_name: str):
        return gpuctx.gpu_task(model=model_name, name=model_name)(lambda x: gpuctx.current_model()(x))

    asr, video, audio, llm, vision = (task(m) for m in ("whisper", "videomae", "clap", "qwen3", "dinov3"))
    order: list[str] = []
    tasks = []
    t0 = time.perf_counter()
    for i in range(clips):
        clip = f"clip{i}"
        text = asr(clip)
        tasks += [text, video(clip), audio(clip), llm(text), vision(clip)]
        order += ["whisper", "videomae", "clap", "qwen3", "dinov3"]
    gpuctx.wait(tasks, timeout=120)
    elapsed = time.perf_counter() - t0
    failed = [t for t in tasks if t.exception(0) is not None]
    st = gpuctx.stats()
    print(f"\n{len(tasks)} tasks in {elapsed:.2f} s, {len(failed)} failed")
    print(f"{'model':<10} {'loads':>5} {'evictions':>9} {'tasks':>5} {'wait p50':>9} {'wait max':>9}")
    for name in MODELS:
        m = st["models"].get(name, {})
        print(f"{name:<10} {m.get('loads', 0):>5} {m.get('unloads', 0) + m.get('offloads', 0):>9} "
              f"{m.get('tasks', 0):>5} {m.get('wait_p50', 0) * 1e3:>7.1f}ms {m.get('wait_max', 0) * 1e3:>7.1f}ms")
    loads = sum(m["loads"] for m in st["models"].values())
    print(f"\nloads: gpuctx {loads}, naive in-order loop {_naive_loads(order, s.budget / GB)}, "
          f"minimum {len(MODELS)}; model switches {st['model_switches']}; peak VRAM "
          f"{format_size(st['peak_vram'])} of {format_size(s.budget)}")
    print("evictions:")
    for e in s.trace.events:
        if e.kind in ("unload", "offload"):
            print(f"  {e.t - t0:6.3f}s {e.kind:<7} {e.model:<9} ({e.reason})")
    print("first result:", tasks[3].result())
    gpuctx.shutdown()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m gpuctx demo [--clips N] [--budget SIZE] [--device D]``."""
    p = argparse.ArgumentParser(prog="python -m gpuctx")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the multi-model demo pipeline")
    d.add_argument("--clips", type=int, default=6)
    d.add_argument("--budget", default="8GB")
    d.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    return demo(args.clips, args.budget, args.device)


if __name__ == "__main__":
    sys.exit(main())
