"""A call's dependencies and their values, found and replaced by :mod:`gpuctx._walk`."""

from __future__ import annotations

from typing import Any

from .._walk import collect, replace
from ..task import Task


_SCALARS = frozenset((int, float, str, bytes, bool, type(None)))


def _is_task(x: Any) -> bool:
    return isinstance(x, Task)


def _value(t: Task) -> Any:
    return t._value


def _collect_tasks(args: tuple, kwargs: dict) -> list[Task]:
    """Every Task in the arguments, in the order met (duplicates kept; the caller dedupes)."""
    found: list[Task] = []
    for a in args:
        if type(a) not in _SCALARS:   # plain values (the common case) need no walk
            collect(a, _is_task, found)
    if kwargs:
        collect(kwargs, _is_task, found)
    return found


def _substitute(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Replace every Task in the arguments by its value."""
    return tuple([_value_of(a) for a in args]), ({k: _value_of(v) for k, v in kwargs.items()} if kwargs else kwargs)


def _value_of(x: Any) -> Any:
    if type(x) in _SCALARS:
        return x
    return replace(x, _is_task, _value)
