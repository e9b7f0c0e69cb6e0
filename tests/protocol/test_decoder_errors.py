"""FrameDecoder: one test per structural rule, end of stream, the zero-copy API."""

from __future__ import annotations

import struct
import uuid

import pytest

from dsamig.proto import (
    CLOSED,
    MAX_BODY,
    NEED_DATA,
    PREAMBLE,
    End,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    LocalProtocolError,
    Manifest,
    PacketHeader,
    PayloadChunk,
    RemoteProtocolError,
    Welcome,
    ZeroRange,
    encode,
    encode_packet_header,
)
from tests.protocol.helpers import feed

JOB = uuid.UUID(int=7)


def raw(
    ftype: int, body: bytes, *, flags: int = 0, reserved: int = 0, length: int | None = None
) -> bytes:
    """A frame built by hand: header fields straight from docs/protocol.md."""
    size = len(body) if length is None else length
    return struct.pack("<BBHI", ftype, flags, reserved, size) + body


def hello_body(
    *,
    version: int = 1,
    reserved: int = 0,
    features: int = 0,
    index: int = 0,
    count: int = 1,
    auth: bytes = b"",
    name: bytes = b"",
    auth_length: int | None = None,
    name_length: int | None = None,
    manifest: bytes | None = None,
) -> bytes:
    fixed = struct.pack(
        "<HHI16sHHHH",
        version,
        reserved,
        features,
        JOB.bytes,
        index,
        count,
        len(auth) if auth_length is None else auth_length,
        len(name) if name_length is None else name_length,
    )
    return fixed + (manifest or b"") + auth + name


