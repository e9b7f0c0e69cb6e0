"""A peer that connects and never finishes its HELLO is dropped in bounded time."""

from __future__ import annotations

import asyncio
import struct
import time

from dsamig.pages import PageSink
from dsamig.proto import PREAMBLE
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
