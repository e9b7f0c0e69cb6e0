"""The sending side of a job: N channels pumping packets from a PageSource.

Every decision of the job is its :class:`SendJobCore`'s (``dsamig.proto``):
which chunks to scan, which packets go out as PACKET or ZERO_RANGE or not at
all, the records, the counts, the resume checks, the COMMIT_REQUEST. This
module connects, moves the bytes, runs the timers and reconnects.

Per-page work never happens here.  Python handles *chunks* (a few packets, one
engine batch) and *packets* (one header, a handful of zero-copy slices of the
mapped image); the engine and ``impl.packet_payload`` handle pages and bytes.

A job runs in *sessions*.  The first connects every channel and streams the
plan.  When a channel breaks (reset, timeout, a receiver that restarted),
every channel is closed and a new session reconnects, asking the receiver
which packets it already holds; the core checks those against the image and
skips them.  A sender started with ``resume`` does the same from its first
session.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
import uuid
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
    AUTH_NONCE_SIZE,
    CLOSED,
    FEATURE_ACKS,
    FEATURE_RESUME,
    NEED_DATA,
    PREAMBLE,
    Ack,
    Challenge,
    ChannelState,
    Chunk,
    Commit,
    End,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    ImageChangedError,
    Manifest,
    PayloadChunk,
    ProtocolError,
    RemoteProtocolError,
    ResumeState,
    SenderState,
    SendJobCore,
    Welcome,
    ZeroRange,
    encode,
    encode_packet_header,
    window_bytes,
)
from dsamig.proto.send_core import ZERO
from dsamig.settings import (
    DEFAULT_CHANNELS,
    DEFAULT_PACKET_SIZE,
    DEFAULT_PAGE_SIZE,
    MAX_CHANNELS,
    RETRY_FOR_S,
    geometry_problem,
)
from dsamig.stats import ChannelStats, JobStats
from dsamig.transport.common import Drain, Timeouts, tune_socket
from dsamig.transport.security import (
    SecurityConfig,
    describe_connection_error,
    describe_tls_error,
    psk_of,
)

PIPELINE_DEPTH = 2  # engine batches in flight per channel
WRITE_HIGH_WATER = 8 * 1024 * 1024

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
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise ConfigError(f"channels must be 1..{MAX_CHANNELS}, not {self.channels}")
        problem = geometry_problem(self.page_size, packet_size=self.packet_size)
        if problem is not None:
            raise ConfigError(str(problem))
        if self.retry_for_s < 0:
            raise ConfigError(f"retry time must not be negative, not {self.retry_for_s}")


class ChannelLostError(TransferError):
    """A channel broke without the receiver failing the job: worth reconnecting."""


class ReceiverBusyError(TransferError):
    """The receiver refused the job for now (busy, destination in use)."""


class SenderChannel(asyncio.Protocol):
    """One TCP connection of a sending job: writes frames, reads answers.

    Every frame, ERROR included, goes through the channel's state machine
    (:meth:`send_frame`, or :meth:`send_packet` on the hot path).
    """

    def __init__(self, index: int, job: Sender) -> None:
        self.index = index
        self.job = job
        self.state = ChannelState.sender(psk=psk_of(job.options.security))
        self.decoder = FrameDecoder(expect_preamble=False)
        self.drain = Drain()
        self.stats = ChannelStats(index, self.state)
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.challenge: asyncio.Future[Challenge] = loop.create_future()
        self.welcome: asyncio.Future[Welcome] = loop.create_future()
        self.resumed: asyncio.Future[None] = loop.create_future()
        self.commit: asyncio.Future[Commit] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        # Data frames sent on this connection with their payload bytes, until
        # the receiver acknowledges them.
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
                self.send_error(ErrorCode.AUTH, exc.message)  # so that the receiver says why
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
                return  # a close is judged in connection_lost, which can say why
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
                self.job.core.resume_state(event)
                if event.last and not self.resumed.done():
                    self.resumed.set_result(None)
            elif isinstance(event, Commit):
                if not self.commit.done():
                    self.commit.set_result(event)
            elif isinstance(event, Error):
                code = getattr(event.code, "name", str(event.code))
                if event.code == ErrorCode.REJECTED:  # the receiver will not take the job
                    self._fail(ReceiverBusyError(f"refused: {event.message}"))
                else:
                    self._fail(TransferError(f"receiver failed the job ({code}): "
                                             f"{event.message}"))
                return

    def _acknowledged(self, frames: int) -> None:
        # The state machine checked that these frames were sent.
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
    def _write(self, buffers: list[bytes | memoryview]) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ChannelLostError(f"receiver closed channel {self.index}{self._why(None)}")
        self.transport.writelines(buffers)
        self.stats.transferred += sum(len(b) for b in buffers)

    def send_frame(self, frame: Frame, *, preamble: bool = False) -> None:
        """Check ``frame`` against the state machine and queue it for the kernel."""
        self.state.on_send(frame)
        self._write([PREAMBLE, encode(frame)] if preamble else [encode(frame)])
        if isinstance(frame, ZeroRange):
            self._data_frame(0)

    def send_packet(self, header: bytes, views: list[memoryview], payload_bytes: int) -> None:
        """Queue one PACKET (encoded header, zero-copy payload slices): the hot path."""
        self.state.on_send_data(1, 1, payload_bytes)
        self._write([header, *views])
        self._data_frame(payload_bytes)

    def send_error(self, code: ErrorCode, message: str) -> None:
        """Report a failure to the receiver, if this channel still may. Every
        write so far was whole frames, so the ERROR lands on a frame boundary."""
        if (
            self.state.can_send_error
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.send_frame(Error(code=code, message=message))

    def _data_frame(self, payload_bytes: int) -> None:
        """Count a PACKET or ZERO_RANGE for the window of unacknowledged data."""
        if self.job.acks:
            self.unacked.append((self.state.data_frames, payload_bytes))
            self.unacked_bytes += payload_bytes

    async def authenticate(self, hello: Hello, timeout_s: float, where: str) -> Hello:
        """Run the CHALLENGE exchange of a pre-shared key; return ``hello`` signed.

        Sends the preamble and our CHALLENGE, waits for the receiver's (whose
        proof the state machine checks), and signs the HELLO with both
        nonces. A wrong key fails the channel with an AUTH error before the
        HELLO, and so the manifest and job name, ever leave this host.
        """
        self.send_frame(Challenge(os.urandom(AUTH_NONCE_SIZE)), preamble=True)
        try:
            await asyncio.wait_for(asyncio.shield(self.challenge), timeout_s)
        except TimeoutError:
            raise TransferError(
                f"receiver {where} did not answer our authentication CHALLENGE in "
                f"{timeout_s:g} s (is it configured with --psk-file?)"
            ) from None
        return self.state.sign_hello(hello)

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

    async def wait_acknowledged(self, timeout_s: float) -> None:
        """Wait until the receiver holds everything this channel sent (bounded)."""
        while self.unacked:
            self.acked.clear()
            try:
                await asyncio.wait_for(self.acked.wait(), timeout_s)
            except TimeoutError:
                raise ChannelLostError(
                    f"channel {self.index}: no acknowledgement for {timeout_s:g} s"
                ) from None
            if self.transport is None or self.transport.is_closing():
                raise ChannelLostError(f"receiver closed channel {self.index}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Sender:
    """One job on the sending side: connect, stream, commit; reconnect on breaks.

    ``run()`` returns the job's stats once the receiver has committed the
    destination, and raises a DsamigError (with ``self.stats`` filled in)
    otherwise. ``cancel(reason)`` ends it from outside: the receiver is told
    why (and drops its partial file) before the channels close.
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
        self.core = SendJobCore(self.manifest)
        self.stats = JobStats(role="sender", total=source.size, page_size=options.page_size,
                              counters=self.core.counters)
        self.window_bytes = window_bytes(self.manifest, options.channels)
        self.engine: ZeroPageEngine | None = None
        # Where the engine comes from: a daemon passes its EnginePool, so its
        # jobs share the DSA work queues it opened once; else this job's own.
        self.engines = engines
        self.log = get_logger(job=str(options.job_id), name=options.name, role="sender")
        self.acks = False
        self.channels: list[SenderChannel] = []
        self._task: asyncio.Task[JobStats] | None = None
        self._new_session_state()

    def _new_session_state(self) -> None:
        """What one session knows: the live channels and its first failure."""
        self.channels = []
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def channel_failed(self, exc: DsamigError) -> None:
        """First failure of any channel ends the session (later ones, and closes
        after the job ended, are ignored)."""
        if not self._failure.done() and self.stats.finished is None:
            self._failure.set_exception(exc)
            self._failure.exception()  # mark retrieved: run() reports it, or a pump does

    async def run(self) -> JobStats:
        self._task = cast("asyncio.Task[JobStats]", asyncio.current_task())
        try:
            create = create_engine if self.engines is None else self.engines.create_engine
            self.engine, reason = create(
                self.options.engine, threads=self.options.engine_threads, dsa=self.options.dsa
            )
            self.log.info("engine selected", reason=reason)
            await self._run_sessions()
            self._finish("completed")
            # At debug: the daemon's "job finished" line (or the one-shot
            # command's summary) is the one canonical report of a job.
            self.log.debug("job completed")
            return self.stats
        except (DsamigError, OSError, EngineClosedError) as exc:
            # A page of the mapped image that cannot be read (EFAULT from the
            # native scan, the CRC or the kernel's send) means the file shrank.
            error = self.source.truncation_error()
            if error is None and not isinstance(exc, DsamigError):
                error = SourceError(f"cannot read image {self.source.path!r}: {exc}")
            self._finish("failed", str(error or exc))
            self.log.debug("job failed", error=str(error or exc))
            if error is not None:
                self._tell_receiver(str(error))  # nothing to resume from a shrunk image
                raise error from None
            raise
        except asyncio.CancelledError:
            self._finish("cancelled", "cancelled")
            self.log.debug("job cancelled")
            raise
        finally:
            await self._close_channels(final=True)
            if self.engine is not None:
                self.engine.close()

    def cancel(self, reason: str) -> None:
        """End the job: tell the receiver why (it records a cancellation and
        drops its partial file), then cancel :meth:`run`, which raises
        CancelledError and closes the channels."""
        self._tell_receiver(reason)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _tell_receiver(self, reason: str) -> None:
        """Send ERROR CANCELLED on every channel that may still carry one."""
        for channel in self.channels:
            channel.send_error(ErrorCode.CANCELLED, reason)

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
                    raise TransferError(str(exc)) from None
                self.log.warning("resume refused, restarting clean", reason=str(exc))
                # Just hang up: the receiver hands the destination to the new
                # job, which starts the partial file afresh.
                await self._close_channels()
                restarted_clean = True
                resume = False
                self.options.job_id = uuid.uuid4()
                self.core.restart_clean()
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
        self.core.new_session()
        self._new_session_state()
        await self._race(self._connect_all(resume))
        if self.core.counters.sessions == 1:
            self.stats.mark_setup_done()
        self.stats.status = "active"
        chunks = self.core.plan(self.source.data_ranges())
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
        self.stats.finish(status, error)

    async def _race(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` unless a channel fails first."""
        task = asyncio.ensure_future(awaitable)
        waiters: list[asyncio.Future[Any]] = [task, self._failure]
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The job is cancelled: so is what it waited for, and its result
            # is retrieved, so that nothing reports it as never retrieved.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
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
        if channel.state.authenticates:
            hello = await channel.authenticate(hello, opts.timeouts.handshake_s, where)
            channel.send_frame(hello)  # the preamble went with our CHALLENGE
        else:
            channel.send_frame(hello, preamble=True)
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
            self.core.verify_known()
        await asyncio.gather(
            *(self._connect(i, FEATURE_ACKS if self.acks else 0)
              for i in range(1, self.options.channels))
        )
        self.channels.sort(key=lambda c: c.index)
        self.stats.channels = [c.stats for c in self.channels]

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
        core = self.core
        manifest = self.manifest
        packet_bytes = manifest.page_size * manifest.packet_pages
        view = self.source.view
        # Mapped ranges already queued, with the channel's byte count at their end.
        unreleased: deque[tuple[int, int, int]] = deque()
        idle_s = self.options.timeouts.idle_s
        while True:
            self.source.check_size()  # a shrunk image fails here, before its pages are touched
            while len(pending) < PIPELINE_DEPTH:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                future = None
                if core.needs_scan(chunk):
                    start = chunk.first_packet * packet_bytes
                    stop = min((chunk.first_packet + chunk.packets) * packet_bytes,
                               manifest.image_size)
                    future = self.engine.submit(
                        view[start:stop], manifest.page_size, manifest.packet_pages
                    )
                pending.append((chunk, future))
            if not pending:
                break
            chunk, future = pending.popleft()
            if future is None:
                if chunk.hole:
                    self._send_zero_runs(channel, chunk.first_packet, chunk.packets)
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
        channel.send_frame(End(packets=channel.state.packets,
                               payload_bytes=channel.state.payload_bytes))
        if self.acks:
            # Done only when the receiver holds everything this channel sent.
            await channel.wait_acknowledged(idle_s)

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

    def _send_zero_runs(self, channel: SenderChannel, first: int, count: int) -> None:
        """Packets ``first .. first+count-1`` are all zero: ZERO_RANGE frames for
        those the receiver does not hold."""
        for run_first, run_count in self.core.zero_runs(first, count):
            channel.send_frame(ZeroRange(first_packet=run_first, packet_count=run_count))

    def _send_chunk(self, channel: SenderChannel, chunk: Chunk, detection: Detection) -> None:
        """Send a scanned chunk as the core lays it out."""
        core = self.core
        manifest = self.manifest
        page_size = manifest.page_size
        view = self.source.view
        for kind, first, what in core.chunk_items(chunk, detection.bitmaps):
            if kind == ZERO:
                self._send_zero_runs(channel, first, cast(int, what))
                continue
            bitmap = cast(bytes, what)
            start, span = manifest.range_bytes(first, 1)
            views, length, crc = impl.packet_payload(view[start : start + span], bitmap, page_size)
            if not core.packet(first, bitmap, length, crc):
                continue  # the receiver holds it (checked)
            # One write per packet, while its bytes are still in cache from the CRC.
            header = encode_packet_header(first, first * manifest.packet_pages,
                                          manifest.pages_in_packet(first), length, crc, bitmap)
            channel.send_packet(header, views, length)

    async def _commit(self) -> None:
        channel = self.channels[0]
        channel.send_frame(self.core.commit_request())
        timeout = self.options.timeouts.commit_s
        try:
            commit = await asyncio.wait_for(asyncio.shield(channel.commit), timeout)
        except TimeoutError:
            raise TransferError(f"receiver did not commit within {timeout:g} s") from None
        try:
            self.core.check_commit(commit)
        except RemoteProtocolError as exc:
            raise TransferError(exc.message) from None

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
    image: str | PageSource, options: SendOptions, *, engines: EngineSource | None = None,
    on_start: Callable[[Sender], None] | None = None,
) -> JobStats:
    """Run one job from its image to its end; the stats of the committed job.

    The one job runner of ``dsamig send`` and of the sender daemon.
    ``image`` is a path, or a PageSource already open (the daemon opens its
    sources at job-start); it is closed when the job ends.  ``engines`` is
    where the engine comes from (a daemon's EnginePool; else the job opens
    its own).  ``on_start(sender)`` runs once the job exists, before it
    connects: the caller hangs its progress bar or its job record on
    ``sender.stats`` there, and keeps ``sender`` to end the job with
    ``sender.cancel(reason)``, the one cancel path.  A DsamigError carries
    the job's stats as ``exc.stats``.
    """
    source = PageSource(image) if isinstance(image, str) else image
    try:
        sender = Sender(source, options, engines)
        if on_start is not None:
            on_start(sender)
        try:
            return await sender.run()
        except DsamigError as exc:
            exc.stats = sender.stats  # type: ignore[attr-defined]
            raise
    finally:
        source.close()
