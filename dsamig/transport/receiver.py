"""The receiving side: a listener that routes channels to jobs, and the jobs.

Payload bytes go from the socket straight into a per-channel buffer sized for
one packet (``recv_into`` through ``asyncio.BufferedProtocol``), are verified
against their CRC32C there and written to the sink with one ``pwrite`` per run
of normal pages.  Headers are read with exact-size reads so payload bytes
never pass through the decoder's buffer.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Callable
from typing import cast

from dsamig.errors import DsamigError, NetworkError, SinkError, TransferError
from dsamig.logs import get_logger
from dsamig.native import impl
from dsamig.pages import PageSink
from dsamig.proto import (
    CLOSED,
    FRAME_HEADER_SIZE,
    MAX_BODY,
    NEED_DATA,
    Commit,
    CommitRequest,
    End,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    Manifest,
    PacketHeader,
    PacketTracker,
    PayloadChunk,
    ProtocolError,
    ReceiverChannelState,
    RemoteProtocolError,
    Welcome,
    ZeroRange,
    encode,
)
from dsamig.stats import ChannelStats, JobStats
from dsamig.transport.common import Timeouts

SinkFactory = Callable[[Hello], PageSink]


class JobFailedError(TransferError):
    """A receiving job failed; ``code`` is what the sender is told."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


