"""A peer that connects and never finishes its HELLO is dropped in bounded time."""

from __future__ import annotations

import asyncio
import struct
import time

from dsamig.pages import PageSink
from dsamig.proto import PREAMBLE
from dsamig.settings import ReceiverLimits
from dsamig.transport.common import Timeouts
from dsamig.transport.receiver import ReceiverServer


async def test_silent_peer_is_refused_after_the_handshake_bound(tmp_path) -> None:
    def sink(hello):  # never reached
        return PageSink(str(tmp_path / "x"), 0)

    server = ReceiverServer("127.0.0.1", 0, sink, timeouts=Timeouts(handshake_s=0.5))
    _, port = await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(PREAMBLE)  # and then nothing
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), 10)
        elapsed = time.monotonic() - started
        writer.close()
    finally:
        await server.close()
    assert answer[0] == 0x7F  # ERROR
    code, length = struct.unpack_from("<HH", answer, 8)
    assert code == 1  # PROTOCOL
    assert b"no HELLO from 127.0.0.1" in answer[12 : 12 + length]
    assert 0.4 <= elapsed < 5


async def test_one_host_cannot_take_every_job_slot(tmp_path) -> None:
    import uuid

    import pytest

    from dsamig.proto import Hello, Manifest
    from dsamig.transport.receiver import JobFailedError

    def sink(hello):
        return PageSink(str(tmp_path / hello.name), hello.manifest.image_size)

    server = ReceiverServer("127.0.0.1", 0, sink, limits=ReceiverLimits(max_jobs=4))
    await server.start()
    try:
        for i in range(2):  # half of max_jobs by default
            server.job_for(Hello(uuid.uuid4(), 0, 1, Manifest(4096), name=f"a{i}"), "10.1.1.1")
        with pytest.raises(JobFailedError, match=r"2 jobs from 10\.1\.1\.1 running"):
            server.job_for(Hello(uuid.uuid4(), 0, 1, Manifest(4096), name="a2"), "10.1.1.1")
        server.job_for(Hello(uuid.uuid4(), 0, 1, Manifest(4096), name="b0"), "10.2.2.2")
        assert len(server.jobs) == 3
    finally:
        await server.close()
