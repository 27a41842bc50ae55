"""The summary table of docs/benchmarks.md, from the output of bench/scheduling.py.

    python bench/scheduling.py > run.md && python bench/summary.py run.md

For each workload x budget x mode: gpuctx's loads and makespan next to the best baseline's
(fewest loads, resp. shortest makespan, among the baselines that finished every task without
a failure), the interactive class's p95 against the best FIFO system's, gpuctx's longest wait
and measured overlap, and whether each done-when target of issue 13 holds in every repeat
(gpuctx's worst repeat against the baseline's best).
"""

from __future__ import annotations

import re
import sys

FIFO = ("Ollama", "Ray Serve LRU", "FIFO + LRU (bytes)")


def _span(cell: str) -> tuple[float, float] | None:
    if cell in ("–", "-", ""):
        return None
    parts = cell.split("–")
    return float(parts[0]), float(parts[-1])


def parse(text: str) -> list[dict]:
    """Every table of a scheduling.py run: title, budget, mode, bound and its rows by system."""
    out, cur, cols = [], None, []
    for line in text.splitlines():
        m = re.match(r"#+ (.*) — (\w+) budget ([\d.]+) GB, (\w+); lower bound (\d+) loads", line)
        if m:
            cur = dict(title=m.group(1), budget=f"{m.group(2)} {m.group(3)} GB", mode=m.group(4),
                       bound=int(m.group(5)), rows={})
            out.append(cur)
            continue
        if cur is None or not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "system":
            cols = cells[1:]
            continue
        cur["rows"][cells[0]] = dict(zip(cols, (_span(c) for c in cells[1:])))
    return out


def summarize(tables: list[dict]) -> tuple[list[str], dict]:
    lines = ["| workload | budget | mode | bound | gpuctx loads | best baseline loads | gpuctx makespan | "
             "best baseline makespan | interactive p95 gpuctx / best FIFO | max wait gpuctx | real overlap | targets met |",
             "|---|---|---|---:|---:|---|---:|---|---|---:|---:|---|"]
    met = dict(loads=0, bound=0, makespan=0, makespan_best=0, ip95=0, violations=0, variance=0, rows=len(tables))
    fmt = lambda s, f=".0f": "–" if s is None else (format(s[0], f) if s[0] == s[1] else f"{s[0]:{f}}–{s[1]:{f}}")  # noqa: E731
    for t in tables:
        g = t["rows"]["gpuctx"]
        ok = {n: r for n, r in t["rows"].items() if not n.startswith("gpuctx") and r["failed"][1] == 0 and r["unfinished"][1] == 0}
        bl = min(ok, key=lambda n: ok[n]["loads"][0])
        bm = min(ok, key=lambda n: ok[n]["makespan"][0])
        fifo = [ok[n]["interactive p95"] for n in FIFO if n in ok and ok[n]["interactive p95"] is not None]
        best_fifo = min(fifo, key=lambda s: s[0]) if fifo else None
        reached = any(r["loads"][0] <= t["bound"] for r in list(ok.values()) + [g])   # by a system that finished
        checks = {
            "loads": g["loads"][1] <= ok[bl]["loads"][0],
            "bound": not reached or g["loads"][1] <= 1.25 * t["bound"],
            "makespan": g["makespan"][1] <= ok[bm]["makespan"][0],
            "makespan_best": g["makespan"][0] <= ok[bm]["makespan"][0],
            "ip95": best_fifo is None or g["interactive p95"][1] <= best_fifo[0],
            "violations": g["violations"][1] == 0,
            "variance": g["loads"][1] <= 1.10 * g["loads"][0],
        }
        for k, v in checks.items():
            met[k] += v
        missed = [k for k, v in checks.items() if not v and k != "makespan_best"]
        ip = "– / –" if best_fifo is None else f"{fmt(g['interactive p95'])} / {fmt(best_fifo)}"
        lines.append(f"| {t['title'][:40]} | {t['budget']} | {t['mode']} | {t['bound']} | {fmt(g['loads'])} | "
                     f"{fmt(ok[bl]['loads'])} ({bl}) | {fmt(g['makespan'])} | {fmt(ok[bm]['makespan'])} ({bm}) | {ip} | "
                     f"{fmt(g['max_wait'])} | {fmt(g.get('real overlap'), '.2f')} | "
                     f"{'all' if not missed else 'not: ' + ', '.join(missed)} |")
    return lines, met


def main() -> None:
    tables = parse(open(sys.argv[1], encoding="utf-8").read())
    lines, met = summarize(tables)
    print("\n".join(lines))
    n = met.pop("rows")
    print("\nrows meeting each target (gpuctx's worst repeat against the best baseline's best; "
          "makespan_best: gpuctx's best repeat against it): "
          + ", ".join(f"{k} {v}/{n}" for k, v in met.items()))


if __name__ == "__main__":
    main()
