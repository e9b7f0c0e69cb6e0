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


# Every implementation the extension has; those this CPU lacks are skipped.
NATIVE_IMPLS = native.CRC32C_IMPLS if native is not None else ("table",)


def _force(name: str) -> None:
    assert native is not None
    try:
        native.crc32c_force(name)
    except ValueError:
        pytest.skip(f"this CPU has no {name}")


@pytest.mark.skipif(native is None, reason="needs the extension")
@pytest.mark.parametrize("name", NATIVE_IMPLS)
@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 127, 128, 129, 191, 192,
                                    4095, 4096, 12287, 12288, 12289, 70001])
@pytest.mark.parametrize("misalign", [0, 1, 5])
def test_native_matches_twin(name: str, length: int, misalign: int) -> None:
    data = os.urandom(length + misalign)[misalign:]
    _force(name)
    try:
        assert native.crc32c_impl() == name
        assert native.crc32c(data) == _pure.crc32c(data)
        assert native.crc32c(memoryview(data)) == _pure.crc32c(data)
        assert native.crc32c(data, 0xDEADBEEF) == _pure.crc32c(data, 0xDEADBEEF)
    finally:
        native.crc32c_force(None)


@pytest.mark.skipif(native is None, reason="needs the extension")
@pytest.mark.parametrize("name", NATIVE_IMPLS)
@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=3000), cut=st.integers(min_value=0, max_value=3000),
       seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_every_implementation_chains(name: str, data: bytes, cut: int, seed: int) -> None:
    _force(name)
    try:
        cut = min(cut, len(data))
        assert native.crc32c(data[cut:], native.crc32c(data[:cut], seed)) == _pure.crc32c(
            data, seed)
    finally:
        native.crc32c_force(None)


@pytest.mark.skipif(native is None, reason="needs the extension")
def test_unknown_implementation_is_refused() -> None:
    assert native is not None
    before = native.crc32c_impl()
    with pytest.raises(ValueError, match="not available"):
        native.crc32c_force("crc32-by-hand")
    assert native.crc32c_impl() == before


@pytest.mark.skipif(native is None, reason="needs the extension")
@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=30000), st.integers(min_value=0, max_value=30000))
def test_chaining(data: bytes, cut: int) -> None:
    cut = min(cut, len(data))
    whole = native.crc32c(data)
    assert native.crc32c(data[cut:], native.crc32c(data[:cut])) == whole
    assert whole == _pure.crc32c(data)
