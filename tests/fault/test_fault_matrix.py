"""Fault matrix: the rows that need no resume, through a fault-injecting proxy.

Each test checks the final bytes (or that no destination appeared), how the
job ended on both sides, and what was left on disk; each is bounded in time.
The rows with resume (channel resets, SIGKILL and restart) live with the
resume tests.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
import uuid

import pytest

from dsamig.errors import DsamigError
from dsamig.pages import PageSink, PageSource
from dsamig.proto import PREAMBLE, Hello, Manifest, encode
from dsamig.settings import EXIT_OK, EXIT_TRANSFER
from dsamig.transport.common import Timeouts
from dsamig.transport.receiver import ReceiverJob, ReceiverServer
from dsamig.transport.sender import Sender, SendOptions
from tests.conftest import read_bytes
from tests.helpers_proxy import Fault, FaultProxy, ThreadedProxy
from tests.integration.helpers import TIMEOUT_S, Receiver, dsamig

MiB = 1 << 20
NAME = "matrix"
PACKET_HEADER = 8 + 32 + 16  # frame header, fixed PACKET body, bitmap of 128 pages


def first_packet_offset() -> int:
    """Offset of channel 0's first PACKET frame in the sender → receiver stream."""
    hello = Hello(uuid.uuid4(), 0, 1, Manifest(4 * MiB), name=NAME)
    return len(PREAMBLE) + len(encode(hello))


#: The receiver's data paths: the loop's, and native threads landing payloads
#: through a buffer (pwrite) or straight into a mapping of the file (mmap).
DATA_PATHS = {
    "loop": {"DSAMIG_DATA_PATH": "loop"},
    "native-pwrite": {"DSAMIG_RECEIVE_PATH": "pwrite"},
    "native-mmap": {"DSAMIG_RECEIVE_PATH": "mmap"},
}


def start_receiver(output: str, *extra: str, env: dict[str, str] | None = None) -> Receiver:
    """``dsamig receive`` logging warnings too (the self-healing path only logs)."""
    return Receiver.start(output, *extra, log_level="warning", env=env)


def send_through(proxy_port: int, image: str, *extra: str):  # type: ignore[no-untyped-def]
    return dsamig("send", image, "--to", f"127.0.0.1:{proxy_port}", "--channels", "1",
                  "--name", NAME, "--retry-for", "0", *extra)


def test_through_a_slow_link(tmp_path, image_factory) -> None:
    # The proxy itself: a delayed pass-through changes nothing but the time.
    image, _, normal = image_factory(3 * MiB + 1000, seed=11)
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output, "--once")
    try:
        with ThreadedProxy(receiver.port, Fault(delay_s=0.01)) as proxy:
            result = dsamig("send", image, "--to", f"127.0.0.1:{proxy.port}", "--channels", "2")
        code, _, err = receiver.finish()
    finally:
        receiver.kill()
    assert (result.returncode, code) == (EXIT_OK, EXIT_OK), result.stderr + err
    assert read_bytes(output) == read_bytes(image)
    assert len(proxy.connections) == 2
    assert sum(c.up_bytes for c in proxy.connections) > (normal - 1) * 4096


@pytest.mark.parametrize("path", DATA_PATHS)
def test_bit_flip_in_a_payload(tmp_path, image_factory, path: str) -> None:
    image, _, _ = image_factory(4 * MiB, seed=12, zero_every=0)
    output = str(tmp_path / "dest.img")
    receiver = start_receiver(output, "--once", "--idle-timeout", "5", env=DATA_PATHS[path])
    # Only the first connection is corrupted: a sender that reconnects gets a clean link.
    flip = [Fault(corrupt_at=first_packet_offset() + PACKET_HEADER + 5000, corrupt_xor=0x10)]
    try:
        with ThreadedProxy(receiver.port, flip) as proxy:
            result = dsamig("send", image, "--to", f"127.0.0.1:{proxy.port}", "--channels", "1",
                            "--name", NAME, "--retry-for", "10", "--idle-timeout", "5")
        code, _, err = receiver.finish()
    finally:
        receiver.kill()
    assert proxy.connections[0].corrupted
    # The corrupted packet is caught by its CRC32C on receipt.  Without
    # self-healing the job fails and no destination appears; with it, the
    # packet is sent again and the copy is exact.  Never a corrupt copy.
    assert "CRC32C" in err and "corrupted in transit" in err, err + result.stderr
    if result.returncode == EXIT_OK:
        assert code == EXIT_OK
        assert read_bytes(output) == read_bytes(image)
        assert len(proxy.connections) >= 2  # the packet came again on a new connection
    else:
        assert result.returncode == EXIT_TRANSFER
        assert "INTEGRITY" in result.stderr, (result.stderr, [c.events for c in proxy.connections])
        assert code == EXIT_TRANSFER
        assert not os.path.exists(output)
        assert not os.path.exists(output + ".partial")


