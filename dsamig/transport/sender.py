"""The sending side of a job: N channels pumping packets from a PageSource.

Every decision of the job is its :class:`SendJobCore`'s (``dsamig.proto``):
which chunks to scan, which packets go out as PACKET or ZERO_RANGE or not at
all, the records, the counts, the resume checks, the COMMIT_REQUEST. This
module connects, moves the bytes, runs the timers and reconnects.

Per-page work never happens here.  Python handles *chunks* (a few packets, one
engine batch); the bytes move on one of two data paths:

* **native** (the default where the extension loaded): each channel's data
  phase runs on its own thread (``dsamig-send-N``, ``cython/src/pump.h``):
  the loop hands it each scanned chunk as the core laid it out, and the thread
  checksums every packet and writes header + mapped slices in one ``sendmsg``,
  with the GIL released; the loop records the CRCs it reports.
* **loop** (TLS channels, the pure-Python twin, or when asked): the loop
  computes each packet's CRC and zero-copy slices (``impl.packet_payload``)
  and writes them with one ``writelines``.

A job runs in *sessions*.  The first connects every channel and streams the
plan.  When a channel breaks (reset, timeout, a receiver that restarted),
every channel is closed and a new session reconnects, asking the receiver
which packets it already holds; the core checks those against the image and
skips them.  A sender started with ``resume`` does the same from its first
session.
"""

from __future__ import annotations

import asyncio
import errno
import os
import ssl
import time
import uuid
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar, cast

