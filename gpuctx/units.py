"""Sizes: ``"4.5GB"``, ``"4.5 GB"``, ``"512MiB"``, ``"2GiB"``, ``4_500_000_000`` -> bytes, and back.

SI units are powers of 1000 (``kB``, ``MB``, ``GB``, ``TB``), IEC units powers of 1024
(``KiB``, ``MiB``, ``GiB``, ``TiB``); ``B`` or no unit means bytes. Units are
case-insensitive except that ``b`` alone is not accepted (bits are not a memory size).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction
from numbers import Integral, Real

from .errors import ConfigError

__all__ = ["KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB", "parse_size", "format_size"]

KB = 10**3
"""A kilobyte (SI): 1000 bytes."""
MB = 10**6
"""A megabyte (SI): 10**6 bytes."""
GB = 10**9
"""A gigabyte (SI): 10**9 bytes; ``4 * GB`` is a size wherever one is taken."""
TB = 10**12
"""A terabyte (SI): 10**12 bytes."""
KiB = 2**10
"""A kibibyte (IEC): 1024 bytes."""
MiB = 2**20
"""A mebibyte (IEC): 2**20 bytes."""
GiB = 2**30
"""A gibibyte (IEC): 2**30 bytes."""
TiB = 2**40
"""A tebibyte (IEC): 2**40 bytes."""

_UNITS = {
    "": 1, "b": 1,
    "k": KB, "kb": KB, "m": MB, "mb": MB, "g": GB, "gb": GB, "t": TB, "tb": TB,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_MAX = 2**63 - 1          # bytes: what an int64 byte count (CUDA, NVML) holds
_MAX_DIGITS = 30          # decimal exponent beyond which a number is certainly above _MAX
_EXPECTED = "expected a size like '4.5GB', '512MiB', '2 GiB' or an int of bytes"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def parse_size(value: object, *, arg: str = "vram", allow_zero: bool = True) -> int:
    """Return ``value`` in bytes.

    Integers are exact (never converted through float). A number without a unit is a count
    of bytes and must be whole: ``4.5`` is refused with a hint (``'4.5GB'``); with a unit,
    a fraction is rounded to the nearest byte (``"0.3KiB"`` is 307).

    Args:
        value: ``"4.5GB"``, ``"512MiB"``, ``"2 GiB"``, or an int (or whole float) of bytes.
        arg: the argument's name, used in the error message.
        allow_zero: whether ``0`` is a valid size.

    Returns:
        The size in bytes, at most ``2**63 - 1``.

    Raises:
        gpuctx.ConfigError: ``value`` is not a size, negative, zero when not allowed, a fraction of
            a byte, or too large; the message names ``arg``.
    """
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{arg}={value!r}: {_EXPECTED}")
    if isinstance(value, Integral):
        number, scale, unit = Fraction(int(value)), 1, ""
    elif isinstance(value, Real):
        if not math.isfinite(value):
            raise ConfigError(f"{arg}={value!r}: a size must be finite; {_EXPECTED}")
        number, scale, unit = Fraction(value), 1, ""
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2) if match else ""
        if not match or unit == "b" or unit.lower() not in _UNITS:
            raise ConfigError(f"{arg}={value!r}: {_EXPECTED}")
        digits = Decimal(match.group(1))
        if digits and digits.adjusted() > _MAX_DIGITS:   # before Fraction: "1e999999999" would take forever
            raise ConfigError(f"{arg}={_short(value)}: too large for a size (at most {_MAX:,} bytes)")
        number, scale = Fraction(digits), _UNITS[unit.lower()]
    else:
        raise ConfigError(f"{arg}={value!r} ({type(value).__name__}): {_EXPECTED}")
    if number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(f"{arg}={value!r}: a size must be {'positive' if not allow_zero else 'zero or more'}")
    nbytes = number * scale
    if scale == 1 and nbytes.denominator != 1:
        raise ConfigError(f"{arg}={value!r}: a size in bytes (no unit, or B) must be a whole number of bytes; "
                          f"did you mean '{float(number):g}GB'?")
    if nbytes > _MAX:
        raise ConfigError(f"{arg}={_short(value)}: too large for a size (at most {_MAX:,} bytes)")
    return round(nbytes)


def format_size(n: float) -> str:
    """Bytes as a short SI string, three significant digits.

    Args:
        n: a number of bytes.

    Returns:
        For example ``'4.5 GB'`` for ``4500000000``, ``'512 B'`` for ``512``.
    """
    n = float(n)
    for unit, scale in (("TB", TB), ("GB", GB), ("MB", MB), ("kB", KB)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
