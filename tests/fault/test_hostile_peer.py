"""A hostile peer with a socket: what it may cost the receiver, and what it may not break.

Every test speaks the wire protocol raw (tests/raw_peer.py) to a real
receiver on a loopback port and checks the bound: memory, CPU, checkpoints,
connections, job slots; and that one bad channel or job leaves the others be.
"""

from __future__ import annotations

import asyncio
import os
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from dsamig.pages import PageSink
from dsamig.proto import (
    FEATURE_ACKS,
    FEATURE_RESUME,
    Commit,
    End,
    Error,
    ErrorCode,
    Hello,
    Manifest,
    ResumeState,
    Welcome,
    ZeroRange,
)
from dsamig.settings import MiB, ReceiverLimits
from dsamig.transport.common import Timeouts
from dsamig.transport.receiver import ReceiverJob, ReceiverServer
from tests.conftest import read_bytes, requires_extension
from tests.integration.helpers import transfer_in_process
from tests.raw_peer import RawChannel, RawJob


@asynccontextmanager
async def receiver(tmp_path: Any, **kwargs: Any) -> AsyncIterator[ReceiverServer]:
    """A receiver on a free loopback port whose jobs land in ``tmp_path``."""
    refused: list[tuple[Hello, str]] = []

    def sink(hello: Hello) -> PageSink:
        assert hello.manifest is not None
        return PageSink(str(tmp_path / hello.name), hello.manifest.image_size)

    server = ReceiverServer("127.0.0.1", 0, sink,
                            on_job_refused=lambda hello, why: refused.append((hello, why)),
                            **kwargs)
    server.refused_jobs = refused  # type: ignore[attr-defined]
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def job_of(server: ReceiverServer) -> ReceiverJob:
    (job,) = server.jobs.values()
    return job


# --- memory: what a HELLO may make the receiver allocate ----------------------------------


async def test_a_hello_with_huge_packets_is_refused_before_any_buffer(tmp_path) -> None:
    """1 MiB pages x 2048 pages per packet used to cost a 2 GiB buffer per channel."""
    manifest = Manifest(image_size=8 << 30, page_size=1 << 20, packet_pages=2048)
    async with receiver(tmp_path) as server:
        tracemalloc.start()
        try:
            channel = await RawChannel.open(server.port)
            answer = await channel.hello(RawJob(manifest, name="huge").hello(0))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        channel.close()
        assert isinstance(answer, Error) and answer.code == ErrorCode.REJECTED
        assert "packets of 2147483648 bytes" in answer.message
        assert "max_packet_bytes 16777216" in answer.message
        assert peak < 16 * MiB
        assert server.jobs == {}
        assert [why for _, why in server.refused_jobs] == [answer.message]  # type: ignore[attr-defined]
        assert not os.path.exists(tmp_path / "huge.partial")


async def test_packet_buffers_are_released_when_the_job_ends(tmp_path) -> None:
    manifest = Manifest(image_size=3 * MiB + 4096, page_size=4096, packet_pages=128)
    job = RawJob(manifest, channels=2, name="freed")
    async with receiver(tmp_path) as server:
        channels = [await RawChannel.open(server.port) for _ in range(2)]
        assert isinstance(await channels[0].hello(job.hello(0)), Welcome)
        assert isinstance(await channels[1].hello(job.hello(1)), Welcome)
        held = list(job_of(server).channels.values())
        # One packet buffer per channel: in Python (loop path) or in its thread.
        assert [len(c.payload) if c.payload is not None else c.pump is not None
                for c in held] in ([512 * 1024] * 2, [True, True])
        assert isinstance(await job.send_all_zero(channels), Commit)
        for channel in channels:
            channel.close()
        assert server.jobs == {}
        assert [(c.payload, c.pump) for c in held] == [(None, None), (None, None)]
        assert [c.job for c in held] == [None, None]
    assert read_bytes(str(tmp_path / "freed")) == bytes(manifest.image_size)


async def test_an_unauthenticated_connection_costs_a_small_buffer(tmp_path) -> None:
    async with receiver(tmp_path) as server:
        idle = [await RawChannel.open(server.port) for _ in range(4)]
        await wait_until(lambda: len(server.channels) == 4)
        assert [len(c.header) for c in server.channels] == [4108] * 4
        assert [c.payload for c in server.channels] == [None] * 4
        for channel in idle:
            channel.close()


# --- connections: bounds before authentication --------------------------------------------


