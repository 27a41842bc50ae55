"""A kernel for the share tests (and bench/share.py): one process, driven by JSON lines on stdin.

Usage: ``python tests/share_worker.py SHARE BUDGET`` (SHARE ``-``: no share). Each line in is a command, each line out
its answer (``{"ok": ...}``); the process exits at EOF or ``{"op": "exit"}``.

Commands: ``model`` (name, vram, pin, priority: register a model whose loader returns a small
object), ``run`` (model: run one task on it and wait; answers the seconds it took), ``hold`` /
``release`` (model: a task that keeps the model busy until released), ``state`` (what is
resident, the stats, the other kernels), ``exit``.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import gpuctx

_held: dict[str, threading.Event] = {}
_tasks: dict[str, object] = {}
_fns: dict[str, object] = {}


def _register(name: str, vram: int, pin: bool = False, priority: int = 0) -> None:
    gpuctx.model(name, vram=vram, pin=pin, priority=priority)(lambda: {"weights": name})

    @gpuctx.gpu_task(model=name)
    def run(hold: threading.Event | None = None) -> str:
        if hold is not None:
            hold.wait(60)
        return gpuctx.current_model()["weights"]

    _fns[name] = run


def _state() -> dict:
    st = gpuctx.status()
    return {"resident": {m.name: m.used for m in st.models if m.state == "resident"},
            "committed": st.committed, "budget": st.budget, "share": st.share,
            "for_others": gpuctx.stats()["evictions_for_others"],
            "others": [{"pid": k.pid, "notebook": k.notebook, "nbytes": k.nbytes, "models": [list(m) for m in k.models]}
                       for k in st.others],
            "text": str(st), "html": st._repr_html_()}


def _do(cmd: dict, out: dict) -> None:
    op = cmd["op"]
    if op == "model":
        _register(cmd["name"], cmd["vram"], cmd.get("pin", False), cmd.get("priority", 0))
    elif op == "run":
        t0 = time.perf_counter()
        out["result"] = _fns[cmd["model"]]().result(timeout=cmd.get("timeout", 60))
        out["seconds"] = time.perf_counter() - t0
    elif op == "hold":
        ev = _held[cmd["model"]] = threading.Event()
        task = _tasks[cmd["model"]] = _fns[cmd["model"]](ev)
        while task.state.value != "running":   # the model is loaded and busy before we answer
            time.sleep(0.002)
    elif op == "release":
        _held.pop(cmd["model"]).set()
        _tasks.pop(cmd["model"]).result(timeout=60)
    elif op == "state":
        out.update(_state())


def main() -> None:
    share, budget = sys.argv[1], int(sys.argv[2])
    gpuctx.configure(device="cpu", budget=budget, share=False if share == "-" else share, offload=False)
    gpuctx.scheduler()
    print(json.dumps({"ok": True, "pid": __import__("os").getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        out: dict = {"ok": True}
        try:
            _do(cmd, out)
        except Exception as exc:  # noqa: BLE001 - reported to the driver (bench/share.py)
            out.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        print(json.dumps(out), flush=True)
    gpuctx.shutdown()
    print(json.dumps({"ok": True, "bye": True}), flush=True)


if __name__ == "__main__":
    main()
