"""Parsing and printing sizes (``512KiB``) and rates (``10Gbit/s``, ``500MB/s``).

Rates follow one rule, so that a network operator's ``100Mbps`` and a storage
operator's ``100MB/s`` both mean what their writer meant:

* bits: ``bit``, ``bits``, ``bps``, or ``b`` after an upper-case prefix
  (``10Gbit``, ``800Mbps``, ``1Gb/s``);
* bytes: ``B``, ``byte``, ``bytes`` (``500MB``, ``1GiB/s``, ``64KB``);
* decimal prefixes ``k``/``K``, ``M``, ``G``, ``T`` (1000ⁿ) and binary
  ``Ki``, ``Mi``, ``Gi``, ``Ti`` (1024ⁿ);
* an optional ``/s``; a bare number is bytes per second.

Spellings whose case cannot be trusted are refused with both readings:
``100mb`` and ``100MBPS`` (bits or bytes?) and a prefix alone, ``100M``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsamig.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
    "p": 1024**5, "pb": 1000**5, "pib": 1024**5,
}
_NUMBER = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z/]*)\s*$")
_RATE_UNIT = re.compile(r"^(?P<prefix>[kKmMgGtT]i?)?(?P<unit>[a-zA-Z]*)$")
_DECIMAL = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BINARY = {"ki": 1024.0, "mi": 1024.0**2, "gi": 1024.0**3, "ti": 1024.0**4}
_PREFIX_WORDS = {"k": "kilo", "m": "mega", "g": "giga", "t": "tera",
                 "ki": "kibi", "mi": "mebi", "gi": "gibi", "ti": "tebi"}


@dataclass(frozen=True)
class RateUnit:
    """How a rate is shown: in bits or bytes, with decimal or binary prefixes."""

    bits: bool = False
    binary: bool = True

    def format(self, bytes_per_s: float) -> str:
        """``12.5 MB/s``, ``100.0 Mbit/s`` or ``11.9 MiB/s`` for the same rate."""
        value = bytes_per_s * 8 if self.bits else bytes_per_s
        step = 1024.0 if self.binary else 1000.0
        suffix = "bit/s" if self.bits else "B/s"
        prefixes = ("", "Ki", "Mi", "Gi", "Ti") if self.binary else ("", "k", "M", "G", "T")
        for prefix in prefixes:
            if abs(value) < step or prefix == prefixes[-1]:
                if not prefix:
                    return f"{value:.0f} {suffix}"
                return f"{value:.1f} {prefix}{suffix}"
            value /= step
        raise AssertionError("unreachable")


#: Rates nobody chose a unit for are shown in binary bytes, as sizes are.
BYTES = RateUnit(bits=False, binary=True)


class Rate(float):
    """Bytes per second that remember the unit they were written in.

    A plain ``float`` everywhere a number is wanted (the pacer, JSON); the
    progress displays read :attr:`unit` to show a rate in the unit of its cap.
    """

    unit: RateUnit

    def __new__(cls, bytes_per_s: float, unit: RateUnit = BYTES) -> Rate:
        self = super().__new__(cls, bytes_per_s)
        self.unit = unit
        return self


def rate_unit(value: float | None) -> RateUnit:
    """The unit ``value`` was written in (a :class:`Rate`), else :data:`BYTES`."""
    return value.unit if isinstance(value, Rate) else BYTES


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


def parse_rate(text: str | float, what: str = "bandwidth") -> Rate:
    """``10Gbit``, ``800Mbps``, ``500MB/s``, ``1GiB`` → bytes per second.

    ConfigError for what is not a rate, and for an ambiguous spelling (with
    both of its readings).
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        return Rate(float(text))
    match = _NUMBER.match(str(text))
    parsed = _RATE_UNIT.match(match.group(2).removesuffix("/s")) if match else None
    if match is None or parsed is None:
        raise ConfigError(f"{what} {text!r} is not a rate ({_EXAMPLES})")
    number = float(match.group(1))
    spelled_prefix, unit = parsed.group("prefix") or "", parsed.group("unit")
    if not spelled_prefix and not unit:
        return Rate(number)  # a bare number: bytes per second
    prefix = spelled_prefix.lower()
    kind = _unit_kind(unit, spelled_prefix)
    if kind == "ambiguous":
        raise ConfigError(_ambiguous(what, text, match.group(1), prefix, unit))
    if kind is None:
        raise ConfigError(f"{what} {text!r} is not a rate ({_EXAMPLES})")
    scale = _BINARY.get(prefix) or _DECIMAL.get(prefix, 1.0)
    bits = kind == "bits"
    return Rate(number * scale / 8 if bits else number * scale,
                RateUnit(bits=bits, binary=prefix in _BINARY))


_EXAMPLES = "examples: 10Gbit, 800Mbps, 500MB/s, 1GiB/s"


def _unit_kind(unit: str, prefix: str) -> str | None:
    """``bits``, ``bytes``, ``ambiguous``, or None for no unit we know."""
    if unit.lower() in ("bit", "bits") or unit == "bps":
        return "bits"
    if unit.lower() in ("byte", "bytes") or unit in ("B", "Bps"):
        return "bytes"
    if unit == "b":
        # "Mb" is megabits; "mb" and a bare "b" are as often meant as bytes.
        return "bits" if prefix[:1].isupper() else "ambiguous"
    if unit in ("", "BPS"):
        return "ambiguous"  # "100M": a prefix alone; "100MBPS": shouted, so either
    return None


def _ambiguous(what: str, text: object, number: str, prefix: str, unit: str) -> str:
    """The refusal of an ambiguous rate, offering both readings."""
    spelled = {"k": "k", "ki": "Ki", "mi": "Mi", "gi": "Gi", "ti": "Ti"}.get(prefix,
                                                                          prefix.upper())
    word = _PREFIX_WORDS.get(prefix, "")
    why = "a prefix alone" if not unit else "its case does not say which"
    return (f"{what} {text!r} is ambiguous ({why}): write {number}{spelled}bit/s for "
            f"{number} {word}bits per second, or {number}{spelled}B/s for {number} "
            f"{word}bytes per second")


def format_bytes(n: float) -> str:
    """1536 → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_s: float, unit: RateUnit = BYTES) -> str:
    """A rate in ``unit`` (bits or bytes, decimal or binary prefixes)."""
    return unit.format(bytes_per_s)


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str | float, what: str = "duration") -> float:
    """``30``, ``500ms``, ``30s``, ``5m``, ``1h`` → seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    match = _DURATION.match(str(text))
    if not match:
        raise ConfigError(f"{what} {text!r} is not a duration (examples: 30, 500ms, 30s, 5m, 1h)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]