@pytest.mark.parametrize("path", DATA_PATHS)
def test_corrupted_header_heals_and_leaves_nothing(tmp_path, image_factory, path: str) -> None:
    """A PACKET header whose zero bitmap and CRC were both damaged in transit:
    the payload lands on the wrong pages (straight into the mapped file on the
    mmap path) and fails its CRC. Every page it touched must be cleared, or a
    zero page of the retransmitted packet would keep the stray bytes."""
    image, _, _ = image_factory(4 * MiB, seed=15, zero_every=2)  # even pages are zero
    output = str(tmp_path / "dest.img")
    receiver = start_receiver(output, "--once", "--idle-timeout", "20", env=DATA_PATHS[path])
    header = first_packet_offset()
    # Pages 0 and 1 swap roles (the payload length stays right) and the CRC
    # field is off by one bit: the first run of data lands on page 0.
    fault = Fault(corrupt_at=header + 8 + 32, corrupt_xor=0x03,
                  also_corrupt=((header + 8 + 24, 0x01),))
    try:
        with ThreadedProxy(receiver.port, [fault]) as proxy:
            result = dsamig("send", image, "--to", f"127.0.0.1:{proxy.port}", "--channels", "1",
                            "--name", NAME, "--retry-for", "30", "--idle-timeout", "20")
        code, _, err = receiver.finish()
    finally:
        receiver.kill()
    assert proxy.connections[0].corrupted
    assert "corrupted in transit" in err, err + result.stderr
    assert result.returncode == EXIT_OK, result.stderr
    assert code == EXIT_OK
    assert read_bytes(output) == read_bytes(image)


def test_bit_flip_in_a_header(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(4 * MiB, seed=13, zero_every=0)
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output, "--once")
    region = first_packet_offset() + 8 + 28  # the PACKET's region field, 0 in v1
    try:
        with ThreadedProxy(receiver.port, Fault(corrupt_at=region)) as proxy:
            result = send_through(proxy.port, image)
        code, _, err = receiver.finish()
    finally:
        receiver.kill()
    assert proxy.connections[0].corrupted
    assert result.returncode == EXIT_TRANSFER
    assert "PROTOCOL" in result.stderr and "PACKET region 1 must be 0" in result.stderr, (
        result.stderr, proxy.connections[0].events)
    assert code == EXIT_TRANSFER and "region" in err
    assert not os.path.exists(output)
    assert not os.path.exists(output + ".partial")


def test_stalled_peer(tmp_path, image_factory) -> None:
    # The link freezes mid-transfer with both sockets open: the idle timeouts
    # (2 s) end the job on both sides; nothing hangs.
    image, _, _ = image_factory(40 * MiB, seed=14, zero_every=0)
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output, "--once", "--idle-timeout", "2")
    started = time.monotonic()
    try:
        with ThreadedProxy(receiver.port, Fault(stall_after=2 * MiB)) as proxy:
            result = send_through(proxy.port, image, "--idle-timeout", "2")
            code, _, err = receiver.finish()
    finally:
        receiver.kill()
    elapsed = time.monotonic() - started
    assert proxy.connections[0].stalled
    assert result.returncode != EXIT_OK
    assert "2 s" in result.stderr, result.stderr
    assert code == EXIT_TRANSFER and "no data from the sender for 2 s" in err, err
    assert elapsed < 30
    assert not os.path.exists(output)
    # What stays is kept for a resume only: full size, never under the final name.
    partial = output + ".partial"
    assert not os.path.exists(partial) or os.path.getsize(partial) == 40 * MiB


GARBAGE = [
    b"",  # connect and hang up
    b"\x89DSA",  # half a preamble, then hang up
    b"GET / HTTP/1.1\r\nHost: receiver\r\n\r\n",
    os.urandom(4096),
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # a TLS ClientHello
    PREAMBLE + struct.pack("<BBHI", 0x42, 0, 0, 0),  # unknown frame type
    PREAMBLE + struct.pack("<BBHI", 0x01, 1, 0, 65536) + bytes(65536),  # absurd HELLO
    PREAMBLE + struct.pack("<BBHI", 0x10, 0, 0, 48) + bytes(48),  # data before HELLO
]


