"""The sending side of a job: N channels pumping packets from a PageSource.

Per-page work never happens here.  Python handles *chunks* (a few packets, one
engine batch) and *packets* (one header, a handful of zero-copy slices of the
mapped image); the engine and ``impl.packet_payload`` handle pages and bytes.

A job runs in *sessions*.  The first connects every channel and streams the
plan.  When a channel breaks (reset, timeout, a receiver that restarted),
every channel is closed and a new session reconnects, asking the receiver
which packets it already holds (RESUME_STATE, from its live tracker or its
durable checkpoint); those are checked against the image and skipped, the
rest is sent again.  A sender started with ``resume`` does the same from its
first session.
"""

from __future__ import annotations

import asyncio
import bisect
import ssl
import time
import uuid
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from dsamig.engine import Detection, EngineClosedError, ZeroPageEngine, create_engine
from dsamig.engine.dsa import DsaConfig
from dsamig.engine.pool import EngineSource
from dsamig.errors import ConfigError, DsamigError, NetworkError, SourceError, TransferError
from dsamig.logs import get_logger
from dsamig.native import impl
from dsamig.pages import PageSource
from dsamig.proto import (
    CLOSED,
    FEATURE_ACKS,
    FEATURE_RESUME,
    NEED_DATA,
    PREAMBLE,
    Ack,
    Challenge,
    Commit,
    CommitRequest,
    End,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    JobDigest,
    Manifest,
    PayloadChunk,
    ProtocolError,
    RemoteProtocolError,
    ResumeState,
    SenderChannelState,
    SenderState,
    Welcome,
    ZeroRange,
    encode,
    encode_packet_header,
    packet_record,
)
from dsamig.stats import ChannelStats, JobStats
from dsamig.transport.common import Drain, Timeouts, tune_socket, window_bytes
from dsamig.transport.security import (
    SecurityConfig,
    authenticate,
    describe_connection_error,
    describe_tls_error,
    psk_of,
)

DEFAULT_CHANNELS = 4
DEFAULT_PACKET_SIZE = 512 * 1024
DEFAULT_PAGE_SIZE = 4096
CHUNK_PACKETS = 8  # packets per engine batch: 4 MiB at the default packet size
PIPELINE_DEPTH = 2  # engine batches in flight per channel
WRITE_HIGH_WATER = 8 * 1024 * 1024
RETRY_FOR_S = 60.0  # keep reconnecting a started job this long

T = TypeVar("T")
# States in which a receiver that hangs up refused us rather than failed.
_HANDSHAKING = frozenset({SenderState.AWAIT_CHALLENGE, SenderState.AWAIT_WELCOME})


class Pacer(Protocol):
    """A bandwidth limiter shared by a job's channels (see ``dsamig.transport.pacing``)."""

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
    dsa: DsaConfig | None = None  # DSA work queues (engine dsa or auto)
    name: str = ""
    job_id: uuid.UUID = field(default_factory=uuid.uuid4)
    timeouts: Timeouts = field(default_factory=Timeouts)
    pacer: Pacer | None = None  # awaited before each scanned chunk is written
    resume: bool = False  # continue from what the receiver already holds
    retry_for_s: float = RETRY_FOR_S  # reconnect a broken job for this long
    security: SecurityConfig | None = None  # TLS and/or pre-shared key

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
        if self.retry_for_s < 0:
            raise ConfigError(f"retry time must not be negative, not {self.retry_for_s}")


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


class ChannelLostError(TransferError):
    """A channel broke without the receiver failing the job: worth reconnecting."""


class ReceiverBusyError(TransferError):
    """The receiver refused the job for now (busy, destination in use)."""


class ImageChangedError(TransferError):
    """The receiver holds packets that differ from the image: start clean."""


