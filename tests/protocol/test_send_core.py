"""The send-side job core: the chunk planner, zero counting and resume bookkeeping."""

from __future__ import annotations

import pytest

from dsamig.checksum import crc32c
from dsamig.proto import (
    Chunk,
    Commit,
    ImageChangedError,
    JobDigest,
    LocalProtocolError,
    Manifest,
    RemoteProtocolError,
    ResumeState,
    SendJobCore,
    packet_record,
    plan_chunks,
)
from dsamig.proto.send_core import CHUNK_BYTES, PACKET, ZERO

# 10 packets of 4 pages of 512 bytes; the last packet has 2 pages, the last
# page 100 bytes: 38 pages, 18 532 bytes.
M = Manifest(37 * 512 + 100, 512, 4)
PACKET_BYTES = 4 * 512
LAST_SPAN = 512 + 100


def test_manifest_of_these_tests() -> None:
    assert (M.packet_count, M.page_count, M.pages_in_packet(9)) == (10, 38, 2)
    assert M.range_bytes(9, 1) == (9 * PACKET_BYTES, LAST_SPAN)


# --- the chunk planner ---------------------------------------------------------------------


def plan(ranges: list[tuple[int, int]], chunk_packets: int = 3,
         manifest: Manifest = M) -> list[tuple[int, int, bool]]:
    return [(c.first_packet, c.packets, c.hole)
            for c in plan_chunks(manifest, ranges, chunk_packets)]


def test_plan_whole_image() -> None:
    # The last chunk is what is left of the image.
    assert plan([(0, M.image_size)]) == [(0, 3, False), (3, 3, False), (6, 3, False),
                                         (9, 1, False)]
    assert plan([(0, M.image_size)], chunk_packets=8) == [(0, 8, False), (8, 2, False)]


def test_plan_empty_image_and_no_data() -> None:
    assert plan([], manifest=Manifest(0, 512, 4)) == []
    # Nothing but holes: one hole chunk over the whole image.
    assert plan([]) == [(0, 10, True)]


def test_plan_merges_consecutive_holes() -> None:
    # Data only in packet 4 (chunk 3..5) and in the last byte of the image.
    ranges = [(4 * PACKET_BYTES + 10, 4 * PACKET_BYTES + 20), (M.image_size - 1, M.image_size)]
    assert plan(ranges) == [(0, 3, True), (3, 3, False), (6, 3, True), (9, 1, False)]


def test_plan_range_edges_are_exclusive() -> None:
    # A range that ends where a chunk begins, or begins where it ends, is not in it.
    ranges = [(0, 3 * PACKET_BYTES), (9 * PACKET_BYTES, M.image_size)]
    assert plan(ranges) == [(0, 3, False), (3, 6, True), (9, 1, False)]
    # One byte into the next chunk is enough to scan it.
    ranges = [(0, 3 * PACKET_BYTES + 1)]
    assert plan(ranges) == [(0, 3, False), (3, 3, False), (6, 4, True)]


@pytest.mark.parametrize(("packet_pages", "per_chunk"), [(128, 8), (512, 2), (2048, 1)])
def test_core_plans_chunks_of_four_mib(packet_pages: int, per_chunk: int) -> None:
    # 512 KiB, 2 MiB and 8 MiB packets: a chunk is CHUNK_BYTES of whole packets, at least one.
    manifest = Manifest(10 * packet_pages * 4096, 4096, packet_pages)
    chunks = list(SendJobCore(manifest).plan([(0, manifest.image_size)]))
    assert [(c.first_packet, c.packets) for c in chunks] == [
        (first, min(per_chunk, 10 - first)) for first in range(0, 10, per_chunk)]
    assert CHUNK_BYTES == 4 * 1024 * 1024


# --- what a scanned chunk holds ------------------------------------------------------------

FULL, LAST = b"\x0f", b"\x03"  # all-zero bitmaps of a full packet and of the last one


def rec(bitmap: bytes, crc: int) -> bytes:
    """A packet's digest record as RESUME_STATE carries it."""
    return packet_record(bitmap, crc).to_bytes(4, "little")


def test_chunk_items_merges_zero_packets() -> None:
    core = SendJobCore(M)
    # Packets 5..9: data, zero, zero, data, zero (the last packet's own bitmap).
    bitmaps = b"\x00" + FULL + FULL + b"\x05" + LAST
    items = list(core.chunk_items(Chunk(5, 5, False), bitmaps))
    assert items == [(PACKET, 5, b"\x00"), (ZERO, 6, 2), (PACKET, 8, b"\x05"), (ZERO, 9, 1)]


def test_chunk_items_last_packet_zero_only_with_its_own_bitmap() -> None:
    core = SendJobCore(M)
    # A full packet's bitmap is not the last packet's all-zero one.
    assert list(core.chunk_items(Chunk(9, 1, False), b"\x02")) == [(PACKET, 9, b"\x02")]
    assert list(core.chunk_items(Chunk(8, 2, False), FULL + LAST)) == [(ZERO, 8, 2)]


