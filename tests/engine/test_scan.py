"""Zero-page scanning: every implementation and SIMD level against the twin."""

from __future__ import annotations

import os

import pytest

from dsamig import _pure
from dsamig.native import native

PAGE = 4096
LEVELS = ["generic", "sse2", "avx2"]


def crafted_pages() -> bytearray:
    """Zero pages, random pages, and pages whose only non-zero byte is at 0, 1,
    2047, 2048, 4094 or 4095 (what the three-byte sample and the vector loop
    must each catch)."""
    pages = [bytes(PAGE), os.urandom(PAGE), bytes(PAGE)]
    for offset in (0, 1, 127, 128, 2047, 2048, 4094, 4095):
        page = bytearray(PAGE)
        page[offset] = 0x80
        pages.append(bytes(page))
    pages.append(bytes(PAGE))
    return bytearray(b"".join(pages))


EXPECTED_ZERO = [0, 2, 11]


@pytest.fixture(params=LEVELS)
def level(request):
    if native is None:
        pytest.skip("needs the extension")
    native.force_simd(request.param)
    yield request.param
    native.force_simd(None)


def test_crafted_pages_every_level(level: str) -> None:
    data = crafted_pages()
    bitmap, zero = native.zero_bitmap(data, PAGE)
    assert zero == len(EXPECTED_ZERO)
    bits = int.from_bytes(bitmap, "little")
    assert [i for i in range(len(data) // PAGE) if bits >> i & 1] == EXPECTED_ZERO
    assert native.zero_bitmap(data, PAGE) == _pure.zero_bitmap(data, PAGE)


def test_twin_crafted_pages() -> None:
    bitmap, zero = _pure.zero_bitmap(crafted_pages(), PAGE)
    bits = int.from_bytes(bitmap, "little")
    assert [i for i in range(12) if bits >> i & 1] == EXPECTED_ZERO
    assert zero == 3


@pytest.mark.parametrize("length", [0, 1, 100, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 17])
@pytest.mark.parametrize("group", [0, 1, 3, 8, 128])
def test_lengths_and_groups(level: str, length: int, group: int) -> None:
    data = bytearray(length)
    if length > PAGE + 5:
        data[PAGE + 5] = 1  # page 1 normal
    assert native.zero_bitmap(data, PAGE, group) == _pure.zero_bitmap(data, PAGE, group)
    assert native.bitmap_bytes(length, PAGE, group) == _pure.bitmap_bytes(length, PAGE, group)


def test_short_last_page_with_data(level: str) -> None:
    data = bytearray(2 * PAGE + 10)
    data[-1] = 7
    bitmap, zero = native.zero_bitmap(data, PAGE)
    assert zero == 2 and bitmap == bytes([0b011])


def test_group_bitmaps_start_on_bytes(level: str) -> None:
    # 10 pages in groups of 3: bitmaps of 1 byte each (3, 3, 3, 1 pages)
    data = bytearray(10 * PAGE)
    data[4 * PAGE] = 1  # page 4 = group 1, index 1
    bitmap, zero = native.zero_bitmap(data, PAGE, 3)
    assert bitmap == bytes([0b111, 0b101, 0b111, 0b1])
    assert zero == 9


@pytest.mark.parametrize("page_size", [512, 1024, 8192, 65536])
def test_page_sizes(level: str, page_size: int) -> None:
    data = bytearray(os.urandom(page_size * 6))
    data[page_size * 2 : page_size * 4] = bytes(page_size * 2)
    assert native.zero_bitmap(data, page_size) == _pure.zero_bitmap(data, page_size)
    assert native.zero_bitmap(data, page_size)[1] == 2


def test_normal_runs_match_twin() -> None:
    if native is None:
        pytest.skip("needs the extension")
    for pattern in (0, 0xFFFF, 0xAAAA, 0x0F0F, 0x8001, 0x7FFE):
        bitmap = pattern.to_bytes(2, "little")
        for count in (1, 8, 9, 16):
            assert native.normal_runs(bitmap, count) == _pure.normal_runs(bitmap, count)
    assert _pure.normal_runs(bytes([0b0110]), 5) == [(0, 1), (3, 2)]
