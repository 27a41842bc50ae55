"""Sharing one budget between kernels: the time from a request in kernel B to its grant after
kernel A evicted for it, next to a local eviction, and what happens without a share.

One command, one run, real processes (tests/share_worker.py) on the CPU device:

- **local**: one kernel, two 600 MB models, budget 1 GB: each call of the other model evicts
  the idle one in the same process (the engine's own path).
- **shared**: kernels A and B, one 600 MB model each, one share of 1 GB: each call in one kernel
  needs the other's idle model gone; the time covers B's request, A's heartbeat seeing it,
  A's eviction and release, and B's grant, load and task.
- **no share**: the same two kernels without a share: each with the whole budget (both
  "fit", 1.2 GB committed of 1 GB: on a GPU, an OOM) or with half each (the model never fits).

Target: shared <= 2 x local + 100 ms (median). Every row is the median (and p95) of ``--cycles``
calls; models load in microseconds here, so the rows measure the mechanism, not a load.

    python bench/share.py [--cycles 40]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

MB = 10**6


def _kernel(share: str, budget: int):
    from conftest import Kernel   # the tests' driver of a worker process

    return Kernel(share, budget)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def local(cycles: int) -> list[float]:
    k = _kernel("-", 1000 * MB)
    try:
        for m in ("la", "lb"):
            k("model", name=m, vram=600 * MB)
        k("run", model="la")
        times = []
        for i in range(cycles):
            r = k("run", model="lb" if i % 2 == 0 else "la")
            times.append(r["seconds"])
        return times
    finally:
        k.close()


def shared(cycles: int) -> tuple[list[float], int]:
    a, b = _kernel("bench", 1000 * MB), _kernel("bench", 1000 * MB)
    try:
        a("model", name="ma", vram=600 * MB)
        b("model", name="mb", vram=600 * MB)
        a("run", model="ma")
        times = []
        for i in range(cycles):
            k, m = (b, "mb") if i % 2 == 0 else (a, "ma")
            times.append(k("run", model=m)["seconds"])
        return times, a("state")["for_others"] + b("state")["for_others"]
    finally:
        a.close()
        b.close()


def no_share(budget: int) -> str:
    a, b = _kernel("-", budget), _kernel("-", budget)
    try:
        a("model", name="ma", vram=600 * MB)
        reg = b("model", name="mb", vram=600 * MB)
        if not reg["ok"]:
            return f"B fails: {reg['error'][:100]}"
        a("run", model="ma")
        rb = b("run", model="mb", timeout=5)
        if not rb["ok"]:
            return f"B fails: {rb['error'][:90]}"
        committed = a("state")["committed"] + b("state")["committed"]
        return (f"B runs at once ({rb['seconds'] * 1e3:.1f} ms) and A keeps its model: together "
                f"{committed / 1e9:.1f} GB committed of a 1.0 GB device (on a GPU: OOM)")
    finally:
        a.close()
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=40)
    args = ap.parse_args()
    os.environ.setdefault("GPUCTX_SHARE_DIR", tempfile.mkdtemp(prefix="gpuctx-bench-"))
    from gpuctx.share import HEARTBEAT

    print(f"gpuctx share bench: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"CPU device, heartbeat {HEARTBEAT * 1e3:.0f} ms, {args.cycles} calls per row")
    lt = local(args.cycles)
    st, asked = shared(args.cycles)
    lm, sm = statistics.median(lt), statistics.median(st)
    print(f"{'case':<44}{'median':>10}{'p95':>10}{'max':>10}")
    print(f"{'local eviction (one kernel)':<44}{lm * 1e3:>8.2f}ms{_pct(lt, .95) * 1e3:>8.2f}ms{max(lt) * 1e3:>8.2f}ms")
    print(f"{'request in B -> A evicts -> grant in B':<44}{sm * 1e3:>8.2f}ms{_pct(st, .95) * 1e3:>8.2f}ms"
          f"{max(st) * 1e3:>8.2f}ms")
    target = 2 * lm + 0.100
    print(f"evictions done for another kernel: {asked} of {args.cycles} calls")
    print(f"target: shared median <= 2 x local + 100 ms = {target * 1e3:.1f} ms: {'met' if sm <= target else 'MISSED'}")
    print(f"no share, each kernel the whole 1 GB: {no_share(1000 * MB)}")
    print(f"no share, 500 MB each:                {no_share(500 * MB)}")


if __name__ == "__main__":
    main()