def test_chunk_items_leave_out_held_packets_already_checked() -> None:
    core = SendJobCore(M)
    record = rec(b"\x00", 7)
    assert core.packet(1, b"\x00", PACKET_BYTES, 7)  # recorded in a first session
    core.new_session()
    core.resume_state(ResumeState(0, 10, b"\x06\x00", record + rec(FULL, 0),
                                  last=True))
    core.verify_known()
    # Packet 1 (held, checked) is left out; packet 2 (held, never recorded
    # here) is scanned and comes out, to be checked by packet().
    items = list(core.chunk_items(Chunk(0, 3, False), b"\x00\x00\x01"))
    assert items == [(PACKET, 0, b"\x00"), (PACKET, 2, b"\x01")]


# --- zero counting -------------------------------------------------------------------------


def test_zero_runs_fresh() -> None:
    core = SendJobCore(M)
    assert core.zero_runs(7, 3) == [(7, 3)]
    c = core.counters
    # Packets 7, 8 (4 pages each) and 9 (2 pages, 612 bytes).
    assert (c.zero_pages, c.done_bytes, c.normal_pages, c.normal_bytes) == (
        10, 2 * PACKET_BYTES + LAST_SPAN, 0, 0)
    digest = JobDigest(M)
    digest.record_zero_range(7, 3)
    for n in (7, 8, 9):
        assert core.digest.record(n) == digest.record(n)


def test_zero_runs_again_counts_nothing_twice() -> None:
    core = SendJobCore(M)
    core.zero_runs(0, 2)
    core.new_session()
    assert core.zero_runs(0, 3) == [(0, 3)]  # nothing held: all of them go out again
    assert (core.counters.zero_pages, core.counters.done_bytes) == (12, 3 * PACKET_BYTES)


def test_zero_runs_around_held_packets() -> None:
    core = SendJobCore(M)
    zero = rec(FULL, 0)
    # The receiver holds packets 2 and 4 (all zero, as their records say).
    core.resume_state(ResumeState(0, 10, b"\x14\x00", zero + zero, last=True))
    core.verify_known()
    assert core.counters.resumed_packets == 2
    assert core.zero_runs(1, 5) == [(1, 1), (3, 1), (5, 1)]
    c = core.counters
    assert (c.zero_pages, c.done_bytes) == (20, 5 * PACKET_BYTES)
    assert (c.reused_zero_pages, c.reused_bytes, c.reused_normal_pages) == (
        8, 2 * PACKET_BYTES, 0)


def test_zero_runs_held_with_data_means_the_image_changed() -> None:
    core = SendJobCore(M)
    core.resume_state(ResumeState(0, 10, b"\x08\x00", rec(b"\x00", 99), last=True))
    core.verify_known()
    with pytest.raises(ImageChangedError, match="receiver's copy of packet 3 differs"):
        core.zero_runs(2, 3)


def test_zero_packet_that_held_data_earlier_in_the_job() -> None:
    core = SendJobCore(M)
    assert core.packet(4, b"\x01", 3 * 512, 5)
    core.new_session()
    with pytest.raises(ImageChangedError, match="packet 4 of the image changed during the job"):
        core.zero_runs(3, 2)


# --- packets with data ---------------------------------------------------------------------


def test_packet_counts_once_then_as_retransmission() -> None:
    core = SendJobCore(M)
    assert core.packet(0, b"\x05", 2 * 512, 11) is True
    c = core.counters
    assert (c.zero_pages, c.normal_pages, c.normal_bytes, c.done_bytes) == (
        2, 2, 1024, PACKET_BYTES)
    # A new session sends it again (the receiver did not hold it).
    core.new_session()
    assert core.packet(0, b"\x05", 2 * 512, 11) is True
    assert (c.normal_pages, c.normal_bytes, c.retransmitted_bytes) == (2, 1024, 1024)
    with pytest.raises(ImageChangedError, match="packet 0 of the image changed during the job"):
        core.packet(0, b"\x05", 2 * 512, 12)


def test_packet_short_tail_counts_its_span() -> None:
    core = SendJobCore(M)
    assert core.packet(9, b"\x00", LAST_SPAN, 3)
    c = core.counters
    assert (c.normal_pages, c.zero_pages, c.normal_bytes, c.done_bytes) == (
        2, 0, LAST_SPAN, LAST_SPAN)


def test_packet_held_by_the_receiver_is_checked_not_sent() -> None:
    core = SendJobCore(M)
    held = rec(b"\x01", 42)
    core.resume_state(ResumeState(3, 4, b"\x01", held))
    core.resume_state(ResumeState(7, 3, b"\x00", b"", last=True))
    core.verify_known()
    assert core.packet(3, b"\x01", 3 * 512, 42) is False
    c = core.counters
    # The whole image's figures include it; normal_bytes (what crossed the
    # wire in this job) does not.
    assert (c.normal_pages, c.zero_pages, c.done_bytes) == (3, 1, PACKET_BYTES)
    assert (c.reused_normal_pages, c.reused_zero_pages, c.reused_bytes) == (3, 1, PACKET_BYTES)
    assert (c.normal_bytes, c.retransmitted_bytes, c.resumed_packets) == (0, 0, 1)


