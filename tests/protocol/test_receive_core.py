"""The receive-side job core: admission, resume, counts, checkpoints, ACKs, the watchdog."""

from __future__ import annotations

import tracemalloc
import uuid

import pytest

from dsamig.checksum import crc32c
from dsamig.proto import (
    FEATURE_ACKS,
    Ack,
    ChannelRefusedError,
    Checkpoint,
    CommitRequest,
    ErrorCode,
    Hello,
    LimitExceededError,
    LocalProtocolError,
    Manifest,
    PacketHeader,
    PacketTracker,
    Progress,
    ReceiveJobCore,
    RemoteProtocolError,
    ZeroRange,
    checkpoint_bytes,
)
from dsamig.proto.receive_core import (
    CHECKPOINT_INTERVAL_S,
    CHECKPOINT_RECORD_BYTES_PER_S,
    MAX_RESTORE_RUNS,
)
from dsamig.settings import KiB, ReceiverLimits

JOB = uuid.UUID(int=7)
# 10 packets of 4 pages of 512 bytes; the last packet has 2 pages, the last
# page 100 bytes.
M = Manifest(37 * 512 + 100, 512, 4)
PACKET_BYTES = 4 * 512
LAST_SPAN = 512 + 100
LIMITS = ReceiverLimits()


def core_for(*, acks: bool = True, channels: int = 2, limits: ReceiverLimits = LIMITS,
             now: float = 100.0) -> ReceiveJobCore:
    hello = Hello(JOB, 0, channels, M, "job", features=FEATURE_ACKS if acks else 0)
    return ReceiveJobCore(hello, limits, now)


def packet(n: int, bitmap: bytes = b"\x00") -> tuple[PacketHeader, int]:
    """A PACKET header for packet ``n`` and its payload's CRC (every normal
    page filled with the byte ``n + 1``)."""
    length = M.payload_length(n, bitmap)
    crc = crc32c(bytes([n + 1]) * length)
    return PacketHeader(n, n * 4, M.pages_in_packet(n), length, crc, bitmap), crc


def store(core: ReceiveJobCore, index: int, n: int, bitmap: bytes = b"\x00",
          now: float = 100.0) -> None:
    header, crc = packet(n, bitmap)
    again = core.packet_header(header)
    core.packet_stored(index, header, crc, again, now)


def test_a_job_is_opened_by_channel_zero() -> None:
    with pytest.raises(LocalProtocolError, match="opened by channel 0's HELLO"):
        ReceiveJobCore(Hello(JOB, 1, 2), LIMITS, 0.0)


# --- channels ------------------------------------------------------------------------------


def test_attach_refuses_a_stray_channel_alone() -> None:
    core = core_for(acks=False)
    assert core.attach(0, 2, 100.0) == 1
    with pytest.raises(ChannelRefusedError) as info:
        core.attach(1, 3, 100.0)
    assert str(info.value) == "channel 1 says 3 channels, channel 0 said 2"
    assert info.value.code is ErrorCode.REJECTED
    with pytest.raises(ChannelRefusedError, match="channel index 0 is already connected"):
        core.attach(0, 2, 100.0)
    assert core.attach(1, 2, 100.0) == 2
    assert core.all_attached


def test_reattach_with_acks_opens_a_session_until_the_limit() -> None:
    core = core_for(limits=ReceiverLimits(max_sessions=3))
    core.attach(0, 2, 100.0)
    core.attach(1, 2, 100.0)
    assert core.counters.sessions == 1
    assert core.attach(1, 2, 100.0) == 3  # channel 1 came back: a new generation
    assert core.counters.sessions == 2
    core.restart_session(101.0)  # channel 0 said HELLO again
    assert core.counters.sessions == 3
    assert not core.all_attached and core.last_progress == 101.0
    with pytest.raises(LimitExceededError, match="opened 4 sessions of this job"):
        core.restart_session(102.0)