from dsamig.engine import Detection, EngineClosedError, ZeroPageEngine, create_engine
from dsamig.engine.dsa import DsaConfig
from dsamig.engine.pool import EngineSource
from dsamig.errors import ConfigError, DsamigError, NetworkError, SourceError, TransferError
from dsamig.live.dirty import UNKNOWN_FINGERPRINT, ContentDirtySource, DirtyPacket
from dsamig.live.pause import PausedWriter, QmpWriterControl, ShellWriterControl, WriterControl
from dsamig.logs import get_logger
from dsamig.native import impl
from dsamig.pages import PageSource
from dsamig.proto import (
    AUTH_NONCE_SIZE,
    CLOSED,
    FEATURE_ACKS,
    FEATURE_LIVE,
    FEATURE_REFRESH,
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
    PacketHeader,
    PayloadChunk,
    ProtocolError,
    RemoteProtocolError,
    ResumeState,
    Round,
    RoundDone,
    SenderState,
    SendJobCore,
    Sums,
    Welcome,
    ZeroRange,
    encode,
    encode_packet_header,
    packet_record,
    window_bytes,
)
from dsamig.proto.live import LivePolicy, RoundFigures
from dsamig.proto.refresh import SumsExchange, packet_fingerprint, packet_runs
from dsamig.proto.send_core import ZERO
from dsamig.runtime import bounded
from dsamig.settings import (
    DEFAULT_CHANNELS,
    DEFAULT_PAGE_SIZE,
    MAX_CHANNELS,
    RETRY_FOR_S,
    default_packet_size,
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
PUMP_DEPTH = 2  # chunks queued on a channel's native thread
#: Changed packets a live round copies, scans and sends at once.
LIVE_BATCH_PACKETS = 64
#: How long stopping a channel's native thread may take (it ends within one
#: system call, or at once when the socket is full).
PUMP_STOP_S = 5.0
WRITE_HIGH_WATER = 8 * 1024 * 1024

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview
#: What a native sending thread reports for a work item: its status (0 or an
#: errno value) and ``(payload_length, crc)`` of each packet it handled.
PumpResult = tuple[int, list[tuple[int, int]]]
#: Chunks on the engine, in plan order: the chunk, its scan (None: nothing to
#: scan) and where its bytes are, with the image offset of that buffer's
#: start (the mapping itself, or for a live job the copy that is sent).
Pending = deque[tuple[Chunk, "asyncio.Future[Detection] | None", "Buffer", int]]
# States in which a receiver that hangs up refused us rather than failed.
_HANDSHAKING = frozenset({SenderState.AWAIT_CHALLENGE, SenderState.AWAIT_WELCOME})


@dataclass
class LiveOptions:
    """How a live job iterates and pauses its writer (``--live``)."""

    max_downtime_s: float = 0.3
    max_rounds: int = 30
    pause_cmd: str | None = None  # with resume_cmd: pause the writer with commands
    resume_cmd: str | None = None
    qmp: str | None = None  # or a QEMU's QMP socket: stop / cont
    #: Leave the writer paused after the commit (the guest lives on at the
    #: destination); False: resume it (a consistent copy of a running guest).
    keep_paused: bool = True

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        if (self.qmp is None) == (self.pause_cmd is None):
            raise ConfigError("a live job pauses its writer with --qmp SOCKET or with "
                              "--pause-cmd CMD and --resume-cmd CMD (one of them)")
        if self.pause_cmd is not None and not self.resume_cmd:
            raise ConfigError("--pause-cmd needs --resume-cmd: a guest must never stay paused "
                              "after a failure")
        if not 0 < self.max_downtime_s <= 3600:
            raise ConfigError(f"max downtime must be 0..3600 s, not {self.max_downtime_s:g}")
        if not 1 <= self.max_rounds <= 1000:
            raise ConfigError(f"max rounds must be 1..1000, not {self.max_rounds}")

    def writer_control(self) -> WriterControl:
        """What pauses and resumes the writer."""
        if self.qmp is not None:
            return QmpWriterControl(self.qmp)
        assert self.pause_cmd is not None and self.resume_cmd is not None
        return ShellWriterControl(self.pause_cmd, self.resume_cmd)


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
    #: Bytes per packet; None: :func:`default_packet_size` for this job.
    packet_size: int | None = None
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
    #: Native sending threads where possible (None: unless DSAMIG_DATA_PATH=loop).
    native: bool | None = None
    live: LiveOptions | None = None  # move a running guest's memory in rounds
    #: Send only what differs from the receiver's committed copy of the image.
    refresh: bool = False

    @property
    def rounds(self) -> bool:
        """Whether the job sends in rounds: live, or a refresh (which sends its
        changes as a live job's rounds do)."""
        return self.live is not None or self.refresh

    @property
    def packet_bytes(self) -> int:
        """The job's packet size: as set, or the default for a job of its kind."""
        if self.packet_size is not None:
            return self.packet_size
        return default_packet_size(self.page_size, rounds=self.rounds)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise ConfigError(f"channels must be 1..{MAX_CHANNELS}, not {self.channels}")
        problem = geometry_problem(self.page_size, packet_size=self.packet_bytes)
        if problem is not None:
            raise ConfigError(str(problem))
        if self.retry_for_s < 0:
            raise ConfigError(f"retry time must not be negative, not {self.retry_for_s}")
        if self.live is not None:
            self.live.validate()


def native_sending(options: SendOptions) -> bool:
    """Whether this job's channels may use native sending threads."""
    if not hasattr(impl, "SendPump"):
        return False  # the pure-Python twin
    if options.native is not None:
        return options.native
    return os.environ.get("DSAMIG_DATA_PATH", "auto") != "loop"


#: A refresh reads and compares the image this much at a time.
REFRESH_CHUNK_BYTES = 32 * 1024 * 1024


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
        # The native thread writing this connection's data phase, if any.
        self.pump: Any = None
        self._pump_waiters: dict[int, asyncio.Future[PumpResult]] = {}
        self._pump_tokens = 0
        self._bytes_before_pump = 0

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
            elif isinstance(event, RoundDone):
                self.job.round_done(event.round)
            elif isinstance(event, Sums):
                self.job.sums_received(event)
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
            self.count_data_frame(0)

    def send_packet(self, header: bytes, views: list[memoryview], payload_bytes: int) -> None:
        """Queue one PACKET (encoded header, zero-copy payload slices): the hot path."""
        self.state.on_send_data(1, 1, payload_bytes)
        self._write([header, *views])
        self.count_data_frame(payload_bytes)

    def send_error(self, code: ErrorCode, message: str) -> None:
        """Report a failure to the receiver, if this channel still may. Every
        write so far was whole frames, so the ERROR lands on a frame boundary
        (a native thread is stopped first; if it had to abandon a frame half
        written, the connection can only be closed)."""
        abandoned = self.stop_pump()
        if (
            not abandoned
            and self.state.can_send_error
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.send_frame(Error(code=code, message=message))

    def count_data_frame(self, payload_bytes: int) -> None:
        """Count a PACKET or ZERO_RANGE for the window of unacknowledged data."""
        if self.job.acks:
            self.unacked.append((self.state.data_frames, payload_bytes))
            self.unacked_bytes += payload_bytes

    async def send_control(self, frame: Frame, idle_s: float) -> None:
        """Send END or ROUND after the data before it (through the thread, if
        one writes this channel); return once it is written."""
        if self.pump is None:
            self.send_frame(frame)
            return
        self.state.on_send(frame)
        done = self.pump_submit(memoryview(b""), 1, [(impl.TX_FRAME, encode(frame))])
        await self.job.pump_written(self, done, idle_s)

    async def send_frames(self, frames: list[tuple[PacketHeader, list[memoryview]]],
                          idle_s: float) -> None:
        """Send a live round's PACKETs (header, payload slices); return once
        written (or, on the loop, once the transport took them)."""
        ops: list[tuple[Any, ...]] = []
        for header, payload in frames:
            self.state.on_send(header)
            self.count_data_frame(header.payload_length)
            if self.pump is None:
                self._write([encode(header), *payload])
            else:
                ops.append((impl.TX_FRAME, encode(header) + b"".join(payload)))
        if ops:
            await self.job.pump_written(self, self.pump_submit(memoryview(b""), 1, ops), idle_s)
        elif self.drain.paused:
            await self.drain.wait(idle_s, f"channel {self.index}")

    async def authenticate(self, hello: Hello, timeout_s: float, where: str) -> Hello:
        """Run the CHALLENGE exchange of a pre-shared key; return ``hello`` signed.

        Sends the preamble and our CHALLENGE, waits for the receiver's (whose
        proof the state machine checks), and signs the HELLO with both
        nonces. A wrong key fails the channel with an AUTH error before the
        HELLO, and so the manifest and job name, ever leave this host.
        """
        self.send_frame(Challenge(os.urandom(AUTH_NONCE_SIZE)), preamble=True)
        try:
            await bounded(asyncio.shield(self.challenge), timeout_s)
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
                await bounded(self.acked.wait(), left)
            except TimeoutError:
                continue
            if self.transport is None or self.transport.is_closing():
                raise ChannelLostError(f"receiver closed channel {self.index}")

    async def wait_acknowledged(self, timeout_s: float) -> None:
        """Wait until the receiver holds everything this channel sent (bounded)."""
        while self.unacked:
            self.acked.clear()
            try:
                await bounded(self.acked.wait(), timeout_s)
            except TimeoutError:
                raise ChannelLostError(
                    f"channel {self.index}: no acknowledgement for {timeout_s:g} s"
                ) from None
            if self.transport is None or self.transport.is_closing():
                raise ChannelLostError(f"receiver closed channel {self.index}")

    def close(self) -> None:
        self.stop_pump()
        if self.transport is not None:
            self.transport.close()

    # native data path
    def go_native(self) -> bool:
        """Hand the data phase to a native thread; False where the channel stays
        on the loop (TLS, or bytes still queued in the transport)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        # Seam for kernel TLS: with the keys in the kernel (TLS_TX) a thread
        # could write a TLS connection too; Python's ssl module does not hand
        # them over, so TLS connections stay on the loop path.
        if transport.get_extra_info("ssl_object") or transport.get_write_buffer_size():
            return False
        fd = os.dup(transport.get_extra_info("socket").fileno())
        try:
            pump = impl.SendPump(fd, self.index)
        except BaseException:
            os.close(fd)
            raise
        self.pump = pump
        self._bytes_before_pump = self.stats.transferred
        asyncio.get_running_loop().add_reader(pump.fileno(), self._pump_events)
        pump.start()
        return True

    def pump_submit(self, image: Buffer, page_size: int,
                    ops: list[tuple[Any, ...]]) -> asyncio.Future[PumpResult]:
        """Queue a work item on the native thread: its ``(status, [(payload_length,
        crc), ...])`` once written."""
        self._pump_tokens += 1
        token = self._pump_tokens
        future: asyncio.Future[PumpResult] = asyncio.get_running_loop().create_future()
        self.pump.submit(token, image, page_size, ops)
        self._pump_waiters[token] = future
        return future

    def _pump_events(self) -> None:
        pump = self.pump
        if pump is None:
            return
        self._settle(pump.collect())

    def _settle(self, events: list[tuple[Any, ...]]) -> None:
        """Resolve the waiters of finished work items."""
        pump = self.pump
        if pump is not None:
            self.stats.transferred = self._bytes_before_pump + pump.stats().get("bytes", 0)
        for event in events:
            if event[0] != "done":
                continue
            _, token, status, results = event
            future = self._pump_waiters.pop(token, None)
            if future is not None and not future.done():
                future.set_result((status, results))

    def stop_pump(self) -> bool:
        """Stop the native thread and wait for it (bounded: it ends within one
        system call); True if it had to abandon a frame half written."""
        pump = self.pump
        if pump is None:
            return False
        asyncio.get_running_loop().remove_reader(pump.fileno())
        self._settle(pump.close(PUMP_STOP_S))
        self.pump = None
        for future in self._pump_waiters.values():
            if not future.done():
                future.set_result((errno.ECANCELED, []))
        self._pump_waiters.clear()
        final = pump.stats()
        self.stats.transferred = self._bytes_before_pump + final.get("bytes", 0)
        self.job.stats.add_thread_cpu(f"dsamig-send-{self.index}", final.get("cpu-s", 0.0))
        return bool(pump.abandoned)


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
            packet_pages=options.packet_bytes // options.page_size,
        )
        rounds = options.rounds
        self.core = SendJobCore(self.manifest, live=rounds)
        #: A job in rounds: its change detection (fingerprints of what was
        #: sent) and its iteration policy.
        self.dirty: ContentDirtySource | None = None
        self.policy: LivePolicy | None = None
        if rounds:
            self.dirty = ContentDirtySource(source.size, options.page_size,
                                            self.manifest.packet_pages)
            live = options.live
            self.policy = (LivePolicy(live.max_downtime_s, live.max_rounds) if live is not None
                           else LivePolicy())
        #: A refresh: the receiver's sums, once it granted REFRESH; page sums
        #: wait in the queue for the exchange to take them.
        self.exchange: SumsExchange | None = None
        self._sums_arrived = asyncio.Event()
        self._page_sums: deque[tuple[int, int, bytes, array[int]]] = deque()
        self._round0: RoundFigures | None = None
        self._refreshed = False
        self._round_waiters: dict[int, asyncio.Future[None]] = {}
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

    def channel_failed(self, exc: DsamigError | ImageChangedError) -> None:
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
                # Recovering: the receiver may still hold the old session's
                # channels for a moment ("busy"); that is worth waiting out.
                retry_until = time.monotonic() + self.options.retry_for_s
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
                # What the receiver holds of this job is worth keeping once a
                # session of it got going; a refusal at the door changes nothing.
                resume = resume or not isinstance(exc, ReceiverBusyError)
                continue

    async def _session(self, resume: bool) -> None:
        if self.exchange is not None and not self._refreshed:
            # Its sums and their answers went with the old connections.
            raise TransferError("the connection broke during the refresh's exchange of sums; "
                                "start the refresh again")
        self.core.new_session()
        self._new_session_state()
        await self._race(self._connect_all(resume))
        if self.core.counters.sessions == 1:
            self.stats.mark_setup_done()
        self.stats.status = "active"
        if self.exchange is not None and not self._refreshed:
            await self._race(self._refresh_exchange())
            await self._race(self._live_rounds())
            return
        # SEEK_DATA/SEEK_HOLE walks a tmpfs file's page cache, about 1 s per
        # 100 GiB: not on the loop, which serves other jobs and the control API.
        ranges = await self._race(asyncio.get_running_loop().run_in_executor(
            None, self.source.data_ranges))
        chunks = self.core.plan(ranges)
        pumps = [asyncio.ensure_future(self._pump(ch, chunks)) for ch in self.channels]
        try:
            await self._race(asyncio.gather(*pumps))
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        if self.core.live:
            await self._race(self._live_rounds())
            return
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
            _, channel = await bounded(
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
            await bounded(asyncio.shield(channel.welcome), opts.timeouts.handshake_s)
        except TimeoutError:
            raise ChannelLostError(
                f"receiver {where} did not answer HELLO in {opts.timeouts.handshake_s:g} s"
            ) from None
        return channel

    async def _connect_all(self, resume: bool) -> None:
        # Channel 0 first: it carries the manifest that makes the receiver
        # create the job (or resume it) before the other channels join.
        features = FEATURE_ACKS | (FEATURE_RESUME if resume else 0)
        if self.core.live:
            features |= FEATURE_LIVE
        # A refresh is asked for once: a later session resumes what it began.
        refresh = self.options.refresh and self.core.counters.sessions == 1 and not resume
        if refresh:
            features |= FEATURE_REFRESH
        first = await self._connect(0, features)
        welcome = first.welcome.result()
        self.acks = bool(welcome.features & FEATURE_ACKS)
        if self.core.live and not welcome.features & FEATURE_LIVE:
            raise TransferError("the receiver does not take live rounds (an older dsamig?)")
        if refresh:
            if welcome.features & FEATURE_REFRESH:
                self.exchange = SumsExchange(self.manifest)
                self.stats.extra["refresh"] = {"granted": True}
            else:
                self.log.info("the receiver holds no committed copy of this image to refresh: "
                              "sending all of it")
                self.stats.extra["refresh"] = {"granted": False}
        if welcome.features & FEATURE_RESUME:
            try:
                await bounded(asyncio.shield(first.resumed), self.options.timeouts.handshake_s)
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
        """Take chunks from the shared plan until it is empty; then END (a live
        job's rounds go on instead)."""
        pending: Pending = deque()
        try:
            if native_sending(self.options) and channel.go_native():
                self.stats.extra["data-path"] = "native"
                await self._pump_native(channel, chunks, pending)
            else:
                self.stats.extra.setdefault("data-path", "loop")
                await self._pump_chunks(channel, chunks, pending)
            if not self.core.live:
                await self._end_channel(channel)
        finally:
            # A pump that stops early (a failure, a new session) leaves batches
            # on the engine: nobody will read their results.
            for _, future, _, _ in pending:
                if future is not None:
                    future.cancel()

    async def _end_channel(self, channel: SenderChannel) -> None:
        """END on a channel, its thread stopped; then wait for its last ACKs."""
        idle_s = self.options.timeouts.idle_s
        await channel.send_control(
            End(packets=channel.state.packets, payload_bytes=channel.state.payload_bytes),
            idle_s)
        channel.stop_pump()  # the rest of the channel (ACKs, COMMIT) is the loop's
        if self.acks:
            # Done only when the receiver holds everything this channel sent.
            await channel.wait_acknowledged(idle_s)

    async def _pump_chunks(
        self,
        channel: SenderChannel,
        chunks: Iterator[Chunk],
        pending: Pending,
    ) -> None:
        manifest = self.manifest
        packet_bytes = manifest.page_size * manifest.packet_pages
        # Mapped ranges already queued, with the channel's byte count at their end.
        unreleased: deque[tuple[int, int, int]] = deque()
        idle_s = self.options.timeouts.idle_s
        while True:
            self.source.check_size()  # a shrunk image fails here, before its pages are touched
            self._next_chunk(chunks, pending)
            if not pending:
                break
            chunk, future, data, base = pending.popleft()
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
                self._send_chunk(channel, chunk, detection, data, base)
                start = chunk.first_packet * packet_bytes
                unreleased.append(
                    (start, start + chunk.packets * packet_bytes, channel.stats.transferred)
                )
            if channel.drain.paused:
                await channel.drain.wait(idle_s, f"channel {channel.index}")
            if channel.unacked_bytes > self.window_bytes:
                await channel.wait_window(idle_s)
            self._release_sent(channel, unreleased)

    def _next_chunk(self, chunks: Iterator[Chunk], pending: Pending) -> None:
        """Keep PIPELINE_DEPTH chunks on the engine (those that need scanning)."""
        assert self.engine is not None
        manifest = self.manifest
        packet_bytes = manifest.page_size * manifest.packet_pages
        while len(pending) < PIPELINE_DEPTH:
            chunk = next(chunks, None)
            if chunk is None:
                return
            future = None
            data: Buffer = self.source.view
            base = 0
            if self.core.needs_scan(chunk):
                start = chunk.first_packet * packet_bytes
                stop = min((chunk.first_packet + chunk.packets) * packet_bytes,
                           manifest.image_size)
                data = self.source.view[start:stop]
                base = start
                if self.dirty is not None:
                    # A live image changes under us: scan and send a copy, and
                    # remember exactly what was sent (fingerprints, page CRCs).
                    copy = bytearray(stop - start)
                    self.dirty.copy_out(copy, data, chunk.first_packet * manifest.packet_pages)
                    self.core.live_pages(chunk.first_packet * manifest.packet_pages, copy)
                    self.source.release(start, stop)
                    data = copy
                future = self.engine.submit(memoryview(data), manifest.page_size,
                                            manifest.packet_pages)
            pending.append((chunk, future, data, base))

    async def _pump_native(
        self,
        channel: SenderChannel,
        chunks: Iterator[Chunk],
        pending: Pending,
    ) -> None:
        """The data phase of a channel on its native thread: the loop lays each
        chunk out (the core decides), the thread checksums and writes it."""
        manifest = self.manifest
        packet_bytes = manifest.page_size * manifest.packet_pages
        idle_s = self.options.timeouts.idle_s
        # Work items on the thread: what to record when each comes back.
        queued: deque[tuple[asyncio.Future[PumpResult], list[tuple[int, bytes, bool, int]],
                            tuple[int, int] | None]] = deque()
        while True:
            self.source.check_size()  # a shrunk image fails here, before its pages are touched
            self._next_chunk(chunks, pending)
            if pending:
                chunk, future, data, base = pending.popleft()
                ops: list[tuple[Any, ...]] = []
                packets: list[tuple[int, bytes, bool, int]] = []
                span: tuple[int, int] | None = None
                if future is None:
                    if chunk.hole:
                        self._zero_ops(channel, chunk.first_packet, chunk.packets, ops)
                else:
                    detection = await future
                    if self.options.pacer is not None:
                        span_bytes = manifest.range_bytes(chunk.first_packet, chunk.packets)[1]
                        await self.options.pacer.acquire(
                            max(span_bytes - detection.zero_pages * manifest.page_size, 0)
                        )
                    self._chunk_ops(channel, chunk, detection, ops, packets, base)
                    start = chunk.first_packet * packet_bytes
                    span = (start, start + chunk.packets * packet_bytes)
                if ops:
                    done = channel.pump_submit(data, manifest.page_size, ops)
                    # Recorded as soon as it is written (progress stays live
                    # while this coroutine waits for the pacer or the window).
                    done.add_done_callback(partial(self._pump_recorded, packets))
                    queued.append((done, packets, span))
                elif span is not None:
                    self.source.release(*span)
            if not pending and not queued:
                break
            while queued and (len(queued) >= PUMP_DEPTH or not pending):
                done, packets, span = queued.popleft()
                await self.pump_written(channel, done, idle_s)
                if span is not None:
                    self.source.release(*span)  # written: the page cache keeps the data
            if channel.unacked_bytes > self.window_bytes:
                await channel.wait_window(idle_s)

    def _zero_ops(self, channel: SenderChannel, first: int, count: int,
                  ops: list[tuple[Any, ...]]) -> None:
        """ZERO_RANGE frames for all-zero packets the receiver does not hold."""
        for run_first, run_count in self.core.zero_runs(first, count):
            frame = ZeroRange(first_packet=run_first, packet_count=run_count)
            channel.state.on_send(frame)
            channel.count_data_frame(0)
            ops.append((impl.TX_FRAME, encode(frame)))

    def _chunk_ops(self, channel: SenderChannel, chunk: Chunk, detection: Detection,
                   ops: list[tuple[Any, ...]], packets: list[tuple[int, bytes, bool, int]],
                   base: int) -> None:
        """A scanned chunk as the core lays it out, for the native thread: frames
        counted now (their payload lengths follow from the bitmaps)."""
        core = self.core
        manifest = self.manifest
        for kind, first, what in core.chunk_items(chunk, detection.bitmaps):
            if kind == ZERO:
                self._zero_ops(channel, first, cast(int, what), ops)
                continue
            bitmap = cast(bytes, what)
            offset, span = manifest.range_bytes(first, 1)
            length = manifest.payload_length(first, bitmap)
            send = not core.skip[first]
            if send:
                channel.state.on_send_data(1, 1, length)
                channel.count_data_frame(length)
            ops.append((impl.TX_PACKET if send else impl.TX_VERIFY, first,
                        first * manifest.packet_pages, manifest.pages_in_packet(first),
                        offset - base, span, bitmap))
            packets.append((first, bitmap, send, length))

    async def pump_written(
        self, channel: SenderChannel, done: asyncio.Future[PumpResult], idle_s: float
    ) -> None:
        """Wait (bounded) for a work item to be written; raise what stopped it."""
        try:
            status, _ = await bounded(asyncio.shield(done), idle_s)
        except TimeoutError:
            raise NetworkError(
                f"channel {channel.index}: receiver stopped reading for {idle_s:g} s"
            ) from None
        if status == errno.EFAULT:
            self.source.check_size()  # the image shrank under the mapping
            raise SourceError(f"cannot read image {self.source.path!r}: bad address")
        if status:
            raise ChannelLostError(
                f"receiver closed channel {channel.index}: {os.strerror(status)}")

    def _pump_recorded(
        self, packets: list[tuple[int, bytes, bool, int]], done: asyncio.Future[PumpResult]
    ) -> None:
        """A work item came back: record what the thread measured of each packet
        (the core checks it against what it knew); a problem ends the session."""
        if done.cancelled():
            return
        status, results = done.result()
        if status:
            return  # _pump_done raises it
        try:
            for (number, bitmap, sent, length), (measured, crc) in zip(packets, results,
                                                                       strict=True):
                if measured != length or self.core.packet(number, bitmap, measured, crc) != sent:
                    raise TransferError(
                        f"packet {number}: the native sender and the job core disagree")
        except (DsamigError, ImageChangedError) as exc:
            self.channel_failed(exc)

    # --- live rounds ---------------------------------------------------------------------

    def round_done(self, number: int) -> None:
        """The receiver applied all of round ``number`` (ROUND_DONE)."""
        waiter = self._round_waiters.get(number)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- refresh -----------------------------------------------------------------------

    def sums_received(self, frame: Sums) -> None:
        """SUMS from the receiver (refresh): checked, then kept for the exchange."""
        if self.exchange is None:
            raise RemoteProtocolError("SUMS in a job that is not a refresh")
        if frame.pages:
            zero, fingerprints = self.exchange.page_sums(frame)
            self._page_sums.append((frame.first_packet, frame.packet_count, zero, fingerprints))
        else:
            self.exchange.packet_sums(frame)
        self._sums_arrived.set()

    async def _await_sums(self, ready: Callable[[], bool], what: str) -> None:
        """Wait (bounded by the idle timeout between frames) until ``ready()``."""
        idle_s = self.options.timeouts.idle_s
        while not ready():
            self._sums_arrived.clear()
            try:
                await bounded(self._sums_arrived.wait(), idle_s)
            except TimeoutError:
                raise ChannelLostError(f"the receiver sent no {what} for {idle_s:g} s") from None

    async def _refresh_exchange(self) -> None:
        """Round 0 of a refresh: compare our packets with the receiver's packet
        sums as they arrive, ask for the page sums of those that differ, and
        set what we know of the receiver's copy from them. The pages whose
        fingerprint differs are left unknown: the next round sends them."""
        assert self.exchange is not None
        exchange = self.exchange
        manifest = self.manifest
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        await self._await_sums(lambda: exchange.seed is not None, "sums")
        assert exchange.seed is not None
        seed = exchange.seed
        self.dirty = ContentDirtySource(
            manifest.image_size, manifest.page_size, manifest.packet_pages, seed=seed,
            receiver_has_zeros=False)
        packet_bytes = manifest.packet_pages * manifest.page_size
        chunk = max(1, REFRESH_CHUNK_BYTES // packet_bytes)
        bounce = bytearray(min(chunk * packet_bytes, manifest.image_size))
        matched = differing = 0
        scan_s = 0.0
        for first in range(0, manifest.packet_count, chunk):
            count = min(chunk, manifest.packet_count - first)
            end = first + count
            await self._await_sums(partial(self._summed_to, end), "packet sums")
            offset, span = manifest.range_bytes(first, count)
            scanned = time.monotonic()
            ours = await loop.run_in_executor(
                None, self._refresh_scan, first, count, memoryview(bounce)[:span], seed)
            scan_s += time.monotonic() - scanned
            self.source.release(offset, offset + span)
            differ: list[int] = []
            for n, bitmap, crc, fingerprint in ours:
                record = exchange.records[n]
                if fingerprint == exchange.fingerprints[n] and packet_record(bitmap,
                                                                             crc) == record:
                    self.core.refresh_packet(n, record, bitmap)
                    matched += 1
                else:
                    differ.append(n)
            differing += len(differ)
            for request in packet_runs(manifest, differ):
                exchange.asked(request)
                self.channels[0].send_frame(request)
        changed = 0
        while exchange.waiting or self._page_sums:
            await self._await_sums(lambda: bool(self._page_sums), "page sums")
            first, count, zero_bitmap, theirs = self._page_sums.popleft()
            changed += self._take_page_sums(first, count, zero_bitmap, theirs)
        self._refreshed = True
        elapsed = time.monotonic() - started
        self._round0 = RoundFigures(0, 0, scan_s, 0, 0, elapsed)
        self.stats.extra["refresh"] = {
            "granted": True, "packets-matched": matched, "packets-compared-by-page": differing,
            "pages-changed": changed, "sums-bytes": exchange.sums_bytes,
            "time-ms": round(elapsed * 1000, 3)}
        self.log.info("refresh: compared with the receiver's copy", matched=matched,
                      differing=differing, pages_changed=changed)

    def _summed_to(self, end: int) -> bool:
        assert self.exchange is not None
        return self.exchange.received >= end

    def _refresh_scan(self, first: int, count: int, bounce: memoryview, seed: bytes
                      ) -> list[tuple[int, bytes, int, int]]:
        """Copy packets of the image (a thread) and note of each page its
        fingerprint and CRC; per packet, its ``(number, zero_bitmap,
        payload_crc, fingerprint)``."""
        assert self.dirty is not None
        manifest = self.manifest
        page_size = manifest.page_size
        offset, span = manifest.range_bytes(first, count)
        first_page = first * manifest.packet_pages
        self.dirty.copy_out(bounce, self.source.view[offset : offset + span], first_page)
        self.core.live_pages(first_page, bounce)
        raw = memoryview(self.dirty.fingerprints).cast("B")
        out: list[tuple[int, bytes, int, int]] = []
        page = first_page
        for n in range(first, first + count):
            start, length = manifest.range_bytes(n, 1)
            piece = bounce[start - offset : start - offset + length]
            bitmap, _ = impl.zero_bitmap(piece, page_size)
            _, _, crc = impl.packet_payload(piece, bitmap, page_size)
            pages = manifest.pages_in_packet(n)
            out.append((n, bitmap, crc,
                        packet_fingerprint(raw[8 * page : 8 * (page + pages)], seed)))
            page += pages
        return out

    def _take_page_sums(self, first: int, count: int, zero_bitmap: bytes,
                        theirs: array[int]) -> int:
        """The receiver's page sums of packets that differ: pages whose
        fingerprint is not ours become unknown (sent next round); each packet
        is held as the receiver has it. Returns the pages that differ."""
        assert self.dirty is not None and self.exchange is not None
        manifest = self.manifest
        fingerprints = self.dirty.fingerprints
        first_page = first * manifest.packet_pages
        changed = 0
        for i, theirs_i in enumerate(theirs):
            if fingerprints[first_page + i] != theirs_i:
                fingerprints[first_page + i] = UNKNOWN_FINGERPRINT
                changed += 1
        bits = int.from_bytes(zero_bitmap, "little")
        at = 0
        for n in range(first, first + count):
            pages = manifest.pages_in_packet(n)
            mine = (bits >> at) & ((1 << pages) - 1)
            self.core.refresh_packet(n, self.exchange.records[n],
                                     mine.to_bytes((pages + 7) >> 3, "little"))
            at += pages
        return changed

    async def _live_rounds(self) -> None:
        """Round 0 went out; iterate on the changes until the policy says the
        final round fits (or must run anyway), then pause the writer, send the
        final round, END and commit. A failure after the pause resumes it."""
        assert self.dirty is not None and self.policy is not None
        dirty, policy, live = self.dirty, self.policy, self.options.live
        manifest = self.manifest
        for packet in self.core.take_stale():  # held by the receiver in an older version
            dirty.forget(packet * manifest.packet_pages, manifest.pages_in_packet(packet))
        # Round 0, or after a reconnect the catch-up of what the receiver
        # lacked: it must be applied before any change of the next round.
        round_number = len(policy.rounds)
        await self._round_barrier(round_number)
        if round_number == 0:
            counters = self.core.counters
            policy.round_sent(self._round0 or RoundFigures(
                0, counters.normal_pages, 0.0, counters.normal_pages, counters.normal_bytes,
                time.monotonic() - self.stats.started))
        round_number += 1
        last_scan = time.monotonic()
        if live is None:
            # A refresh of an image nobody writes: one round of what differs.
            await self._final_round(round_number)
            return
        while True:
            found, scan_s = await self._scan()
            pages = sum(p.dirty_pages for p in found)
            decision = policy.decide(round_number, pages, pages * manifest.page_size, scan_s,
                                     time.monotonic() - last_scan)
            last_scan = time.monotonic()
            self._live_figures(round_number)
            if decision.final:
                break
            started = time.monotonic()
            sent = await self._send_round(found)
            await self._round_barrier(round_number)
            policy.round_sent(RoundFigures(round_number, pages, scan_s, pages, sent,
                                           time.monotonic() - started))
            round_number += 1
        self.log.info("pausing the writer", round=round_number, reason=decision.reason,
                      expected_downtime_ms=round(decision.expected_downtime_s * 1000))
        paused = PausedWriter(live.writer_control(), keep_paused=live.keep_paused)
        async with paused:
            await self._final_round(round_number)
            self.stats.extra["downtime"] = round(paused.downtime_s * 1000)

    async def _final_round(self, round_number: int) -> None:
        """Scan, send what changed, END on every channel, commit."""
        assert self.policy is not None
        found, scan_s = await self._scan()
        started = time.monotonic()
        pages = sum(p.dirty_pages for p in found)
        sent = await self._send_round(found)
        self.stats.status = "completing"
        await asyncio.gather(*(self._end_channel(ch) for ch in self.channels))
        await self._commit()
        self.policy.round_sent(RoundFigures(round_number, pages, scan_s, pages, sent,
                                            time.monotonic() - started))
        self._live_figures(round_number)

    def _live_figures(self, round_number: int) -> None:
        assert self.policy is not None
        self.stats.extra.update(self.policy.to_dict())
        self.stats.extra["round"] = round_number

    async def _scan(self) -> tuple[list[DirtyPacket], float]:
        """Fingerprint the whole image again (off the loop: the native scan
        releases the GIL); the packets with changed pages, and the time taken."""
        assert self.dirty is not None
        dirty, view = self.dirty, self.source.view
        dirty.begin_round()
        started = time.monotonic()
        found = await asyncio.get_running_loop().run_in_executor(
            None, lambda: list(dirty.dirty_packets(view)))
        return found, time.monotonic() - started

    async def _send_round(self, found: list[DirtyPacket]) -> int:
        """Send what changed: each packet's changed pages as a PAGE_LIST, spread
        over the channels, in batches that one engine call scans. Returns the
        payload bytes sent."""
        assert self.dirty is not None and self.engine is not None
        manifest = self.manifest
        page_size = manifest.page_size
        view = self.source.view
        idle_s = self.options.timeouts.idle_s
        sent = 0
        for start in range(0, len(found), LIVE_BATCH_PACKETS):
            batch = found[start : start + LIVE_BATCH_PACKETS]
            pages = sum(p.dirty_pages for p in batch)
            copy = memoryview(bytearray(pages * page_size))
            at = 0
            for packet in batch:
                for first, count in packet.runs():
                    begin = first * page_size
                    end = min(begin + count * page_size, manifest.image_size)
                    self.dirty.copy_out(copy[at : at + end - begin], view[begin:end], first)
                    at += end - begin
            try:
                detection = await self.engine.submit(copy[:at], page_size, pages)
            except BaseException:
                # Copied (so fingerprinted as sent) but never given to the
                # core: nothing else would tell that the receiver lacks them.
                for packet in batch:
                    self.dirty.forget(packet.first_page, manifest.pages_in_packet(
                        packet.first_page // manifest.packet_pages))
                raise
            zero = int.from_bytes(detection.bitmaps, "little")
            per_channel: dict[int, list[tuple[PacketHeader, list[memoryview]]]] = {}
            at = 0
            k = 0
            for packet in batch:
                number = packet.first_page // manifest.packet_pages
                length = sum(min(count * page_size, manifest.image_size - first * page_size)
                             for first, count in packet.runs())
                bits = (zero >> k) & ((1 << packet.dirty_pages) - 1)
                header, payload = self.core.page_list(
                    number, packet.bitmap, copy[at : at + length],
                    bits.to_bytes((packet.dirty_pages + 7) >> 3, "little"))
                per_channel.setdefault(number % len(self.channels), []).append((header, payload))
                sent += header.payload_length
                at += length
                k += packet.dirty_pages
            if self.options.pacer is not None:
                await self.options.pacer.acquire(sum(
                    h.payload_length for frames in per_channel.values() for h, _ in frames))
            await asyncio.gather(*(self.channels[i].send_frames(frames, idle_s)
                                   for i, frames in per_channel.items()))
            for channel in self.channels:
                if channel.unacked_bytes > self.window_bytes:
                    await channel.wait_window(idle_s)
        return sent

    async def _round_barrier(self, number: int) -> None:
        """ROUND on every channel, then wait (bounded) for the receiver's
        ROUND_DONE: no change of the next round may overtake this one's."""
        idle_s = self.options.timeouts.idle_s
        waiter = asyncio.get_running_loop().create_future()
        self._round_waiters[number] = waiter
        try:
            await asyncio.gather(*(
                ch.send_control(Round(number, ch.state.packets, ch.state.payload_bytes), idle_s)
                for ch in self.channels))
            try:
                await bounded(asyncio.shield(waiter), idle_s)
            except TimeoutError:
                raise ChannelLostError(
                    f"the receiver did not finish round {number} in {idle_s:g} s") from None
        finally:
            self._round_waiters.pop(number, None)

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

    def _send_chunk(self, channel: SenderChannel, chunk: Chunk, detection: Detection,
                    data: Buffer, base: int) -> None:
        """Send a scanned chunk (its bytes in ``data``, from image offset ``base``)
        as the core lays it out."""
        core = self.core
        manifest = self.manifest
        page_size = manifest.page_size
        view = memoryview(data)
        for kind, first, what in core.chunk_items(chunk, detection.bitmaps):
            if kind == ZERO:
                self._send_zero_runs(channel, first, cast(int, what))
                continue
            bitmap = cast(bytes, what)
            start, span = manifest.range_bytes(first, 1)
            start -= base
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
            commit = await bounded(asyncio.shield(channel.commit), timeout)
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
