"""Whole jobs in memory: the production job cores back to back (tests/protocol/pair.py).

Each job's streams are fed whole and byte by byte; frames are lost,
repeated, reordered and cut; channels and receivers die and come back. A
job either commits a destination byte-identical to the image, or fails with
the error that names what went wrong and promotes nothing.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable

import pytest

from dsamig.checksum import crc32c
from dsamig.proto import (
    Commit,
    ErrorCode,
    Hello,
    Manifest,
    ReceiverState,
    SenderState,
    encode,
    encode_preamble,
)
from dsamig.settings import ReceiverLimits
from tests.protocol.pair import (
    ChannelLost,
    JobPair,
    MemoryReceiver,
    SendFailed,
    data_ranges,
    make_image,
    scan_packet,
)


def straightforward_digest(manifest: Manifest, image: bytes) -> bytes:
    """The job digest computed the slow, obvious way from docs/protocol.md."""
    records = b""
    for n in range(manifest.packet_count):
        bitmap, payload = scan_packet(manifest, image, n)
        crc = crc32c(payload) if payload else 0
        records += crc32c(bitmap + crc.to_bytes(4, "little")).to_bytes(4, "little")
    return hashlib.sha256(records).digest()


def page_counts(manifest: Manifest, image: bytes) -> tuple[int, int]:
    """(zero pages, normal pages) of the image, page by page."""
    zero = 0
    for page in range(manifest.page_count):
        start = page * manifest.page_size
        chunk = image[start : start + manifest.page_size]
        zero += chunk.count(0) == len(chunk)
    return zero, manifest.page_count - zero


IMAGES: list[Callable[[], tuple[bytes, int, int]]] = [
    lambda: (make_image(512, [1, None, 2, None, None, None, None, None, 3, 4], tail=100), 512, 2),
    lambda: (make_image(512, [None] * 9, tail=7), 512, 4),
    lambda: (make_image(512, [5, 6, 7, 8, 9], tail=0), 512, 3),
    lambda: (make_image(1024, [None, 1, None, None, None, None, 2], tail=1), 1024, 2),
    lambda: (make_image(512, [None] * 40 + [1] + [None] * 40, tail=0), 512, 2),
    lambda: (b"", 512, 4),
]


def _pages() -> list[int | None]:
    """12 packets of 4 pages: packets 4, 5 and 9 all zero, the others mixed."""
    pages: list[int | None] = []
    for packet in range(12):
        if packet in (4, 5, 9):
            pages += [None] * 4
        else:
            pages += [(packet + i) % 5 + 1 if (packet + i) % 3 else None for i in range(4)]
    return pages


IMAGE = make_image(512, _pages(), tail=100)


def assert_committed(pair: JobPair, image: bytes) -> None:
    """The job committed ``image``, and both sides agree on every figure."""
    assert pair.sink.committed == image
    assert pair.sink.partial is None and pair.sink.progress is None
    manifest = pair.sender.manifest
    digest = straightforward_digest(manifest, image)
    assert pair.commit == Commit(digest)
    job = pair.job
    assert job is not None and job.outcome == "completed"
    sent, received = pair.sender.core.counters, job.core.counters
    assert (sent.zero_pages, sent.normal_pages) == page_counts(manifest, image)
    assert (received.zero_pages, received.normal_pages) == (sent.zero_pages, sent.normal_pages)
    assert received.done_bytes == sent.done_bytes == len(image)


@pytest.mark.parametrize("make", IMAGES)
@pytest.mark.parametrize(
    ("channels", "chunk_packets", "sparse"), [(1, 8, False), (3, 1, False), (2, 2, True)]
)
@pytest.mark.parametrize("step", [None, 1], ids=["whole", "byte-by-byte"])
def test_job(make: Callable[[], tuple[bytes, int, int]], channels: int, chunk_packets: int,
             sparse: bool, step: int | None) -> None:
    image, page_size, packet_pages = make()
    pair = JobPair(image, page_size=page_size, packet_pages=packet_pages, channels=channels,
                   chunk_packets=chunk_packets,
                   ranges=data_ranges(image, page_size) if sparse else None)
    pair.run(step=step)
    assert_committed(pair, image)
    sent, received = pair.sender.core.counters, pair.job.core.counters  # type: ignore[union-attr]
    # One session, nothing sent twice; only normal pages were written.
    assert (sent.sessions, received.sessions) == (1, 1)
    assert sent.normal_bytes == received.normal_bytes == pair.sink.bytes_written
    assert sent.retransmitted_bytes == sent.resumed_packets == 0
    # Checkpoints at END only (no time passed), none when nothing was stored.
    assert pair.sink.checkpoints <= (channels if image else 0)
    first = pair.history[0]
    assert first.sender.state.state is SenderState.DONE
    assert first.receiver.state.state is ReceiverState.CLOSED
    # Every data frame of every channel was acknowledged.
    for link in pair.history:
        frames = link.sender.state.data_frames
        assert (link.sender.acks[-1].frames if link.sender.acks else 0) == frames


def test_job_without_acks() -> None:
    pair = JobPair(IMAGE, channels=2, chunk_packets=1, offer_acks=False)
    pair.run(step=3)
    assert_committed(pair, IMAGE)
    assert pair.sink.checkpoints == 0
    assert all(not link.sender.acks for link in pair.history)


def test_sparse_image_scans_only_its_data() -> None:
    image = make_image(512, [None] * 64 + [1] + [None] * 63, tail=0)
    scanned: list[int] = []
    pair = JobPair(image, channels=2, chunk_packets=4, ranges=data_ranges(image, 4096))

    def scan(manifest: Manifest, data: bytes, chunk) -> bytes:  # type: ignore[no-untyped-def]
        scanned.extend(range(chunk.first_packet, chunk.first_packet + chunk.packets))
        return b"".join(scan_packet(manifest, data, n)[0]
                        for n in range(chunk.first_packet, chunk.first_packet + chunk.packets))

    pair.sender.scan = scan
    pair.run()
    assert_committed(pair, image)
    assert scanned == [16, 17, 18, 19]  # the 4 KiB around page 64 (packet 16)


# --- frames lost, repeated, reordered --------------------------------------------------------


def started(offer_acks: bool = True, channels: int = 2) -> JobPair:
    """A job whose every frame is queued, nothing delivered yet."""
    pair = JobPair(IMAGE, channels=channels, chunk_packets=1, offer_acks=offer_acks)
    pair.open_session()
    pair.stream()
    return pair


def assert_failed(pair: JobPair, code: ErrorCode, message: str) -> None:
    """The receiver failed the job with ``code`` and ``message``, told the
    sender, and promoted nothing."""
    job = pair.job
    assert job is not None and job.outcome == "failed"
    assert job.error is not None
    assert (job.error.code, str(job.error)) == (code, message)
    assert pair.sink.final is None
    assert isinstance(pair.sender.failure, SendFailed)
    assert not isinstance(pair.sender.failure, ChannelLost)
    assert str(pair.sender.failure).endswith(f"({code.name}): {message}")


def end_mismatch(pair: JobPair, index: int, received: int) -> str:
    sent = pair.link(index).sender.state.packets
    return (f"channel {index}: END packets {sent} does not match the {received} packets "
            f"received on channel {index}")


@pytest.mark.parametrize("offer_acks", [True, False])
def test_lost_packet(offer_acks: bool) -> None:
    pair = started(offer_acks)
    assert pair.drop(1, 1)[0] == 0x10  # a PACKET
    pair.flush()
    assert_failed(pair, ErrorCode.PROTOCOL, end_mismatch(pair, 1, 5))
    assert pair.sink.partial is None  # deleted: nothing to resume from a broken stream


def test_lost_zero_range() -> None:
    pair = started()
    frames = pair.frames(1)
    pair.drop(1, next(i for i, f in enumerate(frames) if f[0] == 0x11))
    pair.flush()
    assert_failed(pair, ErrorCode.PROTOCOL, end_mismatch(pair, 1, 5))


def test_repeated_packet_with_acks() -> None:
    # Accepted as a repeat (same contents, not written again), but the
    # channel's count no longer matches its END.
    pair = started()
    pair.duplicate(0, 1)
    pair.flush()
    assert_failed(pair, ErrorCode.PROTOCOL, end_mismatch(pair, 0, 7))
    assert pair.job.core.tracker.repeated_packets == 1  # type: ignore[union-attr]


def test_repeated_packet_without_acks() -> None:
    pair = started(offer_acks=False)
    pair.duplicate(0, 1)
    pair.flush()
    assert_failed(pair, ErrorCode.PROTOCOL, "channel 0: PACKET packet_number 2 received twice")


def test_repeated_end() -> None:
    pair = started()
    pair.duplicate(1, len(pair.frames(1)) - 1)
    pair.flush()
    assert_failed(pair, ErrorCode.PROTOCOL,
                  "channel 1: END received in state ENDED on channel 1; expected COMMIT_REQUEST")


def test_reordered_data_frames_are_fine() -> None:
    pair = started()
    count = len(pair.frames(1))
    # Data frames in reverse, END still last: the receiver does not mind.
    pair.reorder(1, [*range(count - 2, 0, -1), 0, count - 1])
    pair.flush()
    pair.request_commit()
    pair.flush()
    pair.finish()
    assert_committed(pair, IMAGE)


def test_end_before_data() -> None:
    pair = started()
    count = len(pair.frames(1))
    pair.reorder(1, [0, count - 1, *range(1, count - 1)])
    pair.flush()
    assert_failed(pair, ErrorCode.PROTOCOL, end_mismatch(pair, 1, 1))


def test_commit_request_waits_for_every_end() -> None:
    # Channels are separate connections: COMMIT_REQUEST may be read before
    # another channel's last frames (without ACKS the sender does not wait).
    pair = started(offer_acks=False, channels=3)
    pair.deliver(0)
    pair.deliver(2)
    pair.request_commit()
    pair.deliver(0)
    job = pair.job
    assert job is not None and job.commit_request is not None and not job.finished
    pair.deliver(1, frames=1)
    assert not job.finished
    pair.flush()
    pair.finish()
    assert_committed(pair, IMAGE)


def test_corrupted_payload_without_acks() -> None:
    pair = started(offer_acks=False)
    frame = bytearray(pair.frames(1)[1])
    frame[-5] ^= 0x40
    pair.frames(1)[1] = bytes(frame)
    pair.flush()
    job = pair.job
    assert job is not None and job.error is not None
    assert job.error.code is ErrorCode.INTEGRITY
    assert "(corrupted in transit)" in str(job.error)
    assert pair.sink.final is None and pair.sink.partial is None


def test_corrupted_payload_with_acks_is_sent_again() -> None:
    # The receiver drops the channel without storing the packet; the sender
    # opens a new session and sends what the receiver does not hold.
    pair = started()
    frame = bytearray(pair.frames(0)[1])
    frame[-1] ^= 0x01
    pair.frames(0)[1] = bytes(frame)
    pair.flush()
    assert isinstance(pair.sender.failure, ChannelLost)
    job = pair.job
    assert job is not None and not job.finished
    # Channel 0 got one PACKET through before the bad one; channel 1 all of its share.
    assert job.core.tracker.received_packets == 1 + 6
    pair.close_session()
    pair.run(resume=True)
    assert_committed(pair, IMAGE)
    sent = pair.sender.core.counters
    assert (sent.sessions, job.core.counters.sessions) == (2, 2)
    assert sent.resumed_packets == 7


# --- connections cut -----------------------------------------------------------------------


@pytest.mark.parametrize(("how", "message"), [
    ("reset", "sender closed channel 1 mid-transfer (connection reset)"),
    ("eof", "channel 1: connection closed in the middle of a frame (PACKET payload, "
            "{missing} bytes missing)"),
])
def test_cut_without_acks(how: str, message: str) -> None:
    pair = started(offer_acks=False)
    frame = pair.frames(1)[0]  # PACKET 1: a 41-byte header (1 bitmap byte), its payload
    pair.cut(1, at_byte=41 + 100, how=how)
    pair.flush()
    job = pair.job
    assert job is not None and job.error is not None
    assert str(job.error) == message.format(missing=len(frame) - 41 - 100)
    assert pair.sink.partial is None


def test_cut_at_a_frame_boundary_without_acks() -> None:
    pair = started(offer_acks=False)
    pair.cut(1, frames=2, how="eof")
    pair.flush()
    assert str(pair.job.error) == (  # type: ignore[union-attr]
        "channel 1: connection closed by the sender in state STREAMING on channel 1")


@pytest.mark.parametrize("how", ["reset", "eof"])
@pytest.mark.parametrize("step", [None, 1])
def test_cut_with_acks_resumes(how: str, step: int | None) -> None:
    pair = started(channels=2)
    # Channel 0 breaks in the middle of its third frame, before its END.
    pair.cut(0, at_byte=sum(len(f) for f in pair.frames(0)[:2]) + 30, how=how, step=step)
    pair.flush(step)
    assert isinstance(pair.sender.failure, ChannelLost)
    job = pair.job
    assert job is not None and not job.finished and set(job.channels) == {1}
    held = job.core.tracker.received_packets
    pair.close_session()
    pair.run(step=step, resume=True)
    assert_committed(pair, IMAGE)
    sent = pair.sender.core.counters
    assert sent.resumed_packets == held
    assert job.core.counters.sessions == 2
    # What the receiver held was neither sent nor written again.
    assert pair.sink.bytes_written == sent.normal_bytes


def test_reconnects_are_bounded() -> None:
    pair = JobPair(IMAGE, chunk_packets=1, limits=ReceiverLimits(max_sessions=2))
    for _ in range(2):
        pair.open_session(resume=pair.sessions > 0)
        pair.stream()
        pair.cut(0, frames=1)
        pair.flush()
        pair.close_session()
    with pytest.raises(SendFailed, match=r"receiver failed the job \(REJECTED\): the sender "
                                         "opened 3 sessions of this job"):
        pair.open_session(resume=True)
    job = pair.job
    assert job is not None and job.outcome == "failed"
    assert pair.sink.partial is not None  # a limit keeps the file for a later resume


def test_stray_channel_is_refused_alone() -> None:
    pair = started()
    stray = pair.receiver.connect()
    stray.receive(encode_preamble() + encode(Hello(pair.sender.job_id, 1, 5)))
    assert pair.receiver.refused == ["channel 1 says 5 channels, channel 0 said 2"]
    assert stray.discarding
    pair.flush()
    pair.request_commit()
    pair.flush()
    pair.finish()
    assert_committed(pair, IMAGE)


def test_stalled_job_keeps_its_file() -> None:
    pair = JobPair(IMAGE, chunk_packets=1, limits=ReceiverLimits(min_job_rate=0))
    pair.open_session()
    pair.stream()
    pair.deliver(0, frames=2)
    pair.receiver.advance(31.0)
    job = pair.job
    assert job is not None and job.error is not None
    assert str(job.error) == "no data from the sender for 30 s"
    assert pair.sink.partial is not None and pair.sink.progress is not None


# --- receivers killed, images changed --------------------------------------------------------


def test_receiver_killed_resumes_from_its_checkpoint() -> None:
    # Packets written but never checkpointed are unknown after a crash; the
    # new source is zero there, so nothing is written over them: the resumed
    # receiver must punch them out before it accepts data.
    receiver = MemoryReceiver()
    pair = JobPair(IMAGE, channels=1, chunk_packets=1, receiver=receiver)
    pair.open_session()
    pair.stream()
    pair.deliver(0, frames=3)
    receiver.advance(0.3)  # the watchdog's checkpoint: packets 0..2
    pair.deliver(0, frames=4)  # packets 3..6 written, never checkpointed
    sink = pair.sink
    manifest = pair.sender.manifest
    start, length = manifest.range_bytes(3, 4)
    assert sink.partial is not None and any(sink.partial.read(start, length))
    changed = bytearray(IMAGE)
    changed[start:] = bytes(len(IMAGE) - start)
    again = JobPair(bytes(changed), channels=2, chunk_packets=1, receiver=receiver.crash())
    again.run(resume=True)
    assert_committed(again, bytes(changed))
    assert again.sender.core.counters.resumed_packets == 3
    assert sink.holes == [manifest.range_bytes(3, manifest.packet_count - 3)]


def test_receiver_killed_before_a_checkpoint_starts_empty() -> None:
    receiver = MemoryReceiver()
    pair = JobPair(IMAGE, channels=1, chunk_packets=1, receiver=receiver)
    pair.open_session()
    pair.stream()
    pair.deliver(0, frames=4)
    sink = pair.sink
    assert sink.progress is None and sink.partial is not None and any(sink.partial.tobytes())
    zeros = bytes(len(IMAGE))
    again = JobPair(zeros, channels=1, receiver=receiver.crash())
    again.run(resume=True)
    assert_committed(again, zeros)
    assert sink.resets == 1


def test_image_changed_restarts_the_job_clean() -> None:
    # A sender restarted with resume finds that a packet the receiver holds
    # differs from the image: it starts a new job, which sends everything.
    pair = started()
    pair.flush()
    for link in pair.links:  # the sender dies before its COMMIT_REQUEST
        link.cut = True
    pair.flush()
    held = pair.sink
    assert held.progress is not None
    changed = bytearray(IMAGE)
    changed[0] ^= 0xFF
    again = JobPair(bytes(changed), receiver=pair.receiver, job_id=uuid.UUID(int=99))
    again.run(resume=True)
    assert again.sender.job_id == uuid.UUID(int=100)
    assert_committed(again, bytes(changed))
    counters = again.sender.core.counters
    assert (counters.resumed_packets, counters.retransmitted_bytes) == (0, 0)
    assert [job.outcome for job in pair.receiver.finished] == ["cancelled", "cancelled",
                                                                "completed"]
