"""Sizes: ``"4.5GB"``, ``"4.5 GB"``, ``"512MiB"``, ``"2GiB"``, ``4_500_000_000`` -> bytes, and back.

SI units are powers of 1000 (``kB``, ``MB``, ``GB``, ``TB``), IEC units powers of 1024
(``KiB``, ``MiB``, ``GiB``, ``TiB``); ``B`` or no unit means bytes. Units are
case-insensitive except that ``b`` alone is not accepted (bits are not a memory size).
"""

from __future__ import annotations

import math
import re
from numbers import Real

from .errors import ConfigError

__all__ = ["KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB", "parse_size", "format_size"]

KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12
KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40

_UNITS = {
    "": 1, "b": 1,
    "k": KB, "kb": KB, "m": MB, "mb": MB, "g": GB, "gb": GB, "t": TB, "tb": TB,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_EXPECTED = "expected a size like '4.5GB', '512MiB', '2 GiB' or an int of bytes"


def parse_size(value: object, *, arg: str = "vram", allow_zero: bool = True) -> int:
    """Return ``value`` in bytes; raise :class:`ConfigError` naming ``arg`` when it is not a size."""
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{arg}={value!r}: {_EXPECTED}")
    if isinstance(value, Real):
        number, scale = float(value), 1
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2) if match else ""
        if not match or unit == "b" or unit.lower() not in _UNITS:
            raise ConfigError(f"{arg}={value!r}: {_EXPECTED}")
        number, scale = float(match.group(1)), _UNITS[unit.lower()]
    else:
        raise ConfigError(f"{arg}={value!r} ({type(value).__name__}): {_EXPECTED}")
    if not math.isfinite(number):
        raise ConfigError(f"{arg}={value!r}: a size must be finite; {_EXPECTED}")
    if number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(f"{arg}={value!r}: a size must be {'positive' if not allow_zero else 'zero or more'}")
    return int(round(number * scale))


def format_size(n: float) -> str:
    """Bytes as a short SI string: ``4500000000 -> '4.5 GB'``."""
    n = float(n)
    for unit, scale in (("TB", TB), ("GB", GB), ("MB", MB), ("kB", KB)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
