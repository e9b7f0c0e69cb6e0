"""Frames of the dsamig wire protocol, version 1, and their encoder.

docs/protocol.md is the normative description; this module follows it field by
field. Every layout is a precompiled :class:`struct.Struct`: the receiver
decodes one PACKET header per packet (512 KiB by default) in Python, so the
per-frame cost is a couple of C calls and one small object.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

from dsamig.proto.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from dsamig.settings import (
    MAX_PACKET_BYTES,
    MAX_PACKET_PAGES,
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
    WIRE_MAX_IMAGE_SIZE,
    geometry_problem,
)

PREAMBLE: Final = b"\x89DSAMIG\n"
PROTOCOL_VERSION: Final = 1
FRAME_HEADER_SIZE: Final = 8
MAX_BODY: Final = 65536
MAX_CHANNELS: Final = 64
MAX_NAME: Final = 255
MAX_ERROR_MESSAGE: Final = 4096
# The geometry rules are dsamig.settings' (geometry_problem), shared with the
# sender's options, the job schema and verify.
MAX_IMAGE_SIZE: Final = WIRE_MAX_IMAGE_SIZE
CHECKSUM_CRC32C: Final = 1
DIGEST_SHA256_RECORDS: Final = 1
DIGEST_SIZE: Final = 32

# HELLO / WELCOME feature bits (docs/protocol.md "Acknowledgements and resume")
FEATURE_ACKS: Final = 0x01  # the receiver ACKs data frames; channels may reconnect
FEATURE_RESUME: Final = 0x02  # sender: resume if you can; receiver: RESUME_STATE follows
FEATURE_LIVE: Final = 0x04  # rounds: PAGE_LIST packets, ROUND / ROUND_DONE, newest wins
# Refresh a committed copy: SUMS / SUMS_REQUEST instead of round 0's data (needs LIVE).
FEATURE_REFRESH: Final = 0x08
KNOWN_FEATURES: Final = FEATURE_ACKS | FEATURE_RESUME | FEATURE_LIVE | FEATURE_REFRESH
# RESUME_STATE flags
RESUME_LAST: Final = 0x01
MAX_RESUME_PACKETS: Final = 8192  # per RESUME_STATE frame: 1 KiB bitmap + 32 KiB records

# CHALLENGE (docs/protocol.md "Authentication")
AUTH_HMAC_SHA256: Final = 1  # the only scheme: HMAC-SHA256 with a pre-shared key
AUTH_NONCE_SIZE: Final = 32
AUTH_MAC_SIZE: Final = 32

# SUMS (docs/protocol.md "Refresh")
SUMS_LAST: Final = 0x01  # the last SUMS of the packet sums
SUMS_PAGES: Final = 0x02  # page sums (an answer to SUMS_REQUEST), not packet sums
SUMS_SEED_SIZE: Final = 16
MAX_SUMS_PACKETS: Final = 4096  # packet sums per frame: 48 KiB
MAX_SUMS_PAGES: Final = 7168  # page sums per frame (and per SUMS_REQUEST): 57 KiB

# HELLO flags
HELLO_MANIFEST: Final = 0x01
# PACKET flags: PAGE_LIST, a live round's packet that carries some of its pages.
PACKET_PAGE_LIST: Final = 0x01

PACKET_FIXED_BODY: Final = 32
HELLO_FIXED_BODY: Final = 32
MANIFEST_SIZE: Final = 32
ERROR_FIXED_BODY: Final = 4
#: The largest body a sender ever needs to send: an ERROR with the longest
#: message (a HELLO with a manifest, a MAC and the longest name is 351 bytes,
#: a PACKET with 4096 pages 544). A receiver refuses bigger frame bodies, so a
#: peer it has not authenticated can make it buffer only this much.
RECEIVER_MAX_BODY: Final = ERROR_FIXED_BODY + MAX_ERROR_MESSAGE

_U16: Final = 0xFFFF
_U32: Final = 0xFFFFFFFF
_U64: Final = 0xFFFFFFFFFFFFFFFF


class FrameType(enum.IntEnum):
    """The ``type`` byte of a frame header."""

    HELLO = 0x01
    WELCOME = 0x02
    CHALLENGE = 0x03
    PACKET = 0x10
    ZERO_RANGE = 0x11
    END = 0x12
    COMMIT_REQUEST = 0x13
    COMMIT = 0x14
    ACK = 0x15
    RESUME_STATE = 0x16
    ROUND = 0x17
    ROUND_DONE = 0x18
    SUMS_REQUEST = 0x19
    SUMS = 0x1A
    ERROR = 0x7F


class Sentinel(enum.Enum):
    """Non-frame results of :meth:`FrameDecoder.next_event`."""

    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"

    def __repr__(self) -> str:
        return self.value


#: More bytes must be fed before the next event can be produced.
NEED_DATA: Final = Sentinel.NEED_DATA
#: The peer closed the connection cleanly, between frames.
CLOSED: Final = Sentinel.CLOSED

# Wire layouts, all little-endian (docs/protocol.md). Shared with the decoder.
HEADER_STRUCT: Final = struct.Struct("<BBHI")
HELLO_STRUCT: Final = struct.Struct("<HHI16sHHHH")
MANIFEST_STRUCT: Final = struct.Struct("<QIIQBB6s")
WELCOME_STRUCT: Final = struct.Struct("<HHI16s")
PACKET_STRUCT: Final = struct.Struct("<QQIIIHH")
# Frame header and the fixed PACKET body in one pack: the sender's hot path.
PACKET_FRAME_STRUCT: Final = struct.Struct("<BBHIQQIIIHH")
ZERO_RANGE_STRUCT: Final = struct.Struct("<QQ")
END_STRUCT: Final = struct.Struct("<QQ")
COMMIT_REQUEST_STRUCT: Final = struct.Struct("<QQQ32s")
COMMIT_STRUCT: Final = struct.Struct("<32s")
ERROR_STRUCT: Final = struct.Struct("<HH")
CHALLENGE_STRUCT: Final = struct.Struct("<B3s32s32s")
ACK_STRUCT: Final = struct.Struct("<QQ")
RESUME_STRUCT: Final = struct.Struct("<QII")
ROUND_STRUCT: Final = struct.Struct("<IIQQ")
ROUND_DONE_STRUCT: Final = struct.Struct("<II")
SUMS_REQUEST_STRUCT: Final = struct.Struct("<QII")  # first_packet, packet_count, reserved
SUMS_STRUCT: Final = struct.Struct("<QII16s")  # first_packet, packet_count, page_count, seed
#: A PAGE_LIST packet's record of the whole packet, after its zero and present bitmaps.
PAGE_LIST_RECORD: Final = struct.Struct("<I")

_MANIFEST_RESERVED: Final = bytes(6)
_T_PACKET: Final = int(FrameType.PACKET)


def _range_problem(what: str, value: int, low: int, high: int) -> str | None:
    """Describe ``value`` if it is outside ``low..high``, else return None."""
    if low <= value <= high:
        return None
    return f"{what} {value} out of range ({low}..{high})"


@dataclass(frozen=True, slots=True)
class Manifest:
    """What channel 0's HELLO says about the image: sizes and algorithms.

    The derived counts are computed once at construction, because the
    receiver consults them for every packet.
    """

    image_size: int
    page_size: int = 4096
    packet_pages: int = 128
    checksum: int = CHECKSUM_CRC32C
    digest: int = DIGEST_SHA256_RECORDS
    _page_count: int = field(init=False, repr=False, compare=False)
    _packet_count: int = field(init=False, repr=False, compare=False)
    _tail_length: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        page_count = packet_count = tail = 0
        # An invalid manifest must still construct (the decoder builds it and
        # then calls validate()), so guard the arithmetic instead of raising.
        if self.page_size > 0 and self.packet_pages > 0 and self.image_size > 0:
            page_count = -(-self.image_size // self.page_size)
            packet_count = -(-page_count // self.packet_pages)
            tail = self.image_size - (page_count - 1) * self.page_size
        object.__setattr__(self, "_page_count", page_count)
        object.__setattr__(self, "_packet_count", packet_count)
        object.__setattr__(self, "_tail_length", tail)

    @property
    def page_count(self) -> int:
        """Pages in the image: ceil(image_size / page_size)."""
        return self._page_count

    @property
    def packet_count(self) -> int:
        """Packets in the image: ceil(page_count / packet_pages)."""
        return self._packet_count

    @staticmethod
    def bitmap_length(page_count: int) -> int:
        """Bytes of zero bitmap for a packet of ``page_count`` pages."""
        return (page_count + 7) >> 3

    def pages_in_packet(self, packet_number: int) -> int:
        """Pages in packet ``packet_number``; the last packet may be shorter.

        Raises ValueError for a packet number outside the image.
        """
        last = self._packet_count - 1
        if 0 <= packet_number < last:
            return self.packet_pages
        if packet_number == last and last >= 0:
            return self._page_count - packet_number * self.packet_pages
        raise ValueError(
            f"packet_number {packet_number} out of range (packet_count {self._packet_count})"
        )

    def range_pages(self, first_packet: int, packet_count: int) -> int:
        """Pages in packets ``first_packet .. first_packet + packet_count - 1``."""
        end = min((first_packet + packet_count) * self.packet_pages, self._page_count)
        return max(end - first_packet * self.packet_pages, 0)

    def range_bytes(self, first_packet: int, packet_count: int) -> tuple[int, int]:
        """``(offset, length)`` in the image of those packets (the tail may be short)."""
        packet_bytes = self.packet_pages * self.page_size
        start = first_packet * packet_bytes
        end = min((first_packet + packet_count) * packet_bytes, self.image_size)
        return start, max(end - start, 0)

    def page_length(self, page_index: int) -> int:
        """Bytes of page ``page_index``: page_size, or the image's short tail.

        Raises ValueError for a page index outside the image.
        """
        last = self._page_count - 1
        if 0 <= page_index < last:
            return self.page_size
        if page_index == last and last >= 0:
            return self._tail_length
        raise ValueError(f"page_index {page_index} out of range (page_count {self._page_count})")

    def payload_length(self, packet_number: int, zero_bitmap: bytes) -> int:
        """Exact payload bytes of a packet: the lengths of its normal pages.

        ``zero_bitmap`` must be the packet's well-formed bitmap (right length,
        padding bits clear), as the decoder guarantees. Only the image's last
        page can be short, so only its bit is tested; the rest is a popcount.
        """
        pages = self.pages_in_packet(packet_number)
        normal = pages - int.from_bytes(zero_bitmap, "little").bit_count()
        length = normal * self.page_size
        if packet_number == self._packet_count - 1 and self._tail_length != self.page_size:
            last = pages - 1
            if not (zero_bitmap[last >> 3] >> (last & 7)) & 1:
                length -= self.page_size - self._tail_length
        return length

    def page_list_payload_length(
        self, packet_number: int, zero_bitmap: bytes, present_bitmap: bytes
    ) -> int:
        """Exact payload bytes of a PAGE_LIST packet: its present normal pages."""
        pages = self.pages_in_packet(packet_number)
        zero = int.from_bytes(zero_bitmap, "little")
        normal = int.from_bytes(present_bitmap, "little") & ~zero
        length = normal.bit_count() * self.page_size
        last = pages - 1
        if (packet_number == self._packet_count - 1 and self._tail_length != self.page_size
                and normal >> last & 1):
            length -= self.page_size - self._tail_length
        return length

    def full_zero_bitmap(self, packet_number: int) -> bytes:
        """The bitmap of packet ``packet_number`` with every page marked zero."""
        pages = self.pages_in_packet(packet_number)
        return ((1 << pages) - 1).to_bytes((pages + 7) >> 3, "little")

    def problem(self) -> str | None:
        """Describe the first rule this manifest breaks, or return None."""
        geometry = geometry_problem(self.page_size, packet_pages=self.packet_pages,
                                    image_size=self.image_size)
        if geometry is not None:
            return f"manifest {geometry}"
        if self.checksum != CHECKSUM_CRC32C:
            return f"manifest checksum {self.checksum} not supported (1 = CRC32C)"
        if self.digest != DIGEST_SHA256_RECORDS:
            return f"manifest digest {self.digest} not supported (1 = SHA-256 over records)"
        return None

    def validate(self) -> None:
        """Raise RemoteProtocolError if the manifest breaks a rule of v1."""
        message = self.problem()
        if message is not None:
            raise RemoteProtocolError(message)


@dataclass(frozen=True, slots=True)
class Hello:
    """HELLO: opens a channel; channel 0 carries the manifest."""

    job_id: uuid.UUID
    channel_index: int
    channel_count: int
    manifest: Manifest | None = None
    name: str = ""
    features: int = 0
    version: int = PROTOCOL_VERSION
    auth: bytes = b""


@dataclass(frozen=True, slots=True)
class Welcome:
    """WELCOME: the receiver accepts the channel."""

    job_id: uuid.UUID
    features: int = 0
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Challenge:
    """CHALLENGE: a fresh nonce, before HELLO, when a pre-shared key is used.

    The sender's carries only its nonce (``proof`` all zero); the receiver's
    answers with its own nonce and ``proof`` = HMAC over both nonces, so the
    sender knows the receiver holds the key before it sends anything else.
    """

    nonce: bytes
    proof: bytes = bytes(AUTH_MAC_SIZE)
    scheme: int = AUTH_HMAC_SHA256


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """PACKET without its payload; ``payload_length`` payload bytes follow it.

    With ``present_bitmap`` (flag PAGE_LIST, live jobs only) the packet carries
    only the pages whose bit is set there: the zero ones (bit set in
    ``zero_bitmap`` too) and the normal ones, whose bytes are the payload;
    ``record`` is then the digest record of the whole packet once applied.
    """

    packet_number: int
    first_page: int
    page_count: int
    payload_length: int
    payload_crc: int
    zero_bitmap: bytes
    region: int = 0
    present_bitmap: bytes = b""
    record: int = 0


@dataclass(frozen=True, slots=True)
class ZeroRange:
    """ZERO_RANGE: ``packet_count`` whole packets, all pages zero."""

    first_packet: int
    packet_count: int


@dataclass(frozen=True, slots=True)
class End:
    """END: the channel is done; its totals, for the receiver to compare."""

    packets: int
    payload_bytes: int


@dataclass(frozen=True, slots=True)
class CommitRequest:
    """COMMIT_REQUEST: channel 0 asks the receiver to commit the job."""

    packet_count: int
    zero_pages: int
    normal_pages: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Commit:
    """COMMIT: the destination is durable; echoes the receiver's digest."""

    digest: bytes


