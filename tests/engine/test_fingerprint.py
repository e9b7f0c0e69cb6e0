"""Page fingerprints: every SIMD level of the native code against the pure-Python twin."""

from __future__ import annotations

import os
import random
import struct
from array import array

import pytest

from dsamig import _pure
from dsamig.native import native

PAGE = 4096
LEVELS = ["generic", "sse2", "avx2"]
SEED = bytes(range(16))


@pytest.fixture(params=LEVELS)
def level(request):
    if native is None:
        pytest.skip("needs the extension")
    native.force_simd(request.param)
    yield request.param
    native.force_simd(None)


def key_for(page_size: int = PAGE) -> bytes:
    return _pure.fingerprint_key(SEED, page_size)


def slots(n: int) -> array:
    return array("Q", bytes(8 * n))


def crafted_pages(key: bytes) -> list[bytes]:
    """Pages that probe the edges of the construction (see fingerprint.c)."""
    rng = random.Random(7)
    pages = [bytes(PAGE), b"\xff" * PAGE, rng.randbytes(PAGE)]
    for offset in (0, 1, 3, 4, 7, 8, 31, 32, 63, 64, 2047, 2048, 4088, 4095):
        page = bytearray(PAGE)
        page[offset] = 0x01
        pages.append(bytes(page))
    # Even words that cancel the first NH key make every product of that pass
    # zero: two such pages that differ only in odd words collide in the first
    # pass, and only the second, independent pass tells them apart.
    k0 = struct.unpack(f"<{PAGE // 4}I", key[:PAGE])
    cancel = [(-k0[i]) % 2**32 if i % 2 == 0 else 0 for i in range(PAGE // 4)]
    pages.append(struct.pack(f"<{PAGE // 4}I", *cancel))
    cancel[1] = 12345
    pages.append(struct.pack(f"<{PAGE // 4}I", *cancel))
    return pages


def test_twin_known_answers() -> None:
    """The specification pinned: a change to the construction changes these."""
    key = key_for()
    assert len(key) == 2 * PAGE + 48
    assert key[:8].hex() == "2b3a81a97c3f0fc8"
    out = slots(4)
    data = bytes(PAGE) + bytes(range(256)) * 16 + b"\x01" + bytes(PAGE - 1) + b"abc"
    assert _pure.fingerprint_pages(data, PAGE, key, out) == 4
    assert [f"{v:016x}" for v in out] == [
        "cca4cbbad8da3ac4", "7da8cf6194325271", "3b51f39363ff7127", "ff0d063f64be6033"]


def test_crafted_pages_match_twin(level: str) -> None:
    key = key_for()
    pages = crafted_pages(key)
    data = b"".join(pages)
    got, want = slots(len(pages)), slots(len(pages))
    assert native.fingerprint_pages(data, PAGE, key, got) == len(pages)
    assert _pure.fingerprint_pages(data, PAGE, key, want) == len(pages)
    assert got == want
    assert len(set(got)) == len(pages), "two different crafted pages share a fingerprint"


def test_nh_cancellation_is_caught_by_the_second_pass() -> None:
    key = key_for()
    first, second = crafted_pages(key)[-2:]
    out = slots(2)
    _pure.fingerprint_pages(first + second, PAGE, key, out)
    assert out[0] != out[1]


@pytest.mark.parametrize("length", [1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 100, PAGE - 1])
def test_short_last_page(level: str, length: int) -> None:
    key = key_for()
    data = os.urandom(PAGE + length)
    got, want = slots(2), slots(2)
    assert native.fingerprint_pages(data, PAGE, key, got) == 2
    _pure.fingerprint_pages(data, PAGE, key, want)
    assert got == want


@pytest.mark.parametrize("page_size", [8, 64, 512, 8192, 65536])
def test_page_sizes(level: str, page_size: int) -> None:
    key = key_for(page_size)
    data = os.urandom(page_size * 3)
    got, want = slots(3), slots(3)
    native.fingerprint_pages(data, page_size, key, got)
    _pure.fingerprint_pages(data, page_size, key, want)
    assert got == want


def test_single_bit_flips_change_the_fingerprint(level: str) -> None:
    """Every one-bit change in the first, middle and last 64 bytes of a zero page
    and of a random page is seen, and no two of them collide."""
    key = key_for()
    offsets = [*range(64), *range(2016, 2080), *range(PAGE - 64, PAGE)]
    bits = [8 * offset + b for offset in offsets for b in range(8)]
    for base in (bytes(PAGE), random.Random(3).randbytes(PAGE)):
        variants = bytearray(base * (len(bits) + 1))
        for n, bit in enumerate(bits):
            variants[n * PAGE + bit // 8] ^= 1 << (bit % 8)
        out = slots(len(bits) + 1)
        native.fingerprint_pages(variants, PAGE, key, out)
        assert len(set(out)) == len(bits) + 1


def test_keys_differ_by_seed_and_page_size() -> None:
    assert _pure.fingerprint_key(SEED, PAGE) != _pure.fingerprint_key(bytes(16), PAGE)
    assert _pure.fingerprint_key(SEED, 512)[:512] != _pure.fingerprint_key(SEED, PAGE)[:512]
    if native is not None:
        assert native.fingerprint_key(SEED, PAGE) == _pure.fingerprint_key(SEED, PAGE)
        assert native.FINGERPRINT_SEED_BYTES == _pure.FINGERPRINT_SEED_BYTES == 16


def test_copy_fingerprint_copies_and_records_the_copy(level: str) -> None:
    key = key_for()
    src = os.urandom(3 * PAGE + 100)
    dst = bytearray(b"\xaa" * (4 * PAGE))
    got, want = slots(10), slots(10)
    assert native.copy_fingerprint(dst, src, PAGE, key, got, 5) == 4
    assert bytes(dst[: len(src)]) == src
    assert dst[len(src):] == b"\xaa" * (4 * PAGE - len(src))  # nothing past the copy
    _pure.fingerprint_pages(src, PAGE, key, want, 5)
    assert got == want
    assert got[:5] == slots(5)  # nothing before the index


def test_twin_copy_fingerprint_matches_its_plain_fingerprint() -> None:
    key = key_for()
    src = random.Random(5).randbytes(2 * PAGE + 9)
    dst = bytearray(len(src))
    a, b = slots(3), slots(3)
    assert _pure.copy_fingerprint(dst, src, PAGE, key, a) == 3
    _pure.fingerprint_pages(src, PAGE, key, b)
    assert bytes(dst) == src and a == b


def test_copy_from_a_mapping(level: str, tmp_path) -> None:
    import mmap

    key = key_for()
    path = tmp_path / "image"
    content = os.urandom(8 * PAGE)
    path.write_bytes(content)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        dst = bytearray(8 * PAGE)
        got, want = slots(8), slots(8)
        native.copy_fingerprint(dst, memoryview(m)[: 8 * PAGE], PAGE, key, got)
        _pure.fingerprint_pages(content, PAGE, key, want)
        assert bytes(dst) == content and got == want


@pytest.mark.parametrize("group", [0, 1, 3, 8, 128])
def test_changes_match_twin(level: str, group: int) -> None:
    key = key_for()
    rng = random.Random(11)
    before = bytearray(rng.randbytes(20 * PAGE))
    before[5 * PAGE : 7 * PAGE] = bytes(2 * PAGE)
    previous = slots(22)
    native.fingerprint_pages(before, PAGE, key, previous, 2)
    after = bytearray(before)
    after[0] ^= 1  # page 0: one bit
    after[5 * PAGE + 100] = 9  # page 5: zero to data
    after[9 * PAGE : 10 * PAGE] = bytes(PAGE)  # page 9: data to zero
    after[19 * PAGE + PAGE - 1] ^= 0x80  # page 19: its last byte
    result = native.fingerprint_changes(after, PAGE, key, previous, 2, group)
    assert result == _pure.fingerprint_changes(after, PAGE, key, previous, 2, group)
    bitmap, changed = result
    assert changed == 4
    if group in (0, 8):
        per_byte = 8 if group == 8 else 20
        bits = [i for i in range(20) if bitmap[i // per_byte * ((per_byte + 7) // 8)
                                              + (i % per_byte) // 8] >> (i % 8) & 1]
        assert bits == [0, 5, 9, 19]
    assert native.fingerprint_changes(before, PAGE, key, previous, 2, group)[1] == 0


IMPLS = [pytest.param(_pure, id="twin"),
         pytest.param(native, id="native",
                      marks=pytest.mark.skipif(native is None, reason="needs the extension"))]


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_are_named(impl) -> None:
    key = key_for()
    page = bytes(PAGE)
    with pytest.raises(ValueError, match="positive multiple of 8"):
        impl.fingerprint_pages(page, 100, key, slots(1))
    with pytest.raises(ValueError, match="need a key of 8240"):
        impl.fingerprint_pages(page, PAGE, key[:-1], slots(1))
    with pytest.raises(ValueError, match=r"holds 1 fingerprints; pages 1\.\.1 do not fit"):
        impl.fingerprint_pages(page, PAGE, key, slots(1), 1)
    with pytest.raises(ValueError, match="must not be negative"):
        impl.fingerprint_pages(page, PAGE, key, slots(1), -1)
    with pytest.raises(BufferError, match="out is not writable"):
        impl.fingerprint_pages(page, PAGE, key, bytes(8))
    with pytest.raises(BufferError, match="dst is not writable"):
        impl.copy_fingerprint(bytes(PAGE), page, PAGE, key, slots(1))
    with pytest.raises(ValueError, match="shorter than src"):
        impl.copy_fingerprint(bytearray(PAGE - 1), page, PAGE, key, slots(1))
    with pytest.raises(ValueError, match="previous holds 0 fingerprints"):
        impl.fingerprint_changes(page, PAGE, key, b"")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        impl.fingerprint_key(b"short", PAGE)


def test_twin_has_the_fingerprint_api() -> None:
    for name in ("fingerprint_key", "fingerprint_pages", "copy_fingerprint",
                 "fingerprint_changes", "FINGERPRINT_SEED_BYTES"):
        assert hasattr(_pure, name), name
        if native is not None:
            assert hasattr(native, name), name
