"""A sender that speaks the wire protocol raw, frame by frame, for hostile tests.

Nothing here checks what it sends: a test decides every frame, valid or not,
and reads back exactly what the receiver answered.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from dsamig.proto import (
    CLOSED,
    NEED_DATA,
    PREAMBLE,
    Ack,
    CommitRequest,
    End,
    Error,
    Frame,
    FrameDecoder,
    Hello,
    JobDigest,
    Manifest,
    PayloadChunk,
    ZeroRange,
    encode,
)

READ_TIMEOUT_S = 20.0


class RawChannel:
    """One TCP connection to a receiver, driven frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(expect_preamble=False)

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1",
                   local_host: str | None = None) -> RawChannel:
        """Connect (from ``local_host``, another loopback address, if given)."""
        local = (local_host, 0) if local_host is not None else None
        reader, writer = await asyncio.open_connection(host, port, local_addr=local)
        return cls(reader, writer)

    def send(self, *frames: Frame | bytes) -> None:
        """Write frames (or raw bytes) as they are."""
        for frame in frames:
            self.writer.write(frame if isinstance(frame, bytes) else encode(frame))

    async def hello(self, hello: Hello) -> Frame:
        """Send the preamble and ``hello``; the receiver's answer (WELCOME or ERROR)."""
        self.send(PREAMBLE, hello)
        return await self.next_frame()

    async def next_frame(self, timeout_s: float = READ_TIMEOUT_S) -> Frame:
        """The next frame from the receiver; AssertionError if it closed first."""
        async def read() -> Frame:
            while True:
                event = self.decoder.next_event()
                if event is CLOSED:
                    raise AssertionError("the receiver closed the connection")
                if event is NEED_DATA:
                    data = await self.reader.read(65536)
                    self.decoder.receive_data(data)
                    continue
                assert not isinstance(event, PayloadChunk)
                return event

        return await asyncio.wait_for(read(), timeout_s)

    async def answer(self, timeout_s: float = READ_TIMEOUT_S) -> Frame:
        """The next frame that is not an ACK."""
        while True:
            frame = await self.next_frame(timeout_s)
            if not isinstance(frame, Ack):
                return frame

    async def error(self, timeout_s: float = READ_TIMEOUT_S) -> Error:
        """Read frames until an ERROR (skipping ACKs and the like)."""
        while True:
            frame = await self.next_frame(timeout_s)
            if isinstance(frame, Error):
                return frame

    async def closed(self, timeout_s: float = READ_TIMEOUT_S) -> bytes:
        """Everything the receiver still sends until it closes; then our side closes too."""
        chunks = []
        async def drain() -> None:
            while data := await self.reader.read(65536):
                chunks.append(data)

        try:
            await asyncio.wait_for(drain(), timeout_s)
        finally:
            self.close()
        return b"".join(chunks)

    def close(self) -> None:
        self.writer.close()


@dataclass
class RawJob:
    """The frames of a job that a test sends by hand: its HELLOs and commit."""

    manifest: Manifest
    channels: int = 1
    name: str = "raw"
    features: int = 0
    job_id: uuid.UUID = field(default_factory=uuid.uuid4)

    def hello(self, index: int, *, channel_count: int | None = None,
              features: int | None = None) -> Hello:
        return Hello(
            job_id=self.job_id, channel_index=index,
            channel_count=self.channels if channel_count is None else channel_count,
            manifest=self.manifest if index == 0 else None, name=self.name,
            features=self.features if features is None else features,
        )

    def all_zero_commit(self) -> CommitRequest:
        """The COMMIT_REQUEST of an image whose every page is zero."""
        digest = JobDigest(self.manifest)
        count = self.manifest.packet_count
        if count:
            digest.record_zero_range(0, count)
        return CommitRequest(packet_count=count, zero_pages=self.manifest.page_count,
                             normal_pages=0, digest=digest.digest())

    async def send_all_zero(self, channels: list[RawChannel]) -> Frame:
        """Send the whole image as one ZERO_RANGE on channel 0, END everywhere,
        COMMIT_REQUEST; the receiver's answer on channel 0."""
        count = self.manifest.packet_count
        first = channels[0]
        if count:
            first.send(ZeroRange(0, count))
        first.send(End(packets=count, payload_bytes=0))
        for channel in channels[1:]:
            channel.send(End(packets=0, payload_bytes=0))
        first.send(self.all_zero_commit())
        return await first.answer()
