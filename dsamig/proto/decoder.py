"""Incremental, sans-I/O decoder of the dsamig byte stream.

Bytes go in with :meth:`FrameDecoder.receive_data`; frames, payload chunks and
the NEED_DATA / CLOSED signals come out of :meth:`FrameDecoder.next_event`.
The checks here are structural (types, flags, lengths, reserved fields, bitmap
padding); order and manifest bounds are :mod:`dsamig.proto.state`'s job.

The I/O shell may also keep PACKET payloads out of this object entirely: it
reads exactly :meth:`FrameDecoder.header_bytes_wanted` bytes while a header is
incomplete, then receives the payload straight into its destination and reports
it with :meth:`FrameDecoder.payload_received`.
"""

from __future__ import annotations

import enum
import uuid
from typing import Final

from dsamig.proto.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from dsamig.proto.frames import (
    ACK_STRUCT,
    CHALLENGE_STRUCT,
    CLOSED,
    COMMIT_REQUEST_STRUCT,
    COMMIT_STRUCT,
    END_STRUCT,
    ERROR_STRUCT,
    FRAME_HEADER_SIZE,
    HEADER_STRUCT,
    HELLO_FIXED_BODY,
    HELLO_MANIFEST,
    HELLO_STRUCT,
    MANIFEST_SIZE,
    MANIFEST_STRUCT,
    MAX_BODY,
    MAX_CHANNELS,
    MAX_ERROR_MESSAGE,
    MAX_NAME,
    MAX_PACKET_PAGES,
    MAX_PAGE_SIZE,
    MAX_RESUME_PACKETS,
    MAX_SUMS_PACKETS,
    MAX_SUMS_PAGES,
    NEED_DATA,
    PACKET_FIXED_BODY,
    PACKET_PAGE_LIST,
    PACKET_STRUCT,
    PAGE_LIST_RECORD,
    PREAMBLE,
    RESUME_LAST,
    RESUME_STRUCT,
    ROUND_DONE_STRUCT,
    ROUND_STRUCT,
    SUMS_LAST,
    SUMS_PAGES,
    SUMS_REQUEST_STRUCT,
    SUMS_STRUCT,
    WELCOME_STRUCT,
    ZERO_RANGE_STRUCT,
    Ack,
    Challenge,
    Commit,
    CommitRequest,
    End,
    Error,
    Event,
    Frame,
    FrameType,
    Hello,
    Manifest,
    PacketHeader,
    PayloadChunk,
    ResumeState,
    Round,
    RoundDone,
    Sums,
    SumsRequest,
    Welcome,
    ZeroRange,
    sums_body_length,
)

_PREAMBLE_SIZE: Final = len(PREAMBLE)
_ERROR_CODES: Final[dict[int, ErrorCode]] = {int(code): code for code in ErrorCode}
_FRAME_TYPES: Final[dict[int, FrameType]] = {int(t): t for t in FrameType}

# Flag bits each type defines; any other bit set is an error.
_ALLOWED_FLAGS: Final[dict[FrameType, int]] = {
    FrameType.HELLO: HELLO_MANIFEST,
    FrameType.WELCOME: 0,
    FrameType.CHALLENGE: 0,
    # PAGE_LIST: a live round's packet (the channel state refuses it elsewhere).
    FrameType.PACKET: PACKET_PAGE_LIST,
    FrameType.ZERO_RANGE: 0,
    FrameType.END: 0,
    FrameType.COMMIT_REQUEST: 0,
    FrameType.COMMIT: 0,
    FrameType.ACK: 0,
    FrameType.RESUME_STATE: RESUME_LAST,
    FrameType.ROUND: 0,
    FrameType.ROUND_DONE: 0,
    FrameType.SUMS_REQUEST: 0,
    FrameType.SUMS: SUMS_LAST | SUMS_PAGES,
    FrameType.ERROR: 0,
}

