"""A hostile or broken sender in a refresh: the receiver answers what it may,
refuses the rest with a clear error, and its committed copy stays whole."""

from __future__ import annotations

import os

from dsamig.proto import (
    FEATURE_ACKS,
    FEATURE_LIVE,
    FEATURE_REFRESH,
    Error,
    ErrorCode,
    Manifest,
    Sums,
    SumsRequest,
    Welcome,
)
from dsamig.proto.refresh import SumsBudget
from dsamig.settings import MiB
from tests.conftest import read_bytes
from tests.fault.test_hostile_peer import receiver
from tests.raw_peer import RawChannel, RawJob

REFRESH = FEATURE_ACKS | FEATURE_LIVE | FEATURE_REFRESH
MANIFEST = Manifest(image_size=8 * MiB, page_size=4096, packet_pages=128)  # 16 packets


def committed_copy(tmp_path, name: str) -> bytes:
    data = os.urandom(MANIFEST.image_size)
    (tmp_path / name).write_bytes(data)
    return data


async def all_packet_sums(channel: RawChannel) -> list[Sums]:
    frames: list[Sums] = []
    while not frames or not frames[-1].last:
        frame = await channel.answer()
        assert isinstance(frame, Sums) and not frame.pages, frame
        frames.append(frame)
    return frames


async def test_a_refresh_is_granted_only_with_a_committed_copy(tmp_path) -> None:
    async with receiver(tmp_path) as server:
        channel = await RawChannel.open(server.port)
        welcome = await channel.hello(RawJob(MANIFEST, name="none", features=REFRESH).hello(0))
        assert isinstance(welcome, Welcome)
        assert welcome.features == FEATURE_ACKS | FEATURE_LIVE  # no copy: no REFRESH
        channel.close()
        # A copy of another size is no copy of this image.
        (tmp_path / "small").write_bytes(bytes(4096))
        channel = await RawChannel.open(server.port)
        welcome = await channel.hello(RawJob(MANIFEST, name="small", features=REFRESH).hello(0))
        assert isinstance(welcome, Welcome) and not welcome.features & FEATURE_REFRESH
        channel.close()
    assert read_bytes(str(tmp_path / "small")) == bytes(4096)


async def test_page_sums_describe_the_committed_copy(tmp_path) -> None:
    data = committed_copy(tmp_path, "vm")
    async with receiver(tmp_path) as server:
        channel = await RawChannel.open(server.port)
        welcome = await channel.hello(RawJob(MANIFEST, name="vm", features=REFRESH).hello(0))
        assert isinstance(welcome, Welcome) and welcome.features & FEATURE_REFRESH
        sums = await all_packet_sums(channel)
        assert sum(f.packet_count for f in sums) == MANIFEST.packet_count
        channel.send(SumsRequest(1, 2))
        answer = await channel.answer()
        assert isinstance(answer, Sums) and answer.pages
        assert (answer.first_packet, answer.packet_count, answer.page_count) == (1, 2, 256)
        assert answer.zero_bitmap == bytes(32)  # random pages: none is zero
        channel.close()
    assert read_bytes(str(tmp_path / "vm")) == data


async def test_bad_sums_requests_fail_the_job_and_keep_the_copy(tmp_path) -> None:
    data = committed_copy(tmp_path, "vm")
    async with receiver(tmp_path) as server:
        channel = await RawChannel.open(server.port)
        assert isinstance(await channel.hello(
            RawJob(MANIFEST, name="vm", features=REFRESH).hello(0)), Welcome)
        await all_packet_sums(channel)
        channel.send(SumsRequest(15, 2))
        error = await channel.error()
        assert error.code == ErrorCode.PROTOCOL
        assert "SUMS_REQUEST for packets up to 16, past the image's 16 packets" in error.message
        channel.close()
        # On another channel than 0: refused as well.
        job = RawJob(MANIFEST, channels=2, name="vm", features=REFRESH)
        first, second = await RawChannel.open(server.port), await RawChannel.open(server.port)
        assert isinstance(await first.hello(job.hello(0)), Welcome)
        assert isinstance(await second.hello(job.hello(1)), Welcome)
        second.send(SumsRequest(0, 1))
        error = await second.error()
        assert "SUMS_REQUEST on channel 1 (refresh uses channel 0)" in error.message
        for channel in (first, second):
            channel.close()
    assert read_bytes(str(tmp_path / "vm")) == data
    assert not os.path.exists(tmp_path / "vm.partial")


async def test_a_flood_of_sums_requests_is_refused_after_its_budget(tmp_path) -> None:
    committed_copy(tmp_path, "vm")
    async with receiver(tmp_path) as server:
        channel = await RawChannel.open(server.port)
        assert isinstance(await channel.hello(
            RawJob(MANIFEST, name="vm", features=REFRESH).hello(0)), Welcome)
        await all_packet_sums(channel)
        # Each request costs the receiver a read of 8 packets (1024 pages); the
        # whole image a few times over is what a job may ask for.
        allowed = SumsBudget(MANIFEST).budget // 1024
        for _ in range(allowed + 1):
            channel.send(SumsRequest(0, 8))
        answered = 0
        while True:
            frame = await channel.answer()
            if isinstance(frame, Error):
                break
            answered += 1
        assert frame.code == ErrorCode.PROTOCOL and "more than this job's" in frame.message
        assert answered <= allowed
        channel.close()


async def test_sums_requests_without_refresh_are_refused(tmp_path) -> None:
    async with receiver(tmp_path) as server:
        channel = await RawChannel.open(server.port)
        assert isinstance(await channel.hello(
            RawJob(MANIFEST, name="plain", features=FEATURE_ACKS).hello(0)), Welcome)
        channel.send(SumsRequest(0, 1))
        error = await channel.error()
        assert error.code == ErrorCode.PROTOCOL
        assert "SUMS_REQUEST in a job without feature REFRESH" in error.message
        channel.close()