@dataclass(frozen=True, slots=True)
class Error:
    """ERROR: a coded failure; its sender closes the channel.

    ``code`` is a plain int when the peer used a code this version does not
    know, so that the message still reaches the operator.
    """

    code: ErrorCode | int
    message: str


@dataclass(frozen=True, slots=True)
class Ack:
    """ACK: the receiver verified and wrote this channel's first ``frames`` data
    frames (PACKET and ZERO_RANGE), covering ``packets`` packets."""

    frames: int
    packets: int


@dataclass(frozen=True, slots=True)
class ResumeState:
    """RESUME_STATE: which of ``packet_count`` packets from ``first_packet`` the
    receiver already holds durably, with their digest records (4 bytes each, in
    packet order, one per set bit).  ``last`` ends the sequence."""

    first_packet: int
    packet_count: int
    done_bitmap: bytes
    records: bytes
    last: bool = False


@dataclass(frozen=True, slots=True)
class Round:
    """ROUND: this channel has sent all of live round ``round``; its totals so
    far, as END has them. No data follows before ROUND_DONE."""

    round: int
    packets: int
    payload_bytes: int


@dataclass(frozen=True, slots=True)
class RoundDone:
    """ROUND_DONE (channel 0): every channel ended round ``round`` and all of it
    was applied; the next round may begin."""

    round: int


