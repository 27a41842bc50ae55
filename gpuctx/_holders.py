"""Who still holds an object: the notebook's names for it, so a warning can say what to drop.

An evicted model that stays referenced stays allocated. The usual holders in a notebook are
IPython's own: the output cache (``Out[n]``, ``_n``, ``_``, ``__``, ``___``), a variable, and
the last traceback (``sys.last_value``, kept for ``%debug``), whose frames hold their locals
(pytorch#37726 is the well-known report). This looks in those places only: it names what it
finds and says nothing when it finds nothing.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["holders_of", "free_output_cache"]


def _shell() -> Any:
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None) if ipython is not None else None
    return get() if get is not None else None


def _contains(value: Any, obj: Any, depth: int = 0) -> bool:
    if value is obj:
        return True
    if depth >= 2:
        return False
    if isinstance(value, (list, tuple)):
        return any(_contains(v, obj, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_contains(v, obj, depth + 1) for v in value.values())
    return False


def holders_of(obj: Any) -> list[str]:
    """Where the notebook still holds ``obj``: ``Out[3]``, ``_``, a variable's name, the last traceback."""
    found: list[str] = []
    shell = _shell()
    if shell is not None:
        ns = shell.user_ns
        out = ns.get("Out")
        if isinstance(out, dict):
            found += [f"Out[{k}]" for k, v in sorted(out.items()) if _contains(v, obj)]
        hidden = getattr(shell, "user_ns_hidden", {})
        for name, value in list(ns.items()):
            if value is out or (name in hidden and not name.startswith("_")):
                continue   # Out and its alias _oh were named entry by entry above
            if _contains(value, obj) and not (name.startswith("_") and name[1:].isdigit()):
                found.append(name)
    tb = getattr(sys, "last_value", None)
    tb = getattr(tb, "__traceback__", None)
    while tb is not None:
        if any(v is obj for v in tb.tb_frame.f_locals.values()):
            found.append("the last traceback (sys.last_value, kept for %debug)")
            break
        tb = tb.tb_next
    return found


def free_output_cache(is_heavy: Any) -> list[str]:
    """Drop IPython's output-cache references (``Out[n]``, ``_n``, ``_``, ``__``, ``___``) and the last
    traceback when ``is_heavy(value)``; return what was dropped."""
    shell = _shell()
    dropped: list[str] = []
    if shell is None:
        return dropped
    ns = shell.user_ns
    out = ns.get("Out")
    if isinstance(out, dict):
        for k, v in list(out.items()):
            if is_heavy(v):
                del out[k]
                ns.pop(f"_{k}", None)
                dropped.append(f"Out[{k}]")
    hidden = getattr(shell, "user_ns_hidden", {})   # IPython pushes _, __, ___ and _N there too
    for space in (ns, hidden):
        for name in [n for n in space if n in ("_", "__", "___") or (n[:1] == "_" and n[1:].isdigit())]:
            if is_heavy(space.get(name)):
                space[name] = ""
                if space is ns and name not in dropped:
                    dropped.append(name)
    hook = getattr(shell, "displayhook", None)
    for attr in ("_", "__", "___"):
        if hook is not None and is_heavy(getattr(hook, attr, None)):
            setattr(hook, attr, "")
    last = getattr(sys, "last_value", None)
    if last is not None and last.__traceback__ is not None:
        tb = last.__traceback__
        while tb is not None:
            if any(is_heavy(v) for v in tb.tb_frame.f_locals.values()):
                sys.last_value = sys.last_traceback = sys.last_type = None
                dropped.append("the last traceback")
                break
            tb = tb.tb_next
    return dropped
