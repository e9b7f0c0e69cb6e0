"""Frames: encode/decode round trips, exact byte layouts, manifest arithmetic."""

from __future__ import annotations

import uuid

import pytest

from dsamig.proto import (
    CLOSED,
    MAX_ERROR_MESSAGE,
    NEED_DATA,
    PREAMBLE,
    Commit,
    CommitRequest,
    End,
    Error,
    ErrorCode,
    FrameDecoder,
    FrameType,
    Hello,
    LocalProtocolError,
    Manifest,
    PacketHeader,
    PayloadChunk,
    Welcome,
    ZeroRange,
    encode,
    encode_packet_header,
    encode_preamble,
    frame_type,
)
from tests.protocol.helpers import feed_zero_copy, transfer

JOB = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
DIGEST = bytes(range(32))
STEPS = [None, 1, 3, 41]


def h(text: str) -> bytes:
    """Bytes from hex written with spaces and line breaks, for readable layouts."""
    return bytes.fromhex("".join(text.split()))


# -- round trips --------------------------------------------------------------

SENDER_FRAMES = [
    Hello(JOB, 0, 4, Manifest(1 << 20), "vm1"),
    Hello(JOB, 3, 4),
    Hello(JOB, 1, 2, None, "ünïcödé ✓", features=0x5, auth=b"\x00\x01secret"),
    Hello(JOB, 0, 1, Manifest(0, 512, 1), "", version=7),
    Hello(JOB, 0, 64, Manifest(2**50, 1 << 20, 4095), "x" * 255),
    ZeroRange(5, 3),
    ZeroRange(2**64 - 2, 1),
    End(0, 0),
    End(2**64 - 1, 2**64 - 1),
    CommitRequest(2, 3, 5, DIGEST),
    Error(ErrorCode.CANCELLED, "stopped by operator"),
]
RECEIVER_FRAMES = [
    Welcome(JOB),
    Welcome(JOB, features=0xFFFFFFFF, version=2),
    Commit(DIGEST),
    Error(ErrorCode.IO, "disk full"),
    Error(999, "a code from the future"),
    Error(ErrorCode.INTERNAL, ""),
]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("frame", SENDER_FRAMES, ids=repr)
def test_sender_frame_round_trip(frame: object, step: int | None) -> None:
    data = encode_preamble() + encode(frame)  # type: ignore[arg-type]
    assert transfer(data, step=step) == [frame]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("frame", RECEIVER_FRAMES, ids=repr)
def test_receiver_frame_round_trip(frame: object, step: int | None) -> None:
    assert transfer(encode(frame), step=step) == [frame]  # type: ignore[arg-type]


def test_unknown_error_code_decodes_as_int() -> None:
    (frame,) = transfer(encode(Error(999, "x")))
    assert isinstance(frame, Error)
    assert frame.code == 999
    assert type(frame.code) is int
    (known,) = transfer(encode(Error(3, "x")))
    assert isinstance(known, Error)
    assert known.code is ErrorCode.REJECTED


@pytest.mark.parametrize("step", STEPS)
def test_packet_stream_round_trip(step: int | None) -> None:
    payload_a = bytes(range(256)) * 4
    payload_b = b"\xaa" * 512
    stream = (
        PREAMBLE
        + encode_packet_header(0, 0, 4, 1024, 11, b"\x0a")
        + payload_a
        + encode_packet_header(1, 4, 4, 0, 0, b"\x0f")
        + encode(ZeroRange(2, 2))
        + encode_packet_header(4, 16, 3, 512, 22, b"\x06")
        + payload_b
        + encode(End(4, 1536))
    )
    assert transfer(stream, step=step) == [
        PacketHeader(0, 0, 4, 1024, 11, b"\x0a"),
        PayloadChunk(payload_a),
        # A zero-length payload produces no PayloadChunk at all.
        PacketHeader(1, 4, 4, 0, 0, b"\x0f"),
        ZeroRange(2, 2),
        PacketHeader(4, 16, 3, 512, 22, b"\x06"),
        PayloadChunk(payload_b),
        End(4, 1536),
    ]
    decoder = FrameDecoder(expect_preamble=True)
    assert feed_zero_copy(decoder, stream, max_read=100 if step else 1 << 30) == [
        PacketHeader(0, 0, 4, 1024, 11, b"\x0a"),
        PayloadChunk(payload_a),
        PacketHeader(1, 4, 4, 0, 0, b"\x0f"),
        ZeroRange(2, 2),
        PacketHeader(4, 16, 3, 512, 22, b"\x06"),
        PayloadChunk(payload_b),
        End(4, 1536),
        CLOSED,
    ]