@dataclass(frozen=True, slots=True)
class SumsRequest:
    """SUMS_REQUEST (refresh, channel 0): send the page sums of ``packet_count``
    packets from ``first_packet``."""

    first_packet: int
    packet_count: int


@dataclass(frozen=True, slots=True)
class Sums:
    """SUMS (refresh, channel 0): fingerprints of what the receiver's copy holds,
    keyed by ``seed``.

    Packet sums (``pages`` False): per packet, a u64 fingerprint of its page
    fingerprints (``fingerprints``) and its u32 digest record (``records``).
    Page sums (``pages``): per page of the packets, a u64 fingerprint, and
    ``zero_bitmap`` (one bit per page, LSB first) marking the zero ones;
    ``page_count`` pages in all. ``last`` ends the packet sums.
    """

    first_packet: int
    packet_count: int
    seed: bytes
    fingerprints: bytes
    records: bytes = b""
    page_count: int = 0
    zero_bitmap: bytes = b""
    pages: bool = False
    last: bool = False


@dataclass(frozen=True, slots=True)
class PayloadChunk:
    """Bytes of the payload of the PACKET decoded last."""

    data: bytes


Frame: TypeAlias = (
    Hello | Welcome | Challenge | PacketHeader | ZeroRange | End | CommitRequest | Commit | Ack
    | ResumeState | Round | RoundDone | SumsRequest | Sums | Error
)
Event: TypeAlias = Frame | PayloadChunk | Literal[Sentinel.NEED_DATA, Sentinel.CLOSED]

