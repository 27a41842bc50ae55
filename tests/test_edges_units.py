"""Issue 14, entry 26 (sizes): integer sizes are exact, huge ones are a ConfigError, and a
fraction of a byte is refused with the argument's name and the likely meant unit."""

from __future__ import annotations

import pytest

import gpuctx
from gpuctx import ConfigError, parse_size


@pytest.mark.parametrize("n", [2**53 + 1, 2**62 + 3, 10**18 + 1])
def test_integer_sizes_are_exact(n):
    assert parse_size(n) == n
    assert parse_size(str(n)) == n


def test_decimal_sizes_with_a_unit_are_exact():
    assert parse_size("9007199.254740993GB") == 9_007_199_254_740_993
    assert parse_size("1.5GiB") == 3 * 2**29


@pytest.mark.parametrize("huge", [10**400, "1e400", "1e400GB", "1e999999999 TB", 2**64])
def test_huge_sizes_are_a_config_error(huge):
    with pytest.raises(ConfigError, match="budget=.*too large"):
        parse_size(huge, arg="budget")


@pytest.mark.parametrize("frac", [4.5, "4.5", "4.5B", 0.25])
def test_a_fraction_of_a_byte_is_refused_with_a_hint(frac):
    with pytest.raises(ConfigError) as info:
        parse_size(frac, arg="vram")
    msg = str(info.value)
    assert "vram=" in msg and "whole number of bytes" in msg and f"'{float(str(frac).rstrip('B'))}GB'" in msg


def test_a_float_vram_in_the_api_is_refused():
    with pytest.raises(ConfigError, match="vram=4.5.*'4.5GB'"):
        gpuctx.gpu_task(model="m", vram=4.5)(lambda: None)


def test_whole_floats_and_units_still_work():
    assert parse_size(1.5e9) == 1_500_000_000
    assert parse_size(4.0) == 4
    assert parse_size("0.5kB") == 500
