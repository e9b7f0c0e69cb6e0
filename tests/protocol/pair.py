"""A job in memory: the production job cores wired back to back.

:class:`MemorySender` and :class:`MemoryReceiver` make the decisions that
``dsamig/transport/sender.py`` and ``receiver.py`` make, step for step, with
the real parts: the job cores (:class:`SendJobCore`, :class:`ReceiveJobCore`),
one :class:`ChannelState` per connection, the encoder and a
:class:`FrameDecoder` read the way the receiver's transport reads it (exact
header reads, payload straight into the packet buffer). Only what moves bytes
or waits is replaced: a connection is two queues of encoded frames, the
engine is a page-by-page scan (:func:`scan_packet`), the destination file is
:class:`MemorySink` (a byte-exact model of ``PageSink``), and time is a number
that the test moves.

:class:`JobPair` connects one sender and one receiver. As aioquic's connection
tests do, a test runs the job in steps (``open_session``, ``stream``,
``request_commit``, ``flush``) and in between may :meth:`JobPair.drop`,
:meth:`JobPair.duplicate`, :meth:`JobPair.reorder` or :meth:`JobPair.cut`
frames still on their way; :meth:`JobPair.flush` delivers them whole or
``step`` bytes at a time. :meth:`JobPair.run` does what ``Sender.run`` does,
reconnecting a broken job.

The mirror of the transport raises, as the transport reports, only what the
transport turns into a job failure: a :class:`RemoteProtocolError` from the
cores fails the job (or refuses one channel), anything else (a
``LocalProtocolError``, an ``AssertionError``) escapes to the test: a bug.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import cast

from dsamig.native import impl
from dsamig.proto import (
    CLOSED,
    FEATURE_ACKS,
    FEATURE_RESUME,
    FRAME_HEADER_SIZE,
    NEED_DATA,
    PREAMBLE,
    RECEIVER_MAX_BODY,
    Ack,
    ChannelRefusedError,
    ChannelState,
    Checkpoint,
    Chunk,
    Commit,
    CommitRequest,
    End,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    ImageChangedError,
    LimitExceededError,
    Manifest,
    PacketHeader,
    PayloadChunk,
    ReceiveJobCore,
    ReceiverState,
    RemoteProtocolError,
    ResumeState,
    SenderState,
    SendJobCore,
    Welcome,
    ZeroRange,
    encode,
    encode_packet_header,
    manifest_problem,
    plan_chunks,
)
from dsamig.proto.send_core import ZERO
from dsamig.settings import ReceiverLimits

JOB_ID = uuid.UUID(int=0x1234)


# --- the image ----------------------------------------------------------------------------


def make_image(page_size: int, pages: list[int | None], tail: int = 0) -> bytes:
    """An image whose page i is zero (None) or filled with byte ``pages[i]``.

    With ``tail`` > 0 the last page is only ``tail`` bytes long.
    """
    image = bytearray()
    for value in pages:
        image += bytes(page_size) if value is None else bytes([value]) * page_size
    if tail and pages:
        del image[len(image) - page_size + tail :]
    return bytes(image)


def scan_packet(manifest: Manifest, image: bytes, n: int) -> tuple[bytes, bytes]:
    """(zero_bitmap, payload) of packet ``n``, computed page by page: the oracle
    that stands in for the engine."""
    first = n * manifest.packet_pages
    bits = 0
    payload = bytearray()
    for i in range(manifest.pages_in_packet(n)):
        start = (first + i) * manifest.page_size
        page = image[start : start + manifest.page_size]
        if page.count(0) == len(page):
            bits |= 1 << i
        else:
            payload += page
    bitmap = bits.to_bytes(Manifest.bitmap_length(manifest.pages_in_packet(n)), "little")
    return bitmap, bytes(payload)


def data_ranges(image: bytes, block: int = 4096) -> list[tuple[int, int]]:
    """The byte ranges of ``image`` a sparse file of it would hold: its blocks
    with a non-zero byte (``PageSource.data_ranges`` of such a file)."""
    ranges: list[tuple[int, int]] = []
    for start in range(0, len(image), block):
        end = min(start + block, len(image))
        if image.count(0, start, end) == end - start:
            continue
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


# --- the destination ----------------------------------------------------------------------


class SparseFile:
    """A file of ``size`` bytes that holds only the blocks written to it; the
    rest reads as zeros (holes), as a sparse file does. A manifest may
    declare a large image: the model then costs what is written, no more."""

    BLOCK = 4096

    def __init__(self, size: int) -> None:
        self.size = size
        self.blocks: dict[int, bytearray] = {}

    def __len__(self) -> int:
        return self.size

    def write(self, offset: int, data: bytes | memoryview) -> None:
        assert offset >= 0 and offset + len(data) <= self.size, "write beyond the file"
        pos = 0
        while pos < len(data):
            number, skip = divmod(offset + pos, self.BLOCK)
            n = min(self.BLOCK - skip, len(data) - pos)
            block = self.blocks.get(number)
            if block is None:
                block = self.blocks[number] = bytearray(self.BLOCK)
            block[skip : skip + n] = data[pos : pos + n]
            pos += n

    def zero(self, offset: int, length: int) -> None:
        """Punch a hole: ``length`` bytes from ``offset`` read as zeros."""
        end = offset + length
        for number in [b for b in self.blocks
                       if b * self.BLOCK < end and (b + 1) * self.BLOCK > offset]:
            lo = max(offset - number * self.BLOCK, 0)
            hi = min(end - number * self.BLOCK, self.BLOCK)
            if lo == 0 and hi == self.BLOCK:
                del self.blocks[number]
            else:
                self.blocks[number][lo:hi] = bytes(hi - lo)

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        out = bytearray(length)
        for number, block in self.blocks.items():
            lo = max(number * self.BLOCK, offset)
            hi = min((number + 1) * self.BLOCK, offset + length)
            if lo < hi:
                out[lo - offset : hi - offset] = block[lo - number * self.BLOCK :
                                                       hi - number * self.BLOCK]
        return bytes(out)

    def tobytes(self) -> bytes:
        return self.read(0, self.size)


class MemorySink:
    """One destination in memory, as ``PageSink`` leaves it on disk: a partial
    file, its checkpoint record beside it, and the final file.

    The partial file is created sparse (nothing written);
    :meth:`write_packet` writes only the normal pages of a packet, as the
    native ``write_runs`` does; :meth:`discard` punches holes; :meth:`checkpoint`
    stores the record after the data it covers; :meth:`commit` gives the
    partial file its final name. What a receiver killed at any moment leaves
    behind is simply what is here.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.image_size = 0
        self.partial: SparseFile | None = None
        self.progress: bytes | None = None
        self.final: SparseFile | None = None
        self.bytes_written = 0
        #: Byte ranges made holes by discard(), for the tests to check.
        self.holes: list[tuple[int, int]] = []
        self.checkpoints = 0
        self.resets = 0

    @property
    def committed(self) -> bytes | None:
        """The bytes of the final file, once a job committed one."""
        return None if self.final is None else self.final.tobytes()

    def prepare(self, image_size: int) -> None:
        """A job for this destination begins (``PageSink(path, image_size)``)."""
        self.image_size = image_size

    def open(self, *, keep_partial: bool = False) -> bool:
        """Create the partial file, or keep one of the right size; True if kept."""
        if keep_partial and self.partial is not None and len(self.partial) == self.image_size:
            return True
        self.partial = SparseFile(self.image_size)
        self.progress = None
        return False

    def _data(self) -> SparseFile:
        assert self.partial is not None, "the partial file is not open"
        return self.partial

    def reset(self) -> None:
        """Back to a fresh sparse file (a kept partial file that cannot be used)."""
        self.partial = SparseFile(self.image_size)
        self.progress = None
        self.resets += 1

    def discard(self, ranges: Iterable[tuple[int, int]]) -> bool:
        """Make ``(offset, length)`` ranges read as zeros (holes)."""
        data = self._data()
        for offset, length in ranges:
            data.zero(offset, length)
            self.holes.append((offset, length))
        return True

    def load_checkpoint(self) -> bytes | None:
        """The record stored by the last checkpoint."""
        return self.progress

    def checkpoint(self, record: bytes) -> None:
        """The data written so far is durable, then ``record`` is stored."""
        self._data()
        self.progress = bytes(record)
        self.checkpoints += 1

    def write_packet(
        self, payload: memoryview | bytes, bitmap: bytes, page_size: int, offset: int, span: int
    ) -> None:
        """Write the normal pages of one verified packet; zero pages are skipped."""
        data = self._data()
        bits = int.from_bytes(bitmap, "little")
        pos = 0
        for page in range(-(-span // page_size)):
            if bits >> page & 1:
                continue
            start = page * page_size
            length = min(page_size, span - start)
            data.write(offset + start, payload[pos : pos + length])
            pos += length
        assert pos == len(payload), "payload and bitmap disagree"
        self.bytes_written += pos

    def commit(self) -> None:
        """The partial file becomes the final file; its checkpoint goes."""
        self.final = self._data()
        self.partial = None
        self.progress = None

    def abort(self, *, keep_for_resume: bool = False) -> None:
        """Delete the partial file and its checkpoint, unless kept for a resume."""
        if not keep_for_resume:
            self.partial = None
            self.progress = None


# --- the receiving side ------------------------------------------------------------------


class JobFailed(Exception):
    """The transport's ``JobFailedError``: why a receiving job failed, the code
    the sender is told, and whether the partial file is kept for a resume."""

    def __init__(
        self, message: str, code: ErrorCode = ErrorCode.PROTOCOL, *, resumable: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.resumable = resumable

    @classmethod
    def of(cls, exc: RemoteProtocolError, prefix: str = "") -> JobFailed:
        """The failure a protocol error of the peer makes (a limit keeps the file)."""
        return cls(prefix + exc.message, exc.code,
                   resumable=isinstance(exc, LimitExceededError))


class CorruptPacket(JobFailed):
    """A payload failed its CRC32C (nothing of it was stored)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.INTEGRITY)


class ReceiverEnd:
    """The receiver's end of one connection (``ReceiverChannel``)."""

    def __init__(self, server: MemoryReceiver) -> None:
        self.server = server
        self.decoder = FrameDecoder(expect_preamble=True, max_body=RECEIVER_MAX_BODY)
        self.state = ChannelState.receiver()
        self.payload: bytearray | None = None
        self.current: PacketHeader | None = None
        self.filled = 0
        self.job: MemoryReceiverJob | None = None
        self.index = -1
        self.generation = 0
        self.again = False
        #: Encoded frames on their way to the sender.
        self.outbox: list[bytes] = []
        #: This end is closed: nothing more is read or written.
        self.closed = False
        #: After an ERROR: what still arrives is dropped.
        self.discarding = False

    # reading, as the transport's get_buffer()/buffer_updated() do
    def _in_payload(self) -> bool:
        decoder = self.decoder
        return self.current is not None and decoder.payload_remaining > 0 and not decoder.buffered

    def _read_size(self) -> int:
        """How many bytes the transport's next read takes at most."""
        if self.discarding:
            return FRAME_HEADER_SIZE + RECEIVER_MAX_BODY
        if self._in_payload():
            assert self.current is not None
            return self.current.payload_length - self.filled
        wanted = self.decoder.header_bytes_wanted()
        return wanted if wanted > 0 else FRAME_HEADER_SIZE

    def receive(self, data: bytes, step: int | None = None) -> None:
        """Bytes from the sender, in reads of at most ``step`` bytes."""
        pos = 0
        while pos < len(data) and not self.closed and not self.discarding:
            n = min(self._read_size(), len(data) - pos, step or len(data))
            self._buffer_updated(data[pos : pos + n])
            pos += n

    def _buffer_updated(self, chunk: bytes) -> None:
        try:
            if self._in_payload():
                assert self.payload is not None
                self.payload[self.filled : self.filled + len(chunk)] = chunk
                self.filled += len(chunk)
                self.decoder.payload_received(len(chunk))
                if not self.decoder.payload_remaining:
                    self._packet_complete()
                return
            self.decoder.receive_data(chunk)
            self._process()
        except (RemoteProtocolError, JobFailed) as exc:
            self._fail(exc)

    def eof(self) -> None:
        """The sender closed its end (``eof_received``, then ``connection_lost``)."""
        if self.closed:
            return
        job = self.job
        resets = job is not None and job.acks and not job.finished and self.state.state in (
            ReceiverState.STREAMING, ReceiverState.HANDSHAKE)
        if not self.discarding and not resets:
            try:
                self.decoder.receive_data(b"")
                self._process()
            except (RemoteProtocolError, JobFailed) as exc:
                self._fail(exc)
        self.connection_lost("closed")

    def connection_lost(self, why: str | None = None) -> None:
        """The connection is gone (``connection_lost``)."""
        self.closed = True
        job = self.job
        if job is None or job.finished:
            return
        if job.acks:
            self.detach()  # the sender reconnects; the watchdog bounds the wait
            return
        reason = f" ({why})" if why else ""
        job.fail(JobFailed(f"sender closed channel {self.index} mid-transfer{reason}"))

    def detach(self) -> None:
        """Leave the job; a half-received packet is given up."""
        job = self.job
        self.payload = None
        if job is None:
            return
        job.detach(self)
        self.current = None
        self.job = None

    def _process(self) -> None:
        while True:
            event = self.decoder.next_event()
            if event is NEED_DATA:
                return
            if event is CLOSED:
                self.state.on_eof()
                return
            if isinstance(event, PayloadChunk):
                self._payload_chunk(event.data)
                continue
            self.state.on_frame(event)
            if isinstance(event, PacketHeader):
                self._packet_header(event)
            elif isinstance(event, ZeroRange):
                self._job().zero_range_received(self.index, event)
            elif isinstance(event, Hello):
                self._hello(event)
            elif isinstance(event, End):
                self._job().channel_ended(self.index)
            elif isinstance(event, CommitRequest):
                self._job().commit_requested(event)
            elif isinstance(event, Error):
                code = getattr(event.code, "name", str(event.code))
                raise JobFailed(f"sender failed the job ({code}): {event.message}",
                                ErrorCode.CANCELLED)

    def _job(self) -> MemoryReceiverJob:
        assert self.job is not None, "the state machine allows data only after HELLO"
        return self.job

    def _hello(self, hello: Hello) -> None:
        self.index = hello.channel_index
        job = self.server.job_for(hello)
        self.generation = job.attach(self, hello)
        self.job = job
        self.payload = bytearray(job.packet_bytes)
        features = hello.features & (FEATURE_ACKS | FEATURE_RESUME) if job.acks else 0
        self.send(Welcome(job_id=hello.job_id, features=features))
        if features & FEATURE_RESUME:
            for frame in job.core.resume_frames():
                self.send(frame)

    def _packet_header(self, header: PacketHeader) -> None:
        job = self._job()
        self.again = job.core.packet_header(header)
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
        job = self._job()
        try:
            job.packet_received(self.index, header,
                                memoryview(self.payload)[: header.payload_length], self.again)
        except CorruptPacket:
            if job.acks:
                self.detach()  # the sender reconnects and sends the packet again
                self.close()
                return
            raise
        self.current = None

    def send(self, frame: Frame) -> None:
        """A frame to the sender, through the state machine first."""
        if not self.closed and not self.discarding:
            self.state.on_send(frame)
            self.outbox.append(encode(frame))

    def send_error(self, code: ErrorCode, message: str) -> None:
        if self.state.can_send_error:
            self.send(Error(code=code, message=message))

    def close(self) -> None:
        self.closed = True

    def close_after_error(self) -> None:
        """The ERROR goes out; whatever arrives later is dropped."""
        self.discarding = True

    def _fail(self, exc: RemoteProtocolError | JobFailed) -> None:
        refused_alone = isinstance(exc, ChannelRefusedError)
        if isinstance(exc, RemoteProtocolError):
            about_bytes = not isinstance(exc, ChannelRefusedError | LimitExceededError)
            where = f"channel {self.index}: " if self.index >= 0 and about_bytes else ""
            exc = JobFailed.of(exc, where)
        if self.job is not None and not refused_alone:
            self.job.fail(exc)
        else:
            self.server.refused.append(str(exc))
            self.send_error(exc.code, str(exc))
        self.close_after_error()


class MemoryReceiverJob:
    """One job being received (``ReceiverJob``): its core, its sink, its channels."""

    def __init__(self, hello: Hello, sink: MemorySink, server: MemoryReceiver) -> None:
        self.server = server
        self.core = ReceiveJobCore(hello, server.limits, server.now)
        self.manifest = self.core.manifest
        self.job_id = hello.job_id
        self.acks = self.core.acks
        self.sink = sink
        self.channels: dict[int, ReceiverEnd] = {}
        self.all_ended = False
        self.outcome: str | None = None  # "completed", "failed" or "cancelled"
        self.error: JobFailed | None = None
        self.commit_request: CommitRequest | None = None
        self.commit_since = 0.0
        #: When the LATER checkpoint timer fires, if one is set.
        self.timer_at: float | None = None
        #: The record of a checkpoint being written (until it lands).
        self.writing: bytes | None = None
        self.watch_at = server.now + server.tick_s

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    @property
    def packet_bytes(self) -> int:
        return self.manifest.packet_pages * self.manifest.page_size

    def resume_from(self, record: bytes | None) -> None:
        ranges, _ = self.core.restore(record)
        if ranges is not None and not self.sink.discard(ranges):
            self.core.forget_restored()
            ranges = None
        if ranges is None:
            self.sink.reset()

    def restart_session(self) -> None:
        try:
            self.core.restart_session(self.server.now)
        except LimitExceededError as exc:
            self.fail(JobFailed.of(exc))
            raise
        for channel in list(self.channels.values()):
            channel.detach()
            channel.close()
        self.channels.clear()
        self.all_ended = False
        if not self.server.stale_commit:
            self.commit_request = None  # the new session's channel 0 asks again

    def attach(self, channel: ReceiverEnd, hello: Hello) -> int:
        index = hello.channel_index
        try:
            generation = self.core.attach(index, hello.channel_count, self.server.now)
        except LimitExceededError as exc:
            self.fail(JobFailed.of(exc))
            raise
        old = self.channels.get(index)
        if old is not None:
            old.detach()
            old.close()
        self.all_ended = False
        self.channels[index] = channel
        return generation

    def detach(self, channel: ReceiverEnd) -> None:
        self.core.detach(channel.index, channel.generation,
                         None if channel.again else channel.current)
        if self.channels.get(channel.index) is channel:
            del self.channels[channel.index]

    def packet_received(
        self, index: int, header: PacketHeader, payload: memoryview, again: bool
    ) -> None:
        crc = impl.crc32c(payload)
        if crc != header.payload_crc:
            raise CorruptPacket(
                f"packet {header.packet_number}: payload CRC32C {crc:#010x} "
                f"!= {header.payload_crc:#010x} (corrupted in transit)"
            )
        if not again:
            offset, span = self.manifest.range_bytes(header.packet_number, 1)
            self.sink.write_packet(payload, header.zero_bitmap, self.manifest.page_size,
                                   offset, span)
        self.core.packet_stored(index, header, crc, again, self.server.now)
        self.checkpoint(urgent=False)

    def zero_range_received(self, index: int, frame: ZeroRange) -> None:
        self.core.zero_range(index, frame, self.server.now)
        self.checkpoint(urgent=False)

    def channel_ended(self, index: int) -> None:
        if self.core.channel_ended(index, self.server.now):
            self.all_ended = True
        self.checkpoint(urgent=True)
        self._try_commit()

    def checkpoint(self, *, urgent: bool) -> None:
        if self.commit_request is not None or self.finished:
            return
        action = self.core.checkpoint(self.server.now, urgent=urgent)
        if action is Checkpoint.ACK:
            self._send_acks(self.core.acks_due())
        elif action is Checkpoint.LATER:
            if self.timer_at is None:
                self.timer_at = self.server.now + self.core.checkpoint_delay_s
        elif action is Checkpoint.TAKE:
            self.writing = self.core.begin_checkpoint(self.server.now)
            if self.server.land_checkpoints:
                self.land_checkpoint()

    def land_checkpoint(self) -> None:
        """The checkpoint being written is durable (the executor returned)."""
        record, self.writing = self.writing, None
        assert record is not None
        if self.finished:
            return
        self.sink.checkpoint(record)
        acks, again = self.core.checkpoint_written()
        self._send_acks(acks)
        self.checkpoint(urgent=again)

    def _send_acks(self, acks: list[tuple[int, Ack]]) -> None:
        for index, ack in acks:
            channel = self.channels.get(index)
            if channel is not None:
                channel.send(ack)

    def commit_requested(self, request: CommitRequest) -> None:
        if self.commit_request is None:
            self.commit_request = request
            self.commit_since = self.server.now
            self._try_commit()

    def _try_commit(self) -> None:
        """The commit, once COMMIT_REQUEST arrived and every channel ended."""
        request = self.commit_request
        if request is None or not self.all_ended or self.finished:
            return
        if self.writing is not None:
            self.land_checkpoint()  # never close the file under a running checkpoint
        try:
            digest = self.core.commit(request)
        except RemoteProtocolError as exc:
            self.fail(JobFailed.of(exc))
            return
        self.sink.commit()
        self.channels[0].send(Commit(digest=digest))
        self.outcome = "completed"
        for channel in list(self.channels.values()):
            channel.close()
        self._release()
        self.server.job_finished(self)

    def fail(self, exc: JobFailed) -> None:
        if self.finished:
            return
        self.error = exc
        self.outcome = "cancelled" if exc.code == ErrorCode.CANCELLED else "failed"
        keep = exc.resumable and self.acks
        self.sink.abort(keep_for_resume=keep)
        if self.writing is not None and keep and self.server.late_checkpoints:
            self.server.orphans.append((self.sink, self.writing))
        for channel in list(self.channels.values()):
            channel.send_error(exc.code, str(exc))
            channel.close_after_error()
        self._release()
        self.server.job_finished(self)

    def _release(self) -> None:
        for channel in list(self.channels.values()):
            channel.detach()
        self.channels.clear()

    def next_timer(self) -> float | None:
        """When the LATER checkpoint timer fires, if one is set."""
        return None if self.finished else self.timer_at

    def fire_timers(self) -> None:
        """Run what is due at ``now``: the checkpoint timer and the watchdog."""
        now = self.server.now
        if self.timer_at is not None and self.timer_at <= now and not self.finished:
            self.timer_at = None
            self.checkpoint(urgent=True)
        while self.watch_at <= now and not self.finished:
            self.watch_at += self.server.tick_s
            self._watch()

    def _watch(self) -> None:
        """One tick of the watchdog (``ReceiverJob._watch``)."""
        self.checkpoint(urgent=False)
        if self.commit_request is not None:
            if not self.all_ended and self.server.now - self.commit_since > self.server.idle_s:
                missing = sorted(set(range(self.core.channel_count)) - self.core.ended)
                self.fail(JobFailed(f"channels {missing} never sent END"))
            return
        stall = self.core.stalled(self.server.now, self.server.idle_s)
        if stall is not None:
            self.fail(JobFailed(stall.message, stall.code, resumable=True))


class MemoryReceiver:
    """A receiver (``ReceiverServer``): routes HELLOs to jobs, keeps destinations.

    ``land_checkpoints``: a checkpoint is durable as soon as it is taken;
    otherwise it stays in ``job.writing`` until the test calls
    ``land_checkpoint`` (the executor returning), so that a test can crash
    the receiver in between.

    Two defects the fuzz target found in the transport (both fixed there),
    which the mirror reproduces only when asked, to show that the target
    catches them: ``late_checkpoints``, a checkpoint that a failed job was
    still writing lands later (:meth:`land_orphans`), even after another job
    took the file over (``PageSink`` now refuses any rename after an abort);
    ``stale_commit``, a COMMIT_REQUEST outlives the session it came in, so
    the commit may answer on a channel 0 that never asked (``ReceiverJob``'s
    ``restart_session`` now cancels a commit still waiting for the ENDs). By
    default the mirror does what the transport does.
    """

    def __init__(
        self,
        *,
        limits: ReceiverLimits | None = None,
        idle_s: float = 30.0,
        now: float = 0.0,
        land_checkpoints: bool = True,
        late_checkpoints: bool = False,
        stale_commit: bool = False,
    ) -> None:
        self.limits = limits or ReceiverLimits()
        self.idle_s = idle_s
        self.tick_s = min(0.25, idle_s / 4)
        self.now = now
        self.land_checkpoints = land_checkpoints
        self.late_checkpoints = late_checkpoints
        self.stale_commit = stale_commit
        self.jobs: dict[uuid.UUID, MemoryReceiverJob] = {}
        #: Destinations by job name; they outlive jobs (and crashes).
        self.sinks: dict[str, MemorySink] = {}
        #: Every job that ended, in order, and every refused connection's reason.
        self.finished: list[MemoryReceiverJob] = []
        self.refused: list[str] = []
        #: Checkpoints of failed jobs still being written: (sink, record).
        self.orphans: list[tuple[MemorySink, bytes]] = []

    def connect(self) -> ReceiverEnd:
        """A new connection from a sender."""
        return ReceiverEnd(self)

    def sink_for(self, hello: Hello) -> MemorySink:
        """The destination of a job: one per name."""
        assert hello.manifest is not None
        sink = self.sinks.setdefault(hello.name, MemorySink(hello.name))
        sink.prepare(hello.manifest.image_size)
        return sink

    def job_for(self, hello: Hello) -> MemoryReceiverJob:
        """The job a HELLO opens (channel 0) or joins (``ReceiverServer.job_for``)."""
        if hello.manifest is None:
            job = self.jobs.get(hello.job_id)
            if job is None or job.finished:
                raise JobFailed(f"channel {hello.channel_index} names unknown job "
                                f"{hello.job_id}", ErrorCode.REJECTED)
            return job
        existing = self.jobs.get(hello.job_id)
        if existing is not None and not existing.finished:
            if existing.acks and hello.features & FEATURE_RESUME:
                if existing.manifest != hello.manifest:
                    raise JobFailed(f"job {hello.job_id} came back with another image layout",
                                    ErrorCode.REJECTED)
                existing.restart_session()
                return existing
            raise JobFailed(f"job {hello.job_id} is already running", ErrorCode.REJECTED)
        problem = manifest_problem(hello.manifest, self.limits)
        if problem is not None:
            raise JobFailed(problem, ErrorCode.REJECTED)
        return self._open_job(hello)

    def _open_job(self, hello: Hello) -> MemoryReceiverJob:
        sink = self.sink_for(hello)
        for other in list(self.jobs.values()):
            if other.sink is sink and not other.finished:
                if other.channels:
                    raise JobFailed(f"destination {sink.name!r} is busy with job "
                                    f"{other.job_id}", ErrorCode.REJECTED)
                other.fail(JobFailed("superseded by a resuming sender", ErrorCode.CANCELLED,
                                     resumable=True))
        if len(self.jobs) >= self.limits.max_jobs:
            raise JobFailed(f"receiver is busy ({self.limits.max_jobs} jobs running)",
                            ErrorCode.REJECTED)
        resuming = bool(hello.features & FEATURE_ACKS and hello.features & FEATURE_RESUME)
        kept = sink.open(keep_partial=resuming)
        job = MemoryReceiverJob(hello, sink, self)
        if kept:
            job.resume_from(sink.load_checkpoint())
        self.jobs[hello.job_id] = job
        return job

    def land_orphans(self) -> None:
        """The checkpoints that failed jobs were writing land, in order."""
        orphans, self.orphans = self.orphans, []
        for sink, record in orphans:
            if sink.partial is not None:
                sink.checkpoint(record)

    def job_finished(self, job: MemoryReceiverJob) -> None:
        self.jobs.pop(job.job_id, None)
        self.finished.append(job)

    def crash(self) -> MemoryReceiver:
        """The receiver is killed: a new one that has only the destinations,
        as the dead one left them (a checkpoint being written is lost)."""
        survivor = MemoryReceiver(limits=self.limits, idle_s=self.idle_s, now=self.now,
                                  land_checkpoints=self.land_checkpoints,
                                  late_checkpoints=self.late_checkpoints,
                                  stale_commit=self.stale_commit)
        survivor.sinks = self.sinks
        return survivor

    def next_timer(self) -> float | None:
        """The earliest checkpoint timer of any job."""
        times = [t for job in self.jobs.values() if (t := job.next_timer()) is not None]
        return min(times, default=None)

    def advance(self, seconds: float) -> None:
        """Let time pass: every timer due by then fires, in order."""
        end = self.now + seconds
        while True:
            due = [t for job in self.jobs.values() if not job.finished
                   for t in (job.timer_at, job.watch_at) if t is not None and t <= end]
            if not due:
                break
            self.now = max(self.now, min(due))
            for job in list(self.jobs.values()):
                job.fire_timers()
        self.now = end


# --- the sending side --------------------------------------------------------------------


class SendFailed(Exception):
    """The sender's job failed: the receiver refused it or broke the protocol."""


class ChannelLost(SendFailed):
    """A channel broke without the receiver failing the job: worth reconnecting."""


class SenderEnd:
    """The sender's end of one connection (``SenderChannel``)."""

    def __init__(self, index: int, sender: MemorySender) -> None:
        self.index = index
        self.sender = sender
        self.state = ChannelState.sender()
        self.decoder = FrameDecoder(expect_preamble=False)
        #: Encoded frames on their way to the receiver, one entry per frame
        #: (a PACKET with its payload), so that tests can work on frames.
        self.outbox: list[bytes] = []
        self.welcome: Welcome | None = None
        self.resumed = False
        self.commit: Commit | None = None
        self.acks: list[Ack] = []
        self.unacked: deque[tuple[int, int]] = deque()
        self.closed = False

    def receive(self, data: bytes) -> None:
        """Bytes from the receiver (``data_received``)."""
        try:
            self.decoder.receive_data(data)
            self._process()
        except RemoteProtocolError as exc:
            self._fail(SendFailed(f"channel {self.index}: receiver broke the protocol: {exc}"))

    def connection_lost(self) -> None:
        """The receiver closed the connection."""
        if self.closed:
            return
        self.closed = True
        # After COMMIT channel 0 is done: the receiver closes every channel
        # then (the transport races the close against its wait for COMMIT).
        finished = self.state.state is SenderState.DONE or (
            self.index != 0 and self.state.state is SenderState.ENDED and not self.unacked)
        if not finished:
            self._fail(ChannelLost(f"receiver closed channel {self.index}"))

    def _process(self) -> None:
        while True:
            event = self.decoder.next_event()
            if event is NEED_DATA or event is CLOSED:
                return
            if isinstance(event, PayloadChunk):
                raise RemoteProtocolError("the receiver sent a PACKET")
            self.state.on_frame(event)
            if isinstance(event, Ack):
                self.acks.append(event)
                while self.unacked and self.unacked[0][0] <= event.frames:
                    self.unacked.popleft()
            elif isinstance(event, Welcome):
                self.welcome = event
            elif isinstance(event, ResumeState):
                self.sender.core.resume_state(event)
                self.resumed = self.resumed or event.last
            elif isinstance(event, Commit):
                self.commit = event
            elif isinstance(event, Error):
                code = getattr(event.code, "name", str(event.code))
                self._fail(SendFailed(f"receiver failed the job ({code}): {event.message}"))
                return

    def _fail(self, exc: SendFailed) -> None:
        self.sender.channel_failed(exc)

    def send_frame(self, frame: Frame, *, preamble: bool = False) -> None:
        self.state.on_send(frame)
        self.outbox.append((PREAMBLE if preamble else b"") + encode(frame))
        if isinstance(frame, ZeroRange):
            self._data_frame(0)

    def send_packet(self, header: bytes, payload: bytes) -> None:
        self.state.on_send_data(1, 1, len(payload))
        self.outbox.append(header + payload)
        self._data_frame(len(payload))

    def _data_frame(self, payload_bytes: int) -> None:
        if self.sender.acks:
            self.unacked.append((self.state.data_frames, payload_bytes))


class MemorySender:
    """The sending side of one job (``Sender``): the core, the plan, the frames.

    ``scan`` stands in for the engine: the zero bitmaps of a chunk's packets,
    each starting on a byte. ``ranges`` are the image's data ranges (default:
    the whole image, as a file system that cannot tell holes gives).
    """

    def __init__(
        self,
        image: bytes,
        *,
        page_size: int = 512,
        packet_pages: int = 4,
        channels: int = 2,
        name: str = "test-job",
        job_id: uuid.UUID = JOB_ID,
        chunk_packets: int = 8,
        ranges: list[tuple[int, int]] | None = None,
        scan: Callable[[Manifest, bytes, Chunk], bytes] | None = None,
        offer_acks: bool = True,
    ) -> None:
        self.image = image
        #: The transport always offers ACKS; without, a job is all or nothing.
        self.offer_acks = offer_acks
        self.manifest = Manifest(len(image), page_size, packet_pages)
        self.core = SendJobCore(self.manifest)
        self.channel_count = channels
        self.name = name
        self.job_id = job_id
        self.chunk_packets = chunk_packets
        self.ranges = [(0, len(image))] if ranges is None and image else (ranges or [])
        self.scan = scan or scan_chunk
        self.acks = False
        self.channels: list[SenderEnd] = []
        self.failure: SendFailed | None = None

    def channel_failed(self, exc: SendFailed) -> None:
        """The first failure of a session ends it."""
        if self.failure is None:
            self.failure = exc

    def connect(self, index: int, features: int) -> SenderEnd:
        channel = SenderEnd(index, self)
        self.channels.append(channel)
        hello = Hello(job_id=self.job_id, channel_index=index,
                      channel_count=self.channel_count,
                      manifest=self.manifest if index == 0 else None, name=self.name,
                      features=features)
        channel.send_frame(hello, preamble=True)
        return channel

    def plan(self) -> Iterator[Chunk]:
        return plan_chunks(self.manifest, self.ranges, self.chunk_packets)

    def send_chunk(self, channel: SenderEnd, chunk: Chunk) -> None:
        """What ``Sender._pump_chunks`` does with one chunk of the plan."""
        core = self.core
        if not core.needs_scan(chunk):
            if chunk.hole:
                self.send_zero_runs(channel, chunk.first_packet, chunk.packets)
            return
        manifest = self.manifest
        bitmaps = self.scan(manifest, self.image, chunk)
        for kind, first, what in core.chunk_items(chunk, bitmaps):
            if kind == ZERO:
                self.send_zero_runs(channel, first, cast(int, what))
                continue
            bitmap = cast(bytes, what)
            start, span = manifest.range_bytes(first, 1)
            views, length, crc = impl.packet_payload(
                memoryview(self.image)[start : start + span], bitmap, manifest.page_size)
            if not core.packet(first, bitmap, length, crc):
                continue
            header = encode_packet_header(first, first * manifest.packet_pages,
                                          manifest.pages_in_packet(first), length, crc, bitmap)
            channel.send_packet(header, b"".join(bytes(v) for v in views))

    def send_zero_runs(self, channel: SenderEnd, first: int, count: int) -> None:
        for run_first, run_count in self.core.zero_runs(first, count):
            channel.send_frame(ZeroRange(first_packet=run_first, packet_count=run_count))

    def end(self, channel: SenderEnd) -> None:
        channel.send_frame(End(packets=channel.state.packets,
                               payload_bytes=channel.state.payload_bytes))


def scan_chunk(manifest: Manifest, image: bytes, chunk: Chunk) -> bytes:
    """The engine's answer for a chunk: each packet's zero bitmap, page by page."""
    return b"".join(scan_packet(manifest, image, n)[0]
                    for n in range(chunk.first_packet, chunk.first_packet + chunk.packets))


# --- the two together --------------------------------------------------------------------


#: Changes bytes on their way to the receiver: ``(channel index, offset in
#: the connection's stream, data) -> data``. Shorter data ends the
#: connection after it, as the sender's end closing would.
Mangle = Callable[[int, int, bytes], bytes]


class Link:
    """One connection: the sender's end and the receiver's end."""

    def __init__(self, sender: SenderEnd, receiver: ReceiverEnd,
                 mangle: Mangle | None = None) -> None:
        self.sender = sender
        self.receiver = receiver
        self.mangle = mangle
        #: Every byte that crossed to the receiver, in order.
        self.sent = bytearray()
        #: Cut: nothing more crosses, and both ends learn it at the next flush.
        self.cut = False
        self.cut_how = "reset"

    def to_receiver(self, step: int | None) -> int:
        """Deliver the sender's queued frames; how many."""
        frames, self.sender.outbox = self.sender.outbox, []
        if frames and not self.cut:
            data = b"".join(frames)
            mangled = data
            if self.mangle is not None:
                mangled = self.mangle(self.sender.index, len(self.sent), data)
            self.sent += mangled
            self.receiver.receive(mangled, step)
            if len(mangled) < len(data):
                self.cut, self.cut_how = True, "eof"
        return len(frames)

    def to_sender(self) -> int:
        frames, self.receiver.outbox = self.receiver.outbox, []
        if frames and not self.cut:
            self.sender.receive(b"".join(frames))
        return len(frames)

    def settle(self) -> int:
        """Tell each end what the other did: a cut, a close."""
        changed = 0
        if self.cut and not self.receiver.closed:
            if self.cut_how == "eof":
                self.receiver.eof()
            else:
                self.receiver.connection_lost("connection reset")
            changed += 1
        if (self.receiver.closed or self.cut) and not self.sender.closed:
            self.sender.connection_lost()
            changed += 1
        return changed


class JobPair:
    """A sender and a receiver of one job, connected in memory.

    Build it from an image; run the job with :meth:`run`, or in steps
    (:meth:`open_session`, :meth:`stream`, :meth:`request_commit`,
    :meth:`finish`) with :meth:`flush` and the frame tools in between.
    """

    def __init__(
        self,
        image: bytes,
        *,
        page_size: int = 512,
        packet_pages: int = 4,
        channels: int = 2,
        name: str = "test-job",
        job_id: uuid.UUID = JOB_ID,
        chunk_packets: int = 8,
        ranges: list[tuple[int, int]] | None = None,
        offer_acks: bool = True,
        receiver: MemoryReceiver | None = None,
        limits: ReceiverLimits | None = None,
    ) -> None:
        self.sender = MemorySender(image, page_size=page_size, packet_pages=packet_pages,
                                   channels=channels, name=name, job_id=job_id,
                                   chunk_packets=chunk_packets, ranges=ranges,
                                   offer_acks=offer_acks)
        self.receiver = receiver or MemoryReceiver(limits=limits)
        #: This session's connections, and every connection the job made.
        self.links: list[Link] = []
        self.history: list[Link] = []
        #: Applied to the bytes of every new connection (see :data:`Mangle`).
        self.mangle: Mangle | None = None
        self.commit: Commit | None = None
        self.sessions = 0

    @property
    def image(self) -> bytes:
        return self.sender.image

    @property
    def sink(self) -> MemorySink:
        return self.receiver.sinks[self.sender.name]

    @property
    def job(self) -> MemoryReceiverJob | None:
        """The receiver's job, running or the last one that finished."""
        job = self.receiver.jobs.get(self.sender.job_id)
        if job is not None:
            return job
        ended = [j for j in self.receiver.finished if j.job_id == self.sender.job_id]
        return ended[-1] if ended else None

    def link(self, index: int) -> Link:
        """This session's connection of channel ``index``."""
        return next(link for link in self.links if link.sender.index == index)

    # --- moving frames ---------------------------------------------------------------------

    def flush(self, step: int | None = None) -> None:
        """Deliver every queued frame, both ways, until nothing moves; then
        run checkpoint timers, as an idle event loop would."""
        while True:
            moved = 0
            for link in self.links:
                moved += link.to_receiver(step)
                moved += link.to_sender()
                moved += link.settle()
            if moved:
                continue
            due = self.receiver.next_timer()
            if due is None:
                return
            self.receiver.advance(max(0.0, due - self.receiver.now))

    def deliver(self, index: int, frames: int | None = None, step: int | None = None) -> None:
        """Deliver the first ``frames`` queued frames of channel ``index`` (all
        by default) and nothing else: the other channels lag behind."""
        link = self.link(index)
        queued = link.sender.outbox
        count = len(queued) if frames is None else frames
        link.sender.outbox = queued[:count]
        link.to_receiver(step)
        link.sender.outbox = queued[count:] + link.sender.outbox
        link.to_sender()
        link.settle()

    def frames(self, index: int) -> list[bytes]:
        """The frames of channel ``index`` still on their way to the receiver."""
        return self.link(index).sender.outbox

    def drop(self, index: int, position: int) -> bytes:
        """Lose one queued frame of channel ``index``."""
        return self.frames(index).pop(position)

    def duplicate(self, index: int, position: int) -> None:
        """Deliver one queued frame of channel ``index`` twice."""
        frames = self.frames(index)
        frames.insert(position, frames[position])

    def reorder(self, index: int, order: list[int]) -> None:
        """Deliver the queued frames of channel ``index`` in another order."""
        frames = self.frames(index)
        frames[:] = [frames[i] for i in order]

    def cut(self, index: int, *, frames: int | None = None, at_byte: int | None = None,
            how: str = "reset", step: int | None = None) -> None:
        """Break channel ``index`` after its next ``frames`` frames, or
        ``at_byte`` bytes into what is queued (mid-frame); ``how`` is
        ``"reset"`` or ``"eof"`` (the sender's end closed)."""
        link = self.link(index)
        queued = b"".join(link.sender.outbox)
        if frames is not None:
            at_byte = sum(len(f) for f in link.sender.outbox[:frames])
        assert at_byte is not None
        link.sender.outbox = [queued[:at_byte]] if at_byte else []
        link.to_receiver(step)
        link.cut, link.cut_how = True, how

    # --- the sender's steps ----------------------------------------------------------------

    def _connect(self, index: int, features: int) -> SenderEnd:
        channel = self.sender.connect(index, features)
        link = Link(channel, self.receiver.connect(), self.mangle)
        self.links.append(link)
        self.history.append(link)
        return channel

    def check(self) -> None:
        """Raise the session's failure, if a channel failed."""
        if self.sender.failure is not None:
            raise self.sender.failure

    def open_session(self, *, resume: bool = False, step: int | None = None) -> None:
        """Connect every channel (``Sender._session`` up to the pumps)."""
        sender = self.sender
        sender.core.new_session()
        sender.failure = None
        sender.channels = []
        self.sessions += 1
        acks = FEATURE_ACKS if sender.offer_acks else 0
        first = self._connect(0, acks | (FEATURE_RESUME if resume else 0))
        self.flush(step)
        self.check()
        if first.welcome is None:
            raise ChannelLost("receiver did not answer HELLO")
        sender.acks = bool(first.welcome.features & FEATURE_ACKS)
        if first.welcome.features & FEATURE_RESUME:
            if not first.resumed:
                raise ChannelLost("receiver did not finish RESUME_STATE")
            sender.core.verify_known()
        for index in range(1, sender.channel_count):
            self._connect(index, FEATURE_ACKS if sender.acks else 0)
        self.flush(step)
        self.check()
        for channel in sender.channels:
            if channel.welcome is None:  # the transport's wait for it times out
                raise ChannelLost(f"receiver did not answer HELLO on channel {channel.index}")

    def stream(self) -> None:
        """The plan, chunk by chunk, round robin over the channels; END on each."""
        channels = sorted(self.sender.channels, key=lambda c: c.index)
        for k, chunk in enumerate(self.sender.plan()):
            self.sender.send_chunk(channels[k % len(channels)], chunk)
        for channel in channels:
            self.sender.end(channel)

    def wait_acknowledged(self) -> None:
        """With ACKS a channel is done only when the receiver holds all it sent;
        what is still unacknowledged once nothing moves never will be (the
        transport's bounded wait would time out)."""
        if not self.sender.acks:
            return
        for channel in self.sender.channels:
            if channel.unacked:
                raise ChannelLost(f"channel {channel.index}: no acknowledgement of "
                                  f"{len(channel.unacked)} frames")

    def request_commit(self) -> None:
        self.link(0).sender.send_frame(self.sender.core.commit_request())

    def finish(self) -> Commit:
        """After COMMIT: check it and close every channel (``Sender._commit``)."""
        self.check()
        commit = self.link(0).sender.commit
        if commit is None:
            raise SendFailed("receiver did not commit")
        self.sender.core.check_commit(commit)
        self.commit = commit
        self.close_session()
        return commit

    def close_session(self) -> None:
        """The sender closes this session's channels (the receiver reads EOF)."""
        for link in self.links:
            link.to_receiver(None)
            link.sender.closed = True
            if not link.receiver.closed:
                link.receiver.eof()
        self.links = []

    def run(self, *, step: int | None = None, resume: bool = False,
            max_sessions: int = 8) -> Commit:
        """The whole job as ``Sender._run_sessions`` runs it: a broken channel
        (with ACKS) opens a new session that resumes; an image that changed
        restarts the job clean under a new id."""
        restarted_clean = False
        for _ in range(max_sessions):
            try:
                self.open_session(resume=resume, step=step)
                self.stream()
                self.flush(step)
                self.check()
                self.wait_acknowledged()
                self.request_commit()
                self.flush(step)
                return self.finish()
            except ImageChangedError:
                if restarted_clean:
                    raise
                self.close_session()
                restarted_clean = True
                resume = False
                self.sender.job_id = uuid.UUID(int=self.sender.job_id.int + 1)
                self.sender.core.restart_clean()
            except ChannelLost:
                if not self.sender.acks:
                    raise
                self.close_session()
                resume = True
        raise SendFailed(f"no commit after {max_sessions} sessions")


def job_streams(
    image: bytes, *, page_size: int = 512, packet_pages: int = 4, channels: int = 2
) -> list[bytes]:
    """Every byte each channel of a whole job sent to the receiver (a job
    that committed, in one session), for the codec's tests."""
    pair = JobPair(image, page_size=page_size, packet_pages=packet_pages, channels=channels,
                   chunk_packets=1)
    pair.run()
    assert pair.sessions == 1
    return [bytes(link.sent) for link in pair.history]


__all__ = [
    "JOB_ID",
    "ChannelLost",
    "CorruptPacket",
    "JobFailed",
    "JobPair",
    "Link",
    "Mangle",
    "MemoryReceiver",
    "MemoryReceiverJob",
    "MemorySender",
    "MemorySink",
    "ReceiverEnd",
    "SendFailed",
    "SenderEnd",
    "SparseFile",
    "data_ranges",
    "job_streams",
    "make_image",
    "scan_chunk",
    "scan_packet",
]