def test_a_new_session_counts_once_whatever_its_channels() -> None:
    # Channel 0's HELLO opens the session; the other channels join it. Counted
    # per channel, a 4-channel job would be refused after its first reconnect.
    core = core_for(channels=4, limits=ReceiverLimits(max_sessions=4))
    for index in range(4):
        core.attach(index, 4, 100.0)
    for session in (2, 3):
        core.restart_session(101.0)
        for index in range(4):
            core.attach(index, 4, 101.0)
        assert core.counters.sessions == session
    core.attach(2, 4, 102.0)  # one channel alone came back: that is a session
    assert core.counters.sessions == 4
    with pytest.raises(LimitExceededError, match="opened 5 sessions"):
        core.attach(2, 4, 103.0)


def test_detach_gives_up_a_packet_half_received() -> None:
    core = core_for()
    generation = core.attach(1, 2, 100.0)
    header, _ = packet(3)
    assert core.packet_header(header) is False
    core.detach(1, generation, header)
    assert core.packet_header(header) is False  # claimed afresh, no "twice"


# --- data and counts -----------------------------------------------------------------------


def test_counts_of_packets_and_zero_ranges() -> None:
    core = core_for()
    core.attach(0, 2, 100.0)
    store(core, 0, 0, b"\x05")  # 2 zero pages, 2 normal
    store(core, 0, 9)  # the short last packet: 2 normal pages, 612 bytes
    core.zero_range(0, ZeroRange(1, 8), 100.0)
    c = core.counters
    assert (c.zero_pages, c.normal_pages) == (2 + 32, 2 + 2)
    assert c.done_bytes == M.image_size
    assert c.normal_bytes == 1024 + LAST_SPAN


def test_normal_bytes_count_the_first_arrival_only() -> None:
    core = core_for()
    core.attach(0, 2, 100.0)
    store(core, 0, 2)
    store(core, 0, 2)  # again (tolerant): compared, not counted
    assert (core.counters.normal_bytes, core.counters.normal_pages) == (PACKET_BYTES, 4)
    assert core.tracker.repeated_packets == 1
    changed = PacketHeader(2, 8, 4, PACKET_BYTES, 1234, b"\x00")
    assert core.packet_header(changed) is True
    with pytest.raises(RemoteProtocolError, match="arrived again with different contents") as info:
        core.packet_stored(0, changed, 1234, True, 100.0)
    assert info.value.code is ErrorCode.INTEGRITY


# --- resume --------------------------------------------------------------------------------


def checkpoint_of(done: list[int], zero: list[int]) -> bytes:
    """The record a receiver writes with packets ``done`` (data) and ``zero`` stored."""
    core = core_for()
    core.attach(0, 2, 100.0)
    for n in done:
        store(core, 0, n)
    for n in zero:
        core.zero_range(0, ZeroRange(n, 1), 100.0)
    return core.begin_checkpoint(100.0)


def test_restore_names_what_the_checkpoint_does_not_cover() -> None:
    record = checkpoint_of(done=[1, 2, 9], zero=[5])
    core = core_for()
    ranges, reason = core.restore(record)
    assert reason is None and ranges is not None
    # Not done: 0, 3..4, 6..8, as byte ranges of the partial file.
    assert list(core.tracker.not_done_runs()) == [(0, 1), (3, 2), (6, 3)]
    assert core.tracker.not_done_run_count() == 3
    assert list(ranges) == [(0, PACKET_BYTES), (3 * PACKET_BYTES, 2 * PACKET_BYTES),
                            (6 * PACKET_BYTES, 3 * PACKET_BYTES)]
    c = core.counters
    assert c.resumed_packets == 4
    assert (c.normal_pages, c.zero_pages) == (4 + 4 + 2, 4)
    assert c.done_bytes == 3 * PACKET_BYTES + LAST_SPAN
    # All of it was there before this job: reused, none of it crossed the wire.
    assert (c.reused_normal_pages, c.reused_zero_pages, c.reused_bytes) == (
        c.normal_pages, c.zero_pages, c.done_bytes)
    assert c.normal_bytes == 0
    # What the sender is told: packets 1, 2, 5, 9, with their records.
    (frame,) = core.resume_frames()
    assert frame.last and frame.done_bitmap == bytes([0b00100110, 0b10])
    old = PacketTracker(M)
    for n in (1, 2, 9):
        header, crc = packet(n)
        old.check_packet(header)
        old.packet_done(header, crc)
    old.check_zero_range(ZeroRange(5, 1))
    old.zero_range_done(ZeroRange(5, 1))
    assert core.tracker.digest() == old.digest()
    assert frame.records == b"".join(old.snapshot().records[4 * n : 4 * n + 4]
                                     for n in (1, 2, 5, 9))