async def test_a_flood_from_one_address_does_not_keep_another_out(tmp_path, image_factory) -> None:
    limits = ReceiverLimits(max_unauthenticated=12, max_unauthenticated_per_peer=6)
    async with receiver(tmp_path, limits=limits) as server:
        flood = [await RawChannel.open(server.port, local_host="127.0.0.3") for _ in range(6)]
        await wait_until(lambda: server.gate.per_host.get("127.0.0.3") == 6)
        # The seventh from that address is closed at once, without a word.
        extra = await RawChannel.open(server.port, local_host="127.0.0.3")
        assert await extra.closed(timeout_s=5) == b""
        assert server.gate.per_host == {"127.0.0.3": 6}
        # A sender on another address still gets through.
        legit = await RawChannel.open(server.port, local_host="127.0.0.4")
        answer = await legit.hello(RawJob(Manifest(4096), name="legit").hello(0))
        assert isinstance(answer, Welcome)
        assert server.gate.per_host == {"127.0.0.3": 6}  # the accepted HELLO left the gate
        for channel in [*flood, extra, legit]:
            channel.close()
        await wait_until(lambda: server.gate.total == 0)


async def test_an_idle_connection_is_closed_after_the_handshake_bound(tmp_path) -> None:
    async with receiver(tmp_path, timeouts=Timeouts(handshake_s=0.3)) as server:
        channel = await RawChannel.open(server.port)
        started = time.monotonic()
        rest = await channel.closed(timeout_s=5)
        assert time.monotonic() - started < 4
        assert b"no HELLO from 127.0.0.1" in rest
        await wait_until(lambda: server.gate.total == 0)


# --- job slots and names --------------------------------------------------------------------


async def test_an_image_larger_than_the_file_system_is_refused(tmp_path) -> None:
    room = os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize
    manifest = Manifest(image_size=room + (1 << 30), page_size=1 << 20, packet_pages=16)
    async with receiver(tmp_path) as server:
        channel = await RawChannel.open(server.port)
        answer = await channel.hello(RawJob(manifest, name="vast").hello(0))
        channel.close()
    assert isinstance(answer, Error) and answer.code == ErrorCode.REJECTED
    assert "larger than the file system" in answer.message
    assert not os.path.exists(tmp_path / "vast.partial")


async def test_max_image_size_is_enforced(tmp_path) -> None:
    limits = ReceiverLimits(max_image_size=1 << 30)
    async with receiver(tmp_path, limits=limits) as server:
        channel = await RawChannel.open(server.port)
        answer = await channel.hello(RawJob(Manifest(2 << 30), name="big").hello(0))
        channel.close()
    assert isinstance(answer, Error) and answer.code == ErrorCode.REJECTED
    assert answer.message == (
        "an image of 2147483648 bytes exceeds this receiver's max_image_size 1073741824"
    )


async def test_a_stray_hello_is_refused_alone_and_the_job_goes_on(tmp_path) -> None:
    """A wrong channel_count or a taken index used to fail the whole job."""
    manifest = Manifest(image_size=2 * MiB, page_size=4096, packet_pages=128)
    job = RawJob(manifest, channels=2, name="steady")
    async with receiver(tmp_path) as server:
        first = await RawChannel.open(server.port)
        assert isinstance(await first.hello(job.hello(0)), Welcome)
        stray = await RawChannel.open(server.port)
        answer = await stray.hello(job.hello(1, channel_count=3))
        assert isinstance(answer, Error) and answer.code == ErrorCode.REJECTED
        assert answer.message == "channel 1 says 3 channels, channel 0 said 2"
        second = await RawChannel.open(server.port)
        assert isinstance(await second.hello(job.hello(1)), Welcome)
        duplicate = await RawChannel.open(server.port)
        answer = await duplicate.hello(job.hello(1))
        assert isinstance(answer, Error) and answer.code == ErrorCode.REJECTED
        assert answer.message == "channel index 1 is already connected"
        assert isinstance(await job.send_all_zero([first, second]), Commit)
        for channel in (first, stray, second, duplicate):
            channel.close()
    assert read_bytes(str(tmp_path / "steady")) == bytes(manifest.image_size)


# --- CPU: tolerant mode must cost in proportion to the frame ---------------------------------