# (smallest, largest) body_length per type, checked as soon as the 8-byte
# header is in, so that a bad length fails before its body is buffered. The
# exact length of the variable types is checked once their counts are parsed.
_BODY_BOUNDS: Final[dict[FrameType, tuple[int, int]]] = {
    FrameType.HELLO: (HELLO_FIXED_BODY, MAX_BODY),
    FrameType.WELCOME: (WELCOME_STRUCT.size, WELCOME_STRUCT.size),
    FrameType.CHALLENGE: (CHALLENGE_STRUCT.size, CHALLENGE_STRUCT.size),
    FrameType.PACKET: (PACKET_FIXED_BODY + 1, PACKET_FIXED_BODY + MAX_PACKET_PAGES // 8),
    FrameType.ZERO_RANGE: (ZERO_RANGE_STRUCT.size, ZERO_RANGE_STRUCT.size),
    FrameType.END: (END_STRUCT.size, END_STRUCT.size),
    FrameType.COMMIT_REQUEST: (COMMIT_REQUEST_STRUCT.size, COMMIT_REQUEST_STRUCT.size),
    FrameType.COMMIT: (COMMIT_STRUCT.size, COMMIT_STRUCT.size),
    FrameType.ACK: (ACK_STRUCT.size, ACK_STRUCT.size),
    FrameType.RESUME_STATE: (
        RESUME_STRUCT.size + 1,
        RESUME_STRUCT.size + MAX_RESUME_PACKETS // 8 + 4 * MAX_RESUME_PACKETS,
    ),
    FrameType.ROUND: (ROUND_STRUCT.size, ROUND_STRUCT.size),
    FrameType.ROUND_DONE: (ROUND_DONE_STRUCT.size, ROUND_DONE_STRUCT.size),
    FrameType.SUMS_REQUEST: (SUMS_REQUEST_STRUCT.size, SUMS_REQUEST_STRUCT.size),
    FrameType.SUMS: (sums_body_length(False, 1, 0),
                     sums_body_length(True, 1, MAX_SUMS_PAGES)),
    FrameType.ERROR: (ERROR_STRUCT.size, ERROR_STRUCT.size + MAX_ERROR_MESSAGE),
}
# A PAGE_LIST PACKET: both bitmaps and the packet's record after the fixed body.
_PAGE_LIST_BOUNDS: Final = (
    PACKET_FIXED_BODY + 2 + PAGE_LIST_RECORD.size,
    PACKET_FIXED_BODY + 2 * (MAX_PACKET_PAGES // 8) + PAGE_LIST_RECORD.size,
)


# Plain module globals: comparing against them skips the enum class lookup.
_HELLO: Final = FrameType.HELLO
_PACKET: Final = FrameType.PACKET


class _Phase(enum.Enum):
    PREAMBLE = "preamble"
    HEADER = "header"
    PAYLOAD = "payload"


class FrameDecoder:
    """Turns the bytes of one channel into frames and payload chunks.

    ``expect_preamble`` is True on the receiver, whose peer starts every
    channel with the 8-byte preamble, and False on the sender.
    """

    __slots__ = (
        "_buffer",
        "_eof",
        "_error",
        "_header_checked",
        "_max_body",
        "_payload_remaining",
        "_phase",
    )

    def __init__(self, *, expect_preamble: bool, max_body: int = MAX_BODY) -> None:
        self._buffer = bytearray()
        #: The largest body this side accepts; a receiver passes
        #: RECEIVER_MAX_BODY, so that a frame header alone never makes it
        #: buffer more than a few KiB for a peer it does not know yet.
        self._max_body = min(max_body, MAX_BODY)
        self._phase = _Phase.PREAMBLE if expect_preamble else _Phase.HEADER
        self._payload_remaining = 0
        self._eof = False
        self._error: str | None = None
        # The buffered frame header has passed its checks (saves redoing them
        # while its body trickles in).
        self._header_checked = False

    # -- input -------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed.

        The bytes are copied. After an error, further data is dropped, so a
        misbehaving peer cannot make the buffer grow.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() called after end of stream")
        if self._error is None:
            self._buffer += data

    def take_buffered(self) -> bytes:
        """Hand over the bytes buffered but not decoded yet (a shell that moves
        the connection to another reader passes them on); the buffer empties."""
        data = bytes(self._buffer)
        self._buffer.clear()
        self._header_checked = False
        return data

    @property
    def buffered(self) -> int:
        """Bytes held in the internal buffer, not yet turned into events."""
        return len(self._buffer)

    @property
    def payload_remaining(self) -> int:
        """Payload bytes of the current PACKET still to come (0 between frames)."""
        return self._payload_remaining

    def payload_received(self, n: int) -> None:
        """Record that the shell stored ``n`` payload bytes itself.

        Only allowed while nothing is buffered and ``0 < n <=
        payload_remaining``; otherwise the shell would lose track of which
        bytes are payload, and LocalProtocolError is raised.
        """
        if self._phase is not _Phase.PAYLOAD:
            raise LocalProtocolError(f"payload_received({n}) outside a PACKET payload")
        if self._buffer:
            raise LocalProtocolError(
                f"payload_received({n}) while {len(self._buffer)} bytes are buffered; "
                "drain them with next_event() first"
            )
        if not 0 < n <= self._payload_remaining:
            raise LocalProtocolError(
                f"payload_received({n}) out of range (1..{self._payload_remaining})"
            )
        self._payload_remaining -= n
        if self._payload_remaining == 0:
            self._phase = _Phase.HEADER

    def header_bytes_wanted(self) -> int:
        """Exactly how many more bytes complete the preamble, header or body.

        0 while in a payload, when a complete frame is already buffered, or
        when the buffered header is invalid (next_event() will say why). A
        shell that reads no more than this never buffers payload bytes here.
        """
        phase = self._phase
        if phase is _Phase.PAYLOAD or self._error is not None:
            return 0
        buffer = self._buffer
        if phase is _Phase.PREAMBLE:
            try:
                # A complete preamble is consumed here, as next_event() would,
                # so that the answer is about the frame header that follows.
                if not self._check_preamble():
                    return _PREAMBLE_SIZE - len(buffer)
            except RemoteProtocolError:
                return 0
        have = len(buffer)
        if have < FRAME_HEADER_SIZE:
            return FRAME_HEADER_SIZE - have
        try:
            body_length = self._check_header()[1]
        except RemoteProtocolError:
            return 0
        return max(0, FRAME_HEADER_SIZE + body_length - have)

    # -- output ------------------------------------------------------------

    def next_event(self) -> Event:
        """Return the next frame, PayloadChunk, NEED_DATA or CLOSED.

        Raises RemoteProtocolError when the peer broke a rule; the decoder
        then stays failed and raises the same error on every later call.
        """
        if self._error is not None:
            raise RemoteProtocolError(self._error)
        try:
            event = self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc.message
            # Nothing more will be decoded; let the memory go.
            self._buffer = bytearray()
            raise
        return event

    def _next_event(self) -> Event:
        phase = self._phase
        if phase is _Phase.PAYLOAD:
            return self._payload_chunk()
        if phase is _Phase.PREAMBLE and not self._check_preamble():
            return self._need_data()
        buffer = self._buffer
        if len(buffer) < FRAME_HEADER_SIZE:
            return self._need_data()
        ftype, body_length = self._check_header()
        end = FRAME_HEADER_SIZE + body_length
        if len(buffer) < end:
            return self._need_data()
        frame = self._decode_body(ftype, body_length)
        del buffer[:end]
        self._header_checked = False
        return frame

    def _need_data(self) -> Event:
        if not self._eof:
            return NEED_DATA
        have = len(self._buffer)
        if self._phase is _Phase.PREAMBLE:
            if have:
                raise RemoteProtocolError(
                    "connection closed in the middle of a frame "
                    f"(preamble, {have} of {_PREAMBLE_SIZE} bytes)"
                )
            return CLOSED
        if self._phase is _Phase.PAYLOAD:
            raise RemoteProtocolError(
                "connection closed in the middle of a frame "
                f"(PACKET payload, {self._payload_remaining} bytes missing)"
            )
        if have == 0:
            return CLOSED
        if have < FRAME_HEADER_SIZE:
            raise RemoteProtocolError(
                "connection closed in the middle of a frame "
                f"(header, {have} of {FRAME_HEADER_SIZE} bytes)"
            )
        ftype, body_length = self._check_header()
        raise RemoteProtocolError(
            "connection closed in the middle of a frame "
            f"({ftype.name}, {have} of {FRAME_HEADER_SIZE + body_length} bytes)"
        )

    def _payload_chunk(self) -> Event:
        buffer = self._buffer
        if not buffer:
            return self._need_data()
        n = min(len(buffer), self._payload_remaining)
        if n == len(buffer):
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:n])
            del buffer[:n]
        self._payload_remaining -= n
        if self._payload_remaining == 0:
            self._phase = _Phase.HEADER
        return PayloadChunk(data)

    def _check_preamble(self) -> bool:
        """Check what has arrived of the preamble; True once it is complete."""
        buffer = self._buffer
        have = min(len(buffer), _PREAMBLE_SIZE)
        # Checking a prefix refuses a stray client (HTTP, a scanner) at its
        # first wrong byte instead of waiting for eight.
        if buffer[:have] != PREAMBLE[:have]:
            # 0x16 opens a TLS handshake record: a sender configured for TLS.
            hint = " (a TLS client: is TLS configured on both sides?)" if buffer[0] == 0x16 else ""
            raise RemoteProtocolError(
                f"not a dsamig peer: bad preamble {bytes(buffer[:have])!r}, expected {PREAMBLE!r}"
                + hint
            )
        if have < _PREAMBLE_SIZE:
            return False
        del buffer[:_PREAMBLE_SIZE]
        self._phase = _Phase.HEADER
        return True

    def _check_header(self) -> tuple[FrameType, int]:
        """Validate the buffered 8-byte frame header; return (type, body_length)."""
        raw_type, flags, reserved, body_length = HEADER_STRUCT.unpack_from(self._buffer)
        ftype = _FRAME_TYPES.get(raw_type)
        if ftype is None:
            raise RemoteProtocolError(f"frame type 0x{raw_type:02x} unknown")
        if self._header_checked:
            return ftype, body_length
        low, high = _BODY_BOUNDS[ftype]
        if ftype is _HELLO and flags & HELLO_MANIFEST:
            low += MANIFEST_SIZE
        elif ftype is _PACKET and flags == PACKET_PAGE_LIST:
            low, high = _PAGE_LIST_BOUNDS
            flags = 0  # a defined flag: the combined test below is about the rest
        # One combined test on the hot path; the messages are built on failure.
        if flags or reserved or not low <= body_length <= high or body_length > self._max_body:
            self._header_problem(ftype, flags, reserved, body_length, low, high)
        if body_length > self._max_body:
            raise RemoteProtocolError(
                f"{ftype.name} body_length {body_length} exceeds this side's limit of "
                f"{self._max_body} bytes"
            )
        self._header_checked = True
        return ftype, body_length

    @staticmethod
    def _header_problem(
        ftype: FrameType, flags: int, reserved: int, body_length: int, low: int, high: int
    ) -> None:
        """Raise the RemoteProtocolError that describes a bad frame header."""
        name = ftype.name
        if flags & ~_ALLOWED_FLAGS[ftype]:
            raise RemoteProtocolError(f"{name} flags 0x{flags:02x} has undefined bits set")
        if reserved:
            raise RemoteProtocolError(f"{name} header reserved 0x{reserved:04x} must be 0")
        if body_length > MAX_BODY:
            raise RemoteProtocolError(
                f"{name} body_length {body_length} exceeds the limit of {MAX_BODY}"
            )
        if not low <= body_length <= high:
            if low == high:
                raise RemoteProtocolError(f"{name} body_length {body_length}, expected {low}")
            raise RemoteProtocolError(
                f"{name} body_length {body_length} out of range ({low}..{high})"
            )

    # -- bodies ------------------------------------------------------------

    def _decode_body(self, ftype: FrameType, body_length: int) -> Frame:
        buffer = self._buffer
        off = FRAME_HEADER_SIZE
        if ftype is _PACKET:
            return self._decode_packet(body_length)
        if ftype is FrameType.ZERO_RANGE:
            first_packet, packet_count = ZERO_RANGE_STRUCT.unpack_from(buffer, off)
            if packet_count < 1:
                raise RemoteProtocolError(f"ZERO_RANGE packet_count {packet_count} must be ≥ 1")
            return ZeroRange(first_packet, packet_count)
        if ftype is FrameType.HELLO:
            return self._decode_hello(body_length)
        if ftype is FrameType.CHALLENGE:
            scheme, reserved, nonce, proof = CHALLENGE_STRUCT.unpack_from(buffer, off)
            if any(reserved):
                raise RemoteProtocolError(f"CHALLENGE reserved {reserved.hex()} must be 0")
            # An unknown scheme is decoded: the state machine answers AUTH for it.
            return Challenge(nonce, proof, scheme)
        if ftype is FrameType.WELCOME:
            version, reserved, features, job_id = WELCOME_STRUCT.unpack_from(buffer, off)
            if reserved:
                raise RemoteProtocolError(f"WELCOME reserved 0x{reserved:04x} must be 0")
            return Welcome(uuid.UUID(bytes=job_id), features, version)
        if ftype is FrameType.END:
            packets, payload_bytes = END_STRUCT.unpack_from(buffer, off)
            return End(packets, payload_bytes)
        if ftype is FrameType.COMMIT_REQUEST:
            packet_count, zero_pages, normal_pages, digest = COMMIT_REQUEST_STRUCT.unpack_from(
                buffer, off
            )
            return CommitRequest(packet_count, zero_pages, normal_pages, digest)
        if ftype is FrameType.COMMIT:
            return Commit(COMMIT_STRUCT.unpack_from(buffer, off)[0])
        if ftype is FrameType.ACK:
            frames, packets = ACK_STRUCT.unpack_from(buffer, off)
            return Ack(frames, packets)
        if ftype is FrameType.RESUME_STATE:
            return self._decode_resume_state(body_length)
        if ftype is FrameType.ROUND:
            number, reserved, packets, payload_bytes = ROUND_STRUCT.unpack_from(buffer, off)
            if reserved:
                raise RemoteProtocolError(f"ROUND reserved 0x{reserved:08x} must be 0")
            return Round(number, packets, payload_bytes)
        if ftype is FrameType.ROUND_DONE:
            number, reserved = ROUND_DONE_STRUCT.unpack_from(buffer, off)
            if reserved:
                raise RemoteProtocolError(f"ROUND_DONE reserved 0x{reserved:08x} must be 0")
            return RoundDone(number)
        if ftype is FrameType.SUMS_REQUEST:
            first_packet, packet_count, reserved = SUMS_REQUEST_STRUCT.unpack_from(buffer, off)
            if reserved:
                raise RemoteProtocolError(f"SUMS_REQUEST reserved 0x{reserved:08x} must be 0")
            if not 1 <= packet_count <= MAX_SUMS_PAGES:
                raise RemoteProtocolError(f"SUMS_REQUEST packet_count {packet_count} out of "
                                          f"range (1..{MAX_SUMS_PAGES})")
            return SumsRequest(first_packet, packet_count)
        if ftype is FrameType.SUMS:
            return self._decode_sums(body_length)
        return self._decode_error(body_length)

    def _decode_sums(self, body_length: int) -> Sums:
        buffer = self._buffer
        off = FRAME_HEADER_SIZE
        flags = buffer[1]
        pages = bool(flags & SUMS_PAGES)
        first_packet, packet_count, page_count, seed = SUMS_STRUCT.unpack_from(buffer, off)
        if pages:
            if not 1 <= packet_count <= page_count <= MAX_SUMS_PAGES:
                raise RemoteProtocolError(
                    f"page SUMS of {packet_count} packets and {page_count} pages out of range "
                    f"(1 ≤ packets ≤ pages ≤ {MAX_SUMS_PAGES})")
        else:
            if page_count:
                raise RemoteProtocolError(f"packet SUMS page_count {page_count} must be 0")
            if not 1 <= packet_count <= MAX_SUMS_PACKETS:
                raise RemoteProtocolError(f"packet SUMS packet_count {packet_count} out of "
                                          f"range (1..{MAX_SUMS_PACKETS})")
        expected = sums_body_length(pages, packet_count, page_count)
        if body_length != expected:
            raise RemoteProtocolError(f"SUMS body_length {body_length}, expected {expected}")
        off += SUMS_STRUCT.size
        body = bytes(buffer[off : FRAME_HEADER_SIZE + body_length])
        if pages:
            bits = (page_count + 7) // 8
            if page_count % 8 and body[bits - 1] >> (page_count % 8):
                raise RemoteProtocolError("SUMS zero_bitmap has bits set past its pages")
            return Sums(first_packet, packet_count, seed, body[bits:], page_count=page_count,
                        zero_bitmap=body[:bits], pages=True, last=bool(flags & SUMS_LAST))
        return Sums(first_packet, packet_count, seed, body[: 8 * packet_count],
                    records=body[8 * packet_count :], last=bool(flags & SUMS_LAST))

    def _decode_resume_state(self, body_length: int) -> ResumeState:
        buffer = self._buffer
        off = FRAME_HEADER_SIZE
        first_packet, packet_count, reserved = RESUME_STRUCT.unpack_from(buffer, off)
        if reserved:
            raise RemoteProtocolError(f"RESUME_STATE reserved 0x{reserved:08x} must be 0")
        if not 1 <= packet_count <= MAX_RESUME_PACKETS:
            raise RemoteProtocolError(
                f"RESUME_STATE packet_count {packet_count} out of range (1..{MAX_RESUME_PACKETS})"
            )
        off += RESUME_STRUCT.size
        bitmap_length = (packet_count + 7) >> 3
        if body_length < RESUME_STRUCT.size + bitmap_length:
            raise RemoteProtocolError(
                f"RESUME_STATE body_length {body_length} too short for {packet_count} packets"
            )
        bitmap = bytes(buffer[off : off + bitmap_length])
        done = int.from_bytes(bitmap, "little")
        if done >> packet_count:
            raise RemoteProtocolError("RESUME_STATE done_bitmap has padding bits set")
        expected = RESUME_STRUCT.size + bitmap_length + 4 * done.bit_count()
        if body_length != expected:
            raise RemoteProtocolError(
                f"RESUME_STATE body_length {body_length}, expected {expected} "
                f"({done.bit_count()} records)"
            )
        off += bitmap_length
        records = bytes(buffer[off : off + 4 * done.bit_count()])
        last = bool(buffer[1] & RESUME_LAST)
        return ResumeState(first_packet, packet_count, bitmap, records, last)

    def _decode_packet(self, body_length: int) -> PacketHeader:
        buffer = self._buffer
        (
            packet_number,
            first_page,
            page_count,
            payload_length,
            payload_crc,
            region,
            reserved,
        ) = PACKET_STRUCT.unpack_from(buffer, FRAME_HEADER_SIZE)
        if not 0 < page_count <= MAX_PACKET_PAGES:
            raise RemoteProtocolError(
                f"PACKET page_count {page_count} out of range (1..{MAX_PACKET_PAGES})"
            )
        bitmap_length = (page_count + 7) >> 3
        page_list = buffer[1] == PACKET_PAGE_LIST
        expected = PACKET_FIXED_BODY + bitmap_length
        if page_list:
            expected += bitmap_length + PAGE_LIST_RECORD.size
        if body_length != expected:
            raise RemoteProtocolError(
                f"PACKET body_length {body_length}, expected {expected} for page_count "
                f"{page_count}"
            )
        if region:
            raise RemoteProtocolError(f"PACKET region {region} must be 0 in v1")
        if reserved:
            raise RemoteProtocolError(f"PACKET reserved 0x{reserved:04x} must be 0")
        if payload_length > page_count * MAX_PAGE_SIZE:
            raise RemoteProtocolError(
                f"PACKET payload_length {payload_length} exceeds page_count {page_count} "
                f"x {MAX_PAGE_SIZE}"
            )
        start = FRAME_HEADER_SIZE + PACKET_FIXED_BODY
        zero_bitmap = bytes(buffer[start : start + bitmap_length])
        if page_count & 7 and zero_bitmap[-1] >> (page_count & 7):
            raise RemoteProtocolError(
                f"PACKET zero_bitmap padding bits set in last byte 0x{zero_bitmap[-1]:02x} "
                f"(page_count {page_count})"
            )
        present_bitmap = b""
        record = 0
        if page_list:
            start += bitmap_length
            present_bitmap = bytes(buffer[start : start + bitmap_length])
            present = int.from_bytes(present_bitmap, "little")
            if not present or present >> page_count:
                raise RemoteProtocolError(
                    "PACKET present_bitmap is empty or has padding bits set "
                    f"(page_count {page_count})"
                )
            if int.from_bytes(zero_bitmap, "little") & ~present:
                raise RemoteProtocolError("PACKET zero_bitmap marks pages that are not present")
            (record,) = PAGE_LIST_RECORD.unpack_from(buffer, start + bitmap_length)
        if payload_length:
            self._phase = _Phase.PAYLOAD
            self._payload_remaining = payload_length
        return PacketHeader(
            packet_number, first_page, page_count, payload_length, payload_crc, zero_bitmap,
            0, present_bitmap, record,
        )

    def _decode_hello(self, body_length: int) -> Hello:
        buffer = self._buffer
        off = FRAME_HEADER_SIZE
        has_manifest = bool(buffer[1] & HELLO_MANIFEST)
        (
            version,
            reserved,
            features,
            job_id,
            channel_index,
            channel_count,
            auth_length,
            name_length,
        ) = HELLO_STRUCT.unpack_from(buffer, off)
        if reserved:
            raise RemoteProtocolError(f"HELLO reserved 0x{reserved:04x} must be 0")
        if not 1 <= channel_count <= MAX_CHANNELS:
            raise RemoteProtocolError(
                f"HELLO channel_count {channel_count} out of range (1..{MAX_CHANNELS})"
            )
        if channel_index >= channel_count:
            raise RemoteProtocolError(
                f"HELLO channel_index {channel_index} out of range (channel_count {channel_count})"
            )
        if name_length > MAX_NAME:
            raise RemoteProtocolError(
                f"HELLO name_length {name_length} exceeds the limit of {MAX_NAME}"
            )
        manifest_size = MANIFEST_SIZE if has_manifest else 0
        expected = HELLO_FIXED_BODY + manifest_size + auth_length + name_length
        if body_length != expected:
            raise RemoteProtocolError(
                f"HELLO body_length {body_length}, expected {expected} "
                f"(manifest {manifest_size}, auth_length {auth_length}, "
                f"name_length {name_length})"
            )
        off += HELLO_FIXED_BODY
        manifest = None
        if has_manifest:
            manifest = self._decode_manifest(off)
            off += MANIFEST_SIZE
        auth = bytes(buffer[off : off + auth_length])
        off += auth_length
        try:
            name = buffer[off : off + name_length].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"HELLO name is not valid UTF-8: {exc.reason}") from None
        return Hello(
            uuid.UUID(bytes=job_id),
            channel_index,
            channel_count,
            manifest,
            name,
            features,
            version,
            auth,
        )

    def _decode_manifest(self, off: int) -> Manifest:
        (
            image_size,
            page_size,
            packet_pages,
            packet_count,
            checksum,
            digest,
            reserved,
        ) = MANIFEST_STRUCT.unpack_from(self._buffer, off)
        if any(reserved):
            raise RemoteProtocolError(f"HELLO manifest reserved {reserved.hex()} must be 0")
        manifest = Manifest(image_size, page_size, packet_pages, checksum, digest)
        manifest.validate()
        if packet_count != manifest.packet_count:
            raise RemoteProtocolError(
                f"HELLO manifest packet_count {packet_count} does not match "
                f"{manifest.packet_count} computed from image_size {image_size}, "
                f"page_size {page_size}, packet_pages {packet_pages}"
            )
        return manifest

    def _decode_error(self, body_length: int) -> Error:
        code, message_length = ERROR_STRUCT.unpack_from(self._buffer, FRAME_HEADER_SIZE)
        if message_length > MAX_ERROR_MESSAGE:
            raise RemoteProtocolError(
                f"ERROR message_length {message_length} exceeds the limit of {MAX_ERROR_MESSAGE}"
            )
        if body_length != ERROR_STRUCT.size + message_length:
            raise RemoteProtocolError(
                f"ERROR body_length {body_length}, expected "
                f"{ERROR_STRUCT.size + message_length} for message_length {message_length}"
            )
        start = FRAME_HEADER_SIZE + ERROR_STRUCT.size
        # "replace": a garbled message must not hide the error it reports.
        message = self._buffer[start : start + message_length].decode("utf-8", "replace")
        return Error(_ERROR_CODES.get(code, code), message)


__all__ = ["CLOSED", "NEED_DATA", "FrameDecoder"]
