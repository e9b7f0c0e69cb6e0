"""Sizes and rates: bits against bytes, ``/s``, and the spellings refused as ambiguous."""

from __future__ import annotations

import pytest

from dsamig.errors import ConfigError
from dsamig.units import BYTES, Rate, RateUnit, format_rate, parse_rate, parse_size, rate_unit

BITS = RateUnit(bits=True, binary=False)
DECIMAL_BYTES = RateUnit(bits=False, binary=False)


@pytest.mark.parametrize(("text", "bytes_per_s", "unit"), [
    # bits: bit, bits, bps, or b after an upper-case prefix
    ("100Mbps", 12.5e6, BITS),
    ("100 Mbps", 12.5e6, BITS),
    ("1 Gb", 125e6, BITS),
    ("1Gb/s", 125e6, BITS),
    ("10Gbit/s", 1.25e9, BITS),
    ("10Gbit", 1.25e9, BITS),
    ("800mbit", 100e6, BITS),
    ("64kbit", 8e3, BITS),
    ("100Kb", 12.5e3, BITS),
    ("10gbps", 1.25e9, BITS),
    ("2 bits/s", 0.25, RateUnit(bits=True, binary=False)),
    ("1Mibit", 1024**2 / 8, RateUnit(bits=True, binary=True)),
    # bytes: B, byte, bytes
    ("100MB/s", 100e6, DECIMAL_BYTES),
    ("100MB", 100e6, DECIMAL_BYTES),
    ("500MBps", 500e6, DECIMAL_BYTES),
    ("100kB", 100e3, DECIMAL_BYTES),
    ("1.5 GB", 1.5e9, DECIMAL_BYTES),
    ("3 Mbyte/s", 3e6, DECIMAL_BYTES),
    ("1GiB", 1024**3, BYTES),
    ("1GiB/s", 1024**3, BYTES),
    ("4 MiB/s", 4 * 1024**2, BYTES),
    # a bare number is bytes per second
    ("12", 12.0, BYTES),
    (2.5e6, 2.5e6, BYTES),
])
def test_rates_in_bits_and_bytes(text: str | float, bytes_per_s: float, unit: RateUnit) -> None:
    rate = parse_rate(text)
    assert rate == pytest.approx(bytes_per_s)
    assert rate.unit == unit
    assert rate_unit(rate) == unit


@pytest.mark.parametrize(("text", "bits", "bytes_"), [
    ("100mb", "100Mbit/s", "100MB/s"),
    ("100mbPS", None, None),
    ("100MBPS", "100Mbit/s", "100MB/s"),
    ("100M", "100Mbit/s", "100MB/s"),
    ("1G/s", "1Gbit/s", "1GB/s"),
    ("64kb", "64kbit/s", "64kB/s"),
    ("2mib", "2Mibit/s", "2MiB/s"),
    ("800b", "800bit/s", "800B/s"),
])
def test_ambiguous_spellings_are_refused_with_both_readings(
        text: str, bits: str | None, bytes_: str | None) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_rate(text, "max_bandwidth")
    message = str(caught.value)
    if bits is None:
        assert message == (f"max_bandwidth {text!r} is not a rate "
                           "(examples: 10Gbit, 800Mbps, 500MB/s, 1GiB/s)")
        return
    assert message.startswith(f"max_bandwidth {text!r} is ambiguous")
    assert f"write {bits} for " in message and f"or {bytes_} for " in message
    # Both readings the message offers are accepted as written.
    assert parse_rate(bits).unit.bits and not parse_rate(bytes_).unit.bits
    assert float(parse_rate(bits)) * 8 == pytest.approx(float(parse_rate(bytes_)))


def test_the_refusal_names_the_prefix_in_words() -> None:
    with pytest.raises(ConfigError, match="100 megabits per second, or 100MB/s for 100 "
                                          "megabytes per second"):
        parse_rate("100mb")
    with pytest.raises(ConfigError, match="2 mebibits per second"):
        parse_rate("2mib")


@pytest.mark.parametrize("text", ["fast", "10Gbitz", "10 Gbit/h", "-5MB", "Mbit", "10Gps", ""])
def test_what_is_not_a_rate(text: str) -> None:
    with pytest.raises(ConfigError, match=r"is not a rate \(examples: 10Gbit, 800Mbps"):
        parse_rate(text)


def test_a_rate_is_a_plain_number_that_remembers_its_unit() -> None:
    rate = parse_rate("800Mbit")
    assert isinstance(rate, float) and rate == 100e6 and rate + 0 == 100e6
    assert rate_unit(100e6) == BYTES  # a float nobody gave a unit
    assert rate_unit(None) == BYTES
    assert Rate(5.0).unit == BYTES


@pytest.mark.parametrize(("bytes_per_s", "unit", "text"), [
    (100e6, BITS, "800.0 Mbit/s"),
    (1.25e9, BITS, "10.0 Gbit/s"),
    (12.5, BITS, "100 bit/s"),
    (100e6, DECIMAL_BYTES, "100.0 MB/s"),
    (100e6, BYTES, "95.4 MiB/s"),
    (512, BYTES, "512 B/s"),
    (3e15, BITS, "24000.0 Tbit/s"),
])
def test_format_rate_in_the_unit_of_the_cap(bytes_per_s: float, unit: RateUnit,
                                            text: str) -> None:
    assert format_rate(bytes_per_s, unit) == text


def test_sizes_unchanged() -> None:
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("2G") == 2 * 1024**3
    assert parse_size("1GB") == 10**9
    assert parse_size(4096) == 4096
    with pytest.raises(ConfigError, match="is not a size"):
        parse_size("4 pages")
