"""Scheduler overhead: no-op throughput (µs/task) and dependency-chain latency (µs/link).

One command, one run: gpuctx through its full scheduler (CPU device), a
``concurrent.futures.ThreadPoolExecutor`` as the baseline, and Ray tasks and Dask
distributed (in-process cluster) when the ``bench`` extra is installed. Each row is
the median of ``--repeat`` samples; gpuctx and the thread pools take turns sample by
sample, each sample after a ``gc.collect()``; ratios are against the thread pool of
the same run. A second table gives the Python memory each queued call holds (tracemalloc),
gpuctx against the pool.

    python bench/overhead.py [--tasks 20000] [--chain 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import threading
import time
import tracemalloc
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as fwait

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import gpuctx  # noqa: E402


def noop(x=None):
    return x


def once_us(fn, n: int) -> float:
    gc.collect()   # every sample starts from the same collector state
    t0 = time.perf_counter()
    fn(n)
    return (time.perf_counter() - t0) / n * 1e6


def median_us(fn, n: int, repeat: int) -> float:
    return statistics.median(once_us(fn, n) for _ in range(repeat))


def interleaved(runners: dict, n: int, repeat: int) -> dict:
    """Median µs per item of each runner, the runners taking turns (in a rotating order) for each
    sample, so that a slow spell of the machine falls on all of them alike."""
    samples: dict = {name: [] for name in runners}
    names = list(runners)
    for r in range(repeat):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(once_us(runners[name], n))
    return {name: statistics.median(v) for name, v in samples.items()}


# ----------------------------------------------------------------------------- thread pool
def pool_throughput(pool: ThreadPoolExecutor):
    def run(n: int) -> None:
        fwait([pool.submit(noop, i) for i in range(n)])
    return run


def callback_chain(submit):
    """A chain where each call's done-callback submits the next (what a thread pool can express):
    the callbacks run on the worker thread, so no call ever crosses threads."""
    def run(n: int) -> None:
        done: Future = Future()

        def step(i: int, value):
            if i == n:
                done.set_result(value)
                return
            submit(value).add_done_callback(lambda f: step(i + 1, f.result()))

        step(0, 0)
        done.result()
    return run


def pool_chain(pool: ThreadPoolExecutor):
    return callback_chain(lambda value: pool.submit(noop, value))


# ----------------------------------------------------------------------------- gpuctx
def gpuctx_throughput(fn):
    def run(n: int) -> None:
        gpuctx.wait([fn(i) for i in range(n)])
    return run


def gpuctx_chain(fn):
    def run(n: int) -> None:
        t = fn(0)
        for _ in range(n - 1):
            t = fn(t)
        t.result()
    return run


# ----------------------------------------------------------------------------- memory
def queued_bytes(hold, submit, n: int, release) -> float:
    """Bytes of Python memory per call queued behind a running ``hold()`` (tracemalloc)."""
    held = hold()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    items = [submit(i) for i in range(n)]
    gpuctx.scheduler().tasks()   # a lock holder takes the lock-free calls in (a no-op for the pool)
    per_call = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    release()
    fwait(list(items) + [held])
    return per_call


def memory_rows(fn, pool: ThreadPoolExecutor, n: int) -> dict:
    gate = threading.Event()
    started = threading.Event()

    def hold_body():
        started.set()
        gate.wait()

    hold_task = gpuctx.gpu_task(model="noop", name="hold")(hold_body)

    def hold_gpuctx():
        t = hold_task()
        started.wait()
        return t

    def hold_pool():
        f = pool.submit(hold_body)
        started.wait()
        return f

    rows = {}
    for name, hold, submit in (("ThreadPoolExecutor(1 worker)", hold_pool, lambda i: pool.submit(noop, i)),
                               ("gpuctx (CPU device, 1 model)", hold_gpuctx, fn)):
        gate.clear()
        started.clear()
        rows[name] = queued_bytes(hold, submit, n, gate.set)
    return rows


# ----------------------------------------------------------------------------- peers
def ray_rows(n: int, chain: int, repeat: int):
    try:
        import ray
    except ImportError:
        return None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    rnoop = ray.remote(noop)

    def thr(k):
        ray.get([rnoop.remote(i) for i in range(k)])

    def ch(k):
        r = rnoop.remote(0)
        for _ in range(k - 1):
            r = rnoop.remote(r)
        ray.get(r)
    thr(100)
    rows = (median_us(thr, min(n, 5000), repeat), median_us(ch, min(chain, 500), repeat))
    ray.shutdown()
    return rows


def dask_rows(n: int, chain: int, repeat: int):
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        return None
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        def thr(k):
            client.gather(client.map(noop, range(k), pure=False))

        def ch(k):
            f = client.submit(noop, 0, pure=False)
            for _ in range(k - 1):
                f = client.submit(noop, f, pure=False)
            f.result()
        thr(100)
        return median_us(thr, min(n, 5000), repeat), median_us(ch, min(chain, 500), repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--chain", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--peers", action="store_true", help="also measure Ray and Dask (bench extra)")
    a = ap.parse_args()

    gpuctx.reset()
    gpuctx.configure(device="cpu", budget="16GB")
    fn = gpuctx.gpu_task(model="noop")(noop)
    gpuctx_throughput(fn)(500)  # warm up: worker thread, slot

    with ThreadPoolExecutor(max_workers=1) as pool1, ThreadPoolExecutor(max_workers=2) as pool2:
        pool_throughput(pool1)(500)
        names = ("ThreadPoolExecutor(1 worker)", "ThreadPoolExecutor(2 workers)", "gpuctx (CPU device, 1 model)")
        thr = interleaved(dict(zip(names, (pool_throughput(pool1), pool_throughput(pool2), gpuctx_throughput(fn)))),
                          a.tasks, a.repeat)
        by_callbacks = "gpuctx, chain by callbacks (as the pools)"
        chain = interleaved(dict(zip(names + (by_callbacks,), (pool_chain(pool1), pool_chain(pool2), gpuctx_chain(fn),
                                                               callback_chain(fn)))),
                            a.chain, a.repeat)
        rows = {name: (thr[name], chain[name]) for name in names}
        rows[by_callbacks] = (None, chain[by_callbacks])
        memory = memory_rows(fn, pool1, a.tasks)
    if a.peers:
        for name, f in (("Ray tasks", ray_rows), ("Dask distributed (in-process)", dask_rows)):
            r = f(a.tasks, a.chain, a.repeat)
            if r is not None:
                rows[name] = r
    gpuctx.shutdown()

    base_t, base_c = rows["ThreadPoolExecutor(1 worker)"]
    print(f"# scheduler overhead — {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{a.tasks} no-op tasks, chain of {a.chain}, median of {a.repeat}")
    print()
    print("| runner | µs/task (no-op) | x thread pool | µs/link (chain) | x thread pool |")
    print("|---|---:|---:|---:|---:|")
    for name, (t, c) in rows.items():
        thr = "– | –" if t is None else f"{t:.1f} | {t / base_t:.2f}"
        print(f"| {name} | {thr} | {c:.1f} | {c / base_c:.2f} |")
    base_m = memory["ThreadPoolExecutor(1 worker)"]
    print()
    print(f"| runner | bytes per queued no-op call ({a.tasks} queued, tracemalloc) | x thread pool |")
    print("|---|---:|---:|")
    for name, b in memory.items():
        print(f"| {name} | {b:.0f} | {b / base_m:.2f} |")


if __name__ == "__main__":
    main()
