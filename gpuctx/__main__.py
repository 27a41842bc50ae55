"""``python -m gpuctx demo``: the reference video pipeline on the default device;
``python -m gpuctx top``: the dashboard's panel in a terminal.

Five models (Whisper 4.5 GB, VideoMAE 5.0, CLAP 2.0, Qwen3 1.5 after Whisper and CLAP,
DINOv3 1.0) share a budget smaller than their sum; clips arrive interleaved. With
transformers installed (the ``models`` extra) they are the real architectures from
:mod:`gpuctx.zoo`, random weights read from safetensors checkpoints: tiny configs on the
CPU, the published sizes on a GPU. Without it, stand-ins (strings on the CPU, small torch
modules on a GPU) say so in one line. It prints what was loaded and evicted, how long
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


def _stand_in_tasks(clips: int, use_torch: bool) -> list:
    """The pipeline with stand-in models (no transformers): strings, or small torch modules on a GPU."""
    for name, gb in MODELS.items():
        gpuctx.model(name, vram=int(gb * GB))(_loader(name, use_torch))

    def task(model_name: str):
        return gpuctx.gpu_task(model=model_name, name=model_name)(lambda x: gpuctx.current_model()(x))

    asr, video, audio, llm, vision = (task(m) for m in ("whisper", "videomae", "clap", "qwen3", "dinov3"))
    tasks = []
    for i in range(clips):
        clip = f"clip{i}"
        text = asr(clip)
        tasks += [text, video(clip), audio(clip), llm(text), vision(clip)]
    return tasks


def _real_models() -> bool:
    from gpuctx import zoo

    return zoo.available()


def demo(clips: int = 6, budget: str = "8GB", device: str = "auto", real: bool | None = None) -> int:
    """Run the pipeline; return 0 when every task succeeded.

    ``real``: use the zoo's real architectures (None: when transformers is installed).
    """
    gpuctx.reset()
    on_gpu = device != "cpu" and _cuda_visible()
    gpuctx.configure(device=device if on_gpu else "cpu", budget=budget, safety_factor=1.0)
    s = gpuctx.scheduler()
    real = _real_models() if real is None else real
    print(f"gpuctx demo on {s.device.name}: budget {format_size(s.budget)}, models need "
          f"{sum(MODELS.values()):.1f} GB together")
    t0 = time.perf_counter()
    if real:
        import torch

        from gpuctx import zoo

        size = "real" if on_gpu else "tiny"
        dtype = torch.bfloat16 if on_gpu else None
        print(f"models: Whisper, VideoMAE, CLAP, Qwen3, DINOv3 with random weights ({size} configs), "
              f"read from safetensors checkpoints in {zoo.default_cache()}")
        # builds and saves each checkpoint the first time only (on the GPU: real sizes are large)
        zoo.register(size, dtype=dtype, build_device=s.device.name if on_gpu else "cpu")
        t0 = time.perf_counter()
        tasks = zoo.submit_clips(clips, size)
    else:
        print("models: stand-ins (install gpuctx[models] for Whisper, VideoMAE, CLAP, Qwen3 and DINOv3)")
        tasks = _stand_in_tasks(clips, on_gpu)
    order = ["whisper", "videomae", "clap", "qwen3", "dinov3"] * clips
    gpuctx.wait(tasks, timeout=600 if real else 120)
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
    if real:
        from gpuctx import zoo

        rows = {r.name: r for r in gpuctx.status().models}
        print("sizes: declared for the budget, and the loaded module's parameter + buffer bytes:")
        for name in MODELS:
            weights = zoo.WEIGHTS.get(name)
            print(f"  {name:<9} {format_size(rows[name].size):>9} ({rows[name].size_source}), weights "
                  f"{format_size(weights) if weights is not None else '?':>9}")
        if not failed:
            print("clip 0: whisper token ids", tasks[0].result()[0].tolist(), "- qwen3 tokens",
                  tasks[3].result()[0].tolist())
    else:
        print("first result:", tasks[3].result())
    for t in failed[:3]:
        print(f"failed: {t.name}: {type(t.exception(0)).__name__}: {t.exception(0)}")
    gpuctx.shutdown()
    return 1 if failed else 0


def _cuda_visible() -> bool:
    try:
        from gpuctx.device import cuda as _cuda

        return _cuda.cuda_available()
    except Exception:  # noqa: BLE001 - a broken CUDA install: the CPU
        return False


def _size(text: str) -> int:
    """argparse type of --budget: a size like 8GB or 12.5GiB."""
    try:
        n = gpuctx.parse_size(text)
    except (gpuctx.ConfigError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 8GB, 12GiB or 8000000000") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the budget must be above 0")
    return n


def _positive(text: str) -> int:
    """argparse type of --clips: an integer of at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: at least one clip is needed")
    return n


