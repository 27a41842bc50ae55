"""The one walker over a call's arguments: find the leaves of a kind in them, or replace them.

The engine uses it for the Tasks in a call (its dependencies, then their values), the graph
runner for the tensors in one (its key's inputs, then the static copies). Lists, tuples, sets,
dicts, named tuples and dict subclasses are walked, and a replacement rebuilds each container
as the type it was (a container with nothing replaced comes back as itself). The walk is
iterative, so a self-referencing container or one nested thousands deep is no RecursionError:
a container met again inside itself is left as it is.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

__all__ = ["collect", "replace"]

_CONTAINERS = (list, tuple, set, frozenset, dict)


def _children(x: Any, items: Callable[[dict], Iterable] | None) -> Iterable[Any]:
    if isinstance(x, dict):
        return x.values() if items is None else (v for _, v in items(x))
    return x


def collect(x: Any, match: Callable[[Any], bool], found: list | None = None,
            items: Callable[[dict], Iterable] | None = None, kinds: tuple = _CONTAINERS) -> list:
    """Every leaf of ``x`` for which ``match`` is true, in visiting order (dicts in ``items`` order),
    looking inside containers of ``kinds``."""
    found = [] if found is None else found
    if match(x):
        found.append(x)
        return found
    if not isinstance(x, kinds):
        return found
    seen = {id(x)}
    stack = [iter(_children(x, items))]
    while stack:
        for y in stack[-1]:
            if match(y):
                found.append(y)
            elif isinstance(y, kinds) and id(y) not in seen:
                seen.add(id(y))
                stack.append(iter(_children(y, items)))
                break
        else:
            stack.pop()
    return found


def replace(x: Any, match: Callable[[Any], bool], fn: Callable[[Any], Any]) -> Any:
    """``x`` with every leaf for which ``match`` is true replaced by ``fn(leaf)``."""
    if match(x):
        return fn(x)
    if not isinstance(x, _CONTAINERS):
        return x
    memo: dict[int, Any] = {}
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(x, False)]

    def now(c: Any) -> Any:
        if match(c):
            return fn(c)
        return memo.get(id(c), c) if isinstance(c, _CONTAINERS) else c

    while stack:   # post-order without recursion
        node, built = stack.pop()
        key = id(node)
        if key in memo:
            continue
        if not built:
            if key in active:
                continue
            active.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node, None)
                         if isinstance(c, _CONTAINERS) and not match(c) and id(c) not in memo and id(c) not in active)
            continue
        active.discard(key)
        memo[key] = _rebuilt(node, now)
    return memo[id(x)]


def _rebuilt(node: Any, now: Callable[[Any], Any]) -> Any:
    """``node`` with its children mapped by ``now``, as the same type (itself when nothing changed)."""
    if isinstance(node, dict):
        items = [(k, now(v)) for k, v in node.items()]
        if all(v is node[k] for k, v in items):
            return node
        if type(node) is dict:
            return dict(items)
        new = copy.copy(node)   # keeps a defaultdict's factory, an attr-dict's class
        new.clear()
        new.update(items)
        return new
    items = [now(c) for c in node]
    if all(a is b for a, b in zip(items, node)):
        return node
    kind = type(node)
    if kind in (list, tuple, set, frozenset):
        return kind(items)
    if isinstance(node, tuple) and hasattr(node, "_fields"):   # a named tuple
        return kind._make(items)
    if isinstance(node, list):
        new = copy.copy(node)
        new[:] = items
        return new
    return kind(items)
