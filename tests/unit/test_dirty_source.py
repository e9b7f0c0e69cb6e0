"""The content dirty source: exactly the pages that differ from what was copied out."""

from __future__ import annotations

import os
import random

import pytest

from dsamig import _pure
from dsamig.live import dirty
from dsamig.live.dirty import UNKNOWN_FINGERPRINT, ContentDirtySource, DirtyPacket
from dsamig.native import native

PAGE = 4096
SEED = bytes(16)


@pytest.fixture(params=["native", "twin"])
def impl(request, monkeypatch):
    """Run each test on the extension and on the pure-Python twin."""
    if request.param == "native":
        if native is None:
            pytest.skip("needs the extension")
        monkeypatch.setattr(dirty, "impl", native)
    else:
        monkeypatch.setattr(dirty, "impl", _pure)
    return request.param


def make_image(pages: int, zero: set[int], tail: int = 0) -> bytearray:
    rng = random.Random(1)
    image = bytearray()
    for i in range(pages):
        image += bytes(PAGE) if i in zero else rng.randbytes(PAGE)
    if tail:
        image += rng.randbytes(tail)
    return image


def dirty_pages(packets: list[DirtyPacket]) -> list[int]:
    return [page for p in packets for first, count in p.runs()
            for page in range(first, first + count)]


