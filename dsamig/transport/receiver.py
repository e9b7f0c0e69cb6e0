"""The receiving side: a listener that routes channels to jobs, and the jobs.

Every decision of a job is its :class:`ReceiveJobCore`'s (``dsamig.proto``);
this module runs the timers and moves the bytes, on one of two data paths:

* **native** (the default where the extension loaded): once a channel's HELLO
  is accepted, a native thread per channel (``dsamig-recv-N``, see
  ``cython/src/pump.h``) reads its frames with the GIL released, lands each
  payload in the destination (through a buffer and ``pwrite``, or straight
  into a shared mapping of the partial file) and verifies its CRC32C; the loop
  gets one completion per packet and every other frame as bytes to decode.
* **loop** (TLS channels, the pure-Python twin, or when asked): payload bytes
  go from the socket into a per-channel buffer sized for one packet
  (``recv_into`` through ``asyncio.BufferedProtocol``), are verified there and
  written with one ``pwrite`` per run of normal pages. Headers are read with
  exact-size reads so payload bytes never pass through the decoder's buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from dsamig.errors import DsamigError, NetworkError, SinkError, TransferError
from dsamig.logs import get_logger
from dsamig.native import impl
from dsamig.pages import PageSink
from dsamig.pages.sink import read_exact
from dsamig.proto import (
    AUTH_NONCE_SIZE,
    CLOSED,
    FEATURE_ACKS,
    FEATURE_LIVE,
    FEATURE_REFRESH,
    FEATURE_RESUME,
    FRAME_HEADER_SIZE,
    NEED_DATA,
    RECEIVER_MAX_BODY,
    Ack,
    Challenge,
    ChannelRefusedError,
    ChannelState,
    Checkpoint,
    Commit,
    CommitRequest,
    End,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    LimitExceededError,
    PacketHeader,
    PacketTracker,
    PayloadChunk,
    ProtocolError,
    ReceiveJobCore,
    ReceiverState,
    RemoteProtocolError,
    Round,
    Sums,
    SumsRequest,
    Welcome,
    ZeroRange,
    encode,
    manifest_problem,
    packet_record,
)
from dsamig.proto.frames import MAX_SUMS_PACKETS, SUMS_SEED_SIZE
from dsamig.proto.refresh import packet_fingerprint
from dsamig.runtime import bounded
from dsamig.settings import MiB, ReceiverLimits
from dsamig.stats import ChannelStats, JobStats
from dsamig.transport.common import Timeouts, tune_socket
from dsamig.transport.security import SecurityConfig, TlsListener, psk_of

SinkFactory = Callable[[Hello], PageSink]
Clock = Callable[[], float]

#: Receive paths of the native data path: "pwrite" lands payloads in a
#: per-channel buffer and writes them; "mmap" receives them straight into a
#: shared mapping of the partial file. "auto" is pwrite: it measured faster
#: on tmpfs and far faster on ext4 (docs/performance.md, "Receive paths").
RECEIVE_PATHS = ("auto", "pwrite", "mmap")
#: How long closing a channel waits for its native thread (it ends within one
#: system call: a packet's pwrite at worst).
PUMP_STOP_S = 5.0


def native_receiving() -> bool:
    """Whether native receiving threads are available (not with the twin)."""
    return hasattr(impl, "RecvPump")


class JobFailedError(TransferError):
    """A receiving job failed; ``code`` is what the sender is told.

    ``resumable`` failures (the sender vanished, or went beyond a limit) keep
    the partial file and its checkpoint so that the sender can resume; the
    others delete them.
    """

    def __init__(
        self, message: str, code: ErrorCode = ErrorCode.PROTOCOL, *, resumable: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.resumable = resumable

    @classmethod
    def of(cls, exc: ProtocolError, prefix: str = "") -> JobFailedError:
        """The job failure a protocol error from the peer makes; a peer that
        merely went beyond a limit leaves a sound partial file behind."""
        return cls(prefix + exc.message, exc.code,
                   resumable=isinstance(exc, LimitExceededError))


class CorruptPacketError(JobFailedError):
    """A payload failed its CRC32C: nothing of it counts (where it landed in
    the destination, its pages were cleared).  With acknowledgements the
    channel is dropped and the packet comes again."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.INTEGRITY)

    @classmethod
    def of_packet(cls, packet: int, crc: int, announced: int) -> CorruptPacketError:
        return cls(f"packet {packet}: payload CRC32C {crc:#010x} != {announced:#010x} "
                   "(corrupted in transit)")


#: A refresh reads and hashes the committed copy this much at a time.
REFRESH_CHUNK_BYTES = 32 * MiB