_FRAME_TYPES: Final[dict[type, FrameType]] = {
    Hello: FrameType.HELLO,
    Challenge: FrameType.CHALLENGE,
    Welcome: FrameType.WELCOME,
    PacketHeader: FrameType.PACKET,
    ZeroRange: FrameType.ZERO_RANGE,
    End: FrameType.END,
    CommitRequest: FrameType.COMMIT_REQUEST,
    Commit: FrameType.COMMIT,
    Ack: FrameType.ACK,
    ResumeState: FrameType.RESUME_STATE,
    Round: FrameType.ROUND,
    RoundDone: FrameType.ROUND_DONE,
    SumsRequest: FrameType.SUMS_REQUEST,
    Sums: FrameType.SUMS,
    Error: FrameType.ERROR,
}


def sums_body_length(pages: bool, packet_count: int, page_count: int) -> int:
    """The exact body length of a SUMS frame with these counts."""
    if pages:
        return SUMS_STRUCT.size + (page_count + 7) // 8 + 8 * page_count
    return SUMS_STRUCT.size + 12 * packet_count


def frame_type(frame: Frame) -> FrameType:
    """The FrameType that ``frame`` is encoded as."""
    try:
        return _FRAME_TYPES[type(frame)]
    except KeyError:
        raise LocalProtocolError(f"not a frame: {frame!r}") from None