class ReceiverJob:
    """One job being received: its sink, its channels and its packet tracker."""

    def __init__(self, hello: Hello, sink: PageSink, server: ReceiverServer) -> None:
        assert hello.manifest is not None
        self.job_id = hello.job_id
        self.name = hello.name
        self.manifest: Manifest = hello.manifest
        self.channel_count = hello.channel_count
        self.sink = sink
        self.server = server
        self.tracker = PacketTracker(self.manifest)
        self.channels: dict[int, ReceiverChannel] = {}
        self.ended: set[int] = set()
        self.all_ended = asyncio.Event()
        self.stats = JobStats(
            role="receiver", total=self.manifest.image_size, page_size=self.manifest.page_size
        )
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[JobStats] = loop.create_future()
        self.last_progress = time.monotonic()
        self.log = get_logger(job=str(self.job_id), name=self.name, role="receiver")
        self._watchdog = asyncio.ensure_future(self._watch())
        self._commit_task: asyncio.Task[None] | None = None

    @property
    def finished(self) -> bool:
        return self.done.done()

    def attach(self, channel: ReceiverChannel, hello: Hello) -> None:
        if hello.channel_count != self.channel_count:
            raise JobFailedError(
                f"channel {hello.channel_index} says {hello.channel_count} channels, "
                f"channel 0 said {self.channel_count}",
                ErrorCode.REJECTED,
            )
        if hello.channel_index in self.channels:
            raise JobFailedError(
                f"channel index {hello.channel_index} is already connected", ErrorCode.REJECTED
            )
        self.channels[hello.channel_index] = channel
        self.stats.channels.append(channel.stats)
        self.stats.channels.sort(key=lambda c: c.index)
        if len(self.channels) == self.channel_count:
            self.stats.mark_setup_done()
            self.stats.status = "active"

    def packet_received(self, header: PacketHeader, payload: memoryview) -> None:
        """Verify and store one packet whose payload is complete in ``payload``."""
        crc = impl.crc32c(payload)
        if crc != header.payload_crc:
            raise JobFailedError(
                f"packet {header.packet_number}: payload CRC32C {crc:#010x} "
                f"!= {header.payload_crc:#010x} (corrupted in transit)",
                ErrorCode.INTEGRITY,
            )
        manifest = self.manifest
        offset, span = manifest.range_bytes(header.packet_number, 1)
        try:
            self.sink.write_packet(payload, header.zero_bitmap, manifest.page_size, offset, span)
        except SinkError as exc:
            raise JobFailedError(str(exc), ErrorCode.IO) from None
        self.tracker.packet_done(header, crc)
        zero = int.from_bytes(header.zero_bitmap, "little").bit_count()
        self.stats.duplicate += zero
        self.stats.normal += header.page_count - zero
        self.stats.normal_bytes += header.payload_length
        self.stats.done_bytes += span
        self.last_progress = time.monotonic()

    def zero_range_received(self, frame: ZeroRange) -> None:
        self.tracker.check_zero_range(frame)
        self.tracker.zero_range_done(frame)
        pages = self.manifest.range_pages(frame.first_packet, frame.packet_count)
        _, span = self.manifest.range_bytes(frame.first_packet, frame.packet_count)
        self.stats.duplicate += pages
        self.stats.done_bytes += span
        self.last_progress = time.monotonic()

    def channel_ended(self, index: int) -> None:
        self.ended.add(index)
        self.last_progress = time.monotonic()
        if len(self.ended) == self.channel_count:
            self.all_ended.set()

    def commit_requested(self, request: CommitRequest) -> None:
        if self._commit_task is None:
            self._commit_task = asyncio.ensure_future(self._commit(request))

    async def _commit(self, request: CommitRequest) -> None:
        timeouts = self.server.timeouts
        try:
            try:
                await asyncio.wait_for(self.all_ended.wait(), timeouts.idle_s)
            except TimeoutError:
                missing = sorted(set(range(self.channel_count)) - self.ended)
                raise JobFailedError(f"channels {missing} never sent END") from None
            self.stats.status = "completing"
            try:
                digest = self.tracker.check_commit_request(request)
            except RemoteProtocolError as exc:
                raise JobFailedError(str(exc), exc.code) from None
            loop = asyncio.get_running_loop()
            try:
                await asyncio.wait_for(
                    loop.run_in_executor(None, self.sink.commit), timeouts.commit_s
                )
            except SinkError as exc:
                raise JobFailedError(str(exc), ErrorCode.IO) from None
            except TimeoutError:
                raise JobFailedError(
                    f"commit of {self.sink.path!r} took over {timeouts.commit_s:g} s", ErrorCode.IO
                ) from None
            channel = self.channels[0]
            channel.send_frame(Commit(digest=digest))
            self.stats.finish("completed")
            self.log.info("job completed", path=self.sink.path, **self.stats.to_dict())
            self._close_channels()
            if not self.done.done():
                self.done.set_result(self.stats)
            self.server.job_finished(self)
        except JobFailedError as exc:
            self.fail(exc)

    def fail(self, exc: DsamigError) -> None:
        """Fail the job: tell the sender, close every channel, delete the partial file."""
        if self.done.done():
            return
        code = exc.code if isinstance(exc, JobFailedError) else ErrorCode.INTERNAL
        status = "cancelled" if code == ErrorCode.CANCELLED else "failed"
        self.sink.abort()
        self.stats.finish(status, str(exc))
        self.log.warning("job failed", error=str(exc), **self.stats.to_dict())
        self._watchdog.cancel()
        for channel in list(self.channels.values()):
            channel.send_error(code, str(exc))
            channel.close_after_error()
        self.done.set_exception(exc)
        self.done.exception()  # retrieved: whoever awaits it still gets it
        self.server.job_finished(self)

    def _close_channels(self) -> None:
        self._watchdog.cancel()
        for channel in list(self.channels.values()):
            channel.close()

    async def _watch(self) -> None:
        """Fail the job when no channel made progress for ``idle_s``."""
        idle_s = self.server.timeouts.idle_s
        while not self.done.done():
            await asyncio.sleep(min(1.0, idle_s / 4))
            if self._commit_task is not None:
                continue  # the commit has its own bounds
            if time.monotonic() - self.last_progress > idle_s:
                self.fail(JobFailedError(f"no data from the sender for {idle_s:g} s"))


