import math

import pytest

from gpuctx import ConfigError, format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4.5GB", 4_500_000_000),
        ("4.5 GB", 4_500_000_000),
        ("512MiB", 512 * 2**20),
        ("2GiB", 2 * 2**30),
        ("1kB", 1000),
        ("1KiB", 1024),
        ("10", 10),
        ("7B", 7),
        (" 3 tb ", 3 * 10**12),
        (4_500_000_000, 4_500_000_000),
        (1.5e9, 1_500_000_000),
        (0, 0),
    ],
)
def test_parse_size_accepts_si_iec_and_bytes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["4.5 G B", "GB", "-1GB", "4.5XB", "", "nan GB", "1b", None, True, [1], "inf"])
def test_parse_size_rejects_with_argument_name(bad):
    with pytest.raises(ConfigError) as info:
        parse_size(bad, arg="vram")
    assert "vram=" in str(info.value)


@pytest.mark.parametrize("bad", [-5, float("nan"), float("inf"), -0.5])
def test_parse_size_rejects_negative_and_non_finite_numbers(bad):
    with pytest.raises(ConfigError, match="vram="):
        parse_size(bad)


def test_zero_refused_when_not_allowed():
    with pytest.raises(ConfigError, match="positive"):
        parse_size("0GB", arg="budget", allow_zero=False)


def test_format_size_round_trips_readably():
    assert format_size(4_500_000_000) == "4.5 GB"
    assert format_size(512) == "512 B"
    assert math.isclose(parse_size(format_size(2_000_000).replace(" ", "")), 2_000_000)
