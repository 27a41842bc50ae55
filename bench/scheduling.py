"""Scheduling quality on standard traces, simulated with the real policy (gpuctx.sim).

    python bench/scheduling.py

Loads, model switches, makespan and p95 wait for gpuctx against FIFO+LRU (model
multiplexing with an LRU cache), Ollama-style keep-alive ordering and the lower bound
(each model loaded once), for budgets from tight to loose, all in one run.
"""

from __future__ import annotations

import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gpuctx.sim import chat_traffic, lower_bound_loads, random_dag, simulate, video_pipeline  # noqa: E402
from gpuctx.units import GB  # noqa: E402

TRACES = {
    "video pipeline (20 clips)": (video_pipeline(20), (6, 8, 10, 14, 20)),
    "chat traffic (ASR/LLM/TTS, 150 calls)": (chat_traffic(150), (6, 8, 11, 14)),
    "random DAG (200 tasks, 6 models)": (random_dag(200), (4, 6, 10, 16)),
}


def main() -> None:
    print(f"# scheduling quality (sim) — {platform.machine()}, Python {platform.python_version()}")
    for title, ((models, tasks), budgets) in TRACES.items():
        print(f"\n## {title}; lower bound: {lower_bound_loads(tasks)} loads\n")
        print("| budget | strategy | loads | switches | makespan s | p95 wait s | loads vs fifo_lru |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for b in budgets:
            if max(m.size for m in models) > b * GB:
                continue
            rows = {s: simulate(models, tasks, b * GB, strategy=s) for s in ("gpuctx", "fifo_lru", "ollama")}
            base = rows["fifo_lru"].loads
            for s, r in rows.items():
                print(f"| {b} GB | {s} | {r.loads} | {r.switches} | {r.makespan:.1f} | {r.p95_wait:.2f} | "
                      f"{r.loads / base:.2f} |")


if __name__ == "__main__":
    main()