def manifest_body(
    image_size: int = 1 << 20,
    page_size: int = 4096,
    packet_pages: int = 128,
    packet_count: int | None = None,
    checksum: int = 1,
    digest: int = 1,
    reserved: bytes = bytes(6),
) -> bytes:
    if packet_count is None:
        pages = -(-image_size // page_size)
        packet_count = -(-pages // packet_pages)
    return struct.pack(
        "<QIIQBB6s", image_size, page_size, packet_pages, packet_count, checksum, digest, reserved
    )


def hello_frame(**kwargs: object) -> bytes:
    manifest = kwargs.pop("manifest", manifest_body())
    flags = 1 if manifest is not None else 0
    return raw(0x01, hello_body(manifest=manifest, **kwargs), flags=flags)  # type: ignore[arg-type]


def packet_body(
    packet_number: int = 0,
    first_page: int = 0,
    page_count: int = 8,
    payload_length: int = 0,
    payload_crc: int = 0,
    region: int = 0,
    reserved: int = 0,
    bitmap: bytes | None = None,
) -> bytes:
    if bitmap is None:
        bitmap = bytes((page_count + 7) // 8)
    return (
        struct.pack(
            "<QQIIIHH",
            packet_number,
            first_page,
            page_count,
            payload_length,
            payload_crc,
            region,
            reserved,
        )
        + bitmap
    )


def decode_error(data: bytes, *, expect_preamble: bool = False, step: int | None = None) -> str:
    """Feed ``data`` (then EOF) and return the RemoteProtocolError message it causes."""
    decoder = FrameDecoder(expect_preamble=expect_preamble)
    with pytest.raises(RemoteProtocolError) as info:
        feed(decoder, data, step)
        decoder.receive_data(b"")
        while decoder.next_event() is not CLOSED:
            pass
    assert info.value.code is ErrorCode.PROTOCOL
    return str(info.value)


def test_helpers_build_valid_frames() -> None:
    """The hand-built frames decode when nothing is wrong with them."""
    decoder = FrameDecoder(expect_preamble=False)
    events = feed(decoder, hello_frame(name=b"ok") + raw(0x10, packet_body()))
    assert events == [
        Hello(JOB, 0, 1, Manifest(1 << 20), "ok"),
        PacketHeader(0, 0, 8, 0, 0, b"\x00"),
    ]


# -- preamble -----------------------------------------------------------------


def test_bad_preamble_refused_at_first_wrong_byte() -> None:
    decoder = FrameDecoder(expect_preamble=True)
    decoder.receive_data(b"G")
    with pytest.raises(RemoteProtocolError, match=r"not a dsamig peer: bad preamble b'G'"):
        decoder.next_event()


def test_bad_preamble_last_byte() -> None:
    message = decode_error(PREAMBLE[:7] + b"\r" + encode(End(0, 0)), expect_preamble=True)
    assert message.startswith("not a dsamig peer: bad preamble b'\\x89DSAMIG\\r'")


def test_http_client_refused() -> None:
    message = decode_error(b"GET / HTTP/1.1\r\n\r\n", expect_preamble=True, step=1)
    assert "not a dsamig peer" in message


def test_sender_side_does_not_expect_preamble() -> None:
    message = decode_error(PREAMBLE + encode(Welcome(JOB)))
    assert message == "frame type 0x89 unknown"


# -- frame header -------------------------------------------------------------


@pytest.mark.parametrize("ftype", [0x00, 0x04, 0x1B, 0x1F, 0x20, 0x7E, 0x80, 0xFF])
def test_unknown_type(ftype: int) -> None:
    assert decode_error(raw(ftype, b"")) == f"frame type 0x{ftype:02x} unknown"


@pytest.mark.parametrize(
    ("ftype", "flags", "name"),
    [
        (0x01, 0x02, "HELLO"),
        (0x01, 0x81, "HELLO"),
        (0x02, 0x01, "WELCOME"),
        (0x10, 0x02, "PACKET"),
        (0x11, 0x01, "ZERO_RANGE"),
        (0x12, 0x80, "END"),
        (0x13, 0x01, "COMMIT_REQUEST"),
        (0x14, 0x01, "COMMIT"),
        (0x7F, 0x01, "ERROR"),
    ],
)
def test_undefined_flags(ftype: int, flags: int, name: str) -> None:
    message = decode_error(raw(ftype, bytes(16), flags=flags))
    assert message == f"{name} flags 0x{flags:02x} has undefined bits set"


def test_page_list_needs_both_bitmaps_and_a_record() -> None:
    message = decode_error(raw(0x10, packet_body(), flags=0x01))
    assert message.startswith("PACKET body_length")


def test_page_list_rules() -> None:
    from dsamig.proto import encode_page_list_header

    ok = encode_page_list_header(3, 384, 128, 4096, 7, b"\x01" + bytes(15),
                                 b"\x03" + bytes(15), 0xABCD)
    (header,) = [e for e in feed(FrameDecoder(expect_preamble=False), ok)]
    assert header.present_bitmap == b"\x03" + bytes(15) and header.record == 0xABCD
    empty = bytearray(ok)
    empty[8 + 32 + 16 : 8 + 32 + 32] = bytes(16)  # no page present
    assert decode_error(bytes(empty)) == (
        "PACKET present_bitmap is empty or has padding bits set (page_count 128)")
    stray = bytearray(ok)
    stray[8 + 32] = 0x04  # a zero page that is not present
    assert decode_error(bytes(stray)) == "PACKET zero_bitmap marks pages that are not present"


def test_header_reserved() -> None:
    message = decode_error(raw(0x12, bytes(16), reserved=0x0100))
    assert message == "END header reserved 0x0100 must be 0"


def test_body_length_over_limit_fails_from_the_header_alone() -> None:
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(struct.pack("<BBHI", 0x01, 0, 0, MAX_BODY + 1))
    with pytest.raises(
        RemoteProtocolError, match="HELLO body_length 65537 exceeds the limit of 65536"
    ):
        decoder.next_event()


@pytest.mark.parametrize(
    ("ftype", "length", "message"),
    [
        (0x02, 25, "WELCOME body_length 25, expected 24"),
        (0x02, 23, "WELCOME body_length 23, expected 24"),
        (0x11, 15, "ZERO_RANGE body_length 15, expected 16"),
        (0x12, 17, "END body_length 17, expected 16"),
        (0x13, 55, "COMMIT_REQUEST body_length 55, expected 56"),
        (0x14, 33, "COMMIT body_length 33, expected 32"),
        (0x10, 32, "PACKET body_length 32 out of range (33..544)"),
        (0x10, 545, "PACKET body_length 545 out of range (33..544)"),
        (0x01, 31, "HELLO body_length 31 out of range (32..65536)"),
        (0x7F, 3, "ERROR body_length 3 out of range (4..4100)"),
        (0x7F, 4101, "ERROR body_length 4101 out of range (4..4100)"),
    ],
)
def test_body_length_bounds(ftype: int, length: int, message: str) -> None:
    # Only the header is sent: the length is refused before any body arrives.
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(raw(ftype, b"", length=length))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert str(info.value) == message


def test_hello_manifest_flag_needs_64_bytes() -> None:
    message = decode_error(raw(0x01, hello_body(), flags=0x01))
    assert message == "HELLO body_length 32 out of range (64..65536)"


# -- HELLO --------------------------------------------------------------------


def test_hello_other_version_still_decodes() -> None:
    decoder = FrameDecoder(expect_preamble=True)
    (frame,) = feed(decoder, PREAMBLE + hello_frame(version=2))
    assert isinstance(frame, Hello)
    assert frame.version == 2


def test_hello_reserved() -> None:
    assert decode_error(hello_frame(reserved=1)) == "HELLO reserved 0x0001 must be 0"


@pytest.mark.parametrize(
    ("index", "count", "message"),
    [
        (0, 0, "HELLO channel_count 0 out of range (1..64)"),
        (0, 65, "HELLO channel_count 65 out of range (1..64)"),
        (4, 4, "HELLO channel_index 4 out of range (channel_count 4)"),
        (65535, 1, "HELLO channel_index 65535 out of range (channel_count 1)"),
    ],
)
def test_hello_channels(index: int, count: int, message: str) -> None:
    assert decode_error(hello_frame(index=index, count=count)) == message


def test_hello_name_too_long() -> None:
    message = decode_error(hello_frame(name=b"n" * 256))
    assert message == "HELLO name_length 256 exceeds the limit of 255"


def test_hello_name_not_utf8() -> None:
    message = decode_error(hello_frame(name=b"ok\xff"))
    assert message.startswith("HELLO name is not valid UTF-8")


def test_hello_name_length_disagrees_with_body() -> None:
    message = decode_error(hello_frame(name=b"abc", name_length=4))
    assert message == (
        "HELLO body_length 67, expected 68 (manifest 32, auth_length 0, name_length 4)"
    )


def test_hello_auth_length_disagrees_with_body() -> None:
    message = decode_error(hello_frame(manifest=None, auth=b"xy", auth_length=1))
    assert message == (
        "HELLO body_length 34, expected 33 (manifest 0, auth_length 1, name_length 0)"
    )


def test_hello_auth_block_is_carried() -> None:
    (frame,) = feed(FrameDecoder(expect_preamble=False), hello_frame(auth=b"key", name=b"nm"))
    assert isinstance(frame, Hello)
    assert (frame.auth, frame.name) == (b"key", "nm")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"page_size": 1000}, "manifest page_size 1000 is not a power of two in 512..1048576"),
        ({"page_size": 256}, "manifest page_size 256 is not a power of two"),
        ({"page_size": 2 << 20}, "manifest page_size 2097152 is not a power of two"),
        ({"page_size": 0, "packet_count": 0}, "manifest page_size 0 is not a power of two"),
        ({"packet_pages": 0, "packet_count": 0}, "manifest packet_pages 0 out of range (1..4096)"),
        ({"packet_pages": 4097}, "manifest packet_pages 4097 out of range (1..4096)"),
        (
            {"image_size": 2**50 + 1},
            f"manifest image_size {2**50 + 1} out of range (0..{2**50})",
        ),
        (
            {"page_size": 1 << 20, "packet_pages": 4096},
            "manifest packet_pages 4096 x page_size 1048576 exceeds 4294967295 bytes",
        ),
        ({"checksum": 2}, "manifest checksum 2 not supported (1 = CRC32C)"),
        ({"digest": 0}, "manifest digest 0 not supported"),
        (
            {"packet_count": 9},
            "HELLO manifest packet_count 9 does not match 2 computed from image_size 1048576, "
            "page_size 4096, packet_pages 128",
        ),
        (
            {"reserved": b"\x00\x00\x00\x00\x00\x01"},
            "HELLO manifest reserved 000000000001 must be 0",
        ),
    ],
)
def test_hello_manifest(fields: dict[str, object], message: str) -> None:
    assert message in decode_error(hello_frame(manifest=manifest_body(**fields)))  # type: ignore[arg-type]


