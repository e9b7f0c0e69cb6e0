"""CRC32C: the native SSE4.2 and table paths against the pure-Python twin."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsamig import _pure
from dsamig.native import native

IMPLS = [_pure] + ([native] if native is not None else [])


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_known_vectors(impl) -> None:
    assert impl.crc32c(b"") == 0
    assert impl.crc32c(b"123456789") == 0xE3069283  # the CRC32C check value
    assert impl.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert impl.crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of ones


@pytest.mark.skipif(native is None, reason="needs the extension")
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 4095, 4096, 12287, 12288, 12289, 70001])
@pytest.mark.parametrize("misalign", [0, 1, 5])
def test_native_matches_twin(portable: bool, length: int, misalign: int) -> None:
    data = os.urandom(length + misalign)[misalign:]
    native.crc32c_force_portable(portable)
    try:
        assert native.crc32c(data) == _pure.crc32c(data)
        assert native.crc32c(memoryview(data)) == _pure.crc32c(data)
    finally:
        native.crc32c_force_portable(False)


@pytest.mark.skipif(native is None, reason="needs the extension")
@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=30000), st.integers(min_value=0, max_value=30000))
def test_chaining(data: bytes, cut: int) -> None:
    cut = min(cut, len(data))
    whole = native.crc32c(data)
    assert native.crc32c(data[cut:], native.crc32c(data[:cut])) == whole
    assert whole == _pure.crc32c(data)