class ReceiverChannel(asyncio.BufferedProtocol):
    """One TCP connection on the receiver: frames in, payload straight to a buffer."""

    def __init__(self, server: ReceiverServer) -> None:
        self.server = server
        self.decoder = FrameDecoder(expect_preamble=True)
        self.state = ReceiverChannelState()
        self.header = memoryview(bytearray(FRAME_HEADER_SIZE + MAX_BODY))
        self.payload: memoryview | None = None
        self.current: PacketHeader | None = None
        self.filled = 0
        self.job: ReceiverJob | None = None
        self.index = -1
        self.stats = ChannelStats(-1)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.discarding = False  # after an ERROR: read and drop until the peer closes

    # asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.channel_opened(self)

    def _in_payload(self) -> bool:
        """Whether the next bytes are payload that goes straight to our buffer."""
        decoder = self.decoder
        return self.current is not None and decoder.payload_remaining > 0 and not decoder.buffered

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.discarding:
            return self.header
        if self._in_payload():
            assert self.payload is not None and self.current is not None
            return self.payload[self.filled : self.current.payload_length]
        wanted = self.decoder.header_bytes_wanted()
        return self.header[: wanted if wanted > 0 else FRAME_HEADER_SIZE]

    def buffer_updated(self, nbytes: int) -> None:
        if self.discarding:
            return
        self.stats.transferred += nbytes
        try:
            if self._in_payload():
                self.filled += nbytes
                self.decoder.payload_received(nbytes)
                if not self.decoder.payload_remaining:
                    self._packet_complete()
                return
            self.decoder.receive_data(self.header[:nbytes])
            self._process()
        except (ProtocolError, DsamigError) as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        if self.discarding:
            return None  # the peer read our ERROR and hung up: close now
        try:
            self.decoder.receive_data(b"")
            self._process()
        except (ProtocolError, DsamigError) as exc:
            self._fail(exc)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.channel_closed(self)
        job = self.job
        if job is not None and not job.finished:
            reason = f" ({exc})" if exc else ""
            job.fail(JobFailedError(f"sender closed channel {self.index} mid-transfer{reason}"))

    # frames
    def _process(self) -> None:
        while True:
            event = self.decoder.next_event()
            if event is NEED_DATA or event is CLOSED:
                return
            if isinstance(event, PayloadChunk):
                self._payload_chunk(event.data)
                continue
            self.state.on_frame(event)
            if isinstance(event, PacketHeader):
                self._packet_header(event)
            elif isinstance(event, ZeroRange):
                self._job().zero_range_received(event)
                self.stats.packets += event.packet_count
            elif isinstance(event, Hello):
                self._hello(event)
            elif isinstance(event, End):
                self._job().channel_ended(self.index)
            elif isinstance(event, CommitRequest):
                self._job().commit_requested(event)
            elif isinstance(event, Error):
                code = getattr(event.code, "name", str(event.code))
                raise JobFailedError(f"sender failed the job ({code}): {event.message}",
                                     ErrorCode.CANCELLED)

    def _job(self) -> ReceiverJob:
        assert self.job is not None  # the state machine allows data only after HELLO
        return self.job

    def _hello(self, hello: Hello) -> None:
        self.index = hello.channel_index
        self.stats.index = hello.channel_index
        job = self.server.job_for(hello)
        self.job = job
        job.attach(self, hello)
        manifest = job.manifest
        self.payload = memoryview(bytearray(manifest.packet_pages * manifest.page_size))
        self.send_frame(Welcome(job_id=hello.job_id))

    def _packet_header(self, header: PacketHeader) -> None:
        job = self._job()
        job.tracker.check_packet(header)
        self.current = header
        self.filled = 0
        if header.payload_length == 0:
            self._packet_complete()

    def _payload_chunk(self, data: bytes) -> None:
        assert self.current is not None and self.payload is not None
        self.payload[self.filled : self.filled + len(data)] = data
        self.filled += len(data)
        if self.filled == self.current.payload_length:
            self._packet_complete()

    def _packet_complete(self) -> None:
        header = self.current
        assert header is not None and self.payload is not None
        self.current = None
        self._job().packet_received(header, self.payload[: header.payload_length])
        self.stats.packets += 1
        self.stats.payload_bytes += header.payload_length

    # output
    def send_frame(self, frame: Frame) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if not isinstance(frame, Error):
                self.state.on_send(frame)
            self.transport.write(encode(frame))

    def send_error(self, code: ErrorCode, message: str) -> None:
        self.send_frame(Error(code=code, message=message))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def close_after_error(self, linger_s: float = 2.0) -> None:
        """Close so that the ERROR we sent reaches the peer.

        Closing with unread bytes in the socket makes the kernel send a reset,
        which can destroy our ERROR frame before the peer reads it.  So: send
        FIN, drop whatever still arrives, and close when the peer closes or
        after ``linger_s``, whichever comes first.
        """
        transport = self.transport
        if transport is None or transport.is_closing() or self.discarding:
            return
        self.discarding = True
        try:
            transport.write_eof()
        except (OSError, RuntimeError):
            transport.close()
            return
        asyncio.get_running_loop().call_later(linger_s, transport.close)

    def _fail(self, exc: ProtocolError | DsamigError) -> None:
        if isinstance(exc, ProtocolError):
            exc = JobFailedError(f"channel {self.index} from {self.peer}: {exc}", exc.code)
        if self.job is not None:
            self.job.fail(exc)
        else:
            code = getattr(exc, "code", ErrorCode.PROTOCOL)
            self.server.log.warning("channel refused", peer=self.peer, error=str(exc))
            self.send_error(code, str(exc))
        self.close_after_error()


