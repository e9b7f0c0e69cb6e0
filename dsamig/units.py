"""Parsing and printing sizes (``512KiB``) and rates (``10Gbit``)."""

from __future__ import annotations

import re

from dsamig.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
    "p": 1024**5, "pb": 1000**5, "pib": 1024**5,
}
_RATE_UNITS = {
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "tbit": 1e12 / 8,
    "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_NUMBER = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, what: str = "size") -> int:
    """``4096``, ``512KiB``, ``2G`` (binary), ``1GB`` (decimal) → bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"{what} must not be negative, got {text}")
        return text
    match = _NUMBER.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ConfigError(
            f"{what} {text!r} is not a size (examples: 4096, 512KiB, 2GiB, 1GB)"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_rate(text: str | float, what: str = "bandwidth") -> float:
    """``10Gbit``, ``500MB``, ``1GiB`` (per second) → bytes per second."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    match = _NUMBER.match(str(text))
    unit = match.group(2).lower().removesuffix("/s").removesuffix("ps") if match else ""
    if not match or unit not in _RATE_UNITS:
        raise ConfigError(
            f"{what} {text!r} is not a rate (examples: 10Gbit, 800Mbit, 500MB, 1GiB)"
        )
    return float(match.group(1)) * _RATE_UNITS[unit]


def format_bytes(n: float) -> str:
    """1536 → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