def test_payload_chunks_never_exceed_the_payload() -> None:
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(encode_packet_header(0, 0, 1, 3, 0, b"\x00") + b"abc" + encode(End(1, 3)))
    assert isinstance(decoder.next_event(), PacketHeader)
    assert decoder.payload_remaining == 3
    assert decoder.next_event() == PayloadChunk(b"abc")
    assert decoder.payload_remaining == 0
    assert decoder.next_event() == End(1, 3)
    assert decoder.next_event() is NEED_DATA
    assert decoder.buffered == 0


def test_sentinels() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert repr(CLOSED) == "CLOSED"
    assert NEED_DATA is not CLOSED


def test_frame_type() -> None:
    assert frame_type(PacketHeader(0, 0, 1, 0, 0, b"\x01")) is FrameType.PACKET
    assert frame_type(Commit(DIGEST)) is FrameType.COMMIT
    with pytest.raises(LocalProtocolError, match="not a frame"):
        frame_type(PayloadChunk(b""))  # type: ignore[arg-type]


# -- exact layouts (written from docs/protocol.md, not from the code) ---------


def test_preamble_bytes() -> None:
    assert encode_preamble() == h("89 44 53 41 4d 49 47 0a")


def test_hello_layout() -> None:
    frame = Hello(JOB, 0, 4, Manifest(1 << 20, 4096, 128), "vm1")
    assert encode(frame) == h(
        """
        01 01 0000 43000000
        0100 0000 00000000 00112233445566778899aabbccddeeff 0000 0400 0000 0300
        0000100000000000 00100000 80000000 0200000000000000 01 01 000000000000
        766d31
        """
    )


def test_hello_without_manifest_layout() -> None:
    frame = Hello(JOB, 2, 3, auth=b"\xab")
    assert encode(frame) == h(
        """
        01 00 0000 21000000
        0100 0000 00000000 00112233445566778899aabbccddeeff 0200 0300 0100 0000
        ab
        """
    )


def test_welcome_layout() -> None:
    assert encode(Welcome(JOB, features=2)) == h(
        "02 00 0000 18000000  0100 0000 02000000 00112233445566778899aabbccddeeff"
    )


def test_packet_layout() -> None:
    expected = h(
        """
        10 00 0000 21000000
        0100000000000000 0800000000000000 08000000 00100000 efbeadde 0000 0000
        fe
        """
    )
    assert encode_packet_header(1, 8, 8, 4096, 0xDEADBEEF, b"\xfe") == expected
    assert encode(PacketHeader(1, 8, 8, 4096, 0xDEADBEEF, b"\xfe")) == expected


def test_small_frame_layouts() -> None:
    assert encode(ZeroRange(5, 3)) == h("11 00 0000 10000000 0500000000000000 0300000000000000")
    assert encode(End(2, 8192)) == h("12 00 0000 10000000 0200000000000000 0020000000000000")
    assert encode(CommitRequest(2, 3, 5, DIGEST)) == h(
        "13 00 0000 38000000 0200000000000000 0300000000000000 0500000000000000"
    ) + bytes(range(32))
    assert encode(Commit(DIGEST)) == h("14 00 0000 20000000") + bytes(range(32))
    assert encode(Error(ErrorCode.REJECTED, "busy")) == h("7f 00 0000 08000000 0300 0400 62757379")


@pytest.mark.parametrize(
    "args",
    [
        (0, 0, 1, 0, 0, b"\x01"),
        (7, 7 * 128, 128, 4096 * 100, 0xFFFFFFFF, b"\x55" * 16),
        (2**64 - 1, 2**64 - 1, 4096, 2**32 - 1, 1, bytes(512)),
        (3, 9, 3, 1, 2, b"\x03"),
    ],
)
def test_encode_packet_header_matches_encode(args: tuple[int, int, int, int, int, bytes]) -> None:
    assert encode_packet_header(*args) == encode(PacketHeader(*args))


