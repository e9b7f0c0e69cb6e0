"""The native core and its pure-Python twin agree on the data path's functions.

The twin (``dsamig._pure``) is the readable specification: for the same
inputs, ``packet_payload``, ``write_runs`` and ``punch_hole`` of the native
extension give the same results, write the same bytes and fail the same way.
The extension is imported directly, so these run with ``DSAMIG_NO_EXTENSIONS``
too (they skip only where it was never built).
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsamig import _pure

native: Any = pytest.importorskip("dsamig._native", reason="the extension is not built")

PAGE = 4096


def packet(pages: int, bitmap_bits: int, seed: int, tail: int = PAGE) -> tuple[bytes, bytes]:
    """``pages`` pages (the last ``tail`` bytes long) and a bitmap: bit i set = page i zero.

    A page marked zero really is zero; the others hold random bytes (some of
    them zero too: the functions trust the bitmap, not the bytes)."""
    rng = random.Random(seed)
    data = bytearray()
    for i in range(pages):
        size = tail if i == pages - 1 else PAGE
        zero = (bitmap_bits >> i) & 1
        data += bytes(size) if zero else rng.randbytes(size)
    return bytes(data), bitmap_bits.to_bytes((pages + 7) // 8, "little")


packets = st.tuples(
    st.integers(1, 64),  # pages
    st.integers(0, (1 << 64) - 1),  # bitmap
    st.integers(0, 2**32),  # seed
    st.sampled_from([PAGE, 1, 100, PAGE - 1]),  # the last page's length
)


def views_bytes(views: list[memoryview]) -> list[bytes]:
    return [bytes(v) for v in views]


@settings(max_examples=100, deadline=None)
@given(packets)
def test_packet_payload_agrees(case: tuple[int, int, int, int]) -> None:
    pages, bits, seed, tail = case
    bits &= (1 << pages) - 1
    data, bitmap = packet(pages, bits, seed, tail)
    n_views, n_length, n_crc = native.packet_payload(memoryview(data), bitmap, PAGE)
    p_views, p_length, p_crc = _pure.packet_payload(memoryview(data), bitmap, PAGE)
    assert (n_length, n_crc) == (p_length, p_crc)
    assert views_bytes(n_views) == views_bytes(p_views)
    assert n_length == sum(len(v) for v in n_views)


@pytest.mark.parametrize("bitmap", [b"", b"\x00"])
def test_packet_payload_refuses_a_short_bitmap_alike(bitmap: bytes) -> None:
    data = bytes(16 * PAGE)
    for impl in (native, _pure):
        with pytest.raises(ValueError):
            impl.packet_payload(memoryview(data), bitmap, PAGE)


@pytest.fixture
def files(tmp_path) -> Iterator[tuple[int, int]]:
    """Two empty files, one for each implementation."""
    fds = [os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o600) for name in ("n", "p")]
    try:
        yield fds[0], fds[1]
    finally:
        for fd in fds:
            os.close(fd)


def contents(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


@settings(max_examples=50, deadline=None)
@given(packets, st.integers(0, 8))
def test_write_runs_agrees(tmp_path_factory, case: tuple[int, int, int, int],
                           where: int) -> None:
    pages, bits, seed, tail = case
    bits &= (1 << pages) - 1
    data, bitmap = packet(pages, bits, seed, tail)
    views, length, _ = _pure.packet_payload(memoryview(data), bitmap, PAGE)
    payload = b"".join(views_bytes(views))
    offset = where * PAGE
    directory = tmp_path_factory.mktemp("runs")
    written = []
    for name, impl in (("n", native), ("p", _pure)):
        fd = os.open(directory / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, offset + len(data))
            written.append((impl.write_runs(fd, payload, bitmap, PAGE, offset, len(data)),
                            contents(fd)))
        finally:
            os.close(fd)
    assert written[0] == written[1]
    assert written[0][0] == length
    assert written[0][1][offset:] == data  # what was zero stayed a hole, the rest is there


@pytest.mark.parametrize("cut", [-1, +1], ids=["short", "long"])
def test_write_runs_refuses_a_payload_of_the_wrong_length_alike(files, cut: int) -> None:
    data, bitmap = packet(8, 0b00100101, seed=3)
    views, _, _ = _pure.packet_payload(memoryview(data), bitmap, PAGE)
    payload = b"".join(views_bytes(views))
    wrong = payload[:cut] if cut < 0 else payload + b"x"
    for fd, impl in zip(files, (native, _pure), strict=True):
        with pytest.raises(ValueError):
            impl.write_runs(fd, wrong, bitmap, PAGE, 0, len(data))


def test_write_runs_reports_a_bad_descriptor_alike(files) -> None:
    data, bitmap = packet(2, 0, seed=4)
    reader = [os.open(f"/proc/self/fd/{fd}", os.O_RDONLY) for fd in files]
    try:
        for fd, impl in zip(reader, (native, _pure), strict=True):
            with pytest.raises(OSError) as info:
                impl.write_runs(fd, data, bitmap, PAGE, 0, len(data))
            assert info.value.errno == errno.EBADF
    finally:
        for fd in reader:
            os.close(fd)


@pytest.mark.parametrize(("offset", "length"), [(0, 4 * PAGE), (PAGE, 2 * PAGE), (100, 5000),
                                                (7 * PAGE, PAGE), (0, 0)])
def test_punch_hole_agrees(files, offset: int, length: int) -> None:
    data = random.Random(5).randbytes(8 * PAGE)
    for fd in files:
        os.pwrite(fd, data, 0)
    for fd, impl in zip(files, (native, _pure), strict=True):
        impl.punch_hole(fd, offset, length)
    expected = data[:offset] + bytes(length) + data[offset + length:]
    assert contents(files[0]) == contents(files[1]) == expected
    blocks = [os.fstat(fd).st_blocks for fd in files]
    assert blocks[0] == blocks[1]  # the same blocks freed


def test_punch_hole_reports_a_bad_descriptor_alike(files) -> None:
    reader = [os.open(f"/proc/self/fd/{fd}", os.O_RDONLY) for fd in files]
    try:
        for fd, impl in zip(reader, (native, _pure), strict=True):
            with pytest.raises(OSError) as info:
                impl.punch_hole(fd, 0, PAGE)
            assert info.value.errno == errno.EBADF
    finally:
        for fd in reader:
            os.close(fd)