async def test_repeated_zero_ranges_cost_little_and_are_refused_after_a_bound(tmp_path) -> None:
    """8 ZERO_RANGE frames over 16 Mi packets used to delay another job's
    handshake by about ten seconds of CPU on the shared loop."""
    packets = 1 << 24
    manifest = Manifest(image_size=packets * 512, page_size=512, packet_pages=1)
    job = RawJob(manifest, name="repeats", features=FEATURE_ACKS)
    async with receiver(tmp_path) as server:
        attacker = await RawChannel.open(server.port)
        assert isinstance(await attacker.hello(job.hello(0)), Welcome)
        attacker.send(*[ZeroRange(0, packets)] * 8)
        started = time.monotonic()
        other = await RawChannel.open(server.port)
        answer = await other.hello(RawJob(Manifest(4096), name="bystander").hello(0))
        waited_s = time.monotonic() - started
        assert isinstance(answer, Welcome)
        assert waited_s < 3.0
        error = await attacker.error()
        assert error.code == ErrorCode.PROTOCOL
        assert error.message.endswith(
            f"the sender sent {3 * packets} packets that were already received (at most "
            f"{2 * packets + 1024} in a job of {packets} packets)"
        )
        attacker.close()
        other.close()
    assert not os.path.exists(tmp_path / "repeats.partial")


# --- checkpoints and reconnects ------------------------------------------------------------


async def test_an_end_with_nothing_new_costs_no_checkpoint(tmp_path) -> None:
    """A reconnecting channel's END used to force a full checkpoint and fsync."""
    manifest = Manifest(image_size=64 * MiB, page_size=4096, packet_pages=128)
    job = RawJob(manifest, channels=2, name="ends", features=FEATURE_ACKS)
    async with receiver(tmp_path, limits=ReceiverLimits(max_sessions=1000)) as server:
        first = await RawChannel.open(server.port)
        assert isinstance(await first.hello(job.hello(0)), Welcome)
        receiving = job_of(server)
        checkpoints: list[int] = []
        original = receiving.sink.checkpoint
        receiving.sink.checkpoint = lambda record: (  # type: ignore[method-assign]
            checkpoints.append(len(record)), original(record))[1]
        for _ in range(40):
            again = await RawChannel.open(server.port)
            assert isinstance(await again.hello(job.hello(1)), Welcome)
            again.send(End(packets=0, payload_bytes=0))
            again.close()
        await wait_until(lambda: receiving.core.counters.sessions == 40)  # one join, 39 reconnects
        assert checkpoints == []
        first.close()


async def test_a_job_that_keeps_reconnecting_is_refused(tmp_path) -> None:
    manifest = Manifest(image_size=MiB, page_size=4096, packet_pages=128)
    job = RawJob(manifest, channels=2, name="flappy", features=FEATURE_ACKS)
    async with receiver(tmp_path, limits=ReceiverLimits(max_sessions=5)) as server:
        first = await RawChannel.open(server.port)
        assert isinstance(await first.hello(job.hello(0)), Welcome)
        answers = []
        for _ in range(6):  # one join, then reconnects
            again = await RawChannel.open(server.port)
            answers.append(await again.hello(job.hello(1)))
            again.close()
        assert [type(a) for a in answers] == [Welcome] * 5 + [Error]
        assert answers[-1].message == (  # type: ignore[union-attr]
            "the sender opened 6 sessions of this job (reconnects), more than this "
            "receiver's max_sessions 5"
        )
        error = await first.error()
        assert error.code == ErrorCode.REJECTED
        first.close()
        assert server.jobs == {}


# --- slots: a job must move --------------------------------------------------------------


async def test_a_trickling_job_is_failed_for_going_too_slowly(tmp_path) -> None:
    """One tiny frame per idle period used to hold a job slot forever."""
    manifest = Manifest(image_size=256 * MiB, page_size=4096, packet_pages=128)
    job = RawJob(manifest, name="trickle", features=FEATURE_ACKS)
    limits = ReceiverLimits(min_job_rate=8 * MiB)
    async with receiver(tmp_path, limits=limits, timeouts=Timeouts(idle_s=1.0)) as server:
        channel = await RawChannel.open(server.port)
        assert isinstance(await channel.hello(job.hello(0)), Welcome)
        started = time.monotonic()

        async def trickle() -> None:
            for n in range(manifest.packet_count):
                channel.send(ZeroRange(n, 1))  # 512 KiB of the image per 0.2 s
                await asyncio.sleep(0.2)

        dribbler = asyncio.ensure_future(trickle())
        try:
            error = await channel.error(timeout_s=10)
        finally:
            dribbler.cancel()
        assert time.monotonic() - started < 5
        assert error.code == ErrorCode.REJECTED
        assert "less than this receiver's min_job_rate of 8388608 bytes/s" in error.message
        channel.close()
        assert server.jobs == {}
    # Failed for slowness, not for bad data: what arrived is kept for a resume.
    assert os.path.exists(tmp_path / "trickle.partial")


