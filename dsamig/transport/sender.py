"""The sending side of a job: N channels pumping packets from a PageSource.

Per-page work never happens here.  Python handles *chunks* (a few packets, one
engine batch) and *packets* (one header, a handful of zero-copy slices of the
mapped image); the engine and ``impl.packet_payload`` handle pages and bytes.
"""

from __future__ import annotations

import asyncio
import bisect
import socket
import uuid
from collections import deque
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from dsamig.engine import Detection, ZeroPageEngine, create_engine
from dsamig.errors import ConfigError, DsamigError, NetworkError, TransferError
from dsamig.logs import get_logger
from dsamig.native import impl
from dsamig.pages import PageSource
from dsamig.proto import (
    CLOSED,
    NEED_DATA,
    PREAMBLE,
    Commit,
    CommitRequest,
    End,
    Error,
    FrameDecoder,
    Hello,
    JobDigest,
    Manifest,
    PayloadChunk,
    ProtocolError,
    RemoteProtocolError,
    SenderChannelState,
    Welcome,
    ZeroRange,
    encode,
    encode_packet_header,
)
from dsamig.stats import ChannelStats, JobStats
from dsamig.transport.common import Drain, Timeouts

DEFAULT_CHANNELS = 4
DEFAULT_PACKET_SIZE = 512 * 1024
DEFAULT_PAGE_SIZE = 4096
CHUNK_PACKETS = 8  # packets per engine batch: 4 MiB at the default packet size
PIPELINE_DEPTH = 2  # engine batches in flight per channel
WRITE_HIGH_WATER = 8 * 1024 * 1024

T = TypeVar("T")


class Pacer(Protocol):
    """A bandwidth limiter shared by a job's channels (see ``dsamig.daemon.pacing``)."""

    async def acquire(self, nbytes: int) -> None:
        """Return once ``nbytes`` more bytes may be written."""


@dataclass
class SendOptions:
    """What a sender needs to know about one job."""

    host: str
    port: int
    channels: int = DEFAULT_CHANNELS
    packet_size: int = DEFAULT_PACKET_SIZE
    page_size: int = DEFAULT_PAGE_SIZE
    engine: str = "auto"
    engine_threads: int | None = None
    name: str = ""
    job_id: uuid.UUID = field(default_factory=uuid.uuid4)
    timeouts: Timeouts = field(default_factory=Timeouts)
    pacer: Pacer | None = None  # awaited before each scanned chunk is written

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        if not 1 <= self.channels <= 64:
            raise ConfigError(f"channels must be 1..64, not {self.channels}")
        ps = self.page_size
        if ps < 512 or ps > 1 << 20 or ps & (ps - 1):
            raise ConfigError(f"page size must be a power of two 512..1MiB, not {ps}")
        if self.packet_size % ps or not 1 <= self.packet_size // ps <= 4096:
            raise ConfigError(
                f"packet size must be 1..4096 pages of {ps} bytes, not {self.packet_size}"
            )


@dataclass(frozen=True, slots=True)
class Chunk:
    """A run of consecutive packets: scanned by the engine, or a known hole."""

    first_packet: int
    packets: int
    hole: bool


def plan_chunks(
    manifest: Manifest, data_ranges: list[tuple[int, int]], chunk_packets: int
) -> Iterator[Chunk]:
    """Cut the image into chunks; consecutive chunks inside holes become one."""
    packet_bytes = manifest.page_size * manifest.packet_pages
    starts = [start for start, _ in data_ranges]
    hole_from: int | None = None
    for first in range(0, manifest.packet_count, chunk_packets):
        count = min(chunk_packets, manifest.packet_count - first)
        lo, hi = first * packet_bytes, (first + count) * packet_bytes
        i = bisect.bisect_left(starts, hi)  # ranges starting before hi ...
        has_data = i > 0 and data_ranges[i - 1][1] > lo  # ... and ending after lo
        if not has_data:
            if hole_from is None:
                hole_from = first
            continue
        if hole_from is not None:
            yield Chunk(hole_from, first - hole_from, True)
            hole_from = None
        yield Chunk(first, count, False)
    if hole_from is not None:
        yield Chunk(hole_from, manifest.packet_count - hole_from, True)