def _seconds_arg(text: str) -> float:
    """argparse type of --interval and --window: seconds above 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds above 0")
    return v


def top(once: bool = False, interval: float = 1.0, window: float = 30.0, demo_clips: int | None = None,
        share: str | None = None) -> int:
    """Draw the panel of this process's scheduler (``--demo``: while the stand-in pipeline runs), or of
    share ``share``'s database, read-only (``--share``: this process does not join it)."""
    from gpuctx.panel import top as _top

    if share is not None:
        return _top(gpuctx.api.current_scheduler, once=once, interval=interval, window=window, share=share)
    if demo_clips is None:
        return _top(gpuctx.api.current_scheduler, once=once, interval=interval, window=window)
    gpuctx.reset()
    gpuctx.configure(device="cpu", budget="8GB", safety_factor=1.0)
    tasks = _stand_in_tasks(demo_clips, False)
    if once:
        gpuctx.wait(tasks, timeout=120)
        return _top(gpuctx.api.current_scheduler, once=True, window=window)
    try:
        return _top(gpuctx.api.current_scheduler, interval=interval, window=window)
    finally:
        gpuctx.shutdown(cancel_pending=True)


def _share_name(text: str) -> str:
    """argparse type of --share: a share's name (letters, digits, '.', '_', '-')."""
    from gpuctx.share import check_name

    try:
        return check_name(text, configure=False)
    except gpuctx.ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device(text: str) -> str:
    """argparse type of --device: auto, cpu, cuda or cuda:N."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu, cuda or cuda:N")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m gpuctx demo [--clips N] [--budget SIZE] [--device D]``."""
    p = argparse.ArgumentParser(prog="python -m gpuctx", description="gpuctx command line.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="run the multi-model demo pipeline",
                       description="Run the reference video pipeline (Whisper, VideoMAE, CLAP, Qwen3, DINOv3) "
                                   "under a budget smaller than the models' sum, and report loads and evictions.")
    d.add_argument("--clips", type=_positive, default=6, metavar="N",
                   help="clips to process, five tasks each (default: 6)")
    d.add_argument("--budget", type=_size, default="8GB", metavar="SIZE",
                   help=f"VRAM budget like 8GB or 12GiB; at least the largest model, "
                        f"{max(MODELS.values()):g} GB (default: 8GB)")
    d.add_argument("--device", type=_device, default="auto", metavar="DEVICE",
                   help="auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N (default: auto)")
    d.add_argument("--stand-ins", action="store_true",
                   help="use stand-in models even when transformers is installed")
    t = sub.add_parser("top", help="show the live panel in a terminal",
                       description="The dashboard's panel (budget, models, queues, loads, evictions, timeline) "
                                   "for this process's scheduler, redrawn until Ctrl-C. With --demo, the demo's "
                                   "stand-in pipeline runs meanwhile, so there is something to watch. With "
                                   "--share NAME, a share's database, read without joining it.")
    t.add_argument("--once", action="store_true", help="print one frame and exit")
    t.add_argument("--interval", type=_seconds_arg, default=1.0, metavar="S",
                   help="seconds between frames (default: 1)")
    t.add_argument("--window", type=_seconds_arg, default=30.0, metavar="S",
                   help="seconds of history in the timeline (default: 30)")
    t.add_argument("--demo", type=_positive, default=None, metavar="CLIPS",
                   help="run the demo pipeline with stand-in models on the CPU (CLIPS clips) while drawing")
    t.add_argument("--share", type=_share_name, default=None, metavar="NAME",
                   help="draw share NAME's database instead: its kernels, what each holds and is charged, "
                        "requests and evictions asked; read-only, without joining the share")
    args = p.parse_args(argv)
    if args.cmd == "top":
        if args.share is not None and args.demo is not None:
            t.error("argument --share: not with --demo (a share's view reads the database, not this process)")
        try:
            return top(args.once, args.interval, args.window, args.demo, args.share)
        except gpuctx.ShareError as exc:
            t.exit(2, f"python -m gpuctx top: {exc}\n")
    largest = max(MODELS, key=MODELS.__getitem__)
    if args.budget < MODELS[largest] * GB:
        d.error(f"argument --budget: {format_size(args.budget)} cannot hold {largest} "
                f"({MODELS[largest]:g} GB); give at least {MODELS[largest]:g}GB")
    if args.device.startswith("cuda") and not _cuda_visible():
        d.error(f"argument --device: {args.device!r} asked for, but no CUDA device is visible to torch or CuPy; "
                "use --device cpu or auto")
    return demo(args.clips, args.budget, args.device, real=False if args.stand_ins else None)


if __name__ == "__main__":
    sys.exit(main())