def test_manifest_validate_directly() -> None:
    Manifest(0, 512, 1).validate()
    Manifest(2**50, 1 << 20, 4095).validate()
    with pytest.raises(RemoteProtocolError, match="manifest image_size -1 out of range"):
        Manifest(-1).validate()
    with pytest.raises(RemoteProtocolError, match="manifest page_size 4095"):
        Manifest(10, 4095).validate()


# -- PACKET -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("page_count", "bitmap_bytes"),
    [(0, 1), (4097, 512)],
)
def test_packet_page_count(page_count: int, bitmap_bytes: int) -> None:
    message = decode_error(
        raw(0x10, packet_body(page_count=page_count, bitmap=bytes(bitmap_bytes)))
    )
    assert message == f"PACKET page_count {page_count} out of range (1..4096)"


def test_packet_body_length_disagrees_with_page_count() -> None:
    message = decode_error(raw(0x10, packet_body(page_count=8, bitmap=bytes(2))))
    assert message == "PACKET body_length 34, expected 33 for page_count 8"


@pytest.mark.parametrize(
    ("page_count", "bitmap"),
    [(1, b"\x02"), (3, b"\x08"), (7, b"\x80"), (9, b"\x00\x02"), (4095, bytes(511) + b"\x80")],
)
def test_packet_bitmap_padding(page_count: int, bitmap: bytes) -> None:
    message = decode_error(raw(0x10, packet_body(page_count=page_count, bitmap=bitmap)))
    assert message.startswith(
        f"PACKET zero_bitmap padding bits set in last byte 0x{bitmap[-1]:02x}"
    )