def test_restore_everything_done_leaves_nothing_to_clear() -> None:
    core = core_for()
    ranges, _ = core.restore(checkpoint_of(done=list(range(5)), zero=list(range(5, 10))))
    assert ranges is not None and list(ranges) == []
    assert core.tracker.complete


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (None, "no checkpoint"),
        (b"garbage", "checkpoint too short"),
        (checkpoint_of([1], [])[:-1], "checkpoint damaged (CRC32C)"),
    ],
)
def test_restore_without_a_usable_checkpoint(record: bytes | None, reason: str) -> None:
    core = core_for()
    assert core.restore(record) == (None, reason)
    assert core.counters.resumed_packets == 0 and core.tracker.received_packets == 0


def test_restore_of_another_layout() -> None:
    other = ReceiveJobCore(Hello(JOB, 0, 1, Manifest(M.image_size, 512, 8)), LIMITS, 0.0)
    core = core_for()
    assert core.restore(other.begin_checkpoint(0.0)) == (None, "another image layout")


def fragmented(runs: int) -> tuple[ReceiveJobCore, bytes]:
    """A core and a checkpoint of every other packet done: ``runs`` holes."""
    manifest = Manifest(2 * runs * 512, 512, 1)
    done = bytes([0b10101010]) * (runs // 4)  # packets 1, 3, 5 ... done (and zero)
    progress = Progress(manifest, done, done, bytes(4 * manifest.packet_count), runs, runs,
                        0, 0)
    core = ReceiveJobCore(Hello(JOB, 0, 1, manifest, features=FEATURE_ACKS), LIMITS, 0.0)
    return core, progress.to_bytes()


def test_a_fragmented_checkpoint_is_not_restored() -> None:
    # A sender that stored every other packet made each packet a hole to
    # punch on resume: 2 million runs cost a minute of Python on the loop and
    # half a GiB of tuples. Beyond MAX_RESTORE_RUNS the file starts empty.
    core, record = fragmented(2 * MAX_RESTORE_RUNS)
    tracemalloc.start()
    try:
        ranges, reason = core.restore(record)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ranges is None
    assert reason == (f"checkpoint too fragmented ({2 * MAX_RESTORE_RUNS} runs of missing "
                      f"packets, at most {MAX_RESTORE_RUNS})")
    assert peak < 24 * 4 * MAX_RESTORE_RUNS  # some bytes per packet, not tuples per run
    assert core.tracker.received_packets == 0 and core.counters.resumed_packets == 0
    # At the bound it is restored, and the ranges come one at a time.
    core, record = fragmented(MAX_RESTORE_RUNS)
    ranges, reason = core.restore(record)
    assert reason is None and ranges is not None
    assert next(ranges) == (0, 512)
    assert sum(1 for _ in ranges) == MAX_RESTORE_RUNS - 1
    assert core.counters.resumed_packets == MAX_RESTORE_RUNS


def test_forget_restored_starts_from_nothing() -> None:
    core = core_for()
    core.restore(checkpoint_of(done=[1, 2], zero=[5]))
    core.forget_restored()
    c = core.counters
    assert (c.resumed_packets, c.zero_pages, c.normal_pages, c.done_bytes, c.reused_bytes) == (
        0, 0, 0, 0, 0)
    assert list(core.tracker.not_done_runs()) == [(0, 10)]
    assert not core.dirty


# --- checkpoints and ACKs ------------------------------------------------------------------


def test_without_acks_there_are_no_checkpoints() -> None:
    core = core_for(acks=False)
    core.attach(0, 2, 100.0)
    store(core, 0, 1)
    assert core.checkpoint(200.0, urgent=True) is Checkpoint.NONE


def test_checkpoint_decisions() -> None:
    core = core_for()
    core.attach(0, 2, 100.0)
    core.attach(1, 2, 100.0)
    # Nothing stored: the ACK needs no checkpoint.
    assert core.checkpoint(100.0, urgent=True) is Checkpoint.ACK
    assert core.acks_due() == []  # and nothing was received to acknowledge
    store(core, 0, 1)
    core.zero_range(1, ZeroRange(2, 3), 100.0)
    # Little data, little time: at the interval, even if nothing more arrives.
    assert core.checkpoint(100.0, urgent=False) is Checkpoint.LATER
    assert core.checkpoint_delay_s == pytest.approx(CHECKPOINT_INTERVAL_S)
    # An END makes it urgent, but checkpoints are spaced so that their
    # records go out at a bounded rate.
    assert core.checkpoint(100.0, urgent=True) is Checkpoint.LATER
    record_bytes = M.packet_count * 4 + M.packet_count // 4
    assert core.checkpoint_delay_s == pytest.approx(record_bytes / CHECKPOINT_RECORD_BYTES_PER_S)
    later = 100.0 + CHECKPOINT_INTERVAL_S
    assert core.checkpoint(later, urgent=False) is Checkpoint.TAKE
    record = core.begin_checkpoint(later)
    # While it is written: nothing else, but an urgent one is remembered.
    store(core, 0, 6)
    assert core.checkpoint(later, urgent=True) is Checkpoint.NONE
    acks, again = core.checkpoint_written()
    # The ACKs cover what the checkpoint covers, not packet 6.
    assert acks == [(0, Ack(frames=1, packets=1)), (1, Ack(frames=1, packets=3))]
    assert again
    assert core.dirty
    fresh = core_for()
    assert fresh.restore(record)[1] is None
    assert fresh.counters.resumed_packets == 4


def test_checkpoint_after_enough_bytes() -> None:
    # 8 packets of 2 MiB: four of them are the 8 MiB a channel may store
    # before a checkpoint is due, whatever the time.
    big = Manifest(16 * 1024 * KiB, 4096, 512)
    core = ReceiveJobCore(Hello(JOB, 0, 1, big, features=FEATURE_ACKS), LIMITS, 100.0)
    core.attach(0, 1, 100.0)
    assert checkpoint_bytes(big, 1) == 8 * 1024 * KiB
    now = 100.0 + 1e-3  # past the spacing of records, far from the interval
    payload = bytes([1]) * (2 * 1024 * KiB)
    for n in range(4):
        header = PacketHeader(n, n * 512, 512, len(payload), crc32c(payload), bytes(64))
        core.packet_stored(0, header, header.payload_crc, core.packet_header(header), now)
        expected = Checkpoint.TAKE if n == 3 else Checkpoint.LATER
        assert core.checkpoint(now, urgent=False) is expected


def test_data_arriving_during_a_checkpoint_does_not_chain_another() -> None:
    """Packets stored while a checkpoint is written wait for their own
    trigger (bytes, the interval): a steady stream must not keep a checkpoint
    running back to back."""
    core = core_for()
    core.attach(0, 2, 100.0)
    store(core, 0, 1)
    assert core.checkpoint(100.0, urgent=True) is Checkpoint.LATER  # the records' spacing
    later = 100.0 + CHECKPOINT_INTERVAL_S
    assert core.checkpoint(later, urgent=False) is Checkpoint.TAKE
    core.begin_checkpoint(later)
    store(core, 0, 4)
    assert core.checkpoint(later, urgent=False) is Checkpoint.NONE
    acks, again = core.checkpoint_written()
    assert acks == [(0, Ack(frames=1, packets=1))]
    assert not again
    # Asked again, not urgently: at the next interval, not at once.
    assert core.checkpoint(later, urgent=False) is Checkpoint.LATER
    assert core.checkpoint_delay_s == pytest.approx(CHECKPOINT_INTERVAL_S)
    assert core.checkpoint(later + CHECKPOINT_INTERVAL_S, urgent=True) is Checkpoint.TAKE


def test_acks_due_when_nothing_is_dirty() -> None:
    core = core_for()
    core.attach(0, 2, 100.0)
    store(core, 0, 4)
    core.begin_checkpoint(101.0)
    assert core.checkpoint_written() == ([(0, Ack(1, 1))], False)
    store(core, 0, 4)  # a repeat records nothing new
    assert core.checkpoint(101.0, urgent=True) is Checkpoint.ACK
    assert core.acks_due() == [(0, Ack(2, 2))]
    assert core.acks_due() == []  # each ACK once


def test_acks_go_only_to_the_connection_that_sent_the_frames() -> None:
    core = core_for()
    core.attach(0, 2, 100.0)
    core.attach(1, 2, 100.0)
    store(core, 1, 6)
    core.begin_checkpoint(101.0)
    core.attach(1, 2, 101.0)  # channel 1 reconnected while the checkpoint was written
    acks, _ = core.checkpoint_written()
    assert acks == []  # the old connection's frames are not the new one's to acknowledge
    store(core, 1, 7)
    core.begin_checkpoint(102.0)
    assert core.checkpoint_written() == ([(1, Ack(1, 1))], False)


def test_a_failed_checkpoint_leaves_the_job_dirty() -> None:
    # What the failed checkpoint would have covered is not durable: no ACK
    # may claim it, only another checkpoint.
    core = core_for()
    core.attach(0, 2, 100.0)
    store(core, 0, 4)
    core.begin_checkpoint(101.0)
    core.checkpoint_failed()
    assert core.dirty
    assert core.checkpoint(102.0, urgent=True) is Checkpoint.TAKE
    core.begin_checkpoint(102.0)
    assert core.checkpoint_written() == ([(0, Ack(1, 1))], False)
    assert not core.dirty
    store(core, 0, 5)
    core.begin_checkpoint(103.0)
    core.checkpoint_failed()
    assert core.dirty  # back to what the checkpoint of 102 s covers
    assert core.checkpoint(103.0, urgent=True) is not Checkpoint.ACK


# --- ending and committing -----------------------------------------------------------------


def test_commit_once_everything_arrived() -> None:
    core = core_for()
    core.attach(0, 2, 100.0)
    core.attach(1, 2, 100.0)
    core.zero_range(0, ZeroRange(0, 9), 100.0)
    assert core.channel_ended(0, 100.0) is False
    request = CommitRequest(10, 36, 2, bytes(32))
    with pytest.raises(RemoteProtocolError, match="COMMIT_REQUEST with 1 of 10 packets missing"):
        core.commit(request)
    store(core, 1, 9)
    assert core.channel_ended(1, 100.0) is True
    with pytest.raises(RemoteProtocolError, match="digest") as info:
        core.commit(request)
    assert info.value.code is ErrorCode.INTEGRITY
    digest = core.tracker.digest()
    assert core.commit(CommitRequest(10, 36, 2, digest)) == digest


# --- the watchdog --------------------------------------------------------------------------


def test_stalled_without_progress() -> None:
    core = core_for(limits=ReceiverLimits(min_job_rate=0))
    core.attach(0, 2, 100.0)
    assert core.stalled(110.0, idle_s=10.0) is None
    stall = core.stalled(110.5, idle_s=10.0)
    assert isinstance(stall, RemoteProtocolError)
    assert str(stall) == "no data from the sender for 10 s"
    store(core, 0, 1, now=110.5)
    assert core.stalled(120.0, idle_s=10.0) is None


def test_stalled_below_the_minimum_rate() -> None:
    core = core_for(limits=ReceiverLimits(min_job_rate=100.0))
    core.attach(0, 2, 100.0)
    # Frames keep coming, but a packet of 2 KiB per 10 s is not 100 bytes/s.
    store(core, 0, 1, now=105.0)
    assert core.stalled(110.0, idle_s=10.0) is None  # a whole window: 2048 >= 1000
    store(core, 0, 2, now=115.0)
    core.channel_ended(0, 119.0)  # moves no data
    assert core.stalled(120.0, idle_s=10.0) is None  # 2048 again: still enough
    core.channel_ended(0, 129.0)
    stall = core.stalled(130.0, idle_s=10.0)
    assert isinstance(stall, LimitExceededError)
    assert str(stall) == ("the sender completed 0 bytes of the image in 10 s, less than this "
                          "receiver's min_job_rate of 100 bytes/s")