def encode_preamble() -> bytes:
    """The 8 bytes a sender writes first on every channel."""
    return PREAMBLE


def _check(*problems: str | None) -> None:
    for message in problems:
        if message is not None:
            raise LocalProtocolError(message)


def _packet_problem(
    packet_number: int,
    first_page: int,
    page_count: int,
    payload_length: int,
    payload_crc: int,
    zero_bitmap: bytes,
) -> str | None:
    """Describe the first encodable-range rule a PACKET breaks, or None."""
    message = (
        _range_problem("PACKET packet_number", packet_number, 0, _U64)
        or _range_problem("PACKET first_page", first_page, 0, _U64)
        or _range_problem("PACKET page_count", page_count, 1, MAX_PACKET_PAGES)
        or _range_problem(
            "PACKET payload_length",
            payload_length,
            0,
            min(_U32, page_count * MAX_PAGE_SIZE),
        )
        or _range_problem("PACKET payload_crc", payload_crc, 0, _U32)
    )
    if message:
        return message
    expected = (page_count + 7) >> 3
    if len(zero_bitmap) != expected:
        return (
            f"PACKET zero_bitmap of {len(zero_bitmap)} bytes, "
            f"expected {expected} for page_count {page_count}"
        )
    if page_count & 7 and zero_bitmap[-1] >> (page_count & 7):
        return f"PACKET zero_bitmap padding bits set in last byte 0x{zero_bitmap[-1]:02x}"
    return None


def encode_packet_header(
    packet_number: int,
    first_page: int,
    page_count: int,
    payload_length: int,
    payload_crc: int,
    zero_bitmap: bytes,
) -> bytes:
    """Encode a PACKET frame header and body (not its payload) without a dataclass.

    The sender calls this once per packet; it is ``encode(PacketHeader(...))``
    with region 0, byte for byte.
    """
    # Cheap checks first; the detailed (slower) description only on failure.
    if (
        0 < page_count <= MAX_PACKET_PAGES
        and len(zero_bitmap) == (page_count + 7) >> 3
        and payload_length <= page_count * MAX_PAGE_SIZE
        and not (page_count & 7 and zero_bitmap[-1] >> (page_count & 7))
    ):
        try:
            head = PACKET_FRAME_STRUCT.pack(
                _T_PACKET,
                0,
                0,
                PACKET_FIXED_BODY + len(zero_bitmap),
                packet_number,
                first_page,
                page_count,
                payload_length,
                payload_crc,
                0,
                0,
            )
        except struct.error:
            pass
        else:
            return head + zero_bitmap
    raise LocalProtocolError(
        _packet_problem(
            packet_number, first_page, page_count, payload_length, payload_crc, zero_bitmap
        )
        or f"PACKET fields not encodable: {packet_number=} {first_page=} {page_count=} "
        f"{payload_length=} {payload_crc=}"
    )