def test_packet_full_bitmap_has_no_padding() -> None:
    (frame,) = feed(FrameDecoder(expect_preamble=False), raw(0x10, packet_body(bitmap=b"\xff")))
    assert isinstance(frame, PacketHeader)
    assert frame.zero_bitmap == b"\xff"


def test_packet_payload_length_bound() -> None:
    message = decode_error(raw(0x10, packet_body(page_count=1, payload_length=(1 << 20) + 1)))
    assert message == "PACKET payload_length 1048577 exceeds page_count 1 x 1048576"


def test_packet_region() -> None:
    assert decode_error(raw(0x10, packet_body(region=1))) == "PACKET region 1 must be 0 in v1"


def test_packet_reserved() -> None:
    assert decode_error(raw(0x10, packet_body(reserved=2))) == "PACKET reserved 0x0002 must be 0"


# -- other frames -------------------------------------------------------------


def test_zero_range_needs_a_packet() -> None:
    message = decode_error(raw(0x11, struct.pack("<QQ", 3, 0)))
    assert message == "ZERO_RANGE packet_count 0 must be ≥ 1"


def test_welcome_reserved() -> None:
    body = struct.pack("<HHI16s", 1, 9, 0, JOB.bytes)
    assert decode_error(raw(0x02, body)) == "WELCOME reserved 0x0009 must be 0"


def test_error_message_too_long() -> None:
    body = struct.pack("<HH", 1, 4097) + b"x" * 4096
    message = decode_error(raw(0x7F, body))
    assert message == "ERROR message_length 4097 exceeds the limit of 4096"


def test_error_message_length_disagrees_with_body() -> None:
    message = decode_error(raw(0x7F, struct.pack("<HH", 1, 5) + b"abcd"))
    assert message == "ERROR body_length 8, expected 9 for message_length 5"


def test_error_message_bad_utf8_is_replaced() -> None:
    frame_bytes = raw(0x7F, struct.pack("<HH", 4, 4) + b"ab\xffc")
    assert feed(FrameDecoder(expect_preamble=False), frame_bytes) == [
        Error(ErrorCode.IO, "ab\ufffdc")
    ]


# -- end of stream ------------------------------------------------------------


def closed_after(data: bytes, *, expect_preamble: bool) -> FrameDecoder:
    decoder = FrameDecoder(expect_preamble=expect_preamble)
    feed(decoder, data)
    decoder.receive_data(b"")
    return decoder


@pytest.mark.parametrize(
    ("data", "expect_preamble", "detail"),
    [
        (PREAMBLE[:3], True, "(preamble, 3 of 8 bytes)"),
        (PREAMBLE + encode(End(1, 2))[:5], True, "(header, 5 of 8 bytes)"),
        (encode(End(1, 2))[:20], False, "(END, 20 of 24 bytes)"),
        (
            encode_packet_header(0, 0, 2, 100, 0, b"\x00") + b"x" * 40,
            False,
            "(PACKET payload, 60 bytes missing)",
        ),
        (
            encode_packet_header(0, 0, 2, 100, 0, b"\x00"),
            False,
            "(PACKET payload, 100 bytes missing)",
        ),
    ],
)
def test_eof_in_the_middle_of_a_frame(data: bytes, expect_preamble: bool, detail: str) -> None:
    decoder = closed_after(data, expect_preamble=expect_preamble)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_event()
    assert str(info.value) == f"connection closed in the middle of a frame {detail}"


@pytest.mark.parametrize(
    ("data", "expect_preamble"),
    [
        (b"", True),
        (b"", False),
        (PREAMBLE, True),
        (PREAMBLE + encode(ZeroRange(0, 1)), True),
        (encode_packet_header(0, 0, 2, 3, 0, b"\x00") + b"xyz", False),
    ],
)
def test_clean_eof(data: bytes, expect_preamble: bool) -> None:
    decoder = closed_after(data, expect_preamble=expect_preamble)
    assert decoder.next_event() is CLOSED
    assert decoder.next_event() is CLOSED


def test_data_after_eof_is_a_local_error() -> None:
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(b"")
    decoder.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        decoder.receive_data(b"x")