def send_all(source: ContentDirtySource, image: bytearray, receiver: bytearray) -> None:
    """What a round 0 does with the source: every packet through copy_out."""
    step = source.packet_pages * PAGE
    bounce = bytearray(step)
    for start in range(0, len(image), step):
        src = memoryview(image)[start : start + step]
        source.copy_out(bounce, src, start // PAGE)
        receiver[start : start + len(src)] = bounce[: len(src)]


def send_dirty(source: ContentDirtySource, image: bytearray, receiver: bytearray) -> int:
    """What a later round does: only the reported pages, through copy_out."""
    sent = 0
    bounce = bytearray(source.packet_pages * PAGE)
    for packet in list(source.dirty_packets(image)):
        for first, count in packet.runs():
            start, end = first * PAGE, min((first + count) * PAGE, len(image))
            source.copy_out(bounce, memoryview(image)[start:end], first)
            receiver[start:end] = bounce[: end - start]
            sent += count
    return sent


def test_a_fresh_receiver_needs_exactly_the_non_zero_pages(impl) -> None:
    image = make_image(40, zero={0, 1, 2, 17, 39})
    source = ContentDirtySource(len(image), PAGE, 8, seed=SEED, scan_packets=2)
    packets = list(source.dirty_packets(image))
    assert dirty_pages(packets) == [p for p in range(40) if p not in {0, 1, 2, 17, 39}]
    assert [(p.first_page, p.page_count, p.dirty_pages) for p in packets] == [
        (0, 8, 5), (8, 8, 8), (16, 8, 7), (24, 8, 8), (32, 8, 7)]
    assert packets[0].bitmap == bytes([0b11111000])
    stats = source.last_scan
    assert (stats.pages, stats.dirty_pages, stats.packets, stats.dirty_packets) == (40, 35, 5, 5)


def test_after_sending_nothing_is_dirty_until_the_image_changes(impl) -> None:
    image = make_image(40, zero={3, 4})
    receiver = bytearray(len(image))
    source = ContentDirtySource(len(image), PAGE, 8, seed=SEED, scan_packets=2)
    send_all(source, image, receiver)
    assert receiver == image
    assert list(source.dirty_packets(image)) == []
    image[5 * PAGE : 6 * PAGE] = bytes(PAGE)  # data to zero
    image[3 * PAGE + 77] = 1  # zero to data
    image[30 * PAGE + PAGE - 1] ^= 0x10  # one bit, last byte of a page
    assert dirty_pages(list(source.dirty_packets(image))) == [3, 5, 30]
    assert send_dirty(source, image, receiver) == 3
    assert receiver == image
    assert list(source.dirty_packets(image)) == []


def test_short_last_page(impl) -> None:
    image = make_image(9, zero={2}, tail=100)
    image[-100:] = bytes(100)  # a zero short page: nothing to send
    source = ContentDirtySource(len(image), PAGE, 4, seed=SEED)
    assert source.page_count == 10
    assert dirty_pages(list(source.dirty_packets(image))) == [0, 1, 3, 4, 5, 6, 7, 8]
    image[-1] = 5
    packets = list(source.dirty_packets(image))
    assert packets[-1].first_page == 8 and packets[-1].page_count == 2
    assert dirty_pages(packets)[-1] == 9
    receiver = bytearray(len(image))
    send_dirty(source, image, receiver)
    assert receiver == image


def test_forget_reports_pages_again(impl) -> None:
    image = make_image(16, zero=set())
    source = ContentDirtySource(len(image), PAGE, 8, seed=SEED)
    send_all(source, image, bytearray(len(image)))
    source.forget(6, 3)
    assert list(source.fingerprints[6:9]) == [UNKNOWN_FINGERPRINT] * 3
    assert dirty_pages(list(source.dirty_packets(image))) == [6, 7, 8]


def test_an_unknown_receiver_needs_everything(impl) -> None:
    image = make_image(10, zero={1, 2})
    source = ContentDirtySource(len(image), PAGE, 4, seed=SEED, receiver_has_zeros=False)
    assert dirty_pages(list(source.dirty_packets(image))) == list(range(10))


def test_copy_out_sends_the_bytes_it_records(impl) -> None:
    """A page that changes after the copy is reported: the record is of the copy."""
    image = make_image(8, zero=set())
    source = ContentDirtySource(len(image), PAGE, 8, seed=SEED)
    bounce = bytearray(8 * PAGE)
    source.copy_out(bounce, memoryview(image), 0)
    assert bounce == image
    image[2 * PAGE] ^= 1  # the writer, just after the copy
    assert dirty_pages(list(source.dirty_packets(image))) == [2]


def test_bad_calls_are_named(impl) -> None:
    image = make_image(8, zero=set(), tail=10)
    source = ContentDirtySource(len(image), PAGE, 4, seed=SEED)
    bounce = bytearray(8 * PAGE)
    with pytest.raises(ValueError, match="not the 32778 bytes"):
        list(source.dirty_packets(image[:-1]))
    with pytest.raises(ValueError, match="not whole pages"):
        source.copy_out(bounce, memoryview(image)[: PAGE + 1], 0)
    with pytest.raises(ValueError, match="not inside the image"):
        source.copy_out(bounce, memoryview(image)[: 2 * PAGE], 8)
    with pytest.raises(ValueError, match="not in the image's 9 pages"):
        source.forget(8, 2)
    with pytest.raises(ValueError, match="image_size must be positive"):
        ContentDirtySource(0, PAGE, 4)


def test_each_source_draws_its_own_key() -> None:
    size = 4 * PAGE
    a, b = ContentDirtySource(size, PAGE, 4), ContentDirtySource(size, PAGE, 4)
    assert len(a.seed) == 16 and a.seed != b.seed and a.key != b.key
    assert a.fingerprints[0] != b.fingerprints[0]
    assert len(a.fingerprints) * a.fingerprints.itemsize == 8 * a.page_count


@pytest.mark.skipif(native is None, reason="needs the extension (8 MiB in per-page Python)")
def test_large_image_scan_in_chunks() -> None:
    image = bytearray(os.urandom(2048 * PAGE))
    source = ContentDirtySource(len(image), PAGE, 128, seed=SEED, scan_packets=3)
    send_all(source, image, bytearray(len(image)))
    for page in (0, 127, 128, 1000, 2047):
        image[page * PAGE + 9] ^= 0xFF
    assert dirty_pages(list(source.dirty_packets(image))) == [0, 127, 128, 1000, 2047]
    assert source.last_scan.packets == 16 and source.last_scan.dirty_packets == 4


def test_leaving_a_scan_early_lets_the_mapping_close(impl, tmp_path) -> None:
    import mmap

    path = tmp_path / "image"
    path.write_bytes(make_image(16, zero=set()))
    source = ContentDirtySource(16 * PAGE, PAGE, 4, seed=SEED)
    with open(path, "rb") as f:
        image = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        scan = source.dirty_packets(image)
        assert next(scan).first_page == 0
        scan.close()
        image.close()  # BufferError if the scan still held a view
        assert image.closed
