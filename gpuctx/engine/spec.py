"""What a call is: the settings (:class:`Config`), a ``@gpu_task``'s declaration (:class:`TaskSpec`),
and the frame a running body can ask for (:func:`current_frame`)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from ..errors import ConfigError
from ..task import Task
from ..units import parse_size


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Config:
    """Scheduler settings; see `gpuctx.configure` for what each means."""

    budget: int | None = None
    safety_factor: float = 0.9
    device: str = "auto"
    max_wait: float = 30.0
    aging: float = 10.0
    latency_priority: int = 10
    keep_alive: float | None = None
    oom_retries: int = 1
    offload: bool = True
    host_budget: int | None = None
    trace_capacity: int = 100_000
    cpu_workers: int = 2
    progress: bool = False
    cluster: str | None = None           # "ray": one engine per worker (gpuctx.cluster); None: this process
    workers: int | None = None           # cluster workers; None: one per GPU Ray knows of
    share: str | bool | None = None      # acted on by gpuctx.api (gpuctx.share): a name, False, or None (default)
    prefetch: bool = False

    @classmethod
    def build(cls, base: "Config | None" = None, **changes: Any) -> "Config":
        """Validate ``changes`` (each error names the key, the value and what was expected)."""
        base = base or cls()
        known = {f.name for f in fields(cls)}
        for key in changes:
            if key not in known:
                raise ConfigError(f"configure({key}=...): unknown setting; expected one of {', '.join(sorted(known))}")
        c = dict(changes)
        if "budget" in c and c["budget"] is not None:
            c["budget"] = parse_size(c["budget"], arg="budget", allow_zero=False)
        if "host_budget" in c and c["host_budget"] is not None:
            c["host_budget"] = parse_size(c["host_budget"], arg="host_budget")
        if "safety_factor" in c:
            sf = c["safety_factor"]
            if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not (0 < sf <= 1):
                raise ConfigError(f"safety_factor={sf!r}: expected a number in (0, 1], like 0.9")
            c["safety_factor"] = float(sf)
        for key in ("max_wait", "aging"):
            if key in c:
                c[key] = _seconds(c[key], key)
        if "keep_alive" in c and c["keep_alive"] is not None:
            c["keep_alive"] = _seconds(c["keep_alive"], "keep_alive")
        for key, low in (("latency_priority", None), ("oom_retries", 0), ("trace_capacity", 1), ("cpu_workers", 1)):
            if key in c:
                v = c[key]
                if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low):
                    raise ConfigError(f"{key}={v!r}: expected an int" + (f" >= {low}" if low is not None else ""))
        for key in ("offload", "progress", "prefetch"):
            if key in c and not isinstance(c[key], bool):
                raise ConfigError(f"{key}={c[key]!r}: expected True or False")
        if "cluster" in c and c["cluster"] not in (None, "ray"):
            raise ConfigError(f"cluster={c['cluster']!r}: expected 'ray' or None")
        if "workers" in c and c["workers"] is not None:
            w = c["workers"]
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ConfigError(f"workers={w!r}: expected an int >= 1 (or None: one per GPU)")
        if "share" in c and c["share"] is not None and not isinstance(c["share"], bool):
            from ..share._db import check_name   # lazily: sqlite3 only for a kernel that shares

            check_name(c["share"])
        if "device" in c:
            d = c["device"]
            if not isinstance(d, str) or not (d in ("auto", "cpu", "cuda") or d.startswith("cuda:")):
                raise ConfigError(f"device={d!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return replace(base, **c)


def _seconds(value: object, arg: str) -> float:
    """Seconds from a number or a string like '5ms', '2s', '1min'."""
    if isinstance(value, str):
        text = value.strip().lower()
        for suffix, scale in (("ms", 1e-3), ("us", 1e-6), ("min", 60.0), ("s", 1.0)):
            if text.endswith(suffix):
                try:
                    value = float(text[: -len(suffix)]) * scale
                except ValueError:
                    break
                break
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0) or value == float("inf"):
        raise ConfigError(f"{arg}={value!r}: expected seconds >= 0 (a number, or a string like '5ms' or '2s')")
    return float(value)

# --------------------------------------------------------------------------- task spec
@dataclass(frozen=True)
class TaskSpec:
    """What a ``@gpu_task`` declares; per-call overrides make a copy."""

    fn: Callable[..., Any]
    name: str
    model: str
    vram: int | None = None
    priority: int = 0
    after: tuple = ()
    device: str | None = None            # "cpu": run in the CPU pool outside the budget
    fallback: str | None = None          # "cpu": go there when the model cannot fit
    batch_size: int = 1
    batch_wait: float = 0.0
    cuda_graph: bool = False
    oom_retries: int | None = None
    working: int | None = None           # working memory a call needs while it runs; None: the model's
    max_retries: int = 0                 # on a cluster: reruns elsewhere after its worker was lost

    @functools.cached_property
    def is_async(self) -> bool:
        """True for an ``async def`` body (run with asyncio.run on the worker)."""
        return asyncio.iscoroutinefunction(self.fn)


@dataclass
class _Frame:
    """What a running task body may ask for: its slot, model object and device."""

    slot: str
    obj: Any
    device: str
    task: Task | None


_current: contextvars.ContextVar[_Frame | None] = contextvars.ContextVar("gpuctx_current", default=None)


def current_frame() -> _Frame | None:
    """The frame of the task or session running in this thread/async task, or None."""
    return _current.get()