def test_errors_are_sticky_and_drop_input() -> None:
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(raw(0x42, b"") + bytes(100))
    with pytest.raises(RemoteProtocolError, match="frame type 0x42 unknown"):
        decoder.next_event()
    assert decoder.buffered == 0
    decoder.receive_data(encode(End(0, 0)))
    assert decoder.buffered == 0
    assert decoder.header_bytes_wanted() == 0
    with pytest.raises(RemoteProtocolError, match="frame type 0x42 unknown"):
        decoder.next_event()


# -- zero-copy API --------------------------------------------------------------


def test_header_bytes_wanted_sequence() -> None:
    decoder = FrameDecoder(expect_preamble=True)
    assert decoder.header_bytes_wanted() == 8
    decoder.receive_data(PREAMBLE[:3])
    assert decoder.header_bytes_wanted() == 5
    decoder.receive_data(PREAMBLE[3:])
    assert decoder.header_bytes_wanted() == 8  # the preamble is done: a frame header now
    header = encode_packet_header(5, 40, 8, 1000, 77, b"\x81")
    decoder.receive_data(header[:6])
    assert decoder.header_bytes_wanted() == 2
    decoder.receive_data(header[6:8])
    assert decoder.header_bytes_wanted() == 33
    decoder.receive_data(header[8:20])
    assert decoder.header_bytes_wanted() == 21
    decoder.receive_data(header[20:])
    assert decoder.header_bytes_wanted() == 0
    assert decoder.next_event() == PacketHeader(5, 40, 8, 1000, 77, b"\x81")
    assert decoder.buffered == 0
    assert decoder.payload_remaining == 1000
    assert decoder.header_bytes_wanted() == 0
    decoder.payload_received(990)
    assert decoder.payload_remaining == 10
    assert decoder.next_event() is NEED_DATA
    decoder.payload_received(10)
    assert decoder.payload_remaining == 0
    assert decoder.header_bytes_wanted() == 8
    decoder.receive_data(encode(End(1, 1000)))
    assert decoder.header_bytes_wanted() == 0
    assert decoder.next_event() == End(1, 1000)
    assert decoder.header_bytes_wanted() == 8


def test_header_bytes_wanted_is_zero_for_a_bad_header() -> None:
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(raw(0x55, b""))
    assert decoder.header_bytes_wanted() == 0
    with pytest.raises(RemoteProtocolError, match="frame type 0x55 unknown"):
        decoder.next_event()
    bad_preamble = FrameDecoder(expect_preamble=True)
    bad_preamble.receive_data(b"\x89X")
    assert bad_preamble.header_bytes_wanted() == 0
    with pytest.raises(RemoteProtocolError, match="bad preamble"):
        bad_preamble.next_event()


def test_header_bytes_wanted_zero_when_frame_buffered() -> None:
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(encode(End(0, 0)) + encode(End(1, 1))[:3])
    assert decoder.header_bytes_wanted() == 0
    assert decoder.next_event() == End(0, 0)
    assert decoder.header_bytes_wanted() == 5


def test_mixed_buffered_and_zero_copy_payload() -> None:
    """Payload already buffered is drained as chunks before the shell takes over."""
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(encode_packet_header(0, 0, 1, 10, 0, b"\x00") + b"0123")
    assert isinstance(decoder.next_event(), PacketHeader)
    with pytest.raises(LocalProtocolError, match="while 4 bytes are buffered"):
        decoder.payload_received(6)
    assert decoder.next_event() == PayloadChunk(b"0123")
    decoder.payload_received(6)
    assert decoder.payload_remaining == 0
    assert decoder.next_event() is NEED_DATA


@pytest.mark.parametrize("n", [0, -1, 11])
def test_payload_received_out_of_range(n: int) -> None:
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(encode_packet_header(0, 0, 1, 10, 0, b"\x00"))
    assert isinstance(decoder.next_event(), PacketHeader)
    with pytest.raises(
        LocalProtocolError, match=rf"payload_received\({n}\) out of range \(1..10\)"
    ):
        decoder.payload_received(n)
    assert decoder.payload_remaining == 10


def test_payload_received_outside_payload() -> None:
    decoder = FrameDecoder(expect_preamble=False)
    with pytest.raises(LocalProtocolError, match="outside a PACKET payload"):
        decoder.payload_received(1)
    decoder.receive_data(encode_packet_header(0, 0, 1, 0, 0, b"\x01"))
    assert isinstance(decoder.next_event(), PacketHeader)
    # A zero-length payload leaves the decoder between frames.
    with pytest.raises(LocalProtocolError, match="outside a PACKET payload"):
        decoder.payload_received(1)