async def test_a_paced_sender_above_the_minimum_rate_completes(tmp_path, image_factory) -> None:
    from dsamig.transport.pacing import TokenBucket

    image, _, _ = image_factory(6 * MiB, seed=3)
    output = str(tmp_path / "paced.img")
    _sent, received = await transfer_in_process(
        image, output, channels=2, pacer=TokenBucket(3 * MiB),
    )
    assert received.status == "completed"
    assert read_bytes(output) == read_bytes(image)


async def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` on the loop until it holds (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.005)


pytestmark = pytest.mark.timeout(60)


# --- the daemon: refused jobs, descriptors ------------------------------------------------


async def test_a_refused_hello_leaves_the_job_name_free(tmp_path) -> None:
    """A refused HELLO (here: a 1 PiB image) used to leave a 'setup' record that
    blocked its name until the daemon restarted."""
    from tests.integration.daemon_helpers import Daemon, execute, short_dir

    with short_dir() as directory:
        storage = os.path.join(directory, "images")
        os.mkdir(storage)
        daemon = Daemon.start("receiver", directory, {
            "listen": "127.0.0.1:0", "storage_dir": storage})
        try:
            channel = await RawChannel.open(daemon.port)
            answer = await channel.hello(RawJob(Manifest(1 << 50), name="vm1").hello(0))
            channel.close()
            assert isinstance(answer, Error) and answer.code == ErrorCode.REJECTED
            record = execute(daemon.socket, "query-job", {"id": "vm1"})["return"]
            assert record["status"] == "failed"
            assert record["error-desc"] == (
                "refused: an image of 2147483648 packets exceeds this receiver's limit of "
                "16777216 packets"
            )
            again = await RawChannel.open(daemon.port)
            job = RawJob(Manifest(64 * 1024), name="vm1")
            assert isinstance(await again.hello(job.hello(0)), Welcome)
            assert isinstance(await job.send_all_zero([again]), Commit)
            again.close()
        finally:
            daemon.stop()
        assert read_bytes(os.path.join(storage, "vm1")) == bytes(64 * 1024)


def test_the_unit_allows_the_descriptors_the_example_limits_need() -> None:
    from pathlib import Path

    from dsamig.jobs.config import load_receiver_config

    root = Path(__file__).resolve().parents[2]
    unit = (root / "systemd" / "dsamig-receiver.service").read_text()
    (line,) = [x for x in unit.splitlines() if x.startswith("LimitNOFILE=")]
    allowed = int(line.split("=", 1)[1])
    limits = load_receiver_config(str(root / "configs" / "receiver.yaml")).limits
    assert limits.descriptors_needed() <= allowed
    assert ReceiverLimits().descriptors_needed() <= allowed


def test_a_daemon_whose_limits_exceed_its_descriptors_refuses_to_start() -> None:
    import resource
    import subprocess
    import sys

    import yaml

    from tests.integration.daemon_helpers import short_dir

    with short_dir() as directory:
        config = os.path.join(directory, "receiver.yaml")
        with open(config, "w") as f:
            yaml.safe_dump({"listen": "127.0.0.1:0", "storage_dir": directory,
                            "control_socket": os.path.join(directory, "r.sock"),
                            "limits": {"max_channels": 4000}}, f)
        proc = subprocess.run(
            [sys.executable, "-m", "dsamig", "receiver", "--config", config],
            capture_output=True, text=True, timeout=30,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)),
        )
    assert proc.returncode != 0
    assert "need up to 4672 file descriptors" in proc.stdout + proc.stderr
    assert "raise LimitNOFILE=" in proc.stdout + proc.stderr


# --- the native receiving thread judges PACKET headers as the Python checks do ------------

def _packet(n: int, *, first_page: int | None = None, page_count: int = 128,
            payload_length: int | None = None, crc: int = 0, region: int = 0,
            reserved: int = 0, flags: int = 0, bitmap: bytes | None = None,
            body_length: int | None = None) -> bytes:
    """A PACKET frame header and body, any field as a test wants it."""
    import struct

    bitmap = bitmap if bitmap is not None else b"\xff" * ((page_count + 7) // 8)
    body = struct.pack("<QQIIIHH", n, n * 128 if first_page is None else first_page,
                       page_count, 0 if payload_length is None else payload_length, crc,
                       region, reserved) + bitmap
    length = len(body) if body_length is None else body_length
    return struct.pack("<BBHI", 0x10, flags, 0, length) + body


MUTATED_HEADERS = {
    "page list flag": _packet(0, flags=1),
    "region": _packet(0, region=1),
    "reserved": _packet(0, reserved=2),
    "page count zero": _packet(0, page_count=0, bitmap=b"\x00"),
    "page count wrong": _packet(0, page_count=64),
    "body length": _packet(0, body_length=40),
    "payload too long": _packet(0, payload_length=129 << 20),
    "payload for bitmap": _packet(0, payload_length=4096),
    "bitmap padding": _packet(7, page_count=4, bitmap=b"\xff", first_page=7 * 128),
    "packet out of range": _packet(99),
    "first page": _packet(1, first_page=5),
    "body too large": b"\x10\x00\x00\x00" + (5000).to_bytes(4, "little"),
}


@requires_extension
@pytest.mark.parametrize("case", MUTATED_HEADERS)
async def test_native_and_loop_receivers_refuse_a_header_alike(tmp_path, case: str) -> None:
    manifest = Manifest(image_size=7 * 128 * 4096 + 4 * 4096, page_size=4096, packet_pages=128)
    answers = []
    for native in (True, False):
        async with receiver(tmp_path / str(native), native=native) as server:
            os.makedirs(tmp_path / str(native), exist_ok=True)
            channel = await RawChannel.open(server.port)
            job = RawJob(manifest, name="judged")
            assert isinstance(await channel.hello(job.hello(0)), Welcome)
            channel.send(MUTATED_HEADERS[case])
            error = await channel.error()
            channel.close()
            assert error.code == ErrorCode.PROTOCOL
            answers.append(error.message.split(": ", 1)[1])  # without "channel 0 from ..."
    assert answers[0] == answers[1]


@requires_extension
async def test_a_packet_twice_is_refused_alike_on_both_paths(tmp_path) -> None:
    manifest = Manifest(image_size=4 * 128 * 4096, page_size=4096, packet_pages=128)
    zero = _packet(1, bitmap=b"\xff" * 16)  # an all-zero packet: no payload
    answers = []
    for native in (True, False):
        async with receiver(tmp_path, native=native) as server:
            channel = await RawChannel.open(server.port)
            job = RawJob(manifest, name=f"twice-{native}")
            assert isinstance(await channel.hello(job.hello(0)), Welcome)
            channel.send(zero, zero)
            error = await channel.error()
            channel.close()
            answers.append(error.message.split(": ", 1)[1])
    assert answers == ["PACKET packet_number 1 received twice"] * 2


# --- sessions: what belongs to which ------------------------------------------------------


async def test_a_commit_request_belongs_to_its_session(tmp_path) -> None:
    """Channel 0 asked to commit while channel 1 still streamed, then the
    sender lost its channels and came back: the old session's request must
    not commit the job for the new one (and answer COMMIT on a channel 0
    that never asked); the new session's own request does."""
    manifest = Manifest(image_size=MiB, page_size=4096, packet_pages=128)
    count = manifest.packet_count
    job = RawJob(manifest, channels=2, name="sessions",
                 features=FEATURE_ACKS | FEATURE_RESUME)
    async with receiver(tmp_path) as server:
        old = [await RawChannel.open(server.port) for _ in range(2)]
        for index, channel in enumerate(old):
            assert isinstance(await channel.hello(job.hello(index)), Welcome)
        receiving = job_of(server)
        old[0].send(ZeroRange(0, count), End(packets=count, payload_bytes=0),
                    job.all_zero_commit())
        await wait_until(lambda: receiving._commit_task is not None)
        # The sender comes back on new connections (its old ones are stuck).
        new = [await RawChannel.open(server.port) for _ in range(2)]
        for index, channel in enumerate(new):
            assert isinstance(await channel.hello(job.hello(index)), Welcome)
        for channel in new:
            channel.send(End(packets=0, payload_bytes=0))
        await wait_until(lambda: len(receiving.core.ended) == 2)
        assert not receiving.finished  # nobody in this session asked to commit yet
        new[0].send(job.all_zero_commit())
        answer = await new[0].answer()
        while isinstance(answer, ResumeState):
            answer = await new[0].answer()
        assert isinstance(answer, Commit), answer
        for channel in [*old, *new]:
            channel.close()
        assert receiving.stats.status == "completed"
    assert read_bytes(str(tmp_path / "sessions")) == bytes(MiB)