def encode_page_list_header(
    packet_number: int,
    first_page: int,
    page_count: int,
    payload_length: int,
    payload_crc: int,
    zero_bitmap: bytes,
    present_bitmap: bytes,
    record: int,
) -> bytes:
    """Encode a PAGE_LIST PACKET's header and body (not its payload)."""
    problem = _packet_problem(packet_number, first_page, page_count, payload_length, payload_crc,
                              zero_bitmap)
    if problem is None and len(present_bitmap) != len(zero_bitmap):
        problem = "PACKET present_bitmap and zero_bitmap differ in length"
    if problem is None:
        present = int.from_bytes(present_bitmap, "little")
        if not present or present >> page_count:
            problem = "PACKET present_bitmap is empty or has padding bits set"
        elif int.from_bytes(zero_bitmap, "little") & ~present:
            problem = "PACKET zero_bitmap marks pages that are not present"
    _check(problem, _range_problem("PACKET record", record, 0, _U32))
    body_length = PACKET_FIXED_BODY + 2 * len(zero_bitmap) + PAGE_LIST_RECORD.size
    head = PACKET_FRAME_STRUCT.pack(_T_PACKET, PACKET_PAGE_LIST, 0, body_length, packet_number,
                                    first_page, page_count, payload_length, payload_crc, 0, 0)
    return head + zero_bitmap + present_bitmap + PAGE_LIST_RECORD.pack(record)


def _frame(ftype: FrameType, flags: int, body: bytes) -> bytes:
    if len(body) > MAX_BODY:
        raise LocalProtocolError(
            f"{ftype.name} body_length {len(body)} exceeds the limit of {MAX_BODY}"
        )
    return HEADER_STRUCT.pack(ftype, flags, 0, len(body)) + body


def _encode_manifest(manifest: Manifest) -> bytes:
    _check(manifest.problem())
    return MANIFEST_STRUCT.pack(
        manifest.image_size,
        manifest.page_size,
        manifest.packet_pages,
        manifest.packet_count,
        manifest.checksum,
        manifest.digest,
        _MANIFEST_RESERVED,
    )


def _encode_hello(frame: Hello) -> bytes:
    try:
        name = frame.name.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"HELLO name {frame.name!r} is not encodable as UTF-8") from None
    _check(
        _range_problem("HELLO version", frame.version, 0, _U16),
        _range_problem("HELLO features", frame.features, 0, _U32),
        _range_problem("HELLO channel_count", frame.channel_count, 1, MAX_CHANNELS),
        _range_problem("HELLO channel_index", frame.channel_index, 0, frame.channel_count - 1),
        _range_problem("HELLO name_length", len(name), 0, MAX_NAME),
        _range_problem("HELLO auth_length", len(frame.auth), 0, _U16),
    )
    flags = 0
    manifest = b""
    if frame.manifest is not None:
        flags = HELLO_MANIFEST
        manifest = _encode_manifest(frame.manifest)
    fixed = HELLO_STRUCT.pack(
        frame.version,
        0,
        frame.features,
        frame.job_id.bytes,
        frame.channel_index,
        frame.channel_count,
        len(frame.auth),
        len(name),
    )
    return _frame(FrameType.HELLO, flags, fixed + manifest + bytes(frame.auth) + name)


def _encode_challenge(frame: Challenge) -> bytes:
    _check(_range_problem("CHALLENGE scheme", frame.scheme, 0, 0xFF))
    if len(frame.nonce) != AUTH_NONCE_SIZE or len(frame.proof) != AUTH_MAC_SIZE:
        raise LocalProtocolError(
            f"CHALLENGE nonce of {len(frame.nonce)} and proof of {len(frame.proof)} bytes, "
            f"expected {AUTH_NONCE_SIZE} and {AUTH_MAC_SIZE}"
        )
    body = CHALLENGE_STRUCT.pack(frame.scheme, bytes(3), frame.nonce, frame.proof)
    return _frame(FrameType.CHALLENGE, 0, body)


def _encode_digest(what: str, digest: bytes) -> bytes:
    if len(digest) != DIGEST_SIZE:
        raise LocalProtocolError(f"{what} of {len(digest)} bytes, expected {DIGEST_SIZE}")
    return bytes(digest)


def _truncate_utf8(text: str, limit: int) -> bytes:
    """UTF-8 of ``text``, cut to at most ``limit`` bytes on a character boundary."""
    # "replace" so that a message with lone surrogates still gets reported.
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    # Decoding with "ignore" drops the partial character the cut left behind.
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


