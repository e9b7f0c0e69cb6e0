"""ACK and RESUME_STATE frames, the tolerant tracker, and checkpoints."""

from __future__ import annotations

import pytest

from dsamig.checksum import crc32c
from dsamig.proto import (
    Ack,
    ErrorCode,
    FrameDecoder,
    Manifest,
    PacketHeader,
    PacketTracker,
    Progress,
    RemoteProtocolError,
    ResumeState,
    ZeroRange,
    encode,
)
from dsamig.proto.errors import LocalProtocolError
from tests.protocol.helpers import feed

MANIFEST = Manifest(image_size=10 * 4 * 4096 + 100, page_size=4096, packet_pages=4)


def decode_all(data: bytes) -> list:
    decoder = FrameDecoder(expect_preamble=False)
    return feed(decoder, data, 1)


def test_ack_round_trip_and_layout() -> None:
    raw = encode(Ack(frames=3, packets=5))
    assert raw.hex() == "1500000010000000" + "0300000000000000" + "0500000000000000"
    assert decode_all(raw) == [Ack(3, 5)]


def test_resume_state_round_trip() -> None:
    frame = ResumeState(16, 10, bytes([0b101, 0b10]), b"AAAABBBBCCCC", last=True)
    raw = encode(frame)
    assert raw[:8].hex() == "160100001e000000"  # type, LAST flag, body 16+2+12
    assert decode_all(raw) == [frame]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (bytes(17), "packet_count 0 out of range"),
        ((0).to_bytes(8, "little") + (3).to_bytes(4, "little") + (1).to_bytes(4, "little")
         + b"\x01" + bytes(4), "reserved"),
        ((0).to_bytes(8, "little") + (3).to_bytes(4, "little") + bytes(4) + b"\x09" + bytes(8),
         "padding bits"),
        ((0).to_bytes(8, "little") + (3).to_bytes(4, "little") + bytes(4) + b"\x03" + bytes(4),
         "expected 25"),
    ],
)
def test_resume_state_validation(body: bytes, message: str) -> None:
    raw = bytes([0x16, 0, 0, 0]) + len(body).to_bytes(4, "little") + body
    with pytest.raises(RemoteProtocolError, match=message):
        decode_all(raw)


def test_resume_state_encode_checks_records() -> None:
    with pytest.raises(LocalProtocolError, match="one 4-byte record per done packet"):
        encode(ResumeState(0, 3, b"\x03", b"AAAA"))


def header(n: int, bitmap: bytes, payload: bytes) -> PacketHeader:
    manifest = MANIFEST
    return PacketHeader(n, n * 4, manifest.pages_in_packet(n), len(payload), crc32c(payload),
                        bitmap)


def test_tolerant_tracker_accepts_equal_duplicates_only() -> None:
    tracker = PacketTracker(MANIFEST)
    tracker.tolerant = True
    payload = b"x" * 4096
    first = header(2, b"\x0e", payload)
    assert tracker.check_packet(first) is False
    tracker.packet_done(first, crc32c(payload))
    assert tracker.check_packet(first) is True  # already stored: compare only
    tracker.packet_done(first, crc32c(payload))
    assert tracker.received_packets == 1 and tracker.normal_pages == 1
    other = b"y" * 4096
    changed = header(2, b"\x0e", other)
    assert tracker.check_packet(changed) is True
    with pytest.raises(RemoteProtocolError, match="different contents") as info:
        tracker.packet_done(changed, crc32c(other))
    assert info.value.code is ErrorCode.INTEGRITY


def test_strict_tracker_still_refuses_duplicates() -> None:
    tracker = PacketTracker(MANIFEST)
    payload = b"x" * 4096
    tracker.check_packet(header(1, b"\x0e", payload))
    with pytest.raises(RemoteProtocolError, match="received twice"):
        tracker.check_packet(header(1, b"\x0e", payload))


def test_unclaim_lets_a_packet_come_again() -> None:
    tracker = PacketTracker(MANIFEST)
    payload = b"z" * 4096
    tracker.check_packet(header(4, b"\x0e", payload))
    tracker.unclaim(4)
    tracker.check_packet(header(4, b"\x0e", payload))  # no "received twice"


def test_zero_range_again_in_tolerant_mode() -> None:
    tracker = PacketTracker(MANIFEST)
    tracker.tolerant = True
    tracker.check_zero_range(ZeroRange(0, 3))
    tracker.zero_range_done(ZeroRange(0, 3))
    tracker.check_zero_range(ZeroRange(1, 4))  # overlaps packets already done
    tracker.zero_range_done(ZeroRange(1, 4))
    assert tracker.received_packets == 5
    assert tracker.zero_pages == 20


def test_snapshot_restore_and_resume_frames() -> None:
    tracker = PacketTracker(MANIFEST)
    payload = b"p" * 4096
    tracker.check_packet(header(3, b"\x0e", payload))
    tracker.packet_done(header(3, b"\x0e", payload), crc32c(payload))
    tracker.check_zero_range(ZeroRange(5, 2))
    tracker.zero_range_done(ZeroRange(5, 2))
    progress = tracker.snapshot()
    again = Progress.from_bytes(progress.to_bytes())
    assert again == progress
    restored = PacketTracker(MANIFEST)
    restored.restore(again)
    assert restored.received_packets == 3
    assert (restored.zero_pages, restored.normal_pages) == (tracker.zero_pages, 1)
    assert restored.digest() == tracker.digest()
    frames = restored.resume_frames()
    assert len(frames) == 1 and frames[0].last
    assert frames[0].done_bitmap == bytes([0b01101000, 0])
    assert len(frames[0].records) == 12


def sealed(body: bytes) -> bytes:
    """A checkpoint body with the CRC32C that makes it look intact."""
    return body + crc32c(body).to_bytes(4, "little")


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b"NOTADSAM" + b[8:], "not a dsamig checkpoint"),
        (lambda b: b[:-1], "damaged"),
        (lambda b: b[:10], "too short"),
        # Intact, but inconsistent: what the CRC cannot tell.
        (lambda b: sealed(b[:-5]), "length"),
        (lambda b: sealed(b[:24] + (9).to_bytes(8, "little") + b[32:-4]), "packet count"),
    ],
)
def test_damaged_checkpoint_is_refused(mangle, message: str) -> None:
    data = PacketTracker(MANIFEST).snapshot().to_bytes()
    with pytest.raises(ValueError, match=message):
        Progress.from_bytes(mangle(data))


def test_any_flipped_bit_of_a_checkpoint_is_refused() -> None:
    # A flipped bit in the bitmaps or the records used to pass: the record
    # then claimed packets the partial file does not hold.
    tracker = PacketTracker(MANIFEST)
    payload = b"p" * 4096
    tracker.check_packet(header(3, b"\x0e", payload))
    tracker.packet_done(header(3, b"\x0e", payload), crc32c(payload))
    data = tracker.snapshot().to_bytes()
    assert Progress.from_bytes(data) == tracker.snapshot()
    for at in range(len(data)):
        damaged = bytearray(data)
        damaged[at] ^= 0x10
        with pytest.raises(ValueError):
            Progress.from_bytes(bytes(damaged))


def test_restore_refuses_another_manifest() -> None:
    other = Manifest(image_size=4096 * 100, page_size=4096, packet_pages=4)
    with pytest.raises(LocalProtocolError):
        PacketTracker(MANIFEST).restore(PacketTracker(other).snapshot())
