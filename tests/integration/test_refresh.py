"""Refreshing a committed copy: only what differs moves, and the copy is exact.

The receiver holds an image committed by an earlier job; the image changed a
little since. ``refresh`` compares the two by fingerprints, packet by packet
and then page by page, and sends only the changed pages; the old copy stays
whole until the new one commits.
"""

from __future__ import annotations

import os
import random

import pytest

from dsamig.native import impl
from tests.conftest import read_bytes
from tests.integration.helpers import transfer_in_process

MiB = 1024 * 1024
PAGE = 4096

DATA_PATHS = [pytest.param(False, id="loop")]
if hasattr(impl, "SendPump"):
    DATA_PATHS.append(pytest.param(True, id="native"))


def make_image(path: str, pages: int, seed: int) -> bytearray:
    rng = random.Random(seed)
    data = bytearray(b"".join(bytes(PAGE) if i % 5 == 0 else rng.randbytes(PAGE)
                              for i in range(pages)))
    with open(path, "wb") as f:
        f.write(data)
    return data


def change_pages(path: str, data: bytearray, pages: list[int], seed: int) -> None:
    """Change ``pages``: zero ones get data, some data ones become zero, the
    rest get other data (at the page's end, so the start stays the same)."""
    rng = random.Random(seed)
    for k, p in enumerate(pages):
        page = data[p * PAGE : (p + 1) * PAGE]
        if page == bytes(PAGE):
            page[100:108] = b"\x01" * 8
        elif k % 4 == 0:
            page[:] = bytes(PAGE)
        else:
            page[-64:] = rng.randbytes(64)
        data[p * PAGE : (p + 1) * PAGE] = page
    with open(path, "r+b") as f:
        f.write(data)


@pytest.mark.parametrize("native", DATA_PATHS)
async def test_a_one_percent_change_moves_less_than_five_percent(tmp_path, native) -> None:
    pages = 8192  # 32 MiB
    image = str(tmp_path / "image")
    data = make_image(image, pages, seed=1)
    output = str(tmp_path / "copy")
    await transfer_in_process(image, output, channels=2)
    assert read_bytes(output) == data
    changed = sorted(random.Random(2).sample(range(pages), pages // 100))
    change_pages(image, data, changed, seed=3)
    sent, received = await transfer_in_process(image, output, channels=2, refresh=True,
                                               native=native, receiver={"native": native})
    assert read_bytes(output) == data
    refresh = sent.to_dict()["refresh"]
    assert refresh["granted"] is True
    assert refresh["pages-changed"] == len(changed)
    # Each way: the pages that changed, the sums, the headers.
    wire = sent.transferred + refresh["sums-bytes"]
    assert wire < 0.05 * len(data), wire
    assert sent.counters.normal_bytes <= len(changed) * PAGE
    assert not os.path.exists(output + ".partial")
    assert received.counters.zero_pages == sum(
        1 for p in range(pages) if data[p * PAGE : (p + 1) * PAGE] == bytes(PAGE))


async def test_no_committed_copy_sends_everything(tmp_path) -> None:
    image = str(tmp_path / "image")
    data = make_image(image, 1024, seed=4)
    output = str(tmp_path / "copy")
    sent, _ = await transfer_in_process(image, output, channels=2, refresh=True)
    assert read_bytes(output) == data
    assert sent.to_dict()["refresh"] == {"granted": False}
    assert sent.counters.normal_pages == 1024 - 205


async def test_an_unchanged_image_moves_no_pages(tmp_path) -> None:
    image = str(tmp_path / "image")
    data = make_image(image, 2048, seed=5)
    output = str(tmp_path / "copy")
    await transfer_in_process(image, output, channels=2)
    sent, _ = await transfer_in_process(image, output, channels=2, refresh=True)
    assert read_bytes(output) == data
    refresh = sent.to_dict()["refresh"]
    assert (refresh["packets-matched"], refresh["pages-changed"]) == (16, 0)
    assert sent.counters.normal_bytes == 0


async def test_a_failed_refresh_leaves_the_committed_copy_whole(tmp_path) -> None:
    """The old copy is replaced only by the commit: a refresh that fails on
    the way (here: the receiver goes away once the round started) leaves it
    byte for byte as it was, and no partial file behind."""
    import asyncio

    from dsamig.errors import DsamigError
    from dsamig.transport.receiver import ReceiverServer

    pages = 4096
    image = str(tmp_path / "image")
    data = make_image(image, pages, seed=6)
    output = str(tmp_path / "copy")
    await transfer_in_process(image, output, channels=2)
    old = read_bytes(output)
    change_pages(image, data, list(range(0, pages, 7)), seed=7)

    async def break_the_round(server: ReceiverServer) -> None:
        deadline = asyncio.get_running_loop().time() + 20
        while not any(job.core.round >= 1 for job in server.jobs.values()):
            assert asyncio.get_running_loop().time() < deadline, "the round never began"
            await asyncio.sleep(0.002)
        for job in list(server.jobs.values()):
            job.fail(__import__("dsamig.transport.receiver", fromlist=["JobFailedError"])
                     .JobFailedError("the test fails the refresh"))

    with pytest.raises(DsamigError):
        await transfer_in_process(image, output, break_the_round, channels=2, refresh=True,
                                  retry_for_s=0)
    assert read_bytes(output) == old
    assert not os.path.exists(output + ".partial")
