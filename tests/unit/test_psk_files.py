"""Pre-shared key files: the two ways to write one, and what is refused and why."""

from __future__ import annotations

import pytest

from dsamig.errors import ConfigError
from dsamig.security import parse_psk

KEY = bytes(range(0xC0, 0xE0))  # 32 bytes, none of them text
HEX = KEY.hex().encode()


@pytest.mark.parametrize("raw", [HEX, HEX + b"\n", HEX + b"\r\n", HEX.upper() + b"\n"],
                         ids=["hex", "hex-newline", "hex-crlf", "HEX"])
def test_hex_files_hold_the_bytes_they_spell(raw: bytes) -> None:
    # `openssl rand -hex 32 > psk` writes 64 hex digits and a newline.
    assert parse_psk(raw, "psk") == KEY


def test_raw_files_hold_their_bytes_exactly() -> None:
    assert parse_psk(KEY, "psk") == KEY
    # A random key whose last byte happens to be a newline is still a key.
    ends_in_newline = KEY[:-1] + b"\n"
    assert parse_psk(ends_in_newline, "psk") == ends_in_newline
    # Text without a newline has no ambiguity: its bytes are the key.
    assert parse_psk(b"a passphrase of at least thirty-two bytes", "psk") == (
        b"a passphrase of at least thirty-two bytes")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"0123456789", "holds 10 hex digits (5 bytes); a key needs at least 32 bytes "
                        "(64 hex digits)"),
        (HEX[:-1] + b"\n", "holds an odd number of hex digits (63)"),
        (b"a passphrase of at least thirty-two bytes\n", "is text ending in a newline but "
                                                         "not hex digits"),
        (b"c2VjcmV0IGtleSBlbmNvZGVkIGFzIGJhc2U2NCBieSBvcGVuc3Ns\n", "is text ending in a "
                                                                     "newline"),
        (KEY[:16], "holds 16 bytes; a key needs at least 32"),
        (b"", "holds 0 bytes"),
    ],
    ids=["short-hex", "odd-hex", "echo-passphrase", "base64", "short-raw", "empty"],
)
def test_refusals_say_how_to_write_a_key(raw: bytes, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_psk(raw, "/etc/dsamig/psk")
    message = str(info.value)
    assert message.startswith("PSK file '/etc/dsamig/psk' ")
    assert problem in message
    assert "head -c 32 /dev/urandom > /etc/dsamig/psk" in message
    assert "openssl rand -hex 32 > /etc/dsamig/psk" in message
    assert "chmod 600 /etc/dsamig/psk" in message