# -- encoder refusals ---------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (Hello(JOB, 4, 4), "HELLO channel_index 4 out of range (0..3)"),
        (Hello(JOB, 0, 65), "HELLO channel_count 65 out of range (1..64)"),
        (Hello(JOB, 0, 1, Manifest(10), "é" * 128), "HELLO name_length 256 out of range"),
        (Hello(JOB, 0, 1, Manifest(10), "\udc80"), "not encodable as UTF-8"),
        (Hello(JOB, 0, 1, Manifest(10, 1000)), "manifest page_size 1000 is not a power of two"),
        (Hello(JOB, 0, 1, version=70000), "HELLO version 70000 out of range"),
        (Hello(JOB, 1, 2, auth=bytes(65536)), "HELLO auth_length 65536 out of range"),
        (Hello(JOB, 1, 2, auth=bytes(65505)), "HELLO body_length 65537 exceeds the limit"),
        (PacketHeader(0, 0, 0, 0, 0, b""), "PACKET page_count 0 out of range (1..4096)"),
        (PacketHeader(0, 0, 8, 0, 0, b"\x00\x00"), "zero_bitmap of 2 bytes, expected 1"),
        (PacketHeader(0, 0, 3, 0, 0, b"\x08"), "padding bits set in last byte 0x08"),
        (PacketHeader(0, 0, 1, 0, 1 << 32, b"\x00"), "PACKET payload_crc 4294967296"),
        (PacketHeader(-1, 0, 1, 0, 0, b"\x00"), "PACKET packet_number -1 out of range"),
        (PacketHeader(0, 0, 1, (1 << 20) + 1, 0, b"\x00"), "PACKET payload_length 1048577"),
        (PacketHeader(0, 0, 1, 0, 0, b"\x00", region=1), "PACKET region 1 out of range (0..0)"),
        (ZeroRange(0, 0), "ZERO_RANGE packet_count 0 out of range"),
        (End(-1, 0), "END packets -1 out of range"),
        (CommitRequest(0, 0, 0, b"short"), "COMMIT_REQUEST digest of 5 bytes, expected 32"),
        (Commit(bytes(33)), "COMMIT digest of 33 bytes, expected 32"),
        (Welcome(JOB, features=1 << 32), "WELCOME features 4294967296 out of range"),
        (Error(65536, "x"), "ERROR code 65536 out of range"),
    ],
)
def test_encode_refuses(frame: object, message: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode(frame)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert info.value.code is ErrorCode.PROTOCOL


def test_encode_refuses_non_frames() -> None:
    with pytest.raises(LocalProtocolError, match="not a frame"):
        encode(PayloadChunk(b"x"))  # type: ignore[arg-type]


def test_error_message_truncated_on_utf8_boundary() -> None:
    (frame,) = transfer(encode(Error(ErrorCode.INTERNAL, "a" + "é" * 3000)))
    assert isinstance(frame, Error)
    # 1 + 2 * 2047 = 4095 bytes: the 2048th "é" would need bytes 4095..4096.
    assert frame.message == "a" + "é" * 2047
    assert len(frame.message.encode()) == 4095
    (exact,) = transfer(encode(Error(ErrorCode.INTERNAL, "é" * 3000)))
    assert isinstance(exact, Error)
    assert len(exact.message.encode()) == MAX_ERROR_MESSAGE
    (short,) = transfer(encode(Error(ErrorCode.INTERNAL, "x" * 4096)))
    assert isinstance(short, Error)
    assert short.message == "x" * 4096


def test_error_message_with_lone_surrogate_is_still_sent() -> None:
    (frame,) = transfer(encode(Error(ErrorCode.IO, "bad name \udc80 here")))
    assert isinstance(frame, Error)
    assert frame.message == "bad name ? here"


# -- manifest arithmetic ------------------------------------------------------

PS = 4096
PP = 4


@pytest.mark.parametrize(
    ("image_size", "page_count", "packet_count", "last_page_length"),
    [
        (0, 0, 0, None),
        (1, 1, 1, 1),
        (4095, 1, 1, 4095),
        (4096, 1, 1, 4096),
        (4097, 2, 1, 1),
        (PS * PP - 1, 4, 1, 4095),
        (PS * PP, 4, 1, 4096),
        (PS * PP + 1, 5, 2, 1),
        (3 * PS * PP - 1, 12, 3, 4095),
        (3 * PS * PP, 12, 3, 4096),
        (3 * PS * PP + 1, 13, 4, 1),
    ],
)
def test_manifest_counts(
    image_size: int, page_count: int, packet_count: int, last_page_length: int | None
) -> None:
    manifest = Manifest(image_size, PS, PP)
    assert manifest.page_count == page_count
    assert manifest.packet_count == packet_count
    if last_page_length is not None:
        assert manifest.page_length(page_count - 1) == last_page_length
        assert sum(manifest.pages_in_packet(n) for n in range(packet_count)) == page_count
    manifest.validate()


def test_pages_in_packet_and_page_length() -> None:
    manifest = Manifest(3 * PS * PP + PS + 10, PS, PP)  # 14 pages: packets of 4, 4, 4, 2
    assert [manifest.pages_in_packet(n) for n in range(4)] == [4, 4, 4, 2]
    assert manifest.page_length(0) == PS
    assert manifest.page_length(12) == PS
    assert manifest.page_length(13) == 10
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=f"packet_number {bad} out of range"):
            manifest.pages_in_packet(bad)
    for bad in (-1, 14):
        with pytest.raises(ValueError, match=f"page_index {bad} out of range"):
            manifest.page_length(bad)
    with pytest.raises(ValueError, match="packet_number 0 out of range"):
        Manifest(0).pages_in_packet(0)