def _encode_sums(frame: Sums) -> bytes:
    if frame.pages:
        _check(
            _range_problem("SUMS packet_count", frame.packet_count, 1, MAX_SUMS_PAGES),
            _range_problem("SUMS page_count", frame.page_count, frame.packet_count,
                           MAX_SUMS_PAGES),
        )
        if frame.records or len(frame.zero_bitmap) != (frame.page_count + 7) // 8 or len(
                frame.fingerprints) != 8 * frame.page_count:
            raise LocalProtocolError("page SUMS need a zero bitmap and 8 bytes per page")
        tail = frame.zero_bitmap + frame.fingerprints
    else:
        _check(_range_problem("SUMS packet_count", frame.packet_count, 1, MAX_SUMS_PACKETS))
        if frame.page_count or frame.zero_bitmap or len(
                frame.fingerprints) != 8 * frame.packet_count or len(
                frame.records) != 4 * frame.packet_count:
            raise LocalProtocolError("packet SUMS need 8 + 4 bytes per packet")
        tail = frame.fingerprints + frame.records
    if len(frame.seed) != SUMS_SEED_SIZE:
        raise LocalProtocolError(f"SUMS seed must be {SUMS_SEED_SIZE} bytes")
    _check(_range_problem("SUMS first_packet", frame.first_packet, 0, _U64))
    flags = (SUMS_PAGES if frame.pages else 0) | (SUMS_LAST if frame.last else 0)
    body = SUMS_STRUCT.pack(frame.first_packet, frame.packet_count, frame.page_count,
                            frame.seed) + tail
    return _frame(FrameType.SUMS, flags, body)


def encode(frame: Frame) -> bytes:
    """Encode ``frame`` as header + body (a PACKET's payload is not included).

    Raises LocalProtocolError for values the wire format cannot carry. ERROR
    messages longer than MAX_ERROR_MESSAGE bytes are truncated, not refused,
    since failing to report a failure helps nobody.
    """
    if isinstance(frame, PacketHeader):
        _check(_range_problem("PACKET region", frame.region, 0, 0))
        if frame.present_bitmap:
            return encode_page_list_header(
                frame.packet_number, frame.first_page, frame.page_count,
                frame.payload_length, frame.payload_crc, frame.zero_bitmap,
                frame.present_bitmap, frame.record,
            )
        return encode_packet_header(
            frame.packet_number,
            frame.first_page,
            frame.page_count,
            frame.payload_length,
            frame.payload_crc,
            frame.zero_bitmap,
        )
    if isinstance(frame, ZeroRange):
        _check(
            _range_problem("ZERO_RANGE first_packet", frame.first_packet, 0, _U64),
            _range_problem("ZERO_RANGE packet_count", frame.packet_count, 1, _U64),
        )
        return _frame(
            FrameType.ZERO_RANGE, 0, ZERO_RANGE_STRUCT.pack(frame.first_packet, frame.packet_count)
        )
    if isinstance(frame, Hello):
        return _encode_hello(frame)
    if isinstance(frame, Challenge):
        return _encode_challenge(frame)
    if isinstance(frame, Welcome):
        _check(
            _range_problem("WELCOME version", frame.version, 0, _U16),
            _range_problem("WELCOME features", frame.features, 0, _U32),
        )
        body = WELCOME_STRUCT.pack(frame.version, 0, frame.features, frame.job_id.bytes)
        return _frame(FrameType.WELCOME, 0, body)
    if isinstance(frame, End):
        _check(
            _range_problem("END packets", frame.packets, 0, _U64),
            _range_problem("END payload_bytes", frame.payload_bytes, 0, _U64),
        )
        return _frame(FrameType.END, 0, END_STRUCT.pack(frame.packets, frame.payload_bytes))
    if isinstance(frame, CommitRequest):
        _check(
            _range_problem("COMMIT_REQUEST packet_count", frame.packet_count, 0, _U64),
            _range_problem("COMMIT_REQUEST zero_pages", frame.zero_pages, 0, _U64),
            _range_problem("COMMIT_REQUEST normal_pages", frame.normal_pages, 0, _U64),
        )
        digest = _encode_digest("COMMIT_REQUEST digest", frame.digest)
        body = COMMIT_REQUEST_STRUCT.pack(
            frame.packet_count, frame.zero_pages, frame.normal_pages, digest
        )
        return _frame(FrameType.COMMIT_REQUEST, 0, body)
    if isinstance(frame, Commit):
        digest = _encode_digest("COMMIT digest", frame.digest)
        return _frame(FrameType.COMMIT, 0, COMMIT_STRUCT.pack(digest))
    if isinstance(frame, Ack):
        _check(
            _range_problem("ACK frames", frame.frames, 0, _U64),
            _range_problem("ACK packets", frame.packets, 0, _U64),
        )
        return _frame(FrameType.ACK, 0, ACK_STRUCT.pack(frame.frames, frame.packets))
    if isinstance(frame, ResumeState):
        _check(
            _range_problem("RESUME_STATE first_packet", frame.first_packet, 0, _U64),
            _range_problem("RESUME_STATE packet_count", frame.packet_count, 1,
                           MAX_RESUME_PACKETS),
        )
        done = int.from_bytes(frame.done_bitmap, "little")
        if len(frame.done_bitmap) != (frame.packet_count + 7) >> 3 or done >> frame.packet_count:
            raise LocalProtocolError("RESUME_STATE done_bitmap does not match packet_count")
        if len(frame.records) != 4 * done.bit_count():
            raise LocalProtocolError("RESUME_STATE needs one 4-byte record per done packet")
        body = (
            RESUME_STRUCT.pack(frame.first_packet, frame.packet_count, 0)
            + frame.done_bitmap
            + frame.records
        )
        return _frame(FrameType.RESUME_STATE, RESUME_LAST if frame.last else 0, body)
    if isinstance(frame, Round):
        _check(
            _range_problem("ROUND round", frame.round, 0, _U32),
            _range_problem("ROUND packets", frame.packets, 0, _U64),
            _range_problem("ROUND payload_bytes", frame.payload_bytes, 0, _U64),
        )
        body = ROUND_STRUCT.pack(frame.round, 0, frame.packets, frame.payload_bytes)
        return _frame(FrameType.ROUND, 0, body)
    if isinstance(frame, RoundDone):
        _check(_range_problem("ROUND_DONE round", frame.round, 0, _U32))
        return _frame(FrameType.ROUND_DONE, 0, ROUND_DONE_STRUCT.pack(frame.round, 0))
    if isinstance(frame, SumsRequest):
        _check(
            _range_problem("SUMS_REQUEST first_packet", frame.first_packet, 0, _U64),
            _range_problem("SUMS_REQUEST packet_count", frame.packet_count, 1, MAX_SUMS_PAGES),
        )
        return _frame(FrameType.SUMS_REQUEST, 0,
                      SUMS_REQUEST_STRUCT.pack(frame.first_packet, frame.packet_count, 0))
    if isinstance(frame, Sums):
        return _encode_sums(frame)
    if isinstance(frame, Error):
        _check(_range_problem("ERROR code", int(frame.code), 0, _U16))
        message = _truncate_utf8(frame.message, MAX_ERROR_MESSAGE)
        return _frame(
            FrameType.ERROR, 0, ERROR_STRUCT.pack(int(frame.code), len(message)) + message
        )
    raise LocalProtocolError(f"not a frame: {frame!r}")


