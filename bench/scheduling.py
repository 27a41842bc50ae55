"""Scheduling under a budget, live: gpuctx against the seed's policy and its peers.

    python bench/scheduling.py            # every workload x budget x mode, 5 repeats
    python bench/scheduling.py --quick    # smaller workloads, 1 repeat (~1-2 min)
    python bench/scheduling.py --repeat 3 --scale 0.005 --only video,chat

Everything is live: real threads and real time. Loaders and task bodies sleep for the
workload's times multiplied by ``--scale`` (default 0.005: 1 GB loads in 5 ms). gpuctx runs
on its CPU device with the declared budget and safety_factor=1.0; the baselines
(bench/baselines.py) run on a common harness in the same process and run, on the same
workloads (bench/workloads.py). Mode "serial" puts one global lock around every task body,
for every system: the GPU runs one call at a time.

One gpuctx configuration for every workload: its defaults, with ``max_wait`` (30 s) and
``aging`` (10 s) multiplied by the same scale as every other time.
"gpuctx (prefetch)" is the same with ``prefetch=True``, to show what prefetching does.
The last column is gpuctx's measured real overlap of task runs
(``stats()["overlap"]["effective_concurrency"]``: each model's run time alone x its runs, over the
busy time; about 1.00 when runs never overlapped or were serialised underneath).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import gpuctx  # noqa: E402
from baselines import GB, Run, baselines, run_body  # noqa: E402
from workloads import all_workloads  # noqa: E402


def run_gpuctx(wl, budget_gb: float, *, scale: float, body_lock, timeout: float = 20.0, prefetch: bool = False) -> dict:
    gpuctx.reset()
    gpuctx.configure(device="cpu", budget=int(budget_gb * GB), safety_factor=1.0,
                     max_wait=30.0 * scale, aging=10.0 * scale, prefetch=prefetch)
    for m in wl.models:
        gpuctx.model(m.name, vram=int(m.gb * GB))(lambda s=m.load_s * scale: time.sleep(s) or object())
    start: dict = {}
    end: dict = {}
    jobs = {j.id: j for j in wl.jobs}

    def body(job_id, *deps):
        run_body(jobs[job_id], scale, body_lock, start, end)
        return job_id

    fns = {m.name: gpuctx.gpu_task(model=m.name, name=f"call_{m.name}")(body) for m in wl.models}
    tasks: dict = {}
    t0 = time.perf_counter()
    for j in wl.jobs:
        delay = t0 + j.arrival * scale - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        fn = fns[j.model] if j.priority == 0 else fns[j.model].options(priority=j.priority)
        tasks[j.id] = fn(j.id, *(tasks[d] for d in j.deps))
    _, pending = gpuctx.wait(list(tasks.values()), timeout=timeout)
    failed = {i for i, t in tasks.items() if t not in pending and t.exception() is not None}
    sched = gpuctx.scheduler()
    gpuctx.shutdown(wait=not pending, cancel_pending=bool(pending))   # read the trace once it is still
    for _ in range(20):          # a spinning engine (see docs) can still be recording: retry the copy
        try:
            st, events = sched.trace.stats.as_dict(), sched.trace.events
            break
        except RuntimeError:
            time.sleep(0.01)
    budget = int(budget_gb * GB)
    loads = sum(m["loads"] + m["restores"] for m in st["models"].values())
    out = dict(loads=loads, failed=len(failed), peak=st["peak_vram"], unfinished=len(pending),
               violations=sum(1 for e in events if e.vram is not None and e.vram > budget),
               overlap=st["overlap"]["effective_concurrency"])
    return {**out, **latency(wl, t0, scale, start, end)}


def run_baseline(policy, wl, budget_gb: float, *, scale: float, body_lock) -> dict:
    r = Run(wl, budget_gb, policy, scale=scale, body_lock=body_lock)
    r.go()
    with r.cv:
        for s in r.slots.values():
            s.closed = True
        r.cv.notify_all()
    return dict(loads=r.loads, failed=len(r.failed), peak=r.peak, violations=r.violations, unfinished=0, overlap=None,
                **latency(wl, r.t0, scale, r.start, r.end))


def latency(wl, t0: float, scale: float, start: dict, end: dict) -> dict:
    """Makespan, end-to-end latency from arrival (p50, p95, interactive p95) and the longest
    wait from ready (arrival and every dependency done) to start, in unscaled seconds."""
    lat, inter, waits = [], [], []
    for j in wl.jobs:
        if j.id not in end:
            continue
        arrive = t0 + j.arrival * scale
        ready = max([arrive] + [end[d] for d in j.deps if d in end])
        lat.append((end[j.id] - arrive) / scale)
        waits.append((start[j.id] - ready) / scale)
        if j.cls == "interactive":
            inter.append(lat[-1])
    return dict(makespan=(max(end.values(), default=t0) - t0) / scale, p50=pct(lat, 0.5), p95=pct(lat, 0.95),
                ip95=pct(inter, 0.95) if inter else None, max_wait=max(waits, default=0.0))


def pct(xs: list, q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def rng(vals: list, fmt: str) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    lo, hi = min(vals), max(vals)
    a, b = format(lo, fmt), format(hi, fmt)
    return a if a == b else f"{a}–{b}"


COLS = [("loads", "d"), ("makespan", ".0f"), ("p50", ".0f"), ("p95", ".0f"), ("ip95", ".0f"), ("max_wait", ".0f"),
        ("violations", "d"), ("failed", "d"), ("unfinished", "d"), ("overlap", ".2f")]


HEAD = {"ip95": "interactive p95", "overlap": "real overlap"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller workloads, 1 repeat")
    ap.add_argument("--repeat", type=int, default=None, help="repeats per cell (default 5; 1 with --quick)")
    ap.add_argument("--scale", type=float, default=0.005, help="real seconds per workload second")
    ap.add_argument("--only", default="", help="comma-separated words; run the workloads whose title has one")
    ap.add_argument("--budgets", default="tight,medium,loose")
    ap.add_argument("--modes", default="concurrent,serial")
    ap.add_argument("--timeout", type=float, default=20.0,
                    help="real seconds a gpuctx run may take; what is left is counted as unfinished")
    a = ap.parse_args()
    repeat = a.repeat or (1 if a.quick else 5)
    wls = [w for w in all_workloads(a.quick) if not a.only or any(k in w.title for k in a.only.split(","))]
    systems = ["gpuctx", "gpuctx (prefetch)"] + [p.name for p in baselines()]
    print(f"# Scheduling under a budget (live) — {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {datetime.date.today()}")
    print(f"\nscale {a.scale:g} s per workload second, {repeat} repeat(s); times below in workload seconds; "
          f"ranges are min–max over the repeats.")
    t_start = time.perf_counter()
    for wl in wls:
        for budget in a.budgets.split(","):
            gb = wl.budgets[budget]
            for mode in a.modes.split(","):
                print(f"\n### {wl.title} — {budget} budget {gb:g} GB, {mode}; lower bound {wl.lower_bound_loads()} "
                      "loads\n")
                print("| system | " + " | ".join(HEAD.get(c, c) for c, _ in COLS) + " |")
                print("|---|" + "---:|" * len(COLS))
                for name in systems:
                    rows = []
                    for _ in range(repeat):
                        lock = threading.Lock() if mode == "serial" else None
                        if name.startswith("gpuctx"):
                            rows.append(run_gpuctx(wl, gb, scale=a.scale, body_lock=lock, timeout=a.timeout,
                                                   prefetch=name == "gpuctx (prefetch)"))
                        else:
                            pol = next(p for p in baselines() if p.name == name)
                            rows.append(run_baseline(pol, wl, gb, scale=a.scale, body_lock=lock))
                    cells = [rng([r[c] for r in rows], f) for c, f in COLS]
                    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n(wall time {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