def test_payload_length() -> None:
    # 14 pages, the last one 10 bytes: packets of 4, 4, 4 and 2 pages.
    manifest = Manifest(13 * PS + 10, PS, PP)
    assert manifest.payload_length(0, b"\x00") == 4 * PS
    assert manifest.payload_length(0, b"\x05") == 2 * PS
    assert manifest.payload_length(0, b"\x0f") == 0
    # Last packet: page 12 full, page 13 short.
    assert manifest.payload_length(3, b"\x00") == PS + 10
    assert manifest.payload_length(3, b"\x01") == 10
    assert manifest.payload_length(3, b"\x02") == PS
    assert manifest.payload_length(3, b"\x03") == 0


def test_payload_length_without_short_page() -> None:
    manifest = Manifest(9 * PS, PS, PP)  # packets of 4, 4, 1 pages, all full
    assert manifest.payload_length(2, b"\x00") == PS
    assert manifest.payload_length(2, b"\x01") == 0
    assert manifest.payload_length(1, b"\x08") == 3 * PS


def test_payload_length_short_page_in_wide_bitmap() -> None:
    # The last page is bit 9: byte 1, bit 1.
    manifest = Manifest(9 * 512 + 1, 512, 16)
    assert manifest.pages_in_packet(0) == 10
    assert manifest.payload_length(0, b"\x00\x00") == 9 * 512 + 1
    assert manifest.payload_length(0, b"\x00\x02") == 9 * 512
    assert manifest.payload_length(0, b"\xff\x01") == 1


def test_range_pages_and_bytes() -> None:
    manifest = Manifest(13 * PS + 10, PS, PP)  # 14 pages, the last 10 bytes: 4, 4, 4, 2
    assert manifest.range_pages(0, 1) == 4
    assert manifest.range_pages(1, 3) == 10
    assert manifest.range_pages(3, 1) == 2
    assert manifest.range_pages(0, 4) == 14
    assert manifest.range_bytes(0, 1) == (0, 4 * PS)
    assert manifest.range_bytes(2, 2) == (8 * PS, 5 * PS + 10)
    assert manifest.range_bytes(3, 1) == (12 * PS, PS + 10)


def test_full_zero_bitmap_and_bitmap_length() -> None:
    manifest = Manifest(23 * 512, 512, 10)  # packets of 10, 10, 3 pages
    assert manifest.full_zero_bitmap(0) == b"\xff\x03"
    assert manifest.full_zero_bitmap(2) == b"\x07"
    assert Manifest.bitmap_length(1) == 1
    assert Manifest.bitmap_length(8) == 1
    assert Manifest.bitmap_length(9) == 2
    assert Manifest.bitmap_length(4096) == 512
    assert manifest.payload_length(2, manifest.full_zero_bitmap(2)) == 0


def test_manifest_equality_ignores_derived_fields() -> None:
    assert Manifest(100) == Manifest(100, 4096, 128, 1, 1)
    assert Manifest(100) != Manifest(101)
    assert repr(Manifest(100)) == (
        "Manifest(image_size=100, page_size=4096, packet_pages=128, checksum=1, digest=1)"
    )