class ReceiverServer:
    """Listens on one address and runs every job whose channels arrive there.

    ``sink_factory`` turns a job's HELLO into its PageSink (deciding where the
    data goes); ``on_job_finished`` is called once per job, completed or not.
    """

    def __init__(
        self,
        host: str,
        port: int,
        sink_factory: SinkFactory,
        *,
        timeouts: Timeouts | None = None,
        max_jobs: int = 16,
        on_job_finished: Callable[[ReceiverJob], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.sink_factory = sink_factory
        self.timeouts = timeouts or Timeouts()
        self.max_jobs = max_jobs
        self.on_job_finished = on_job_finished
        self.jobs: dict[uuid.UUID, ReceiverJob] = {}
        self.channels: set[ReceiverChannel] = set()
        self._server: asyncio.base_events.Server | None = None
        self.log = get_logger(role="receiver")

    async def start(self) -> tuple[str, int]:
        """Bind and listen; return the bound address (port 0 picks a free port)."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: ReceiverChannel(self), self.host, self.port, reuse_address=True
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise NetworkError(f"cannot listen on {self.host}:{self.port}: {reason}") from None
        sockname = self._server.sockets[0].getsockname()
        self.port = sockname[1]
        return sockname[0], sockname[1]

    def job_for(self, hello: Hello) -> ReceiverJob:
        """The job a HELLO opens (channel 0) or joins (the others)."""
        if hello.manifest is None:
            job = self.jobs.get(hello.job_id)
            if job is None or job.finished:
                raise JobFailedError(f"channel {hello.channel_index} names unknown job "
                                     f"{hello.job_id}", ErrorCode.REJECTED)
            return job
        if hello.job_id in self.jobs:
            raise JobFailedError(f"job {hello.job_id} is already running", ErrorCode.REJECTED)
        if len(self.jobs) >= self.max_jobs:
            raise JobFailedError(f"receiver is busy ({self.max_jobs} jobs running)",
                                 ErrorCode.REJECTED)
        try:
            sink = self.sink_factory(hello)
        except DsamigError as exc:
            raise JobFailedError(str(exc), ErrorCode.IO) from None
        job = ReceiverJob(hello, sink, self)
        self.jobs[hello.job_id] = job
        job.log.info("job started", channels=hello.channel_count,
                     size=hello.manifest.image_size, path=sink.path)
        return job

    def job_finished(self, job: ReceiverJob) -> None:
        self.jobs.pop(job.job_id, None)
        if self.on_job_finished is not None:
            self.on_job_finished(job)

    def channel_opened(self, channel: ReceiverChannel) -> None:
        self.channels.add(channel)

    def channel_closed(self, channel: ReceiverChannel) -> None:
        self.channels.discard(channel)

    async def close(self, reason: str = "receiver shutting down") -> None:
        """Stop listening, cancel running jobs (their partial files are removed)."""
        if self._server is not None:
            self._server.close()
        for job in list(self.jobs.values()):
            job.fail(JobFailedError(reason, ErrorCode.CANCELLED))
        for channel in list(self.channels):
            channel.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
