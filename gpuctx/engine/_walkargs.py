"""Walk."""

from __future__ import annotations

from typing import Any

from ..task import Task

_SCALARS = frozenset((int, float, str, bytes, bool, type(None)))



def _collect_tasks(args: tuple, kwargs: dict) -> list[Task]:
    found: list[Task] = []
    for a in args:
        if type(a) not in _SCALARS:   # plain values (the common case) need no walk
            _find_tasks(a, found)
    if kwargs:
        _find_tasks(kwargs, found)
    return found


# Module-level recursion, not nested closures: a closure that calls itself is a reference
# cycle, which would keep what it saw (Tasks, their results) alive until the collector runs.
def _find_tasks(x: Any, found: list) -> None:
    if isinstance(x, Task):
        found.append(x)
    elif isinstance(x, (list, tuple, set, frozenset)):
        for y in x:
            _find_tasks(y, found)
    elif isinstance(x, dict):
        for y in x.values():
            _find_tasks(y, found)


def _substitute(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Replace every Task in the arguments by its value."""
    return tuple([_value_of(a) for a in args]), ({k: _value_of(v) for k, v in kwargs.items()} if kwargs else kwargs)


def _value_of(x: Any) -> Any:
    if type(x) in _SCALARS:
        return x
    if isinstance(x, Task):
        return x._value
    if isinstance(x, (list, tuple, set, frozenset)):
        return type(x)(_value_of(y) for y in x)
    if isinstance(x, dict):
        return {k: _value_of(v) for k, v in x.items()}
    return x