class SenderChannel(asyncio.Protocol):
    """One TCP connection of a sending job: writes frames, reads answers."""

    def __init__(self, index: int, job: Sender) -> None:
        self.index = index
        self.job = job
        self.state = SenderChannelState()
        self.decoder = FrameDecoder(expect_preamble=False)
        self.drain = Drain()
        self.stats = ChannelStats(index)
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.welcome: asyncio.Future[Welcome] = loop.create_future()
        self.commit: asyncio.Future[Commit] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Small frames (END, COMMIT_REQUEST) must not wait for Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.receive_data(data)
            self._process()
        except ProtocolError as exc:
            self._fail(TransferError(f"channel {self.index}: receiver broke the protocol: {exc}"))

    def eof_received(self) -> bool | None:
        try:
            self.decoder.receive_data(b"")
            self._process()
        except ProtocolError as exc:
            self._fail(TransferError(f"channel {self.index}: {exc}"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(TransferError(f"receiver closed channel {self.index}{reason}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.drain.pause()

    def resume_writing(self) -> None:
        self.drain.resume()

    # frames from the receiver
    def _process(self) -> None:
        while True:
            event = self.decoder.next_event()
            if event is NEED_DATA or event is CLOSED:
                return
            if isinstance(event, PayloadChunk):
                raise RemoteProtocolError("the receiver sent a PACKET")
            self.state.on_frame(event)
            if isinstance(event, Welcome):
                if event.job_id != self.job.options.job_id:
                    expected = self.job.options.job_id
                    self._fail(TransferError(
                        f"channel {self.index}: WELCOME for job {event.job_id}, expected {expected}"
                    ))
                    return
                if not self.welcome.done():
                    self.welcome.set_result(event)
            elif isinstance(event, Commit):
                if not self.commit.done():
                    self.commit.set_result(event)
            elif isinstance(event, Error):
                code = getattr(event.code, "name", str(event.code))
                self._fail(TransferError(f"receiver failed the job ({code}): {event.message}"))
                return

    def _fail(self, exc: DsamigError) -> None:
        for future in (self.welcome, self.commit):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here; the job reports it
        self.drain.fail(exc)
        self.job.channel_failed(exc)

    # frames to the receiver
    def send(self, buffers: list[bytes | memoryview]) -> None:
        """Queue ``buffers`` (header and zero-copy payload slices) for the kernel."""
        if self.transport is None or self.transport.is_closing():
            raise TransferError(f"receiver closed channel {self.index}")
        self.transport.writelines(buffers)
        self.stats.transferred += sum(len(b) for b in buffers)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Sender:
    """One job on the sending side: connect, stream, commit.

    ``run()`` returns the job's stats once the receiver has committed the
    destination, and raises a DsamigError (with ``self.stats`` filled in)
    otherwise.
    """

    def __init__(self, source: PageSource, options: SendOptions) -> None:
        options.validate()
        self.source = source
        self.options = options
        self.manifest = Manifest(
            image_size=source.size,
            page_size=options.page_size,
            packet_pages=options.packet_size // options.page_size,
        )
        self.digest = JobDigest(self.manifest)
        self.stats = JobStats(role="sender", total=source.size, page_size=options.page_size)
        self.channels: list[SenderChannel] = []
        self.engine: ZeroPageEngine | None = None
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.log = get_logger(job=str(options.job_id), name=options.name, role="sender")

    def channel_failed(self, exc: DsamigError) -> None:
        """First failure of any channel fails the job (later ones, and closes
        after the job ended, are ignored)."""
        if not self._failure.done() and self.stats.finished is None:
            self._failure.set_exception(exc)
            self._failure.exception()  # mark retrieved: run() reports it, or a pump does

    async def run(self) -> JobStats:
        try:
            self.engine, reason = create_engine(
                self.options.engine, threads=self.options.engine_threads
            )
            self.log.info("engine selected", reason=reason)
            await self._race(self._connect_all())
            self.stats.mark_setup_done()
            self.stats.status = "active"
            chunks = plan_chunks(self.manifest, self.source.data_ranges(), CHUNK_PACKETS)
            pumps = [asyncio.ensure_future(self._pump(ch, chunks)) for ch in self.channels]
            try:
                await self._race(asyncio.gather(*pumps))
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
            self.stats.status = "completing"
            await self._race(self._commit())
            self._finish("completed")
            self.log.info("job completed", **self.stats.to_dict())
            return self.stats
        except DsamigError as exc:
            self._finish("failed", str(exc))
            self.log.warning("job failed", error=str(exc))
            raise
        except asyncio.CancelledError:
            self._finish("cancelled", "cancelled")
            raise
        finally:
            await self._close()

    def _finish(self, status: str, error: str | None = None) -> None:
        # Before the engine closes: its threads' CPU time is read from /proc.
        if self.engine is not None:
            self.stats.engine = self.engine.stats()
        self.stats.finish(status, error)

    async def _race(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` unless a channel fails first."""
        task = asyncio.ensure_future(awaitable)
        waiters: list[asyncio.Future[Any]] = [task, self._failure]
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._failure.result()  # raises the channel's error
        raise AssertionError("unreachable")

    async def _connect(self, index: int) -> SenderChannel:
        loop = asyncio.get_running_loop()
        opts = self.options
        where = f"{opts.host}:{opts.port}"
        try:
            _, channel = await asyncio.wait_for(
                loop.create_connection(lambda: SenderChannel(index, self), opts.host, opts.port),
                opts.timeouts.connect_s,
            )
        except TimeoutError:
            raise NetworkError(
                f"cannot connect to receiver {where}: no answer in {opts.timeouts.connect_s:g} s"
            ) from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise NetworkError(f"cannot connect to receiver {where}: {reason}") from None
        self.stats.channels.append(channel.stats)
        hello = Hello(
            job_id=opts.job_id,
            channel_index=index,
            channel_count=opts.channels,
            manifest=self.manifest if index == 0 else None,
            name=opts.name,
        )
        channel.state.on_send(hello)
        channel.send([PREAMBLE, encode(hello)])
        try:
            await asyncio.wait_for(asyncio.shield(channel.welcome), opts.timeouts.handshake_s)
        except TimeoutError:
            raise TransferError(
                f"receiver {where} did not answer HELLO in {opts.timeouts.handshake_s:g} s"
            ) from None
        return channel

    async def _connect_all(self) -> None:
        # Channel 0 first: it carries the manifest that makes the receiver
        # create the job the other channels join.
        self.channels.append(await self._connect(0))
        rest = await asyncio.gather(*(self._connect(i) for i in range(1, self.options.channels)))
        self.channels.extend(rest)
        self.stats.channels.sort(key=lambda c: c.index)

    async def _pump(self, channel: SenderChannel, chunks: Iterator[Chunk]) -> None:
        """Take chunks from the shared plan until it is empty; then END."""
        assert self.engine is not None
        manifest = self.manifest
        packet_bytes = manifest.page_size * manifest.packet_pages
        view = self.source.view
        pending: deque[tuple[Chunk, asyncio.Future[Detection] | None]] = deque()
        # Mapped ranges already queued, with the channel's byte count at their end.
        unreleased: deque[tuple[int, int, int]] = deque()
        idle_s = self.options.timeouts.idle_s
        while True:
            while len(pending) < PIPELINE_DEPTH:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                future = None
                if not chunk.hole:
                    start = chunk.first_packet * packet_bytes
                    end = min(start + chunk.packets * packet_bytes, manifest.image_size)
                    future = self.engine.submit(
                        view[start:end], manifest.page_size, manifest.packet_pages
                    )
                pending.append((chunk, future))
            if not pending:
                break
            chunk, future = pending.popleft()
            if future is None:
                self._send_zero_range(channel, chunk.first_packet, chunk.packets)
            else:
                detection = await future
                if self.options.pacer is not None:
                    # Paced on the page bytes about to be written; headers are noise.
                    span = manifest.range_bytes(chunk.first_packet, chunk.packets)[1]
                    await self.options.pacer.acquire(
                        max(span - detection.zero_pages * manifest.page_size, 0)
                    )
                self._send_chunk(channel, chunk, detection)
                start = chunk.first_packet * packet_bytes
                unreleased.append(
                    (start, start + chunk.packets * packet_bytes, channel.stats.transferred)
                )
            if channel.drain.paused:
                await channel.drain.wait(idle_s, f"channel {channel.index}")
            self._release_sent(channel, unreleased)
        end_frame = End(packets=channel.stats.packets, payload_bytes=channel.stats.payload_bytes)
        channel.state.on_send(end_frame)
        channel.send([encode(end_frame)])

    def _release_sent(
        self, channel: SenderChannel, unreleased: deque[tuple[int, int, int]]
    ) -> None:
        """Unmap chunks whose bytes the transport has handed to the kernel.

        The transport writes in order, so everything queued before
        ``transferred - buffered`` has left our buffers; dropping those pages
        from our mapping keeps the resident set flat whatever the image size.
        """
        transport = channel.transport
        if transport is None:
            return
        flushed = channel.stats.transferred - transport.get_write_buffer_size()
        while unreleased and unreleased[0][2] <= flushed:
            start, end, _ = unreleased.popleft()
            self.source.release(start, end)

    def _send_zero_range(self, channel: SenderChannel, first: int, count: int) -> None:
        """Send packets ``first .. first+count-1`` as one ZERO_RANGE and count them."""
        channel.state.on_send_data(count, 0)
        channel.send([encode(ZeroRange(first_packet=first, packet_count=count))])
        self.digest.record_zero_range(first, count)
        channel.stats.packets += count
        self.stats.duplicate += self.manifest.range_pages(first, count)
        self.stats.done_bytes += self.manifest.range_bytes(first, count)[1]

    def _send_chunk(self, channel: SenderChannel, chunk: Chunk, detection: Detection) -> None:
        """Send a scanned chunk: PACKETs for packets with data, ZERO_RANGE for the rest."""
        manifest = self.manifest
        page_size = manifest.page_size
        view = self.source.view
        bitmaps = detection.bitmaps
        full_zero = manifest.full_zero_bitmap(0)
        zero_from: int | None = None
        offset = 0
        stats = self.stats
        end_packet = chunk.first_packet + chunk.packets
        for number in range(chunk.first_packet, end_packet):
            pages = manifest.pages_in_packet(number)
            blen = (pages + 7) >> 3
            bitmap = bitmaps[offset : offset + blen]
            offset += blen
            if bitmap == full_zero or bitmap == manifest.full_zero_bitmap(number):
                if zero_from is None:
                    zero_from = number
                continue
            if zero_from is not None:
                self._send_zero_range(channel, zero_from, number - zero_from)
                zero_from = None
            start, span = manifest.range_bytes(number, 1)
            views, length, crc = impl.packet_payload(view[start : start + span], bitmap, page_size)
            channel.state.on_send_data(1, length)
            # One write per packet, while its bytes are still in cache from the CRC.
            channel.send([
                encode_packet_header(number, number * manifest.packet_pages, pages, length, crc,
                                     bitmap),
                *views,
            ])
            self.digest.record_packet(number, bitmap, crc)
            zero_pages = int.from_bytes(bitmap, "little").bit_count()
            stats.duplicate += zero_pages
            stats.normal += pages - zero_pages
            stats.normal_bytes += length
            stats.done_bytes += span
            channel.stats.packets += 1
            channel.stats.payload_bytes += length
        if zero_from is not None:
            self._send_zero_range(channel, zero_from, end_packet - zero_from)

    async def _commit(self) -> None:
        channel = self.channels[0]
        tracker_digest = self.digest.digest()
        request = CommitRequest(
            packet_count=self.manifest.packet_count,
            zero_pages=self.stats.duplicate,
            normal_pages=self.stats.normal,
            digest=tracker_digest,
        )
        channel.state.on_send(request)
        channel.send([encode(request)])
        timeout = self.options.timeouts.commit_s
        try:
            commit = await asyncio.wait_for(asyncio.shield(channel.commit), timeout)
        except TimeoutError:
            raise TransferError(f"receiver did not commit within {timeout:g} s") from None
        if commit.digest != tracker_digest:
            raise TransferError(
                "receiver committed a different job digest "
                f"({commit.digest.hex()[:16]}… != {tracker_digest.hex()[:16]}…)"
            )

    async def _close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        for channel in self.channels:
            channel.close()
        if self.channels:
            await asyncio.wait([c.closed for c in self.channels], timeout=5)


async def send_image(path: str, options: SendOptions) -> JobStats:
    """Send the image at ``path``; the stats of the committed job."""
    source = PageSource(path)
    try:
        sender = Sender(source, options)
        try:
            return await sender.run()
        except DsamigError as exc:
            exc.stats = sender.stats  # type: ignore[attr-defined]
            raise
    finally:
        source.close()
