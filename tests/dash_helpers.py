"""Helpers of the dashboard tests: wait for what the dashboard's own thread shows, count what it sends."""

from __future__ import annotations

import threading

from gpuctx import panel

TIMEOUT = 10


def model_line(d: panel.Dashboard | panel.Panel, name: str) -> panel.ModelLine | None:
    p = d.panel if isinstance(d, panel.Dashboard) else d
    return next((m for m in p.models if m.name == name), None)


def wait_for(d: panel.Dashboard, pred, timeout: float = TIMEOUT, *, sent: bool = False) -> list[str]:
    """Block until a refresh sent by the dashboard's own thread shows ``pred(d.panel)``; returns the
    names of the threads that sent the values seen meanwhile. The first check runs here, and
    counts unless ``sent``: then only a value sent after this call began does."""
    seen = threading.Event()
    senders: list[str] = []

    def check(_change=None):
        if _change is not None:
            senders.append(threading.current_thread().name)
        elif sent:
            return
        if pred(d.panel):
            seen.set()

    d.widget.observe(check, names="value")
    check()
    try:
        assert seen.wait(timeout), panel.render_text(d.panel)
    finally:
        d.widget.unobserve(check, names="value")
    return senders


def count_sends(d: panel.Dashboard) -> list:
    """Record every message the widget sends to the frontend (its comm's ``send``)."""
    sent: list = []
    comm = d.widget.comm
    real = comm.send

    def send(*args, **kwargs):
        sent.append(kwargs.get("data", args[0] if args else None))
        return real(*args, **kwargs)

    comm.send = send
    return sent
