"""The dashboard's refresh cost under a 10,000-task burst, and how few messages reach the frontend.

One command, one run, the live scheduler on the CPU device (no-op task bodies on three models, so
the trace fills as fast as the engine can go):

- **refresh time**: with the burst's events in the timeline's window (about 30,000), one reading
  of the panel: the old code (``gpuctx/panel.py`` at ``--old REV``, read from git: it re-scanned
  the window at every refresh), a reading from scratch (``Panel.of``: the window's events read
  once, as the old code did at every refresh, with today's pairing), and the kept reading a
  dashboard does (``PanelReader``: only the events new since the last refresh), with nothing new
  and with 100 new tasks between two refreshes. The timeline part alone is shown too.
- **frontend updates**: a live ``Dashboard`` (``interval=0.3``) open while the burst runs: how
  many messages it sent, per second, against the trace events recorded meanwhile; and its
  refresh times during the burst (which include the live tasks' part: the status and the
  oldest waits cost one pass over the tasks not yet ended). Twice: no-op bodies, and bodies of
  ``--body-ms`` so that the burst lasts seconds.

Target (issue 20): a burst must not flood the frontend (a few messages per second), and a
refresh's cost must not grow with the events in the window.

    python bench/dashboard.py [--tasks 10000] [--window 60] [--repeats 15] [--body-ms 1] [--old b841d44]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import gpuctx  # noqa: E402
from gpuctx import panel  # noqa: E402
from gpuctx._lanes import Follower  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _old_panel(rev: str):
    """``gpuctx/panel.py`` at git revision ``rev``, loaded as a module of the package (or None)."""
    try:
        src = subprocess.run(["git", "show", f"{rev}:gpuctx/panel.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("gpuctx._panel_old", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "gpuctx"
    sys.modules[spec.name] = mod   # dataclasses look their module up
    exec(compile(src, f"{rev}:gpuctx/panel.py", "exec"), mod.__dict__)   # noqa: S102 - our own file, from git
    return mod


def _setup(window: float, body_ms: float = 0.0):
    gpuctx.reset()
    gpuctx.configure(device="cpu", budget="10GB", safety_factor=1.0, trace_capacity=200_000)
    fns = []
    pause = threading.Event()   # never set: its wait() is a sleep that says so
    for name in ("asr", "llm", "tts"):
        gpuctx.model(name, vram="1GB")(lambda name=name: name)
        body = (lambda i: i) if body_ms <= 0 else (lambda i: pause.wait(body_ms / 1e3) or i)
        fns.append(gpuctx.gpu_task(model=name, name=name)(body))
    return fns


def _burst(fns, n: int) -> list:
    return [fns[i % len(fns)](i) for i in range(n)]


def _ms(f, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]


def refresh_times(tasks: int, window: float, repeats: int, old_rev: str) -> list[tuple[str, int | str, float, float]]:
    fns = _setup(window)
    sched = gpuctx.scheduler()
    kept = panel.PanelReader(lambda: sched, window)
    kept.read()
    gpuctx.wait(_burst(fns, tasks), timeout=600)
    in_window = len(sched.trace.since(sched.trace.now() - window))
    rows = []
    old = _old_panel(old_rev)
    if old is not None:
        rows.append((f"old code ({old_rev}): the window re-scanned", in_window,
                     *_ms(lambda: old.Panel.of(sched, window), repeats)))
    rows.append(("a reading from scratch (Panel.of)", in_window, *_ms(lambda: panel.Panel.of(sched, window), repeats)))
    kept.read()                                    # the burst's events, read once
    before = kept.follower.fed
    rows.append(("kept (PanelReader), nothing new", 0, *_ms(kept.read, repeats)))
    assert kept.follower.fed == before

    def hundred_then_read() -> None:
        gpuctx.wait(_burst(fns, 100), timeout=60)
        t0 = time.perf_counter()
        kept.read()
        hundred_then_read.ms.append((time.perf_counter() - t0) * 1e3)

    hundred_then_read.ms = []
    for _ in range(repeats):
        hundred_then_read()
    ms = sorted(hundred_then_read.ms)
    per = (kept.follower.fed - before) // repeats
    rows.append(("kept (PanelReader), 100 new tasks since the last", per, statistics.median(ms),
                 ms[round(0.95 * (len(ms) - 1))]))
    now = sched.trace.now()
    order = {"asr": 0, "llm": 1, "tts": 2}
    rows.append(("timeline only: from scratch (a new Follower)", in_window,
                 *_ms(lambda: Follower(sched.trace, window).rows(now, order), repeats)))
    follower = Follower(sched.trace, window)
    follower.rows(now, order)
    rows.append(("timeline only: kept, nothing new", 0, *_ms(lambda: follower.rows(now, order), repeats)))
    gpuctx.shutdown()
    return rows


def frontend_updates(tasks: int, window: float, body_ms: float, interval: float = 0.3) -> dict:
    fns = _setup(window, body_ms)
    sched = gpuctx.scheduler()
    d = panel.Dashboard(gpuctx.api.current_scheduler, interval=interval, window=window)
    times: list[float] = []
    refresh = d.refresh

    def timed() -> bool:
        t0 = time.perf_counter()
        try:
            return refresh()
        finally:
            times.append((time.perf_counter() - t0) * 1e3)

    d.refresh = timed
    events0 = len(sched.trace.events)
    t0 = time.perf_counter()
    todo = _burst(fns, tasks)
    gpuctx.wait(todo, timeout=600)
    elapsed = time.perf_counter() - t0
    settled = threading.Event()                    # one more refresh shows the end of the burst

    def check(_change=None) -> None:
        if d.panel.done >= tasks:
            settled.set()

    d.widget.observe(check, names="value")
    check()
    settled.wait(30)
    d.close()
    sent = d.updates
    events = len(sched.trace.events) - events0
    gpuctx.shutdown()
    times.sort()
    return dict(seconds=elapsed, updates=sent, events=events, refreshes=len(times),
                p50=statistics.median(times) if times else 0.0,
                p95=times[round(0.95 * (len(times) - 1))] if times else 0.0, max=max(times, default=0.0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--body-ms", type=float, default=1.0,
                    help="task body time of the second frontend run, so the burst lasts seconds (default: 1)")
    ap.add_argument("--old", default="b841d44", help="git revision of the old panel.py (the baseline)")
    args = ap.parse_args()
    print(f"# dashboard refresh: {args.tasks:,}-task burst, 3 models, no-op bodies, window {args.window:g} s")
    print(f"# {platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, CPU device (no GPU)\n")
    rows = refresh_times(args.tasks, args.window, args.repeats, args.old)
    base = next((r for r in rows if r[0].startswith("old")), rows[0])
    print("| reading | events read per refresh | refresh p50 | p95 | vs the old code (p50) |")
    print("|---|---:|---:|---:|---:|")
    for name, n, p50, p95 in rows:
        print(f"| {name} | {n:,} | {p50:.2f} ms | {p95:.2f} ms | {p50 / base[2]:.3f}x |")
    for body_ms in (0.0, args.body_ms):
        f = frontend_updates(args.tasks, args.window, body_ms)
        print(f"\nfrontend, Dashboard(interval=0.3) open during the burst (bodies {body_ms:g} ms): "
              f"{f['updates']} updates in {f['seconds']:.2f} s "
              f"({f['updates'] / f['seconds']:.1f} per s) for {f['events']:,} trace events; "
              f"{f['refreshes']} refreshes, p50 {f['p50']:.1f} ms, p95 {f['p95']:.1f} ms, max {f['max']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