def test_garbage_on_the_data_port(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(2 * MiB, seed=15)
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output)  # no --once: it must go on serving
    answers = []
    try:
        for junk in GARBAGE:
            with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as conn:
                conn.sendall(junk)
                conn.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                answers.append(data)
        assert receiver.proc.poll() is None
        result = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}")
        assert result.returncode == EXIT_OK, result.stderr
        assert read_bytes(output) == read_bytes(image)
    finally:
        receiver.kill()
    # Every refusal is an ERROR frame (or a plain close for a peer that sent nothing).
    for junk, answer in zip(GARBAGE, answers, strict=True):
        assert answer[:1] in (b"", b"\x7f"), (junk[:16], answer[:32])
    assert sum(answer[:1] == b"\x7f" for answer in answers) >= 6
    assert sorted(os.listdir(tmp_path)) == sorted(
        [os.path.basename(image), "dest.img"]
    )


async def test_eight_jobs_one_failing(tmp_path, image_factory) -> None:
    # One receiver, eight concurrent jobs; job 3 goes through a proxy that
    # breaks a PACKET header.  The other seven are exact; job 3 fails on both
    # sides and leaves nothing.
    images = [image_factory(2 * MiB + i * 4096, seed=20 + i)[0] for i in range(8)]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    finished: list[ReceiverJob] = []
    all_done = asyncio.Event()

    def sink(hello: Hello) -> PageSink:
        assert hello.manifest is not None
        return PageSink(str(out_dir / hello.name), hello.manifest.image_size)

    def on_finished(job: ReceiverJob) -> None:
        finished.append(job)
        if len(finished) == 8:
            all_done.set()

    server = ReceiverServer("127.0.0.1", 0, sink, timeouts=Timeouts(idle_s=10),
                            on_job_finished=on_finished)
    _, port = await server.start()
    region = first_packet_offset() - len(NAME) + len("job-3") + 8 + 28
    proxy = FaultProxy(port, [Fault(corrupt_at=region)])
    proxy_port = await proxy.start()
    sources = [PageSource(path) for path in images]

    async def send(i: int) -> Exception | None:
        options = SendOptions(host="127.0.0.1", port=proxy_port if i == 3 else port,
                              channels=1 if i == 3 else 2, name=f"job-{i}", retry_for_s=0)
        try:
            await Sender(sources[i], options).run()
        except DsamigError as exc:
            return exc
        return None

    try:
        results = await asyncio.wait_for(asyncio.gather(*(send(i) for i in range(8))),
                                         TIMEOUT_S)
        await asyncio.wait_for(all_done.wait(), TIMEOUT_S)
    finally:
        for source in sources:
            source.close()
        await proxy.close()
        await server.close()
    assert [r is None for r in results] == [i != 3 for i in range(8)], results
    assert "PACKET region 1 must be 0" in str(results[3])
    by_name = {job.name: job for job in finished}
    for i in range(8):
        status = by_name[f"job-{i}"].stats.status
        assert status == ("failed" if i == 3 else "completed"), (i, status)
        if i != 3:
            assert read_bytes(str(out_dir / f"job-{i}")) == read_bytes(images[i])
    assert sorted(os.listdir(out_dir)) == sorted(f"job-{i}" for i in range(8) if i != 3)
    assert not server.jobs


@pytest.mark.parametrize("cut_after", [3, 600_000])
async def test_proxy_cut_resets_both_sides(cut_after: int) -> None:
    # The proxy's cut: exactly ``cut_after`` bytes reach the far side, then both
    # sockets are reset.
    received = bytearray()
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                received.extend(data)
        except ConnectionError:
            pass
        writer.close()
        done.set()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    proxy = FaultProxy(server.sockets[0].getsockname()[1], Fault(cut_after=cut_after))
    port = await proxy.start()
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises((ConnectionError, OSError)):
            for _ in range(100):
                writer.write(bytes(65536))
                await writer.drain()
        await asyncio.wait_for(done.wait(), 10)
        writer.close()
    finally:
        await proxy.close()
        server.close()
    assert len(received) == cut_after
    assert proxy.connections[0].cut
