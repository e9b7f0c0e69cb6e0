"""Real loopback transfers: exact bytes, exact page counts, sparse destinations."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from dsamig.pages import PageSource
from tests.conftest import read_bytes
from tests.integration.helpers import transfer_in_process

PAGE = 4096
PACKET = 128 * PAGE


@pytest.mark.parametrize("channels", [1, 2, 4, 8])
@pytest.mark.parametrize(
    "size",
    [0, 1, PAGE - 1, PAGE, PAGE + 1, PACKET - 1, PACKET, PACKET + 1, 3 * PACKET + 5 * PAGE + 123,
     9 * 1024 * 1024 + 7],
)
async def test_byte_identical(tmp_path, image_factory, channels: int, size: int) -> None:
    image, zero, normal = image_factory(size, seed=size)
    output = str(tmp_path / "out.img")
    sent, received = await transfer_in_process(image, output, channels=channels)
    assert read_bytes(output) == read_bytes(image)
    assert (sent.counters.zero_pages, sent.counters.normal_pages) == (zero, normal)
    assert (received.counters.zero_pages, received.counters.normal_pages) == (zero, normal)
    assert sent.status == received.status == "completed"
    assert not os.path.exists(output + ".partial")


@pytest.mark.parametrize("engine", ["cpu", "none"])
async def test_engines_give_same_bytes(tmp_path, image_factory, engine: str) -> None:
    image, zero, normal = image_factory(2 * PACKET + 3 * PAGE, seed=3)
    output = str(tmp_path / "out.img")
    _sent, received = await transfer_in_process(image, output, channels=2, engine=engine)
    assert read_bytes(output) == read_bytes(image)
    if engine == "none":
        assert (received.counters.zero_pages, received.counters.normal_pages) == (0, zero + normal)
        assert received.counters.normal_bytes == os.path.getsize(image)
    else:
        assert (received.counters.zero_pages, received.counters.normal_pages) == (zero, normal)


@pytest.mark.parametrize("offset", [0, 2047, 4095])
async def test_single_byte_makes_a_normal_page(tmp_path, offset: int) -> None:
    image = tmp_path / "img"
    data = bytearray(300 * PAGE)
    data[137 * PAGE + offset] = 0x01
    image.write_bytes(data)
    output = str(tmp_path / "out.img")
    _sent, received = await transfer_in_process(str(image), output, channels=3)
    assert read_bytes(output) == bytes(data)
    assert (received.counters.zero_pages, received.counters.normal_pages) == (299, 1)
    assert received.counters.normal_bytes == PAGE


async def test_destination_is_sparse(tmp_path, image_factory) -> None:
    image, _zero, normal = image_factory(64 * 1024 * 1024, seed=5, zero_every=2)
    output = str(tmp_path / "out.img")
    await transfer_in_process(image, output, channels=4)
    allocated = os.stat(output).st_blocks * 512
    assert read_bytes(output) == read_bytes(image)
    # Zero pages were never written: about the normal pages are allocated.
    assert normal * PAGE <= allocated <= normal * PAGE + 1024 * 1024


async def test_sparse_source_holes_are_not_scanned(tmp_path) -> None:
    image = tmp_path / "holey.img"
    size = 256 * 1024 * 1024
    with open(image, "wb") as f:
        f.truncate(size)
        f.seek(100 * 1024 * 1024)
        f.write(b"\x01" * PAGE)
    output = str(tmp_path / "out.img")
    sent, received = await transfer_in_process(str(image), output, channels=2)
    assert received.counters.normal_pages == 1 and received.counters.zero_pages == size // PAGE - 1
    # The engine saw only the chunk holding data, not the 256 MiB of holes.
    assert sent.engine["pages"] <= 8 * 128
    assert read_bytes(output) == image.read_bytes()


async def test_finding_the_holes_does_not_block_the_loop(tmp_path, image_factory,
                                                        monkeypatch) -> None:
    # SEEK_DATA/SEEK_HOLE over a large tmpfs image takes about 1 s per 100 GiB.
    # Here it waits until the loop has run a callback it scheduled: on the
    # loop, it would wait out its bound and the job would fail.
    image, _, _ = image_factory(4 * 1024 * 1024, seed=12, zero_every=3)
    loop = asyncio.get_running_loop()
    served = threading.Event()
    find_ranges = PageSource.data_ranges

    def data_ranges(self: PageSource) -> list[tuple[int, int]]:
        loop.call_soon_threadsafe(served.set)
        if not served.wait(10):
            raise AssertionError("the event loop stood still while the holes were found")
        return find_ranges(self)

    monkeypatch.setattr(PageSource, "data_ranges", data_ranges)
    output = str(tmp_path / "out.img")
    await transfer_in_process(image, output, channels=2)
    assert served.is_set()
    assert read_bytes(output) == read_bytes(image)


@pytest.mark.parametrize("packet_size,page_size", [(64 * 1024, 4096), (1024 * 1024, 8192),
                                                   (100 * 512, 512)])
async def test_packet_and_page_sizes(tmp_path, image_factory, packet_size, page_size) -> None:
    image, _, _ = image_factory(5 * 1024 * 1024 + 3, seed=9)
    output = str(tmp_path / "out.img")
    _sent, received = await transfer_in_process(
        image, output, channels=3, packet_size=packet_size, page_size=page_size
    )
    assert read_bytes(output) == read_bytes(image)
    pages = received.counters.zero_pages + received.counters.normal_pages
    assert pages == -(-(5 * 1024 * 1024 + 3) // page_size)


async def test_stats_use_query_migrate_names(tmp_path, image_factory) -> None:
    image, _zero, normal = image_factory(3 * PACKET, seed=1)
    sent, received = await transfer_in_process(image, str(tmp_path / "o"), channels=2)
    for stats in (sent, received):
        d = stats.to_dict()
        for key in ("status", "total-time", "setup-time", "mbps", "transferred", "total",
                    "duplicate", "normal", "normal-bytes", "pages-per-second", "channels",
                    "engine", "channel-stats", "thread-cpu-s"):
            assert key in d, key
        assert d["total"] == 3 * PACKET
        assert d["channels"] == 2 == len(d["channel-stats"])
        assert d["remaining"] == 0
    assert sent.transferred == received.transferred
    assert sent.transferred > normal * PAGE  # payload plus headers


async def test_the_transport_reports_a_job_end_at_debug_only(tmp_path, image_factory) -> None:
    """The daemon's "job finished" line (or the one-shot summary) is the one
    canonical report; the transport's own end-of-job events stay at debug."""
    from structlog.testing import capture_logs

    image, _, _ = image_factory(1024 * 1024, seed=9)
    with capture_logs() as logs:
        await transfer_in_process(image, str(tmp_path / "out.img"), channels=2)
    ends = [(e["event"], e["log_level"]) for e in logs
            if e["event"] in ("job completed", "job failed", "job cancelled")]
    assert ends == [("job completed", "debug"), ("job completed", "debug")]