class SenderChannel(asyncio.Protocol):
    """One TCP connection of a sending job: writes frames, reads answers."""

    def __init__(self, index: int, job: Sender) -> None:
        self.index = index
        self.job = job
        self.state = SenderChannelState(psk=psk_of(job.options.security))
        self.decoder = FrameDecoder(expect_preamble=False)
        self.drain = Drain()
        self.stats = ChannelStats(index)
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.challenge: asyncio.Future[Challenge] = loop.create_future()
        self.welcome: asyncio.Future[Welcome] = loop.create_future()
        self.resumed: asyncio.Future[None] = loop.create_future()
        self.commit: asyncio.Future[Commit] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        # Data frames sent on this connection with their payload bytes, until
        # the receiver acknowledges them.
        self.frames_sent = 0
        self.unacked: deque[tuple[int, int]] = deque()
        self.unacked_bytes = 0
        self.acked = asyncio.Event()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        tune_socket(transport.get_extra_info("socket"))
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.receive_data(data)
            self._process()
        except ProtocolError as exc:
            if exc.code is ErrorCode.AUTH:
                # Say why we hang up, so that the receiver reports it too.
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(encode(Error(ErrorCode.AUTH, exc.message)))
                self._fail(TransferError(f"channel {self.index}: {exc}"))
                return
            self._fail(TransferError(f"channel {self.index}: receiver broke the protocol: {exc}"))

    def eof_received(self) -> bool | None:
        try:
            self.decoder.receive_data(b"")
            self._process()
        except ProtocolError as exc:
            self._fail(ChannelLostError(f"channel {self.index}: {exc}"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        finished = (
            self.index != 0 and self.state.state is SenderState.ENDED and not self.unacked
        )
        if not finished:
            # A channel other than 0 that ENDed and holds no unacknowledged data
            # has nothing left to say: the receiver may close it before channel
            # 0's COMMIT reaches us.
            self._fail(ChannelLostError(f"receiver closed channel {self.index}{self._why(exc)}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _why(self, exc: Exception | None) -> str:
        """Why the receiver closed us, for the error message."""
        return describe_connection_error(
            exc,
            handshaking=self.state.state in _HANDSHAKING,
            tls=self.transport is not None and bool(self.transport.get_extra_info("ssl_object")),
        )

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
            if isinstance(event, Ack):
                self._acknowledged(event.frames)
            elif isinstance(event, Welcome):
                if not self.welcome.done():
                    self.welcome.set_result(event)
            elif isinstance(event, Challenge):
                if not self.challenge.done():
                    self.challenge.set_result(event)
            elif isinstance(event, ResumeState):
                self.job.resume_state(event)
                if event.last and not self.resumed.done():
                    self.resumed.set_result(None)
            elif isinstance(event, Commit):
                if not self.commit.done():
                    self.commit.set_result(event)
            elif isinstance(event, Error):
                code = getattr(event.code, "name", str(event.code))
                error_class = (
                    ReceiverBusyError if event.code == ErrorCode.REJECTED else TransferError
                )
                self._fail(error_class(f"receiver failed the job ({code}): {event.message}"))
                return

    def _acknowledged(self, frames: int) -> None:
        if frames > self.frames_sent:
            raise RemoteProtocolError(
                f"ACK of {frames} frames on channel {self.index}, only {self.frames_sent} sent"
            )
        while self.unacked and self.unacked[0][0] <= frames:
            self.unacked_bytes -= self.unacked.popleft()[1]
        self.acked.set()

    def _fail(self, exc: DsamigError) -> None:
        for future in (self.challenge, self.welcome, self.resumed, self.commit):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here; the job reports it
        self.drain.fail(exc)
        self.acked.set()
        self.job.channel_failed(exc)

    # frames to the receiver
    def send(self, buffers: list[bytes | memoryview]) -> None:
        """Queue ``buffers`` (header and zero-copy payload slices) for the kernel."""
        if self.transport is None or self.transport.is_closing():
            raise ChannelLostError(f"receiver closed channel {self.index}{self._why(None)}")
        self.transport.writelines(buffers)
        self.stats.transferred += sum(len(b) for b in buffers)

    def sent_data_frame(self, payload_bytes: int) -> None:
        """Count a PACKET or ZERO_RANGE for the window of unacknowledged data."""
        self.frames_sent += 1
        if self.job.acks:
            self.unacked.append((self.frames_sent, payload_bytes))
            self.unacked_bytes += payload_bytes

    async def wait_window(self, timeout_s: float) -> None:
        """Wait while more than the job's window is unacknowledged (bounded)."""
        deadline = time.monotonic() + timeout_s
        while self.unacked_bytes > self.job.window_bytes:
            self.acked.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelLostError(
                    f"channel {self.index}: no acknowledgement for {timeout_s:g} s"
                )
            try:
                await asyncio.wait_for(self.acked.wait(), left)
            except TimeoutError:
                continue
            if self.transport is None or self.transport.is_closing():
                raise ChannelLostError(f"receiver closed channel {self.index}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Sender:
    """One job on the sending side: connect, stream, commit; reconnect on breaks.

    ``run()`` returns the job's stats once the receiver has committed the
    destination, and raises a DsamigError (with ``self.stats`` filled in)
    otherwise.
    """

    def __init__(self, source: PageSource, options: SendOptions,
                 engines: EngineSource | None = None) -> None:
        options.validate()
        self.source = source
        self.options = options
        self.manifest = Manifest(
            image_size=source.size,
            page_size=options.page_size,
            packet_pages=options.packet_size // options.page_size,
        )
        self.stats = JobStats(role="sender", total=source.size, page_size=options.page_size)
        self.window_bytes = window_bytes(self.manifest, options.channels)
        self.engine: ZeroPageEngine | None = None
        # Where the engine comes from: a daemon passes its EnginePool, so its
        # jobs share the DSA work queues it opened once; else this job's own.
        self.engines = engines
        self.log = get_logger(job=str(options.job_id), name=options.name, role="sender")
        self.acks = False
        self.retransmitted_bytes = 0
        self.sessions = 0
        self._new_job_state()
        self._new_session_state()

    def _new_job_state(self) -> None:
        """What one job accumulates: the digest and which packets it counted."""
        count = self.manifest.packet_count
        self.digest = JobDigest(self.manifest)
        self.recorded = bytearray(count)  # packets whose record (and pages) we counted
        self.stats.duplicate = self.stats.normal = self.stats.normal_bytes = 0
        self.stats.done_bytes = 0

    def _new_session_state(self) -> None:
        """What one session knows: the receiver's packets, the live channels."""
        count = self.manifest.packet_count
        self.skip = bytearray(count)  # the receiver holds these packets
        self.remote_records = array("I", [0]) * count
        self.channels: list[SenderChannel] = []
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def channel_failed(self, exc: DsamigError) -> None:
        """First failure of any channel ends the session (later ones, and closes
        after the job ended, are ignored)."""
        if not self._failure.done() and self.stats.finished is None:
            self._failure.set_exception(exc)
            self._failure.exception()  # mark retrieved: run() reports it, or a pump does

    async def run(self) -> JobStats:
        try:
            create = create_engine if self.engines is None else self.engines.create_engine
            self.engine, reason = create(
                self.options.engine, threads=self.options.engine_threads, dsa=self.options.dsa
            )
            self.log.info("engine selected", reason=reason)
            await self._run_sessions()
            self._finish("completed")
            self.log.info("job completed", **self.stats.to_dict())
            return self.stats
        except (DsamigError, OSError, EngineClosedError) as exc:
            # A page of the mapped image that cannot be read (EFAULT from the
            # native scan, the CRC or the kernel's send) means the file shrank.
            error = self.source.truncation_error()
            if error is None and not isinstance(exc, DsamigError):
                error = SourceError(f"cannot read image {self.source.path!r}: {exc}")
            self._finish("failed", str(error or exc))
            self.log.warning("job failed", error=str(error or exc))
            if error is not None:
                self._cancel(str(error))  # nothing to resume from a shrunk image
                raise error from None
            raise
        except asyncio.CancelledError:
            self._finish("cancelled", "cancelled")
            raise
        finally:
            await self._close_channels(final=True)
            if self.engine is not None:
                self.engine.close()

    def _cancel(self, message: str) -> None:
        """Tell the receiver the job is over for good, so that it drops its partial file."""
        frame = encode(Error(ErrorCode.CANCELLED, message))
        for channel in self.channels:
            # Frames are written whole, so this lands between two of them.
            if channel.transport is not None and not channel.transport.is_closing():
                channel.transport.write(frame)

    async def _run_sessions(self) -> None:
        resume = self.options.resume
        restarted_clean = False
        backoff_s = 0.1
        retry_until: float | None = None
        while True:
            try:
                await self._session(resume)
                return
            except ImageChangedError as exc:
                if restarted_clean:
                    raise
                self.log.warning("resume refused, restarting clean", reason=str(exc))
                # Just hang up: the receiver hands the destination to the new
                # job, which starts the partial file afresh.
                await self._close_channels()
                restarted_clean = True
                resume = False
                self.options.job_id = uuid.uuid4()
                self._new_job_state()
                continue
            except (ChannelLostError, NetworkError, ReceiverBusyError) as exc:
                # Reconnect only a job that got going and talks to a receiver
                # that acknowledges: before that, an error is the answer.  A
                # busy receiver is worth waiting for only while recovering (its
                # old connections of this job may not have timed out yet).
                if not self.acks or self.options.retry_for_s <= 0:
                    raise
                if isinstance(exc, ReceiverBusyError) and retry_until is None:
                    raise
                now = time.monotonic()
                if retry_until is None:
                    retry_until = now + self.options.retry_for_s
                if now >= retry_until:
                    raise TransferError(
                        f"gave up after {self.options.retry_for_s:g} s of reconnecting: {exc}"
                    ) from None
                self.log.warning("channel lost, reconnecting", error=str(exc),
                                 retry_in_s=backoff_s)
                await self._close_channels()
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
                resume = True
                continue

    async def _session(self, resume: bool) -> None:
        self.sessions += 1
        self._new_session_state()
        await self._race(self._connect_all(resume))
        if self.sessions == 1:
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

    def _finish(self, status: str, error: str | None = None) -> None:
        # Before the engine closes: its threads' CPU time is read from /proc.
        if self.engine is not None:
            self.stats.engine = self.engine.stats()
        self.stats.extra["retransmitted-bytes"] = self.retransmitted_bytes
        self.stats.extra["sessions"] = self.sessions
        self.stats.finish(status, error)

    async def _race(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` unless a channel fails first."""
        task = asyncio.ensure_future(awaitable)
        waiters: list[asyncio.Future[Any]] = [task, self._failure]
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            if task.exception() is not None and self._failure.done():
                # Both ended in the same pass: the channel's failure (say, the
                # receiver's ERROR) is the cause, the task's error its echo.
                self._failure.result()
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._failure.result()  # raises the channel's error
        raise AssertionError("unreachable")

    async def _connect(self, index: int, features: int) -> SenderChannel:
        loop = asyncio.get_running_loop()
        opts = self.options
        where = f"{opts.host}:{opts.port}"
        tls = opts.security.client_hostname(opts.host) if opts.security else None
        context, server_name = tls if tls is not None else (None, None)
        try:
            _, channel = await asyncio.wait_for(
                loop.create_connection(
                    lambda: SenderChannel(index, self), opts.host, opts.port, ssl=context,
                    server_hostname=server_name,
                    ssl_handshake_timeout=opts.timeouts.connect_s if context else None,
                ),
                opts.timeouts.connect_s,
            )
        except ssl.SSLError as exc:
            raise TransferError(
                f"TLS handshake with receiver {where} failed: {describe_tls_error(exc)}"
            ) from None
        except TimeoutError:
            raise NetworkError(
                f"cannot connect to receiver {where}: no answer in {opts.timeouts.connect_s:g} s"
            ) from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise NetworkError(f"cannot connect to receiver {where}: {reason}") from None
        self.channels.append(channel)
        hello = Hello(
            job_id=opts.job_id,
            channel_index=index,
            channel_count=opts.channels,
            manifest=self.manifest if index == 0 else None,
            name=opts.name,
            features=features,
        )
        preamble: list[bytes | memoryview] = [PREAMBLE]
        if channel.state.authenticates:
            hello = await authenticate(channel, hello, opts.timeouts.handshake_s, where)
            preamble = []  # sent with our CHALLENGE
        channel.state.on_send(hello)
        channel.send([*preamble, encode(hello)])
        try:
            await asyncio.wait_for(asyncio.shield(channel.welcome), opts.timeouts.handshake_s)
        except TimeoutError:
            raise ChannelLostError(
                f"receiver {where} did not answer HELLO in {opts.timeouts.handshake_s:g} s"
            ) from None
        return channel

    async def _connect_all(self, resume: bool) -> None:
        # Channel 0 first: it carries the manifest that makes the receiver
        # create the job (or resume it) before the other channels join.
        features = FEATURE_ACKS | (FEATURE_RESUME if resume else 0)
        first = await self._connect(0, features)
        welcome = first.welcome.result()
        self.acks = bool(welcome.features & FEATURE_ACKS)
        if welcome.features & FEATURE_RESUME:
            try:
                await asyncio.wait_for(asyncio.shield(first.resumed),
                                       self.options.timeouts.handshake_s)
            except TimeoutError:
                raise ChannelLostError("receiver did not finish RESUME_STATE") from None
            self._verify_known()
        await asyncio.gather(
            *(self._connect(i, FEATURE_ACKS if self.acks else 0)
              for i in range(1, self.options.channels))
        )
        self.channels.sort(key=lambda c: c.index)
        self.stats.channels = [c.stats for c in self.channels]

    def resume_state(self, frame: ResumeState) -> None:
        """Note which packets the receiver already holds, and their records."""
        count = self.manifest.packet_count
        if frame.first_packet + frame.packet_count > count:
            raise RemoteProtocolError(
                f"RESUME_STATE packets {frame.first_packet}+{frame.packet_count} beyond "
                f"packet_count {count}"
            )
        bits = int.from_bytes(frame.done_bitmap, "little")
        offset = 0
        while bits:
            low = bits & -bits
            n = frame.first_packet + low.bit_length() - 1
            self.skip[n] = 1
            self.remote_records[n] = int.from_bytes(frame.records[offset : offset + 4], "little")
            offset += 4
            bits ^= low

    def _verify_known(self) -> None:
        """Packets we sent in an earlier session must come back unchanged."""
        index = self.skip.find(1)
        while index >= 0:
            if self.recorded[index]:
                self._check_remote(index, self.digest.record(index))
            index = self.skip.find(1, index + 1)

    def _check_remote(self, packet: int, record: int) -> None:
        if self.remote_records[packet] != record:
            raise ImageChangedError(
                f"the receiver's copy of packet {packet} differs from the image: the image "
                "changed since the interrupted transfer"
            )

    async def _pump(self, channel: SenderChannel, chunks: Iterator[Chunk]) -> None:
        """Take chunks from the shared plan until it is empty; then END."""
        pending: deque[tuple[Chunk, asyncio.Future[Detection] | None]] = deque()
        try:
            await self._pump_chunks(channel, chunks, pending)
        finally:
            # A pump that stops early (a failure, a new session) leaves batches
            # on the engine: nobody will read their results.
            for _, future in pending:
                if future is not None:
                    future.cancel()

    async def _pump_chunks(
        self,
        channel: SenderChannel,
        chunks: Iterator[Chunk],
        pending: deque[tuple[Chunk, asyncio.Future[Detection] | None]],
    ) -> None:
        assert self.engine is not None
        manifest = self.manifest
        packet_bytes = manifest.page_size * manifest.packet_pages
        view = self.source.view
        # Mapped ranges already queued, with the channel's byte count at their end.
        unreleased: deque[tuple[int, int, int]] = deque()
        idle_s = self.options.timeouts.idle_s
        skip = self.skip
        while True:
            self.source.check_size()  # a shrunk image fails here, before its pages are touched
            while len(pending) < PIPELINE_DEPTH:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                future = None
                first, end = chunk.first_packet, chunk.first_packet + chunk.packets
                # Scan unless the receiver holds every packet and we checked them.
                needed = not chunk.hole and (
                    skip.count(0, first, end) or self.recorded.count(0, first, end)
                )
                if needed:
                    start = first * packet_bytes
                    stop = min(end * packet_bytes, manifest.image_size)
                    future = self.engine.submit(
                        view[start:stop], manifest.page_size, manifest.packet_pages
                    )
                pending.append((chunk, future))
            if not pending:
                break
            chunk, future = pending.popleft()
            if future is None:
                if chunk.hole:
                    self._send_zero_ranges(channel, chunk.first_packet, chunk.packets)
                # else: every packet is held by the receiver and was checked
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
            if channel.unacked_bytes > self.window_bytes:
                await channel.wait_window(idle_s)
            self._release_sent(channel, unreleased)
        end_frame = End(packets=channel.stats.packets, payload_bytes=channel.stats.payload_bytes)
        channel.state.on_send(end_frame)
        channel.send([encode(end_frame)])
        if self.acks:
            # Done only when the receiver holds everything this channel sent.
            while channel.unacked:
                channel.acked.clear()
                try:
                    await asyncio.wait_for(channel.acked.wait(), idle_s)
                except TimeoutError:
                    raise ChannelLostError(
                        f"channel {channel.index}: no acknowledgement for {idle_s:g} s"
                    ) from None
                if channel.transport is None or channel.transport.is_closing():
                    raise ChannelLostError(f"receiver closed channel {channel.index}")

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

    def _count_zero_packets(self, first: int, count: int) -> None:
        """Record zero packets in the digest and the stats, once per packet."""
        manifest = self.manifest
        new = self.recorded.count(0, first, first + count)
        if new != count:
            for n in range(first, first + count):
                if self.recorded[n] and self.digest.record(n) != self.digest.zero_record(n):
                    raise ImageChangedError(f"packet {n} of the image changed during the job")
        if new == count:
            self.digest.record_zero_range(first, count)
            self.stats.duplicate += manifest.range_pages(first, count)
            self.stats.done_bytes += manifest.range_bytes(first, count)[1]
        else:
            for n in range(first, first + count):
                if not self.recorded[n]:
                    self.digest.record_zero_range(n, 1)
                    self.stats.duplicate += manifest.range_pages(n, 1)
                    self.stats.done_bytes += manifest.range_bytes(n, 1)[1]
        self.recorded[first : first + count] = b"\x01" * count

    def _send_zero_ranges(self, channel: SenderChannel, first: int, count: int) -> None:
        """Send packets ``first .. first+count-1`` (all zero) as ZERO_RANGE frames,
        leaving out those the receiver holds (whose records must be zero ones)."""
        self._count_zero_packets(first, count)
        end = first + count
        n = first
        skip = self.skip
        while n < end:
            if skip[n]:
                self._check_remote(n, self.digest.record(n))
                n += 1
                continue
            run_end = skip.find(1, n, end)
            run_end = end if run_end < 0 else run_end
            channel.state.on_send_data(run_end - n, 0)
            channel.send([encode(ZeroRange(first_packet=n, packet_count=run_end - n))])
            channel.sent_data_frame(0)
            channel.stats.packets += run_end - n
            n = run_end

    def _send_chunk(self, channel: SenderChannel, chunk: Chunk, detection: Detection) -> None:
        """Send a scanned chunk: PACKETs for packets with data, ZERO_RANGE for the rest;
        packets the receiver holds are only checked."""
        manifest = self.manifest
        page_size = manifest.page_size
        view = self.source.view
        bitmaps = detection.bitmaps
        # The all-zero bitmaps: of a full packet, and of the (maybe shorter) last one.
        last = manifest.packet_count - 1
        full_zero = manifest.full_zero_bitmap(0)
        last_zero = manifest.full_zero_bitmap(last)
        zero_from: int | None = None
        offset = 0
        stats = self.stats
        skip = self.skip
        end_packet = chunk.first_packet + chunk.packets
        for number in range(chunk.first_packet, end_packet):
            pages = manifest.pages_in_packet(number)
            blen = (pages + 7) >> 3
            bitmap = bitmaps[offset : offset + blen]
            offset += blen
            if bitmap == (last_zero if number == last else full_zero):
                if zero_from is None:
                    zero_from = number
                continue
            if zero_from is not None:
                self._send_zero_ranges(channel, zero_from, number - zero_from)
                zero_from = None
            start, span = manifest.range_bytes(number, 1)
            if skip[number] and self.recorded[number]:
                continue  # checked against the receiver's record when the session began
            views, length, crc = impl.packet_payload(view[start : start + span], bitmap, page_size)
            if not self.recorded[number]:
                self.recorded[number] = 1
                self.digest.record_packet(number, bitmap, crc)
                zero_pages = int.from_bytes(bitmap, "little").bit_count()
                stats.duplicate += zero_pages
                stats.normal += pages - zero_pages
                stats.normal_bytes += length
                stats.done_bytes += span
            elif self.digest.record(number) != packet_record(bitmap, crc):
                raise ImageChangedError(f"packet {number} of the image changed during the job")
            else:
                self.retransmitted_bytes += length
            if skip[number]:
                self._check_remote(number, self.digest.record(number))
                continue
            channel.state.on_send_data(1, length)
            # One write per packet, while its bytes are still in cache from the CRC.
            channel.send([
                encode_packet_header(number, number * manifest.packet_pages, pages, length, crc,
                                     bitmap),
                *views,
            ])
            channel.sent_data_frame(length)
            channel.stats.packets += 1
            channel.stats.payload_bytes += length
        if zero_from is not None:
            self._send_zero_ranges(channel, zero_from, end_packet - zero_from)

    async def _commit(self) -> None:
        channel = self.channels[0]
        digest = self.digest.digest()
        request = CommitRequest(
            packet_count=self.manifest.packet_count,
            zero_pages=self.stats.duplicate,
            normal_pages=self.stats.normal,
            digest=digest,
        )
        channel.state.on_send(request)
        channel.send([encode(request)])
        timeout = self.options.timeouts.commit_s
        try:
            commit = await asyncio.wait_for(asyncio.shield(channel.commit), timeout)
        except TimeoutError:
            raise TransferError(f"receiver did not commit within {timeout:g} s") from None
        if commit.digest != digest:
            raise TransferError(
                "receiver committed a different job digest "
                f"({commit.digest.hex()[:16]}… != {digest.hex()[:16]}…)"
            )

    async def _close_channels(self, *, final: bool = False) -> None:
        """Close the session's channels (``final``: the job's last, whose
        per-channel figures stay in the stats)."""
        channels, self.channels = self.channels, []
        if not final:
            self.stats.earlier_transferred += sum(c.stats.transferred for c in channels)
            self.stats.channels = []
        for channel in channels:
            channel.close()
        if channels:
            await asyncio.wait([c.closed for c in channels], timeout=5)


async def send_image(
    path: str, options: SendOptions, *, on_start: Callable[[Sender], None] | None = None
) -> JobStats:
    """Send the image at ``path``; the stats of the committed job.

    ``on_start(sender)`` runs once the job exists, before it connects (the
    CLI hangs its progress bar on ``sender.stats`` there).  A DsamigError
    carries the job's stats as ``exc.stats``.
    """
    source = PageSource(path)
    try:
        sender = Sender(source, options)
        if on_start is not None:
            on_start(sender)
        try:
            return await sender.run()
        except DsamigError as exc:
            exc.stats = sender.stats  # type: ignore[attr-defined]
            raise
    finally:
        source.close()
