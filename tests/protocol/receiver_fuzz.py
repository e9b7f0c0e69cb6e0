"""A stateful fuzz target: a receiving job in memory, fed valid and invalid frames.

:class:`ReceiverFuzz` is a receiver (:class:`MemoryReceiver`: the
production :class:`ReceiveJobCore`, one :class:`ChannelState` and
:class:`FrameDecoder` per connection, the byte-exact :class:`MemorySink`,
and the transport's decisions around them) and a hostile sender. The sender
has an image, and another image of the same layout (the first one changed);
each operation opens a connection, sends one frame on one, cuts one, lets
time pass, lands a checkpoint, kills the receiver or damages its checkpoint.
Frames are valid (as the sender of the image would send them), describe the
other image, or break a rule; any channel of the job, in any order, with or
without ACKS, resuming or not.

After every operation the target checks:

(a) the operation cost at most :data:`MEMORY_BOUND` bytes of memory and
    :data:`LINE_BUDGET` lines of Python in ``dsamig`` (with ``measure``), bounds
    that hold whatever sizes, counts and ranges the frames declare: the
    receiver's :data:`FUZZ_LIMITS` bound the geometry it accepts;
(b) a destination is committed only if its bytes are the image that the frames
    the receiver accepted describe, and their digest (computed page by page)
    is the one of the COMMIT_REQUEST; an ACK covers only packets a
    checkpoint made durable;
(c) nothing but a :class:`RemoteProtocolError` (which fails the job or
    refuses the connection, as the transport does) comes out of the receiver:
    any other exception escapes the operation and is a finding.

The hypothesis state machine (test_receiver_fuzz.py) and the long-run driver
(fuzz/fuzz_receiver.py) both drive this class.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import struct
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType as PyFrame
from typing import Any

import dsamig
from dsamig.checksum import crc32c
from dsamig.native import impl
from dsamig.proto import (
    FEATURE_ACKS,
    FEATURE_RESUME,
    NEED_DATA,
    PREAMBLE,
    Ack,
    Commit,
    CommitRequest,
    End,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    Manifest,
    ReceiverState,
    ResumeState,
    Welcome,
    encode,
    encode_packet_header,
)
from dsamig.settings import KiB, MiB, ReceiverLimits
from tests.protocol.pair import MemoryReceiver, MemoryReceiverJob, ReceiverEnd, scan_packet

#: The destination of the jobs of the fuzzer's image, and of foreign layouts.
NAME = "fuzz"
OTHER = "other"
#: What the receiver grants: a declared geometry beyond these is refused.
FUZZ_LIMITS = ReceiverLimits(max_jobs=3, max_packet_bytes=64 * KiB, max_image_size=64 * MiB,
                             max_packets=1 << 17, max_sessions=12, min_job_rate=4 * KiB)
#: Layouts of other jobs (destination OTHER): the largest the limits allow,
#: in packets and in packet bytes, an odd one, and two just beyond them.
FOREIGN = (
    Manifest(64 * MiB, 512, 1),
    Manifest(64 * MiB, 512, 128),
    Manifest(3 * MiB + 17, 4096, 3),
    Manifest(64 * MiB + 1, 512, 1),
    Manifest(MiB, 128 * KiB, 1),
)
IDLE_S = 10.0
#: Per operation, whatever the frame declares: the tracker of the largest
#: image the limits allow (about 10 bytes per packet), its RESUME_STATE
#: frames, a channel's packet buffer, and some room.
MEMORY_BOUND = 16 * FUZZ_LIMITS.max_packets + 8 * FUZZ_LIMITS.max_packet_bytes + 1 * MiB
LINE_BUDGET = 5000
_DSAMIG_DIR = os.path.dirname(dsamig.__file__)
#: Under the pure-Python twin (DSAMIG_NO_EXTENSIONS=1) its lines stand for
#: the native core's work, which is per byte and bounded by the frame's
#: size: they do not count against the budget, which is about Python that
#: walks what a frame declares.
NATIVE_STAND_IN: tuple[str, ...] = (impl.__file__,) if impl.__name__ == "dsamig._pure" else ()

# Frame header of a PACKET with its fixed body, packed by hand so that the
# fuzzer can write what the encoder refuses.
_RAW_PACKET = struct.Struct("<BBHIQQIIIHH")
_U64 = (1 << 64) - 1


class BudgetExceeded(BaseException):
    """An operation ran more lines of dsamig's Python than LINE_BUDGET.

    A BaseException, so that no ``except Exception`` on the way swallows it."""


class LineCounter:
    """Counts the lines of Python run in ``dsamig`` while active (sys.settrace),
    and stops the operation once it passes the budget."""

    def __init__(self, budget: int, skip: tuple[str, ...] = ()) -> None:
        self.budget = budget
        self.skip = skip  # files whose lines do not count
        self.lines = 0

    def _local(self, frame: PyFrame, event: str, arg: Any) -> Any:
        if event == "line":
            self.lines += 1
            if self.lines > self.budget:
                raise BudgetExceeded(
                    f"more than {self.budget} lines of dsamig's Python in one operation "
                    f"(now in {frame.f_code.co_filename}:{frame.f_lineno})")
        return self._local

    def _global(self, frame: PyFrame, event: str, arg: Any) -> Any:
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(_DSAMIG_DIR) and name not in self.skip:
            return self._local
        return None

    def __enter__(self) -> LineCounter:
        self.lines = 0
        self._previous = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._previous)


@dataclass
class FuzzImage:
    """The sender's image and another of the same layout (the image changed)."""

    manifest: Manifest
    image: bytes
    other: bytes

    @classmethod
    def make(cls, rng: random.Random) -> FuzzImage:
        page_size = 512
        packet_pages = rng.choice([1, 2, 3, 4, 8])
        pages = rng.randint(1, 40)
        tail = rng.choice([page_size, page_size, rng.randint(1, page_size)])
        size = (pages - 1) * page_size + tail
        manifest = Manifest(size, page_size, packet_pages)
        image = bytearray(size)
        for page in range(pages):
            if rng.random() < 0.45:
                continue
            start = page * page_size
            fill = rng.randbytes(min(page_size, size - start))
            image[start : start + len(fill)] = fill
            image[start] |= 1  # never zero by chance
        other = bytearray(image)
        for n in rng.sample(range(manifest.packet_count), k=min(2, manifest.packet_count)):
            start, span = manifest.range_bytes(n, 1)
            page = rng.randrange(-(-span // page_size))
            offset = start + page * page_size
            if rng.random() < 0.5:
                other[offset : offset + min(page_size, size - offset)] = bytes(
                    min(page_size, size - offset))
            else:
                other[offset] ^= 0x5A
        return cls(manifest, bytes(image), bytes(other))


def zero_digest_of(manifest: Manifest) -> bytes:
    """The digest of an all-zero image: every record the full zero one, the
    last packet's with its own bitmap (docs/protocol.md), without a scan."""
    count = manifest.packet_count
    if not count:
        return hashlib.sha256(b"").digest()

    def record(n: int) -> bytes:
        bitmap = manifest.full_zero_bitmap(n)
        return crc32c(bitmap + bytes(4)).to_bytes(4, "little")

    return hashlib.sha256(record(0) * (count - 1) + record(count - 1)).digest()


def digest_of(manifest: Manifest, image: bytes) -> tuple[bytes, int, int]:
    """(digest, zero pages, normal pages) of an image, page by page: docs/protocol.md."""
    records = bytearray()
    zero = 0
    for n in range(manifest.packet_count):
        bitmap, payload = scan_packet(manifest, image, n)
        zero += int.from_bytes(bitmap, "little").bit_count()
        crc = crc32c(payload) if payload else 0
        records += crc32c(bitmap + crc.to_bytes(4, "little")).to_bytes(4, "little")
    return hashlib.sha256(records).digest(), zero, manifest.page_count - zero


@dataclass
class Conn:
    """One connection the fuzzer opened, and what it sent on it."""

    end: ReceiverEnd
    name: str = NAME
    #: Data sent on it, as its END should say.
    packets: int = 0
    payload_bytes: int = 0
    #: The packets of each data frame the receiver accepted, in order.
    accepted: list[frozenset[int]] = field(default_factory=list)
    answers: FrameDecoder = field(default_factory=lambda: FrameDecoder(expect_preamble=False))
    acked: int = 0


class Finding(AssertionError):
    """The receiver broke one of the target's rules (b)."""


class ReceiverFuzz:
    """A receiver in memory and a hostile sender; see the module docstring."""

    def __init__(self, image: FuzzImage, *, measure: bool = False,
                 old_defects: bool = False) -> None:
        self.fuzz = image
        self.manifest = image.manifest
        self.measure = measure
        # old_defects: the two defects the transport had, too (see MemoryReceiver).
        self.receiver = MemoryReceiver(limits=FUZZ_LIMITS, idle_s=IDLE_S, land_checkpoints=False,
                                       late_checkpoints=old_defects,
                                       stale_commit=old_defects)
        self.conns: list[Conn] = []
        self.job_id = uuid.UUID(int=1)
        self.next_job = 2
        #: Packet -> its bytes, for every packet the live job of NAME accepted.
        self.described: dict[int, bytes] = {}
        #: The job of NAME that `described` is about.
        self.live: MemoryReceiverJob | None = None
        #: Checkpoint record -> what `described` was when it was taken.
        self.snapshots: dict[bytes, dict[int, bytes]] = {}
        self.commits = 0
        self.ops = 0
        self.peak_bytes = 0
        self.peak_lines = 0
        self.slowest_s = 0.0
        self._committed_seen: set[int] = set()
        self._counter = LineCounter(LINE_BUDGET, skip=NATIVE_STAND_IN)

    # --- the harness of every operation ---------------------------------------------------

    def _run(self, operation: Callable[[], None]) -> None:
        """Run one operation, measured; then check every rule."""
        self.ops += 1
        # CPU time of this thread: on a shared machine, wall time measures the others.
        started = time.thread_time()
        if self.measure:
            if not tracemalloc.is_tracing():
                tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            with self._counter:
                operation()
            peak = tracemalloc.get_traced_memory()[1] - base
            self.peak_bytes = max(self.peak_bytes, peak)
            self.peak_lines = max(self.peak_lines, self._counter.lines)
            if peak > MEMORY_BOUND:
                raise Finding(f"one operation took {peak} bytes (bound {MEMORY_BOUND})")
        else:
            operation()
        self.slowest_s = max(self.slowest_s, time.thread_time() - started)
        self._after()

    def _after(self) -> None:
        """Follow what happened and check rule (b)."""
        for conn in self.conns:
            self._read_answers(conn)
        job = self.live
        if job is not None and job.writing is not None and job.writing not in self.snapshots:
            self.snapshots[job.writing] = dict(self.described)
        self._check_commits()
        if self.live is not None and self.live.finished:
            self.live = None
            self.described = {}
        self.conns = [c for c in self.conns if not (c.end.closed or c.end.discarding)]

    def _read_answers(self, conn: Conn) -> None:
        """Decode what the receiver sent on a connection: it must be well formed."""
        out, conn.end.outbox = conn.end.outbox, []
        for data in out:
            conn.answers.receive_data(data)
        while conn.answers.next_event() is not NEED_DATA:
            pass  # a RemoteProtocolError here: the receiver sent something malformed

    def _connect(self, name: str) -> Conn:
        """A new connection, whose every ACK is checked as it is sent."""
        conn = Conn(self.receiver.connect(), name)
        send = conn.end.send

        def checked(frame: Frame) -> None:
            if isinstance(frame, Ack) and conn.name == NAME:
                self._check_ack(conn, frame)
            send(frame)

        conn.end.send = checked  # type: ignore[method-assign]
        self.conns.append(conn)
        return conn

    def _check_ack(self, conn: Conn, ack: Ack) -> None:
        """An ACK covers only packets that a checkpoint on the destination holds."""
        if ack.frames < conn.acked or ack.frames > len(conn.accepted):
            raise Finding(f"ACK of {ack.frames} frames on a connection that had "
                          f"{len(conn.accepted)} accepted, {conn.acked} acknowledged")
        conn.acked = ack.frames
        covered = frozenset().union(*conn.accepted[: ack.frames])
        durable = self._durable()
        if not covered <= durable.keys():
            raise Finding(f"ACK covers packets {sorted(covered - durable.keys())} "
                          "that no checkpoint holds")

    def _durable(self) -> dict[int, bytes]:
        sink = self.receiver.sinks.get(NAME)
        if sink is None or sink.progress is None:
            return {}
        return self.snapshots.get(sink.progress, {})

    def _check_commits(self) -> None:
        """Rule (b) for every job that committed in this operation."""
        for job in self.receiver.finished:
            if job.outcome != "completed" or id(job) in self._committed_seen:
                continue
            self._committed_seen.add(id(job))
            self.commits += 1
            request = job.commit_request  # the first one the job took
            if request is None:
                raise Finding(f"job {job.job_id} committed without a COMMIT_REQUEST")
            assert job.sink.final is not None
            if not job.sink.final.blocks:  # nothing written: all zero, whatever its size
                digest = zero_digest_of(job.manifest)
                zero, normal = job.manifest.page_count, 0
                final = b""
            else:
                final = job.sink.final.tobytes()
                digest, zero, normal = digest_of(job.manifest, final)
            if (request.digest, request.zero_pages, request.normal_pages) != (
                    digest, zero, normal):
                raise Finding("committed bytes do not have the digest and counts that the "
                              "COMMIT_REQUEST asked for")
            if job.sink.name != NAME:
                continue
            if job is not self.live:
                raise Finding("a job of the image committed that the target did not follow")
            described = self.described
            if sorted(described) != list(range(self.manifest.packet_count)):
                raise Finding(f"committed with packets {sorted(described)} described")
            image = b"".join(described[n] for n in range(self.manifest.packet_count))
            final = final or bytes(self.manifest.image_size)
            if final != image:
                where = next(i for i in range(len(image)) if final[i] != image[i])
                raise Finding(f"committed bytes differ from what the frames described, "
                              f"first at byte {where}")
            if request.digest == digest_of(self.manifest, self.fuzz.image)[0] and (
                    final != self.fuzz.image):
                raise Finding("committed the image's digest with other bytes")

    # --- helpers -------------------------------------------------------------------------

    def _conn(self, position: int) -> Conn | None:
        return self.conns[position % len(self.conns)] if self.conns else None

    def _send(self, conn: Conn, data: bytes, cuts: tuple[int, ...] = ()) -> None:
        """Bytes to the receiver, read in pieces cut at ``cuts`` (fractions in 1/256)."""
        points = sorted({len(data) * c // 256 for c in cuts} | {0, len(data)})
        for lo, hi in itertools.pairwise(points):
            conn.end.receive(data[lo:hi])

    def _packet_content(self, source: bytes, n: int) -> bytes:
        start, span = self.manifest.range_bytes(n, 1)
        return source[start : start + span]

    def _data_frame(self, conn: Conn, data: bytes, packets: dict[int, bytes] | None,
                    frame_packets: int, cuts: tuple[int, ...] = ()) -> None:
        """Send a data frame on ``conn`` and follow whether the job accepted it;
        ``packets`` (packet -> bytes) is what a valid frame describes, None for
        a frame that breaks a rule."""
        job = conn.end.job
        conn.packets += frame_packets
        if packets is not None:  # counted before the ACK it may cause goes out
            conn.accepted.append(frozenset(packets))
        self._send(conn, data, cuts)
        if packets is None:
            return
        if job is None or job.finished or conn.end.job is not job or conn.end.closed or (
                conn.end.discarding):
            conn.accepted.pop()  # refused: the connection or the job is gone
            return
        if job is not self.live:
            return
        for n, content in packets.items():
            held = self.described.get(n)
            if held is None:
                self.described[n] = content
            elif held != content:
                raise Finding(f"packet {n} accepted again with other contents")

    # --- operations ----------------------------------------------------------------------

    HELLO_KINDS = ("resume", "resume", "acks", "plain", "new_job", "join", "join", "join",
                   "wrong_count", "unknown_job", "foreign", "too_big", "bad_version")

    def hello(self, channels: int, index: int, kind: str, cuts: tuple[int, ...] = ()) -> None:
        """A new connection: preamble and HELLO of some kind, for a job of
        ``channels`` channels (1..3); ``index`` for the channels that join."""
        self._run(lambda: self._hello(channels, index, kind, cuts))

    def _hello(self, channels: int, index: int, kind: str, cuts: tuple[int, ...]) -> None:
        channels = 1 + channels % 3
        features = FEATURE_ACKS | FEATURE_RESUME
        manifest: Manifest | None = self.manifest
        name, job_id, version = NAME, self.job_id, 1
        if kind == "acks":
            features = FEATURE_ACKS
        elif kind == "plain":
            features = 0
        elif kind == "new_job":
            job_id = self.job_id = uuid.UUID(int=self.next_job)
            self.next_job += 1
        elif kind in ("join", "wrong_count", "unknown_job"):
            manifest = None
            index = index % channels or min(1, channels - 1)
            if kind == "wrong_count":
                channels += 1
            elif kind == "unknown_job":
                job_id = uuid.UUID(int=999)
        elif kind == "foreign":
            name, job_id = OTHER, uuid.UUID(int=1000 + index % 3)
            manifest = FOREIGN[(index + channels) % len(FOREIGN)]
        elif kind == "too_big":
            manifest = Manifest(1 << (27 + index % 20), 1 << (9 + index % 12), 1 << (index % 13))
            job_id = uuid.UUID(int=2000 + index)
        elif kind == "bad_version":
            version = 2
        if manifest is not None:
            index = 0
        hello = Hello(job_id, index, channels, manifest, name, features, version)
        conn = self._connect(name)
        before = self.receiver.jobs.get(job_id)
        sink = self.receiver.sinks.get(NAME)
        kept: dict[int, bytes] = {}
        if (features & FEATURE_ACKS and features & FEATURE_RESUME and sink is not None
                and sink.partial is not None and len(sink.partial) == self.manifest.image_size
                and sink.progress is not None and sink.progress in self.snapshots):
            kept = dict(self.snapshots[sink.progress])
        self._send(conn, PREAMBLE + encode(hello), cuts)
        job = conn.end.job
        if name != NAME or manifest is None or job is None or job is before:
            return  # no new job of the image: joined, restarted in place, or refused
        # A new job of the image knows what the checkpoint it resumed from held.
        self.live, self.described = job, kept
        if job.core.tracker.received_packets != len(kept):
            raise Finding(f"resumed with {job.core.tracker.received_packets} packets, the "
                          f"checkpoint held {len(kept)}")

    PACKET_KINDS = ("valid", "valid", "valid", "other", "zeros", "corrupt", "bad_length",
                    "bad_first_page", "bad_count", "out_of_range", "padding")

    def packet(self, position: int, n: int, kind: str, cuts: tuple[int, ...] = ()) -> None:
        """A PACKET for packet ``n`` (of the image, of the other image, or broken)."""
        self._run(lambda: self._packet(position, n, kind, cuts))

    def _packet(self, position: int, n: int, kind: str, cuts: tuple[int, ...]) -> None:
        conn = self._conn(position)
        if conn is None:
            return
        m = self.manifest
        n %= m.packet_count
        source = self.fuzz.other if kind == "other" else self.fuzz.image
        if kind == "zeros":
            source = bytes(m.image_size)
        content = self._packet_content(source, n)
        bitmap, payload = scan_packet(m, source, n)
        crc = crc32c(payload)
        pages = m.pages_in_packet(n)
        number, first_page, length = n, n * m.packet_pages, len(payload)
        valid = kind in ("valid", "other", "zeros")
        if kind == "corrupt" and payload:
            payload = bytes([payload[0] ^ 1]) + payload[1:]
        elif kind == "bad_length":
            length = length + 1 if length < pages * m.page_size else length - 1
            payload = bytes(length)
        elif kind == "bad_first_page":
            first_page += 1
        elif kind == "bad_count":
            pages += 1
            bitmap = bytes((pages + 7) >> 3)
        elif kind == "out_of_range":
            number = m.packet_count + (position % 3) * (1 << 40)
            first_page = number * m.packet_pages
        elif kind == "padding" and pages & 7:
            bitmap = bitmap[:-1] + bytes([bitmap[-1] | 0x80])
        else:
            valid = True  # the change did not apply: the frame is a valid one
        header = _RAW_PACKET.pack(0x10, 0, 0, 32 + len(bitmap), number & _U64,
                                  first_page & _U64, pages, length, crc, 0, 0) + bitmap
        conn.payload_bytes += length
        self._data_frame(conn, header + payload, {n: content} if valid else None, 1, cuts)

    ZERO_KINDS = ("valid", "valid", "run", "huge", "beyond", "empty")

    def zero_range(self, position: int, first: int, count: int, kind: str) -> None:
        """A ZERO_RANGE (of zero packets of the image, or any run, or broken)."""
        self._run(lambda: self._zero_range(position, first, count, kind))

    def _zero_range(self, position: int, first: int, count: int, kind: str) -> None:
        conn = self._conn(position)
        if conn is None:
            return
        m = self.manifest
        foreign = conn.name == OTHER and conn.end.job is not None
        if foreign:
            m = conn.end.job.manifest  # type: ignore[union-attr]
        first %= m.packet_count
        count = 1 + count % (m.packet_count - first)
        if kind == "valid" and foreign:  # the rest of a large image, in one frame
            count = m.packet_count - first
        elif kind == "valid":  # the run of the image's zero packets from `first`
            zero = [n for n in range(first, first + count)
                    if not any(self._packet_content(self.fuzz.image, n))]
            if not zero:
                return
            first, count = zero[0], 1
            while first + count in zero:
                count += 1
        elif kind == "huge":
            count = (1 << 63) + count
        elif kind == "beyond":
            first = m.packet_count + first
        elif kind == "empty":
            count = 0
        frame = struct.pack("<BBHIQQ", 0x11, 0, 0, 16, first & _U64, count & _U64)
        packets = None
        if kind in ("valid", "run") and not foreign:
            packets = {n: bytes(m.range_bytes(n, 1)[1]) for n in range(first, first + count)}
        self._data_frame(conn, frame, packets, count & _U64)

    def end(self, position: int, off: int) -> None:
        """END with what the connection sent (``off`` 0), or not."""
        self._run(lambda: self._end(position, off))

    def _end(self, position: int, off: int) -> None:
        conn = self._conn(position)
        if conn is not None:
            packets = max(conn.packets + off, 0) & _U64
            self._send(conn, encode(End(packets, conn.payload_bytes & _U64)))

    REQUEST_KINDS = ("image", "image", "described", "other", "garbage", "counts")

    def commit_request(self, position: int, kind: str) -> None:
        """COMMIT_REQUEST for the image, for what the job holds, or wrong."""
        self._run(lambda: self._commit_request(position, kind))

    def _commit_request(self, position: int, kind: str) -> None:
        conn = self._conn(position)
        if conn is None:
            return
        m = self.manifest
        if conn.name == OTHER and conn.end.job is not None:
            m = conn.end.job.manifest  # what an all-zero image of it asks for
            digest = zero_digest_of(m)
            if kind == "garbage":
                digest = hashlib.sha256(digest).digest()
            self._send(conn, encode(CommitRequest(m.packet_count, m.page_count, 0, digest)))
            return
        if kind == "described" and len(self.described) == m.packet_count:
            image = b"".join(self.described[n] for n in range(m.packet_count))
        elif kind == "other":
            image = self.fuzz.other
        else:
            image = self.fuzz.image
        digest, zero, normal = digest_of(m, image)
        if kind == "garbage":
            digest = hashlib.sha256(digest).digest()
        elif kind == "counts":
            zero, normal = zero + 1, max(normal - 1, 0)
        self._send(conn, encode(CommitRequest(m.packet_count, zero, normal, digest)))

    OTHER_KINDS = ("error", "garbage", "welcome", "ack", "commit", "resume_state", "hello_again")

    def other_frame(self, position: int, kind: str, data: bytes) -> None:
        """A frame a sender never sends now: ERROR, random bytes, the receiver's frames."""
        self._run(lambda: self._other_frame(position, kind, data))

    def _other_frame(self, position: int, kind: str, data: bytes) -> None:
        conn = self._conn(position)
        if conn is None:
            return
        frames = {
            "error": lambda: encode(Error(ErrorCode.CANCELLED, "stop")),
            "garbage": lambda: data,
            "welcome": lambda: encode(Welcome(self.job_id)),
            "ack": lambda: encode(Ack(1, 1)),
            "commit": lambda: encode(Commit(bytes(32))),
            "resume_state": lambda: encode(ResumeState(0, 1, b"\x01", b"ABCD", last=True)),
            "hello_again": lambda: encode(Hello(self.job_id, 0, 2, self.manifest, NAME,
                                                FEATURE_ACKS | FEATURE_RESUME)),
        }
        self._send(conn, frames[kind]())

    def cut(self, position: int, how: str, partial: int) -> None:
        """The sender's end of a connection goes: part of a PACKET, then a reset or EOF."""
        self._run(lambda: self._cut(position, how, partial))

    def _cut(self, position: int, how: str, partial: int) -> None:
        conn = self._conn(position)
        if conn is None:
            return
        if partial:
            m = self.manifest
            n = partial % m.packet_count
            bitmap, payload = scan_packet(m, self.fuzz.image, n)
            frame = encode_packet_header(n, n * m.packet_pages, m.pages_in_packet(n),
                                         len(payload), crc32c(payload), bitmap) + payload
            conn.end.receive(frame[: partial % len(frame)])
        if how == "eof":
            conn.end.eof()
        else:
            conn.end.connection_lost("connection reset")

    def land(self) -> None:
        """Every checkpoint being written becomes durable."""
        self._run(self._land)

    def _land(self) -> None:
        for job in list(self.receiver.jobs.values()):
            if job.writing is not None:
                job.land_checkpoint()
        self.receiver.land_orphans()

    def advance(self, seconds: float) -> None:
        """Time passes: timers, the watchdog."""
        self._run(lambda: self.receiver.advance(seconds))

    def crash(self, garbage: int, damage: int = -1) -> None:
        """The receiver is killed: a new one finds the destinations as they are,
        whatever no checkpoint covers holds garbage (written, never recorded),
        and with ``damage`` >= 0 the checkpoint record is torn at that byte."""
        self._run(lambda: self._crash(garbage, damage))

    def _crash(self, garbage: int, damage: int) -> None:
        self.receiver = self.receiver.crash()
        self.conns = []
        self.live, self.described = None, {}
        sink = self.receiver.sinks.get(NAME)
        if sink is None or sink.partial is None or len(sink.partial) != self.manifest.image_size:
            return
        durable = self._durable()
        for n in range(self.manifest.packet_count):
            if n not in durable:
                start, span = self.manifest.range_bytes(n, 1)
                sink.partial.write(start, random.Random(garbage + n).randbytes(span))
        if damage >= 0 and sink.progress is not None:
            record = bytearray(sink.progress)
            record[damage % len(record)] ^= 0xFF
            sink.progress = bytes(record)

    # --- what a correct sender does next ------------------------------------------------

    def sender_step(self, choice: int) -> None:
        """One step of a correct sender of the image, ``choice`` picking among
        what it may do now: open the job (resuming), connect a missing
        channel, send a packet the job lacks (or its zero run), END, then
        COMMIT_REQUEST; or wait for a checkpoint."""
        live = self.live
        if live is None or live.finished:
            self.hello(choice, 0, "resume")
            return
        mine = [c for c in self.conns if c.end.job is live]
        attached = {c.end.index for c in mine}
        count = live.core.channel_count
        missing = [i for i in range(count) if i not in attached]
        if 0 in missing:
            self.hello(count - 1, 0, "resume")
            return
        if missing:
            self.hello(count - 1, missing[choice % len(missing)], "join")
            return
        streaming = [c for c in mine if c.end.state.state is ReceiverState.STREAMING]
        todo = [n for n in range(self.manifest.packet_count) if n not in self.described]
        if streaming:
            position = self.conns.index(streaming[choice % len(streaming)])
            if not todo:
                self.end(position, 0)
                return
            n = todo[(choice >> 3) % len(todo)]
            if choice & 4 and not any(self._packet_content(self.fuzz.image, n)):
                self.zero_range(position, n, 0, "valid")
            else:
                self.packet(position, n, "valid")
            return
        first = next(c for c in mine if c.end.index == 0)
        if first.end.state.state is ReceiverState.ENDED and live.commit_request is None:
            self.commit_request(self.conns.index(first), "image")
        else:
            self.land()

    def foreign_job(self, layout: int) -> None:
        """A whole job of another layout (one channel): its whole image in one
        ZERO_RANGE, END, COMMIT_REQUEST; each frame measured as always."""
        index = layout % len(FOREIGN)
        self.hello(0, index - 1 if index else len(FOREIGN) - 1, "foreign")
        conn = self.conns[-1] if self.conns and self.conns[-1].name == OTHER else None
        if conn is None or conn.end.job is None:
            return  # refused: beyond the limits
        position = len(self.conns) - 1
        self.zero_range(position, 0, 0, "valid")
        self.end(position, 0)
        self.commit_request(position, "image")

    # --- a whole valid job, for a start ---------------------------------------------------

    def valid_job(self, channels: int) -> None:
        """Open a job of ``channels`` channels (1..3) and send the image as a
        correct sender would, up to END."""
        m = self.manifest
        count = 1 + channels % 3
        self.hello(channels, 0, "resume")
        for index in range(1, count):
            self.hello(channels, index, "join")
        for n in range(m.packet_count):
            self.packet(n % count, n, "valid")
        for index in range(count):
            self.end(index, 0)


def run_program(seed: int, *, steps: int = 60, measure: bool = False,
                old_defects: bool = False) -> ReceiverFuzz:
    """One fuzz input from a seed: an image and ``steps`` random operations."""
    rng = random.Random(seed)
    target = ReceiverFuzz(FuzzImage.make(rng), measure=measure, old_defects=old_defects)
    random_operations(target, rng, steps)
    return target


def random_operations(target: ReceiverFuzz, rng: random.Random, steps: int) -> None:
    """``steps`` operations chosen by ``rng``: a correct sender's steps more
    often than not, among frames that break every rule, cuts, crashes and time."""
    m = target.manifest

    def cuts() -> tuple[int, ...]:
        return tuple(rng.randrange(256) for _ in range(rng.choice([0, 0, 1, 3])))

    if rng.random() < 0.5:
        target.valid_job(rng.randrange(3))
    for _ in range(steps):
        pick = rng.random()
        position = rng.randrange(8)
        if pick < 0.55:
            target.sender_step(rng.randrange(1 << 16))
        elif pick < 0.57:
            target.foreign_job(rng.randrange(len(FOREIGN)))
        elif pick < 0.61:
            target.hello(rng.randrange(3), rng.randrange(8), rng.choice(ReceiverFuzz.HELLO_KINDS),
                         cuts())
        elif pick < 0.69:
            target.packet(position, rng.randrange(m.packet_count),
                          rng.choice(ReceiverFuzz.PACKET_KINDS), cuts())
        elif pick < 0.73:
            target.zero_range(position, rng.randrange(m.packet_count), rng.randrange(64),
                              rng.choice(ReceiverFuzz.ZERO_KINDS))
        elif pick < 0.76:
            target.end(position, rng.choice([0, 0, 1, -1]))
        elif pick < 0.79:
            target.commit_request(position, rng.choice(ReceiverFuzz.REQUEST_KINDS))
        elif pick < 0.81:
            target.other_frame(position, rng.choice(ReceiverFuzz.OTHER_KINDS),
                               rng.randbytes(rng.randrange(1, 64)))
        elif pick < 0.86:
            target.cut(position, rng.choice(["reset", "eof"]),
                       rng.randrange(3) * rng.randrange(1 << 16))
        elif pick < 0.92:
            target.land()
        elif pick < 0.97:
            target.advance(rng.choice([0.01, 0.3, 0.3, 2.0, IDLE_S + 1]))
        else:
            target.crash(rng.randrange(1 << 30), rng.choice([-1, -1, -1, rng.randrange(1 << 16)]))


__all__ = [
    "FUZZ_LIMITS",
    "LINE_BUDGET",
    "MEMORY_BOUND",
    "BudgetExceeded",
    "Finding",
    "FuzzImage",
    "ReceiverFuzz",
    "digest_of",
    "random_operations",
    "run_program",
]