def test_packet_held_with_another_record() -> None:
    core = SendJobCore(M)
    core.resume_state(ResumeState(0, 10, b"\x01\x00", rec(b"\x00", 1), last=True))
    core.verify_known()
    with pytest.raises(ImageChangedError, match="copy of packet 0 differs from the image"):
        core.packet(0, b"\x00", PACKET_BYTES, 2)


# --- resume bookkeeping --------------------------------------------------------------------


def test_resume_state_marks_held_packets() -> None:
    core = SendJobCore(M)
    core.resume_state(ResumeState(0, 8, b"\x81", b"AAAABBBB"))
    core.resume_state(ResumeState(8, 2, b"\x02", b"CCCC", last=True))
    assert [n for n in range(10) if core.skip[n]] == [0, 7, 9]
    assert [core.remote_records[n] for n in (0, 7, 9)] == [
        int.from_bytes(r, "little") for r in (b"AAAA", b"BBBB", b"CCCC")]
    core.verify_known()
    assert core.counters.resumed_packets == 3


def test_resume_state_beyond_the_image_or_after_the_last() -> None:
    core = SendJobCore(M)
    with pytest.raises(RemoteProtocolError, match=r"RESUME_STATE packets 8\+3 beyond "
                                                  "packet_count 10"):
        core.resume_state(ResumeState(8, 3, b"\x00", b""))
    core.resume_state(ResumeState(0, 10, b"\x00\x00", b"", last=True))
    with pytest.raises(RemoteProtocolError, match="RESUME_STATE after the one marked last"):
        core.resume_state(ResumeState(0, 1, b"\x00", b""))
    core.new_session()  # a new session hears afresh
    held_record = (0x5EC0DED).to_bytes(4, "little")  # the receiver's record of packet 0
    core.resume_state(ResumeState(0, 1, b"\x01", held_record, last=True))
    assert core.skip[0] == 1


def test_verify_known_checks_only_what_this_job_recorded() -> None:
    core = SendJobCore(M)
    core.packet(2, b"\x00", PACKET_BYTES, 5)
    core.new_session()
    # The receiver holds 2 (with its true record) and 3 (never recorded
    # here: checked when it is scanned).
    core.resume_state(ResumeState(0, 10, b"\x0c\x00",
                                  rec(b"\x00", 5) + b"ZZZZ", last=True))
    core.verify_known()
    assert core.counters.resumed_packets == 2
    assert not core.needs_scan(Chunk(2, 1, False))
    assert core.needs_scan(Chunk(2, 2, False))
    assert not core.needs_scan(Chunk(0, 10, True))
    core.new_session()
    core.resume_state(ResumeState(0, 10, b"\x04\x00", b"ZZZZ", last=True))
    with pytest.raises(ImageChangedError, match="packet 2 differs"):
        core.verify_known()


def test_restart_clean_forgets_the_job() -> None:
    core = SendJobCore(M)
    core.packet(0, b"\x00", PACKET_BYTES, 5)
    core.zero_runs(1, 9)
    core.resume_state(ResumeState(0, 1, b"\x01", b"ZZZZ", last=True))
    core.restart_clean()
    c = core.counters
    assert (c.zero_pages, c.normal_pages, c.done_bytes, c.normal_bytes) == (0, 0, 0, 0)
    assert not any(core.recorded) and not any(core.skip)
    # Different content is no longer a change: the job starts over.
    assert core.packet(0, b"\x01", 3 * 512, 6)


# --- commit --------------------------------------------------------------------------------


def test_commit_request_needs_every_packet() -> None:
    core = SendJobCore(M)
    core.zero_runs(0, 9)
    with pytest.raises(LocalProtocolError, match="COMMIT_REQUEST with 1 packets never recorded"):
        core.commit_request()
    payload = bytes([1]) * LAST_SPAN
    core.packet(9, b"\x00", LAST_SPAN, crc32c(payload))
    request = core.commit_request()
    digest = JobDigest(M)
    digest.record_zero_range(0, 9)
    digest.record_packet(9, b"\x00", crc32c(payload))
    assert (request.packet_count, request.zero_pages, request.normal_pages, request.digest) == (
        10, 36, 2, digest.digest())
    core.check_commit(Commit(digest.digest()))
    with pytest.raises(RemoteProtocolError, match="receiver committed a different job digest"):
        core.check_commit(Commit(bytes(32)))


def test_empty_image() -> None:
    core = SendJobCore(Manifest(0))
    assert list(core.plan([])) == []
    request = core.commit_request()
    assert (request.packet_count, request.zero_pages, request.normal_pages) == (0, 0, 0)