__all__ = [
    "ACK_STRUCT",
    "AUTH_HMAC_SHA256",
    "AUTH_MAC_SIZE",
    "AUTH_NONCE_SIZE",
    "CHALLENGE_STRUCT",
    "CHECKSUM_CRC32C",
    "CLOSED",
    "DIGEST_SHA256_RECORDS",
    "DIGEST_SIZE",
    "FEATURE_ACKS",
    "FEATURE_LIVE",
    "FEATURE_REFRESH",
    "FEATURE_RESUME",
    "FRAME_HEADER_SIZE",
    "HELLO_MANIFEST",
    "KNOWN_FEATURES",
    "MAX_BODY",
    "MAX_CHANNELS",
    "MAX_ERROR_MESSAGE",
    "MAX_IMAGE_SIZE",
    "MAX_NAME",
    "MAX_PACKET_BYTES",
    "MAX_PACKET_PAGES",
    "MAX_PAGE_SIZE",
    "MAX_RESUME_PACKETS",
    "MAX_SUMS_PACKETS",
    "MAX_SUMS_PAGES",
    "MIN_PAGE_SIZE",
    "NEED_DATA",
    "PACKET_PAGE_LIST",
    "PAGE_LIST_RECORD",
    "PREAMBLE",
    "PROTOCOL_VERSION",
    "RECEIVER_MAX_BODY",
    "RESUME_LAST",
    "RESUME_STRUCT",
    "ROUND_DONE_STRUCT",
    "ROUND_STRUCT",
    "SUMS_LAST",
    "SUMS_PAGES",
    "SUMS_REQUEST_STRUCT",
    "SUMS_SEED_SIZE",
    "SUMS_STRUCT",
    "Ack",
    "Challenge",
    "Commit",
    "CommitRequest",
    "End",
    "Error",
    "Event",
    "Frame",
    "FrameType",
    "Hello",
    "Manifest",
    "PacketHeader",
    "PayloadChunk",
    "ResumeState",
    "Round",
    "RoundDone",
    "Sentinel",
    "Sums",
    "SumsRequest",
    "Welcome",
    "ZeroRange",
    "encode",
    "encode_packet_header",
    "encode_page_list_header",
    "encode_preamble",
    "frame_type",
    "sums_body_length",
]
