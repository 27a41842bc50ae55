"""Dynamic batching through the live scheduler: many small calls, batch_size 1 vs 8 vs 32, one run.

    python bench/batching.py [--calls 2000]

Each call of the batched function costs a fixed launch overhead plus a small per-item
cost (a stand-in for a GPU kernel launch and its work), as small embedding calls do.
Two models alternate so that grouping and batching work together. Prints tasks/s,
executions, model switches and calls per switch, with ratios against batch_size=1.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import gpuctx  # noqa: E402

LAUNCH_S, PER_ITEM_S = 0.0005, 0.00002
_pause = threading.Event()


def _cost(n: int) -> None:
    _pause.wait(LAUNCH_S + PER_ITEM_S * n)   # a fixed launch cost plus per-item work


def run(batch_size: int, calls: int) -> dict:
    gpuctx.reset()
    gpuctx.configure(device="cpu", budget="4GB", safety_factor=1.0)
    for m in ("clap", "dinov3"):
        gpuctx.model(m, vram="3GB")(lambda _m=m: _m)   # only one fits: switches cost a load
    executions = [0]

    def make(model: str):
        if batch_size == 1:
            def one(x):
                executions[0] += 1
                _cost(1)
                return x
            return gpuctx.gpu_task(model=model, name=f"{model}_1")(one)

        def many(xs):
            executions[0] += 1
            _cost(len(xs))
            return xs
        return gpuctx.gpu_task(model=model, name=f"{model}_b", batch_size=batch_size, batch_wait="2ms")(many)

    fns = [make("clap"), make("dinov3")]
    t0 = time.perf_counter()
    tasks = [fns[i % 2](i) for i in range(calls)]
    gpuctx.wait(tasks)
    dt = time.perf_counter() - t0
    assert all(t.result() == i for i, t in enumerate(tasks))
    st = gpuctx.stats()
    switches = max(1, st["model_switches"])
    return {"tasks/s": calls / dt, "executions": executions[0], "switches": st["model_switches"],
            "calls/switch": calls / switches}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    a = ap.parse_args()
    rows = {b: run(b, a.calls) for b in (1, 8, 32)}
    gpuctx.shutdown()
    base = rows[1]["tasks/s"]
    print(f"# dynamic batching — {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{a.calls} calls over 2 models that do not fit together")
    print()
    print("| batch_size | tasks/s | x batch_size=1 | executions | model switches | calls per switch |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b, r in rows.items():
        print(f"| {b} | {r['tasks/s']:.0f} | {r['tasks/s'] / base:.1f} | {r['executions']} | {r['switches']} | "
              f"{r['calls/switch']:.0f} |")


if __name__ == "__main__":
    main()