class ReceiverJob:
    """One job being received: its core, its sink, its channels, its timers."""

    def __init__(self, hello: Hello, sink: PageSink, server: ReceiverServer) -> None:
        self.server = server
        self.clock = server.clock
        self.core = ReceiveJobCore(hello, server.limits, self.clock())
        self.manifest = self.core.manifest
        self.job_id = hello.job_id
        self.name = hello.name
        self.channel_count = hello.channel_count
        self.acks = self.core.acks
        self.sink = sink
        self.superseded = False  # a resuming sender took the destination over
        self.peer_host = "?"  # the host that opened the job (limits per peer)
        self.channels: dict[int, ReceiverChannel] = {}
        self.all_ended = asyncio.Event()
        self.stats = JobStats(role="receiver", total=self.manifest.image_size,
                              page_size=self.manifest.page_size, counters=self.core.counters)
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[JobStats] = loop.create_future()
        self._threads_ended = asyncio.Event()
        self.log = get_logger(job=str(self.job_id), name=self.name, role="receiver")
        self._watchdog = asyncio.ensure_future(self._watch())
        self._commit_task: asyncio.Task[None] | None = None
        self._committing = False  # past waiting for every END: no new session now
        self._checkpoint_timer: asyncio.TimerHandle | None = None
        self._checkpointing: asyncio.Future[None] | None = None
        # Native receiving: what the job's threads share, and how many run.
        self._native: Any = None
        self._pumps = 0
        self.stats.extra["data-path"] = "loop"
        # Refreshing a committed copy: its descriptor, whether the partial file
        # shares its blocks, the task that sends its sums, the SUMS_REQUESTs it
        # has still to answer, and the read now running off the loop.
        self._committed_fd: int | None = None
        self._cloned = False
        self._refresh_task: asyncio.Task[None] | None = None
        self._sums_requests: deque[SumsRequest] = deque()
        self._sums_wakeup = asyncio.Event()
        self._refresh_read: asyncio.Future[Any] | None = None

    def native_shared(self) -> Any:
        """What this job's native receiving threads share (made for the first);
        call :meth:`pump_stopped` when each thread has ended."""
        if self._native is None:
            manifest = self.manifest
            mode = self.server.receive_path
            fd = os.dup(self.sink.fileno())
            try:
                self._native = impl.RecvJobShared(
                    self.tracker.status_array, manifest.image_size, manifest.packet_count,
                    manifest.page_size, manifest.packet_pages, self.acks, fd, mode,
                    self.core.live)
            except BaseException:
                os.close(fd)
                raise
            self.stats.extra["data-path"] = "native"
            self.stats.extra["receive-path"] = mode
        self._pumps += 1
        return self._native

    def pump_stopped(self, index: int, cpu_s: float) -> None:
        """A native receiving thread of this job ended."""
        self.stats.add_thread_cpu(f"dsamig-recv-{index}", cpu_s)
        self._pumps -= 1
        self._release_native()

    def _release_native(self) -> None:
        """Unmap and unpin once the job is over and its threads have ended."""
        if self._pumps == 0 and self.done.done():
            if self._native is not None:
                self._native.close()
                self._native = None
            self._threads_ended.set()

    async def threads_ended(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until the job is over and its native
        threads have ended, so that their CPU time is in its figures."""
        try:
            await bounded(self._threads_ended.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @property
    def tracker(self) -> PacketTracker:
        """The core's packet tracker."""
        return self.core.tracker

    def resume_from(self, record: bytes | None) -> None:
        """Continue in a kept partial file from its checkpoint, or start afresh.

        Only the packets the checkpoint records are known: the core names the
        byte ranges to clear, and without a usable checkpoint the file starts
        empty.
        """
        ranges, reason = self.core.restore(record)
        if ranges is not None and not self.sink.discard(ranges):
            self.core.forget_restored()
            ranges, reason = None, "the file system cannot punch holes"
        if ranges is None:
            if reason != "no checkpoint":
                self.log.warning("checkpoint ignored", reason=reason)
            self.sink.reset()
            return
        if self.core.needs_reload:
            self._reload()
        self.log.info("job resumed", packets_done=self.core.counters.resumed_packets,
                      packets=self.manifest.packet_count)

    def _reload(self) -> None:
        """Read back every done packet of a restored live job and take its
        record from what is stored; then make the checkpoint say so (and say
        "live") before any new round can change a packet again."""
        manifest = self.manifest
        page_size = manifest.page_size
        packets: list[tuple[int, bytes, int]] = []
        try:
            for n in self.core.tracker.done_packets():
                offset, span = manifest.range_bytes(n, 1)
                data = memoryview(self.sink.read(offset, span))
                bitmap, _ = impl.zero_bitmap(data, page_size)
                _, _, crc = impl.packet_payload(data, bitmap, page_size)
                packets.append((n, bitmap, crc))
            self.core.reload(packets)
            self.sink.checkpoint(self.core.tracker.snapshot().to_bytes())
        except SinkError as exc:
            raise JobFailedError(str(exc), ErrorCode.IO) from None
        self.log.info("live job's packets read back", packets=len(packets))

    # --- refresh -----------------------------------------------------------------------

    def begin_refresh(self, committed_fd: int) -> None:
        """Refresh the committed copy open as ``committed_fd`` (the job owns it
        from now on): the partial file starts as its clone where the file
        system can share blocks, else its pages are copied as they are summed."""
        self._committed_fd = committed_fd
        self._cloned = self.sink.clone_from(committed_fd)
        self.core.begin_refresh()
        self.stats.extra["refresh"] = {"cloned": self._cloned}
        self.log.info("refreshing the committed copy", cloned=self._cloned)

    def start_refresh(self) -> None:
        """WELCOME granted REFRESH: send the packet sums, answer SUMS_REQUESTs."""
        if self._refresh_task is None:
            self._refresh_task = asyncio.ensure_future(self._refresh())

    def sums_requested(self, index: int, request: SumsRequest) -> None:
        """A SUMS_REQUEST: checked now, answered in order by the refresh task."""
        self.core.sums_requested(index, request)
        self._sums_requests.append(request)
        self._sums_wakeup.set()

    async def _refresh(self) -> None:
        """Send the committed copy's packet sums, a chunk at a time read and
        hashed off the loop, and answer each SUMS_REQUEST as it comes, one
        read at a time, until the job ends."""
        manifest = self.manifest
        seed = os.urandom(SUMS_SEED_SIZE)
        key = impl.fingerprint_key(seed, manifest.page_size)
        packet_bytes = manifest.packet_pages * manifest.page_size
        chunk = max(1, min(MAX_SUMS_PACKETS, REFRESH_CHUNK_BYTES // packet_bytes))
        loop = asyncio.get_running_loop()
        try:
            while not self.done.done():
                if self._sums_requests:
                    request = self._sums_requests.popleft()
                    frame = await self._off_loop(loop, partial(self._page_sums, request, key,
                                                               seed))
                    self._send_sums(frame)
                elif self.core.summed_packets < manifest.packet_count:
                    first = self.core.summed_packets
                    count = min(chunk, manifest.packet_count - first)
                    packets, frame = await self._off_loop(
                        loop, partial(self._packet_sums, first, count, key, seed))
                    self.core.refreshed(packets, self.clock())
                    self._send_sums(frame)
                    self.checkpoint(urgent=False)
                else:
                    self._sums_wakeup.clear()
                    await self._sums_wakeup.wait()  # the job's watchdog bounds the job
        except SinkError as exc:
            self.fail(JobFailedError(str(exc), ErrorCode.IO))
        except (ProtocolError, DsamigError) as exc:
            self.fail(exc if isinstance(exc, DsamigError) else JobFailedError.of(exc))

    async def _off_loop(self, loop: asyncio.AbstractEventLoop, work: Callable[[], Any]) -> Any:
        """Run ``work`` on the executor; the committed copy stays open until it returns."""
        future = self._refresh_read = loop.run_in_executor(None, work)
        # Retrieved even when the job ended meanwhile (its sink closed under it).
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            return await asyncio.shield(future)
        finally:
            if future.done():
                self._refresh_read = None

    def _send_sums(self, frame: Sums) -> None:
        channel = self.channels.get(0)
        if channel is None:
            raise JobFailedError("channel 0 left during the refresh's exchange of sums")
        channel.send_frame(frame)

    def _packet_sums(self, first: int, count: int, key: bytes, seed: bytes
                     ) -> tuple[list[tuple[int, bytes, int]], Sums]:
        """Read packets of the committed copy (a thread): their records and
        packet sums; without a clone, their pages are copied too."""
        assert self._committed_fd is not None
        manifest = self.manifest
        page_size = manifest.page_size
        offset, span = manifest.range_bytes(first, count)
        data = memoryview(read_exact(self._committed_fd, offset, span, self.sink.path))
        fingerprints = array("Q", [0]) * manifest.range_pages(first, count)
        impl.fingerprint_pages(data, page_size, key, fingerprints, 0)
        raw = memoryview(fingerprints).cast("B")
        sums = array("Q")
        records = array("I")
        packets: list[tuple[int, bytes, int]] = []
        page = 0
        for n in range(first, first + count):
            start, length = manifest.range_bytes(n, 1)
            piece = data[start - offset : start - offset + length]
            bitmap, _ = impl.zero_bitmap(piece, page_size)
            views, payload_length, crc = impl.packet_payload(piece, bitmap, page_size)
            pages = manifest.pages_in_packet(n)
            sums.append(packet_fingerprint(raw[8 * page : 8 * (page + pages)], seed))
            records.append(packet_record(bitmap, crc))
            packets.append((n, bitmap, crc))
            page += pages
            if payload_length and not self._cloned:
                self.sink.write_packet(memoryview(b"".join(views)), bitmap, page_size, start,
                                       length)
        last = first + count == manifest.packet_count
        return packets, Sums(first, count, seed, sums.tobytes(), records.tobytes(), last=last)

    def _page_sums(self, request: SumsRequest, key: bytes, seed: bytes) -> Sums:
        """The page sums of the requested packets, read again (a thread)."""
        assert self._committed_fd is not None
        manifest = self.manifest
        offset, span = manifest.range_bytes(request.first_packet, request.packet_count)
        data = read_exact(self._committed_fd, offset, span, self.sink.path)
        pages = manifest.range_pages(request.first_packet, request.packet_count)
        fingerprints = array("Q", [0]) * pages
        impl.fingerprint_pages(data, manifest.page_size, key, fingerprints, 0)
        bitmap, _ = impl.zero_bitmap(data, manifest.page_size)
        return Sums(request.first_packet, request.packet_count, seed, fingerprints.tobytes(),
                    page_count=pages, zero_bitmap=bitmap, pages=True)

    def _end_refresh(self) -> None:
        """Stop the refresh task; close the committed copy once no read uses it."""
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        fd, self._committed_fd = self._committed_fd, None
        if fd is None:
            return
        if self._refresh_read is not None and not self._refresh_read.done():
            self._refresh_read.add_done_callback(lambda _: os.close(fd))
        else:
            os.close(fd)

    def restart_session(self) -> None:
        """Channel 0 said HELLO again: the sender lost its channels and starts
        over from our RESUME_STATE; the old connections are done with."""
        if self.core.refresh and self.core.summed_packets < self.manifest.packet_count:
            exc = JobFailedError("the sender reconnected before the refresh's sums were sent; "
                                 "start the refresh again")
            self.fail(exc)
            raise exc
        self._sums_requests.clear()  # asked by the old session: it will ask again
        if self._commit_task is not None:
            if self._committing:
                raise JobFailedError("the job is committing what the sender's last session "
                                     "sent", ErrorCode.REJECTED)
            # A COMMIT_REQUEST belongs to its session: the new one asks again
            # once its channels have ended.
            self._commit_task.cancel()
            self._commit_task = None
        try:
            self.core.restart_session(self.clock())
        except LimitExceededError as exc:
            self.fail(JobFailedError.of(exc))
            raise
        for channel in list(self.channels.values()):
            channel.detach()
            channel.close()
        self.channels.clear()
        self.all_ended.clear()
        self.stats.earlier_transferred += sum(c.transferred for c in self.stats.channels)
        self.stats.channels.clear()

    @property
    def finished(self) -> bool:
        return self.done.done()

    def attach(self, channel: ReceiverChannel, hello: Hello) -> int:
        """Join a channel to the job; its generation. ChannelRefusedError
        refuses that channel alone."""
        index = hello.channel_index
        try:
            generation = self.core.attach(index, hello.channel_count, self.clock())
        except LimitExceededError as exc:
            self.fail(JobFailedError.of(exc))
            raise
        old = self.channels.get(index)
        if old is not None:
            # The sender reconnected this channel: the old connection is stale.
            old.detach()
            old.close()
        for stale in [s for s in self.stats.channels if s.index == index]:
            self.stats.earlier_transferred += stale.transferred
            self.stats.channels.remove(stale)
        self.all_ended.clear()
        self.channels[index] = channel
        self.stats.channels.append(channel.stats)
        self.stats.channels.sort(key=lambda c: c.index)
        if self.core.all_attached:
            self.stats.mark_setup_done()
            self.stats.status = "active"
        return generation

    def detach(self, channel: ReceiverChannel) -> None:
        """A channel left the job (closed, or replaced by a reconnect)."""
        self.core.detach(channel.index, channel.generation,
                         None if channel.again else channel.current)
        if self.channels.get(channel.index) is channel:
            del self.channels[channel.index]

    @property
    def packet_bytes(self) -> int:
        """The payload buffer a channel needs: one whole packet."""
        return self.manifest.packet_pages * self.manifest.page_size

    def packet_received(
        self, index: int, header: PacketHeader, payload: memoryview, again: bool
    ) -> None:
        """Verify and store one packet whose payload is complete in ``payload``
        (the loop path).

        ``again``: the packet is already stored (a retransmission after a
        broken channel); it is only compared, not written.
        """
        crc = impl.crc32c(payload)
        if crc != header.payload_crc:
            raise CorruptPacketError.of_packet(header.packet_number, crc, header.payload_crc)
        if not again:
            offset, span = self.manifest.range_bytes(header.packet_number, 1)
            try:
                self.sink.write_packet(payload, header.zero_bitmap, self.manifest.page_size,
                                       offset, span)
            except SinkError as exc:
                # Keep what is stored: once space is freed the sender can resume.
                raise JobFailedError(str(exc), ErrorCode.IO, resumable=self.acks) from None
        self.packet_stored(index, header, crc, again)

    def page_list_received(self, index: int, header: PacketHeader, payload: memoryview) -> None:
        """Apply a live round's PAGE_LIST to the packet the receiver holds.

        The packet's current bytes are read, the present pages merged in (the
        zero ones as zeros), and the whole packet's new record must be the one
        the sender computed, before anything is written: then the present
        normal pages are written and the present zero pages punched out.
        """
        crc = impl.crc32c(payload)
        if crc != header.payload_crc:
            raise CorruptPacketError.of_packet(header.packet_number, crc, header.payload_crc)
        manifest = self.manifest
        page_size = manifest.page_size
        offset, span = manifest.range_bytes(header.packet_number, 1)
        pages = header.page_count
        try:
            packet = self.sink.read(offset, span)
        except SinkError as exc:
            raise JobFailedError(str(exc), ErrorCode.IO, resumable=True) from None
        _, old_zero = impl.zero_bitmap(packet, page_size)
        present = int.from_bytes(header.present_bitmap, "little")
        zero = int.from_bytes(header.zero_bitmap, "little")
        every = (1 << pages) - 1
        width = len(header.zero_bitmap)

        def runs_of(pages_set: int) -> list[tuple[int, int]]:
            """Byte ranges (offset in the packet, length) of the runs of ``pages_set``."""
            return [(first * page_size, min(count * page_size, span - first * page_size))
                    for first, count in impl.normal_runs(
                        (~pages_set & every).to_bytes(width, "little"), pages)]

        # Run by run, not page by page: the payload holds the present normal
        # pages in order; the present zero pages become zeros.
        at = 0
        for start, length in runs_of(present & ~zero):
            packet[start : start + length] = payload[at : at + length]
            at += length
        zero_runs = runs_of(present & zero)
        for start, length in zero_runs:
            packet[start : start + length] = bytes(length)
        bitmap, _ = impl.zero_bitmap(packet, page_size)
        _, _, new_crc = impl.packet_payload(memoryview(packet), bitmap, page_size)
        if packet_record(bitmap, new_crc) != header.record:
            raise JobFailedError(
                f"packet {header.packet_number} after its PAGE_LIST would have another record "
                f"than the sender's 0x{header.record:08x}: the copy went wrong",
                ErrorCode.INTEGRITY)
        written = ~(present & ~zero) & every
        try:
            self.sink.write_packet(payload, written.to_bytes(width, "little"),
                                   page_size, offset, span)
            self.sink.zero_pages([(offset + start, length) for start, length in zero_runs])
        except SinkError as exc:
            raise JobFailedError(str(exc), ErrorCode.IO, resumable=True) from None
        self.core.page_list_applied(index, header, old_zero, bitmap, new_crc, self.clock())
        self.checkpoint(urgent=False)

    def packet_stored(self, index: int, header: PacketHeader, crc: int, again: bool) -> None:
        """A packet is verified and stored (or, ``again``, compared): record it."""
        self.core.packet_stored(index, header, crc, again, self.clock())
        self.checkpoint(urgent=False)

    def zero_range_received(self, index: int, frame: ZeroRange) -> None:
        self.core.zero_range(index, frame, self.clock())
        self.checkpoint(urgent=False)

    def channel_ended(self, index: int) -> None:
        if self.core.channel_ended(index, self.clock()):
            self.all_ended.set()
        self.checkpoint(urgent=True)  # the sender waits for the ACKs of its last frames

    def checkpoint(self, *, urgent: bool) -> None:
        """Make what is stored durable when the core says so, then ACK each
        channel up to what the checkpoint covers: an ACK means "durable"."""
        if self._commit_task is not None or self.done.done():
            return  # the commit makes everything durable itself
        action = self.core.checkpoint(self.clock(), urgent=urgent)
        if action is Checkpoint.ACK:
            self._send_acks(self.core.acks_due())
        elif action is Checkpoint.LATER:
            if self._checkpoint_timer is None:
                self._checkpoint_timer = asyncio.get_running_loop().call_later(
                    self.core.checkpoint_delay_s, self._checkpoint_timer_fired)
        elif action is Checkpoint.TAKE:
            record = self.core.begin_checkpoint(self.clock())
            future = asyncio.get_running_loop().run_in_executor(
                None, self.sink.checkpoint, record)
            self._checkpointing = future
            future.add_done_callback(self._checkpointed)

    def _checkpoint_timer_fired(self) -> None:
        self._checkpoint_timer = None
        self.checkpoint(urgent=True)

    def _checkpointed(self, future: asyncio.Future[None]) -> None:
        self._checkpointing = None
        exc = future.exception()  # retrieved even when the job ended meanwhile
        if self.done.done():
            return
        if exc is not None:
            self.core.checkpoint_failed()
            message = str(exc) if isinstance(exc, SinkError) else f"checkpoint failed: {exc}"
            self.fail(JobFailedError(message, ErrorCode.IO, resumable=True))
            return
        acks, again = self.core.checkpoint_written()
        self._send_acks(acks)
        self.checkpoint(urgent=again)

    def _send_acks(self, acks: list[tuple[int, Ack]]) -> None:
        for index, ack in acks:
            channel = self.channels.get(index)
            if channel is not None:
                channel.send_frame(ack)

    def commit_requested(self, request: CommitRequest) -> None:
        if self._commit_task is None:
            self._commit_task = asyncio.ensure_future(self._commit(request))

    async def _commit(self, request: CommitRequest) -> None:
        timeouts = self.server.timeouts
        try:
            try:
                await bounded(self.all_ended.wait(), timeouts.idle_s)
            except TimeoutError:
                missing = sorted(set(range(self.channel_count)) - self.core.ended)
                raise JobFailedError(f"channels {missing} never sent END") from None
            self._committing = True
            self.stats.status = "completing"
            if self._checkpointing is not None:
                # Never fsync/close the file under a checkpoint still writing.
                await asyncio.wait([self._checkpointing], timeout=timeouts.commit_s)
            try:
                digest = self.core.commit(request)
            except RemoteProtocolError as exc:
                raise JobFailedError.of(exc) from None
            loop = asyncio.get_running_loop()
            try:
                await bounded(
                    loop.run_in_executor(None, self.sink.commit), timeouts.commit_s
                )
            except SinkError as exc:
                raise JobFailedError(str(exc), ErrorCode.IO) from None
            except TimeoutError:
                raise JobFailedError(
                    f"commit of {self.sink.path!r} took over {timeouts.commit_s:g} s", ErrorCode.IO
                ) from None
            self.channels[0].send_frame(Commit(digest=digest))
            self.stats.finish("completed")
            # At debug: the daemon's "job finished" line (or the one-shot
            # command's summary) is the one canonical report of a job.
            self.log.debug("job completed", path=self.sink.path)
            self._end()
            for channel in list(self.channels.values()):
                channel.close()
            self._release()
            if not self.done.done():
                self.done.set_result(self.stats)
            self._release_native()
            self.server.job_finished(self)
        except JobFailedError as exc:
            self.fail(exc)

    def fail(self, exc: DsamigError) -> None:
        """Fail the job: tell the sender, close every channel, delete the partial
        file (or keep it for a resume when the failure allows)."""
        if self.done.done():
            return
        code = exc.code if isinstance(exc, JobFailedError) else ErrorCode.INTERNAL
        status = "cancelled" if code == ErrorCode.CANCELLED else "failed"
        resumable = isinstance(exc, JobFailedError) and exc.resumable and self.acks
        self.sink.abort(keep_for_resume=resumable)
        self.stats.finish(status, str(exc))
        self.log.debug("job cancelled" if status == "cancelled" else "job failed",
                       error=str(exc))
        self._end()
        for channel in list(self.channels.values()):
            channel.send_error(code, str(exc))
            channel.close_after_error()
        self._release()
        self.done.set_exception(exc)
        self.done.exception()  # retrieved: whoever awaits it still gets it
        self._release_native()
        self.server.job_finished(self)

    def _end(self) -> None:
        """Stop the job's timers (and its refresh)."""
        self._end_refresh()
        self._watchdog.cancel()
        if self._checkpoint_timer is not None:
            self._checkpoint_timer.cancel()
            self._checkpoint_timer = None

    def _release(self) -> None:
        """Let go of the channels and their packet buffers once the job is over."""
        for channel in list(self.channels.values()):
            channel.detach()
        self.channels.clear()

    async def _watch(self) -> None:
        """Fail the job when the core says it stalled; take the checkpoints
        that are due by time alone."""
        idle_s = self.server.timeouts.idle_s
        tick = min(0.25 if self.acks else 1.0, idle_s / 4)
        while not self.done.done():
            await asyncio.sleep(tick)
            self.checkpoint(urgent=False)
            if self._commit_task is not None:
                continue  # the commit has its own bounds
            stall = self.core.stalled(self.clock(), idle_s)
            if stall is not None:
                self.fail(JobFailedError(stall.message, stall.code, resumable=True))
                return


class ReceiverChannel(asyncio.BufferedProtocol):
    """One TCP connection on the receiver: frames in, payload straight to a buffer."""

    def __init__(self, server: ReceiverServer) -> None:
        self.server = server
        self.decoder = FrameDecoder(expect_preamble=True, max_body=RECEIVER_MAX_BODY)
        self.state = ChannelState.receiver(psk=server.psk)
        # Small until a HELLO is accepted: an unauthenticated connection costs
        # this buffer (4 KiB) and no more. The packet buffer comes with the job.
        self.header = memoryview(bytearray(FRAME_HEADER_SIZE + RECEIVER_MAX_BODY))
        self.payload: memoryview | None = None
        self.current: PacketHeader | None = None
        self.filled = 0
        self.job: ReceiverJob | None = None
        self.index = -1
        self.generation = 0  # which connection of this channel index, for the core
        self.stats = ChannelStats(-1, self.state)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peer_host = "?"
        self.discarding = False  # after an ERROR: read and drop until the peer closes
        self.again = False  # the current packet is already stored (retransmission)
        self.unauthenticated = False  # counted by the server's gate until HELLO
        self.pump: Any = None  # the native thread reading this connection, if any
        self._pump_job: ReceiverJob | None = None
        self._bytes_before_pump = 0
        self._pump_unfinished: int | None = None  # from the thread's last event

    # asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.peer_host = str(peer[0]) if peer else "?"
        if not self.server.gate.enter(self.peer_host):
            self.discarding = True
            self.transport.abort()  # over the bound on unauthenticated connections
            self.server.refused(self.peer, self.server.gate.why(self.peer_host))
            return
        self.unauthenticated = True
        tune_socket(transport.get_extra_info("socket"))
        self.server.channel_opened(self)
        # A peer that never completes its HELLO must not hold a channel forever.
        self._hello_timer = asyncio.get_running_loop().call_later(
            self.server.timeouts.handshake_s, self._hello_timeout
        )

    def _hello_timeout(self) -> None:
        if self.job is None and not self.discarding:
            self._fail(JobFailedError(
                f"no HELLO from {self.peer} within {self.server.timeouts.handshake_s:g} s",
                ErrorCode.PROTOCOL,
            ))

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
        job = self.job
        if job is not None and job.acks and not job.finished and self.state.state in (
            ReceiverState.STREAMING, ReceiverState.HANDSHAKE
        ):
            # A sender that died mid-stream: like a reset, it may come back.
            return None
        try:
            self.decoder.receive_data(b"")
            self._process()
        except (ProtocolError, DsamigError) as exc:
            self._fail(exc)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.unauthenticated and self.job is None and self.index < 0:
            return  # refused at connection_made: nothing was set up
        self._hello_timer.cancel()
        self._authenticated()
        self._stop_pump()
        self.server.channel_closed(self)
        job = self.job
        if job is None or job.finished:
            return
        if job.acks:
            # The sender reconnects and re-sends what we did not acknowledge;
            # the job's watchdog bounds how long we wait for it.
            job.log.info("channel lost", channel=self.index, error=str(exc) if exc else None)
            self.detach()
            return
        reason = f" ({exc})" if exc else ""
        job.fail(JobFailedError(f"sender closed channel {self.index} mid-transfer{reason}"))

    def detach(self) -> None:
        """Leave the job: a half-received packet is given up (it will be re-sent),
        and the packet buffer is let go."""
        job = self.job
        self.payload = None
        self._stop_pump()
        if job is None:
            return
        job.detach(self)
        self.current = None
        self.job = None

    def _authenticated(self) -> None:
        """This connection no longer counts as unauthenticated."""
        if self.unauthenticated:
            self.unauthenticated = False
            self.server.gate.leave(self.peer_host)

    # frames
    def _process(self) -> None:
        while True:
            event = self.decoder.next_event()
            if event is NEED_DATA or event is CLOSED:
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
                job = self._job()
                job.zero_range_received(self.index, event)
            elif isinstance(event, Hello):
                self._hello(event)
            elif isinstance(event, Challenge):
                self.send_frame(self.state.answer_challenge(os.urandom(AUTH_NONCE_SIZE)))
            elif isinstance(event, End):
                self._job().channel_ended(self.index)
            elif isinstance(event, Round):
                done = self._job().core.round_ended(self.index, event, self._job().clock())
                if done is not None:
                    self._job().channels[0].send_frame(done)
            elif isinstance(event, CommitRequest):
                self._job().commit_requested(event)
            elif isinstance(event, SumsRequest):
                self._job().sums_requested(self.index, event)
            elif isinstance(event, Error):
                code = getattr(event.code, "name", str(event.code))
                raise JobFailedError(f"sender failed the job ({code}): {event.message}",
                                     ErrorCode.CANCELLED)

    def _job(self) -> ReceiverJob:
        assert self.job is not None  # the state machine allows data only after HELLO
        return self.job

    def _hello(self, hello: Hello) -> None:
        self._hello_timer.cancel()
        self.index = hello.channel_index
        self.stats.index = hello.channel_index
        job = self.server.job_for(hello, self.peer_host)
        self.generation = job.attach(self, hello)  # ChannelRefusedError: this channel only
        self.job = job
        self._authenticated()
        offered = FEATURE_ACKS | FEATURE_RESUME | (FEATURE_LIVE if job.core.live else 0)
        if job.core.refresh and self.index == 0:
            offered |= FEATURE_REFRESH
        features = hello.features & offered if job.acks else 0
        self.send_frame(Welcome(job_id=hello.job_id, features=features))
        if features & FEATURE_REFRESH:
            job.start_refresh()
        if features & FEATURE_RESUME:
            # What we hold: the sender skips (and checks) these packets.
            for frame in job.core.resume_frames():
                self.send_frame(frame)
        if self.server.native and native_receiving() and not self._tls():
            self._go_native(job)
        else:
            # Bounded by the receiver's max_packet_bytes, checked when the job opened.
            self.payload = memoryview(bytearray(job.packet_bytes))

    def _tls(self) -> bool:
        # Seam for kernel TLS: a connection whose keys the kernel holds (TLS_RX)
        # could be read natively too, but Python's ssl module does not hand
        # them over, so TLS connections stay on the loop path.
        return self.transport is None or bool(self.transport.get_extra_info("ssl_object"))

    # native data path
    def _go_native(self, job: ReceiverJob) -> None:
        """From here on a native thread reads this connection; the loop keeps
        writing to it (ACK, COMMIT, ERROR) through the transport."""
        assert self.transport is not None
        self.transport.pause_reading()
        fd = os.dup(self.transport.get_extra_info("socket").fileno())
        try:
            pump = impl.RecvPump(job.native_shared(), fd, self.index,
                                 self.decoder.take_buffered(), job.packet_bytes)
        except BaseException:
            os.close(fd)
            raise
        # Frames the thread passes on arrive whole: decoded afresh.
        self.decoder = FrameDecoder(expect_preamble=False, max_body=RECEIVER_MAX_BODY)
        self.pump = pump
        self._pump_job = job
        self._bytes_before_pump = self.stats.transferred
        job_loop = asyncio.get_running_loop()
        job_loop.add_reader(pump.fileno(), self._pump_events)
        pump.start()

    def _pump_events(self) -> None:
        pump = self.pump
        if pump is None:
            return
        events = pump.collect()
        self.stats.transferred = self._bytes_before_pump + pump.stats()["bytes"]
        for event in events:
            if event[0] == "stopped":
                self._pump_unfinished = event[1]  # in case handling stops it first
        for event in events:
            if event[0] == "stopped":
                self._pump_ended(event[1])
                return
            if self.job is None or self.discarding:
                continue  # left its job: what the thread still says is moot
            try:
                self._pump_event(event)
            except (ProtocolError, DsamigError) as exc:
                self._fail(exc)
            if self.pump is None:
                return  # stopped while handling the event

    def _pump_event(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        job = self._job()
        if kind == "packet":
            _, number, length, crc, again, bitmap = event
            manifest = job.manifest
            header = PacketHeader(number, number * manifest.packet_pages,
                                  manifest.pages_in_packet(number), length, crc, bitmap)
            self.state.on_frame(header)
            job.packet_stored(self.index, header, crc, again)
        elif kind == "frame":
            self.decoder.receive_data(event[1])
            self._process()
        elif kind == "corrupt":
            _, number, crc, announced = event
            exc = CorruptPacketError.of_packet(number, crc, announced)
            if not job.acks:
                raise exc
            job.log.warning("corrupted packet, dropping channel", channel=self.index,
                            error=str(exc))
            self.detach()
            self.close()
        elif kind == "eof":
            if job.acks and not job.finished and self.state.state in (
                ReceiverState.STREAMING, ReceiverState.HANDSHAKE
            ):
                self.close()  # like a reset: the sender may come back
                return
            if event[1]:
                raise RemoteProtocolError("connection closed in the middle of a frame")
            self.decoder.receive_data(b"")
            self._process()
            self.close()
        elif kind == "error":
            _, err, in_file, _number = event
            if not in_file:
                self._lose(OSError(err, os.strerror(err)))
                return
            what = {errno.ENOSPC: "no space left on device",
                    errno.EDQUOT: "disk quota exceeded"}.get(err)
            message = (f"{what} writing {job.sink.partial_path!r}" if what else
                       f"cannot write {job.sink.partial_path!r}: {os.strerror(err)}")
            # Keep what is stored: once space is freed the sender can resume.
            raise JobFailedError(message, ErrorCode.IO, resumable=job.acks)

    def _lose(self, exc: Exception) -> None:
        """The connection broke under the native thread: as connection_lost."""
        transport = self.transport
        if transport is not None:
            transport.abort()  # connection_lost follows, with the same judgement
        self._stop_pump()

    def _stop_pump(self) -> None:
        """Stop the native thread and wait for it (it ends within one system
        call), so that nothing of this connection happens after this."""
        pump = self.pump
        if pump is None:
            return
        asyncio.get_running_loop().remove_reader(pump.fileno())
        job = self._pump_job
        for event in pump.close(PUMP_STOP_S):
            if event[0] == "stopped":
                self._pump_unfinished = event[1]
            elif event[0] == "packet" and not event[4] and job is not None and not job.finished:
                # Stored but never recorded: it is not acknowledged, so it comes again.
                job.tracker.unclaim(event[1])
        if pump.is_stopped:
            self._pump_ended(self._pump_unfinished)
        else:  # it did not stop in time (a hung file system): its claim stays
            self.pump = self._pump_job = None

    def _pump_ended(self, unfinished: int | None) -> None:
        """The native thread's last event: release what it held."""
        pump, job = self.pump, self._pump_job
        self.pump = self._pump_job = None
        with contextlib.suppress(ValueError):  # closed already
            asyncio.get_running_loop().remove_reader(pump.fileno())
        pump.close(PUMP_STOP_S)  # frees it (it has ended)
        final = pump.stats()
        cpu_s = final.get("cpu-s", 0.0)
        self.stats.transferred = self._bytes_before_pump + final.get("bytes", 0)
        if job is None:
            return
        if unfinished is not None and not job.finished:
            job.tracker.unclaim(unfinished)  # it will come again
        job.pump_stopped(self.index, cpu_s)

    def _packet_header(self, header: PacketHeader) -> None:
        job = self._job()
        if header.present_bitmap:  # a live round's PAGE_LIST: applied on the loop
            job.core.page_list_header(self.index, header)
            self.again = False
            self.current = header
            self.filled = 0
            if self.payload is None:
                self.payload = memoryview(bytearray(job.packet_bytes))
            if header.payload_length == 0:
                self._packet_complete()
            return
        self.again = job.core.packet_header(header)
        if self.pump is not None:
            # A header the native checks refused but the Python ones accept.
            raise JobFailedError(
                f"PACKET {header.packet_number}: the native and Python checks disagree",
                ErrorCode.INTERNAL)
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
            if header.present_bitmap:
                job.page_list_received(self.index, header, self.payload[: header.payload_length])
            else:
                job.packet_received(self.index, header, self.payload[: header.payload_length],
                                    self.again)
        except CorruptPacketError as exc:
            if job.acks:
                # Self-healing: drop this connection; the sender reconnects and
                # re-sends the packet, which we never stored.
                job.log.warning("corrupted packet, dropping channel", channel=self.index,
                                error=str(exc))
                self.detach()
                self.close()
                return
            raise
        self.current = None

    # output: every frame goes through the state machine first
    def send_frame(self, frame: Frame) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.state.on_send(frame)
            self.transport.write(encode(frame))

    def send_error(self, code: ErrorCode, message: str) -> None:
        """Report a failure to the peer, if this channel still may."""
        if self.state.can_send_error:
            self.send_frame(Error(code=code, message=message))

    def close(self) -> None:
        self._stop_pump()
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
        if self.pump is not None:
            # The thread owns reading: stop it, and let the loop drain instead.
            self._stop_pump()
            transport.resume_reading()
        try:
            transport.write_eof()
        except (OSError, RuntimeError):
            transport.close()
            return
        asyncio.get_running_loop().call_later(linger_s, transport.close)

    def _fail(self, exc: ProtocolError | DsamigError) -> None:
        refused_alone = isinstance(exc, ChannelRefusedError)
        if isinstance(exc, ProtocolError):
            # Before HELLO there is no channel index; refused() names the peer.
            # A refusal is about the job, not this channel's bytes: no prefix.
            about_bytes = not isinstance(exc, ChannelRefusedError | LimitExceededError)
            where = (f"channel {self.index} from {self.peer}: "
                     if self.index >= 0 and about_bytes else "")
            exc = JobFailedError.of(exc, where)
        if self.job is not None and not refused_alone:
            self.job.fail(exc)
        else:
            code = getattr(exc, "code", ErrorCode.PROTOCOL)
            self.server.refused(self.peer, str(exc))
            self.send_error(code, str(exc))
        self.close_after_error()


class ConnectionGate:
    """Counts connections that have not had a HELLO accepted, in all and per
    host, and refuses those beyond the bounds: a flood of idle connections
    from one address must not take descriptors or memory from the others."""

    def __init__(self, limits: ReceiverLimits) -> None:
        self.limits = limits
        self.total = 0
        self.per_host: dict[str, int] = {}

    def enter(self, host: str) -> bool:
        """Count one more from ``host``; False (not counted) when over a bound."""
        if (
            self.total >= self.limits.max_unauthenticated
            or self.per_host.get(host, 0) >= self.limits.max_unauthenticated_per_peer
        ):
            return False
        self.total += 1
        self.per_host[host] = self.per_host.get(host, 0) + 1
        return True

    def leave(self, host: str) -> None:
        """One connection from ``host`` authenticated or closed."""
        self.total -= 1
        left = self.per_host[host] - 1
        if left:
            self.per_host[host] = left
        else:
            del self.per_host[host]

    def why(self, host: str) -> str:
        """The message for a connection ``enter`` refused."""
        if self.per_host.get(host, 0) >= self.limits.max_unauthenticated_per_peer:
            return (f"{self.per_host[host]} connections from {host} have not sent a HELLO yet "
                    f"(max_unauthenticated_per_peer {self.limits.max_unauthenticated_per_peer})")
        return (f"{self.total} connections have not sent a HELLO yet "
                f"(max_unauthenticated {self.limits.max_unauthenticated})")


def filesystem_size(path: str) -> int | None:
    """Bytes of the file system holding ``path`` (None if it cannot be told)."""
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


class ReceiverServer:
    """Listens on one address and runs every job whose channels arrive there.

    ``sink_factory`` turns a job's HELLO into its PageSink (deciding where the
    data goes); ``on_job_started`` is called once per job that opened,
    ``on_job_finished`` once per such job, completed or not, and
    ``on_job_refused`` with the HELLO and the reason for each job refused
    before it opened. ``limits`` bound what any peer may cost. ``security``
    (TLS, pre-shared key) guards every connection, and ``on_refused`` gets one
    line for each connection turned away before it joined a job (failed TLS
    handshake, failed authentication, garbage, too many connections).
    ``clock`` is the time every job rule is measured with. ``native`` lets
    channels move to native receiving threads, which land payloads by
    ``receive_path`` (see :data:`RECEIVE_PATHS`).
    """

    def __init__(
        self,
        host: str,
        port: int,
        sink_factory: SinkFactory,
        *,
        timeouts: Timeouts | None = None,
        limits: ReceiverLimits | None = None,
        on_job_started: Callable[[ReceiverJob], None] | None = None,
        on_job_finished: Callable[[ReceiverJob], None] | None = None,
        on_job_refused: Callable[[Hello, str], None] | None = None,
        security: SecurityConfig | None = None,
        on_refused: Callable[[str], None] | None = None,
        clock: Clock = time.monotonic,
        native: bool | None = None,
        receive_path: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.sink_factory = sink_factory
        self.timeouts = timeouts or Timeouts()
        self.gate = ConnectionGate(limits or ReceiverLimits())
        self.on_job_started = on_job_started
        self.on_job_finished = on_job_finished
        self.on_job_refused = on_job_refused
        self.security = security
        self.psk = psk_of(security)
        self.on_refused = on_refused  # told about every connection refused before a job
        self.clock = clock
        #: Whether channels may move to the native data path (else the loop's);
        #: DSAMIG_DATA_PATH=loop keeps them on the loop (a knob for tests and
        #: for comparing the paths), DSAMIG_RECEIVE_PATH picks how payloads land.
        if native is None:
            native = os.environ.get("DSAMIG_DATA_PATH", "auto") != "loop"
        self.native = native
        if receive_path is None:
            receive_path = os.environ.get("DSAMIG_RECEIVE_PATH", "auto")
        if receive_path not in RECEIVE_PATHS:
            raise ValueError(f"receive path {receive_path!r}: one of {', '.join(RECEIVE_PATHS)}")
        #: How native threads land payloads: as asked, and for "auto" pwrite,
        #: the faster on every file system measured.
        self.receive_path = "pwrite" if receive_path == "auto" else receive_path
        self.jobs: dict[uuid.UUID, ReceiverJob] = {}
        self.channels: set[ReceiverChannel] = set()
        self._server: asyncio.base_events.Server | TlsListener | None = None
        self.log = get_logger(role="receiver")

    @property
    def limits(self) -> ReceiverLimits:
        """The bounds new jobs and connections get (a reload may change them)."""
        return self.gate.limits

    @limits.setter
    def limits(self, limits: ReceiverLimits) -> None:
        self.gate.limits = limits

    async def start(self) -> tuple[str, int]:
        """Bind and listen; return the bound address (port 0 picks a free port)."""
        loop = asyncio.get_running_loop()
        try:
            context = self.security.server_context() if self.security else None
            if context is not None:
                self._server = TlsListener.listen(
                    self.host, self.port, partial(ReceiverChannel, self), context,
                    self.timeouts.handshake_s, self.refused, self.gate,
                )
            else:
                self._server = await loop.create_server(
                    partial(ReceiverChannel, self), self.host, self.port, reuse_address=True
                )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise NetworkError(f"cannot listen on {self.host}:{self.port}: {reason}") from None
        sockname = self._server.sockets[0].getsockname()
        self.port = sockname[1]
        return sockname[0], sockname[1]

    def job_for(self, hello: Hello, peer_host: str = "?") -> ReceiverJob:
        """The job a HELLO opens (channel 0) or joins (the others).

        Raises JobFailedError (REJECTED, IO) when the HELLO is refused; a job
        refused before it opened is reported to ``on_job_refused`` and leaves
        nothing behind.
        """
        if hello.manifest is None:
            job = self.jobs.get(hello.job_id)
            if job is None or job.finished:
                raise JobFailedError(f"channel {hello.channel_index} names unknown job "
                                     f"{hello.job_id}", ErrorCode.REJECTED)
            return job
        existing = self.jobs.get(hello.job_id)
        if existing is not None and not existing.finished:
            if existing.acks and hello.features & FEATURE_RESUME:
                if existing.manifest != hello.manifest:
                    raise JobFailedError(f"job {hello.job_id} came back with another image "
                                         "layout", ErrorCode.REJECTED)
                existing.log.info("sender reconnected", channel=0)
                existing.restart_session()
                return existing
            raise JobFailedError(f"job {hello.job_id} is already running", ErrorCode.REJECTED)
        try:
            problem = manifest_problem(hello.manifest, self.limits)
            if problem is not None:
                raise JobFailedError(problem, ErrorCode.REJECTED)
            return self._open_job(hello, peer_host)
        except JobFailedError as exc:
            if self.on_job_refused is not None:
                self.on_job_refused(hello, str(exc))
            raise

    def _open_job(self, hello: Hello, peer_host: str) -> ReceiverJob:
        assert hello.manifest is not None
        orphan = self._orphan_for(hello, peer_host)
        if orphan is not None:
            # A restarted sender resumes what its predecessor left: hand the
            # partial file and checkpoint over now, not after the idle timeout.
            orphan.log.info("job taken over by a resuming sender", by=str(hello.job_id))
            orphan.superseded = True
            orphan.fail(JobFailedError(f"taken over by resuming job {hello.job_id}",
                                       ErrorCode.CANCELLED, resumable=True))
        try:
            sink = self.sink_factory(hello)
        except DsamigError as exc:
            code = exc.code if isinstance(exc, JobFailedError) else ErrorCode.IO
            raise JobFailedError(str(exc), code) from None
        room = filesystem_size(sink.path)
        if room is not None and hello.manifest.image_size > room:
            raise JobFailedError(
                f"an image of {hello.manifest.image_size} bytes is larger than the file "
                f"system that would hold it ({room} bytes)", ErrorCode.REJECTED)
        for other in list(self.jobs.values()):
            if other.sink.path == sink.path and not other.finished:
                if other.channels:
                    raise JobFailedError(f"destination {sink.path!r} is busy with job "
                                         f"{other.job_id}", ErrorCode.REJECTED)
                # The same destination, abandoned by a sender that has since
                # restarted: hand its partial file and checkpoint over (a job
                # that does not resume starts the file afresh anyway).
                other.superseded = True
                other.fail(JobFailedError("superseded by a resuming sender",
                                          ErrorCode.CANCELLED, resumable=True))
        limits = self.limits
        if len(self.jobs) >= limits.max_jobs:
            raise JobFailedError(f"receiver is busy ({limits.max_jobs} jobs running)",
                                 ErrorCode.REJECTED)
        from_peer = sum(1 for job in self.jobs.values() if job.peer_host == peer_host)
        if from_peer >= limits.jobs_per_peer:
            raise JobFailedError(f"receiver is busy ({from_peer} jobs from {peer_host} running, "
                                 f"the most one host may have)", ErrorCode.REJECTED)
        resuming = bool(hello.features & FEATURE_ACKS and hello.features & FEATURE_RESUME)
        try:
            kept = sink.open(keep_partial=resuming)
        except DsamigError as exc:
            raise JobFailedError(str(exc), ErrorCode.IO) from None
        job = ReceiverJob(hello, sink, self)
        job.peer_host = peer_host
        if kept:
            try:
                job.resume_from(sink.load_checkpoint())
            except DsamigError as exc:
                job._end()
                sink.abort()
                raise JobFailedError(str(exc), ErrorCode.IO) from None
        elif hello.features & FEATURE_REFRESH and job.core.live:
            committed = sink.open_committed()
            if committed is not None:
                job.begin_refresh(committed)
        self.jobs[hello.job_id] = job
        job.log.info("job started", channels=hello.channel_count,
                     size=hello.manifest.image_size, path=sink.path,
                     resumed_packets=job.core.counters.resumed_packets)
        if self.on_job_started is not None:
            self.on_job_started(job)
        return job

    def _orphan_for(self, hello: Hello, peer_host: str) -> ReceiverJob | None:
        """The job a resuming HELLO takes over: unfinished, without a channel
        (its sender is gone), the same name, the same image (manifest) and
        the same peer host."""
        if not (hello.features & FEATURE_ACKS and hello.features & FEATURE_RESUME):
            return None
        for job in self.jobs.values():
            if (not job.finished and job.acks and not job.channels and job.name == hello.name
                    and job.manifest == hello.manifest and job.peer_host == peer_host):
                return job
        return None

    def job_finished(self, job: ReceiverJob) -> None:
        self.jobs.pop(job.job_id, None)
        if self.on_job_finished is not None:
            self.on_job_finished(job)

    def refused(self, peer: str, reason: str) -> None:
        """A connection was turned away before it joined a job (TLS, auth, garbage)."""
        self.log.warning("channel refused", peer=peer, error=reason)
        if self.on_refused is not None:
            self.on_refused(f"refused a connection from {peer}: {reason}")

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
