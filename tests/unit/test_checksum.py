"""CRC32C: every native implementation against the pure-Python twin."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsamig import _pure
from dsamig.native import native
from tests.conftest import requires_extension

IMPLS = [_pure] + ([native] if native is not None else [])


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_known_vectors(impl) -> None:
    assert impl.crc32c(b"") == 0
    assert impl.crc32c(b"123456789") == 0xE3069283  # the CRC32C check value
    assert impl.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert impl.crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of ones


# Every implementation the extension has (taken from it, not listed twice).
NATIVE_IMPLS = native.CRC32C_IMPLS if native is not None else ("table",)
#: The CPU flags (as /proc/cpuinfo names them) each implementation needs.
NEEDS = {"table": set(), "sse4.2-3way": {"sse4_2"}, "pclmul-fold4": {"sse4_2", "pclmulqdq"}}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _force(name: str) -> None:
    """Run ``name`` from now on; skipped only where this CPU lacks what it
    needs, so an implementation the CPU could run is never skipped."""
    assert native is not None
    missing = NEEDS[name] - _cpu_flags()
    if missing:
        pytest.skip(f"{name} needs {', '.join(sorted(missing))}, which this CPU lacks")
    native.crc32c_force(name)


@requires_extension
def test_every_implementation_has_its_cpu_needs_listed() -> None:
    assert set(NATIVE_IMPLS) == set(NEEDS)


@requires_extension
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


@requires_extension
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


@requires_extension
def test_unknown_implementation_is_refused() -> None:
    assert native is not None
    before = native.crc32c_impl()
    with pytest.raises(ValueError, match="not available"):
        native.crc32c_force("crc32-by-hand")
    assert native.crc32c_impl() == before


@requires_extension
@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=30000), st.integers(min_value=0, max_value=30000))
def test_chaining(data: bytes, cut: int) -> None:
    cut = min(cut, len(data))
    whole = native.crc32c(data)
    assert native.crc32c(data[cut:], native.crc32c(data[:cut])) == whole
    assert whole == _pure.crc32c(data)
