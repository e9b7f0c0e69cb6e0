"""``dsamig verify IMAGE DEST``: the job digest recomputed, and a byte comparison."""

from __future__ import annotations

import os

import pytest

from dsamig.errors import ConfigError
from dsamig.pages import PageSink, PageSource
from dsamig.proto import Hello
from dsamig.settings import (
    EXIT_LOCAL_IO,
    EXIT_OK,
    EXIT_TRANSFER,
    EXIT_USAGE,
    SNAPSHOT_PACKET_SIZE,
)
from dsamig.transport.common import Timeouts
from dsamig.transport.receiver import ReceiverServer
from dsamig.transport.sender import Sender, SendOptions
from dsamig.verify import compare
from tests.conftest import read_bytes
from tests.fault.test_bad_input import assert_one_line_error
from tests.integration.helpers import dsamig
from tests.protocol.pair import JobPair, make_image

MiB = 1 << 20


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.mark.parametrize(
    ("pages", "tail"),
    [
        ([], 0),  # empty image: SHA-256 of no records
        ([1], 0),
        ([None] * 9, 0),  # all zero: ZERO_RANGE on the wire, same records
        ([1, None, 2, None, None, 3, 4, None, 5, 6, None], 100),
        ([None, None, None, None, 7, 8, None, 9, None, 10], 1),
    ],
)
def test_digest_is_the_protocol_digest(tmp_path, pages, tail) -> None:
    # The job cores in memory, fed by a page-by-page scan rather than the
    # native one, commit a digest; verify must agree with it for every
    # layout, the short tail included.
    image = make_image(512, pages, tail)
    path = write(tmp_path / "image", image)
    result = compare(path, path, page_size=512, packet_size=4 * 512)
    assert result.identical
    committed = JobPair(image, page_size=512, packet_pages=4).run().digest
    assert result.image_digest == result.dest_digest == committed


async def test_digest_is_the_senders(tmp_path, image_factory) -> None:
    # A real transfer: the digest the sender committed is the one verify prints.
    image, _, _ = image_factory(5 * MiB + 4096 * 3 + 17, seed=41, holes=True)
    output = str(tmp_path / "dest.img")
    done = []

    def sink(hello: Hello) -> PageSink:
        assert hello.manifest is not None
        return PageSink(output, hello.manifest.image_size)

    server = ReceiverServer("127.0.0.1", 0, sink, timeouts=Timeouts(idle_s=20),
                            on_job_finished=done.append)
    _, port = await server.start()
    source = PageSource(image)
    try:
        sender = Sender(source, SendOptions(host="127.0.0.1", port=port, channels=2))
        await sender.run()
    finally:
        source.close()
        await server.close()
    # A snapshot's packets are SNAPSHOT_PACKET_SIZE, verify's default.
    assert sender.manifest.packet_pages * 4096 == SNAPSHOT_PACKET_SIZE
    result = compare(image, output, 4096, SNAPSHOT_PACKET_SIZE)
    assert result.identical
    assert result.image_digest == result.dest_digest == sender.core.digest.digest()


def test_cli_identical(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(2 * MiB + 5, seed=42)
    copy = write(tmp_path / "copy", read_bytes(image))
    result = dsamig("verify", image, copy)
    assert result.returncode == EXIT_OK, result.stderr
    digest = compare(image, copy, 4096, SNAPSHOT_PACKET_SIZE).image_digest.hex()
    assert result.stdout.strip().endswith(f"are identical: {2 * MiB + 5} bytes, "
                                          f"job digest {digest}")


def test_holes_and_written_zeros_are_identical(tmp_path, image_factory) -> None:
    sparse, _, _ = image_factory(MiB, seed=43, holes=True)
    dense, _, _ = image_factory(MiB, seed=43, holes=False)
    assert os.stat(sparse).st_blocks < os.stat(dense).st_blocks
    assert dsamig("verify", sparse, dense).returncode == EXIT_OK


@pytest.mark.parametrize("page", [0, 37, 255])
def test_first_differing_page(tmp_path, image_factory, page: int) -> None:
    image, _, _ = image_factory(MiB, seed=44)
    data = bytearray(read_bytes(image))
    data[page * 4096 + 4095] ^= 0x80
    if page == 255:
        data[100 * 4096] ^= 1  # an earlier difference wins
        page = 100
    copy = write(tmp_path / "copy", bytes(data))
    result = compare(image, copy, 4096, 512 * 1024)
    assert result.first_difference == page
    assert result.image_digest != result.dest_digest
    cli = dsamig("verify", image, copy)
    assert cli.returncode == EXIT_TRANSFER
    assert_one_line_error(cli.stderr, f"first differing page {page} (offset {page * 4096})")


def test_sizes_differ(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(MiB, seed=45)
    short = write(tmp_path / "short", read_bytes(image)[: MiB - 4096 - 10])
    result = compare(image, short, 4096, 512 * 1024)
    assert (result.image_size, result.dest_size) == (MiB, MiB - 4096 - 10)
    assert result.first_difference == 254  # the page the copy cuts short
    cli = dsamig("verify", image, short)
    assert cli.returncode == EXIT_TRANSFER
    assert_one_line_error(cli.stderr, "first differing page 254", f"sizes {MiB} and")


def test_bad_arguments(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(4096)
    missing = dsamig("verify", image, str(tmp_path / "nope"))
    assert missing.returncode == EXIT_LOCAL_IO
    assert_one_line_error(missing.stderr, "nope", "does not exist")
    odd = dsamig("verify", image, image, "--page-size", "1000")
    assert odd.returncode == EXIT_USAGE
    assert_one_line_error(odd.stderr, "page_size 1000 is not a power of two")
    with pytest.raises(ConfigError, match="packet_size"):
        compare(image, image, 4096, 4096 * 5000)
