"""Channel state machines and job-wide bookkeeping of the dsamig protocol.

Every allowed transition of a channel is one row of :data:`RECEIVER_TRANSITIONS`
or :data:`SENDER_TRANSITIONS`; anything not in the table is a protocol error,
RemoteProtocolError when the peer did it and LocalProtocolError when we were
about to. ERROR frames are the exception that the tables spell out once for
every state: either side may report a failure at any time.

:class:`PacketTracker` (receiver, one per job, shared by its channels) checks
each packet against the manifest and remembers what arrived; :class:`JobDigest`
computes the job digest both sides compare before the receiver commits.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct
import sys
from array import array
from dataclasses import dataclass
from itertools import compress
from typing import Final, TypeVar

from dsamig.checksum import crc32c
from dsamig.proto.auth import (
    check_hello,
    check_nonce,
    check_receiver_proof,
    hello_mac,
    receiver_proof,
)
from dsamig.proto.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from dsamig.proto.frames import (
    AUTH_HMAC_SHA256,
    MAX_RESUME_PACKETS,
    PROTOCOL_VERSION,
    Challenge,
    Commit,
    CommitRequest,
    End,
    Error,
    Frame,
    FrameType,
    Hello,
    Manifest,
    PacketHeader,
    ResumeState,
    Welcome,
    ZeroRange,
    frame_type,
)

# Records are u32 on the wire; 'I' is 4 bytes on every platform we build for.
if array("I").itemsize != 4:  # pragma: no cover - exotic platforms only
    raise ImportError("dsamig.proto.state needs a 4-byte array('I')")

_U32_LE: Final = struct.Struct("<I")
# b"1" -> 1, anything else -> 0: a digit string as truth values for compress().
_DIGIT_TRUTH: Final = bytes(1 if b == 49 else 0 for b in range(256))

#: Default ceiling on a receiver job's packet_count: 8 TiB at the default
#: 512 KiB packets, with 5 bytes of bookkeeping per packet (80 MiB). A hostile
#: manifest must not make the receiver allocate before any data arrives.
DEFAULT_MAX_PACKETS: Final = 1 << 24


class Direction(enum.Enum):
    """Whether a frame is received from the peer or sent to it."""

    RECV = "recv"
    SEND = "send"


RECV: Final = Direction.RECV
SEND: Final = Direction.SEND


class ReceiverState(enum.Enum):
    """States of one channel on the receiving side."""

    AWAIT_HELLO = "AWAIT_HELLO"
    #: With a pre-shared key: the sender's CHALLENGE arrived, ours is not sent yet.
    CHALLENGED = "CHALLENGED"
    #: With a pre-shared key: our CHALLENGE is sent; only a signed HELLO may follow.
    AWAIT_AUTH_HELLO = "AWAIT_AUTH_HELLO"
    #: HELLO accepted; WELCOME (or ERROR) not sent yet.
    HANDSHAKE = "HANDSHAKE"
    STREAMING = "STREAMING"
    ENDED = "ENDED"
    #: COMMIT_REQUEST received on channel 0; COMMIT not sent yet.
    COMMITTING = "COMMITTING"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


class SenderState(enum.Enum):
    """States of one channel on the sending side."""

    #: Nothing sent yet (the preamble goes out with HELLO).
    IDLE = "IDLE"
    #: With a pre-shared key: our CHALLENGE is sent, the receiver's not read yet.
    AWAIT_CHALLENGE = "AWAIT_CHALLENGE"
    #: With a pre-shared key: the receiver proved it holds the key; HELLO next.
    AUTHENTICATED = "AUTHENTICATED"
    AWAIT_WELCOME = "AWAIT_WELCOME"
    STREAMING = "STREAMING"
    ENDED = "ENDED"
    #: Channel 0 sent COMMIT_REQUEST and waits for COMMIT.
    AWAIT_COMMIT = "AWAIT_COMMIT"
    DONE = "DONE"
    ERROR = "ERROR"


_R = ReceiverState
_S = SenderState
_T = FrameType

#: (state, direction, frame type) -> next state, for a receiver's channel.
RECEIVER_TRANSITIONS: Final[dict[tuple[ReceiverState, Direction, FrameType], ReceiverState]] = {
    (_R.AWAIT_HELLO, RECV, _T.HELLO): _R.HANDSHAKE,
    # With a pre-shared key (docs/protocol.md "Authentication").
    (_R.AWAIT_HELLO, RECV, _T.CHALLENGE): _R.CHALLENGED,
    (_R.CHALLENGED, SEND, _T.CHALLENGE): _R.AWAIT_AUTH_HELLO,
    (_R.AWAIT_AUTH_HELLO, RECV, _T.HELLO): _R.HANDSHAKE,
    (_R.HANDSHAKE, SEND, _T.WELCOME): _R.STREAMING,
    (_R.STREAMING, RECV, _T.PACKET): _R.STREAMING,
    (_R.STREAMING, RECV, _T.ZERO_RANGE): _R.STREAMING,
    (_R.STREAMING, RECV, _T.END): _R.ENDED,
    (_R.ENDED, RECV, _T.COMMIT_REQUEST): _R.COMMITTING,
    (_R.COMMITTING, SEND, _T.COMMIT): _R.CLOSED,
    # With FEATURE_ACKS / FEATURE_RESUME (negotiated in HELLO / WELCOME).
    (_R.STREAMING, SEND, _T.RESUME_STATE): _R.STREAMING,
    (_R.STREAMING, SEND, _T.ACK): _R.STREAMING,
    (_R.ENDED, SEND, _T.ACK): _R.ENDED,
    (_R.COMMITTING, SEND, _T.ACK): _R.COMMITTING,
    # The peer may report a failure in any state but after its own ERROR; we
    # may report one in any state but after a clean close (once: see below).
    **{(state, RECV, _T.ERROR): _R.ERROR for state in _R if state is not _R.ERROR},
    **{(state, SEND, _T.ERROR): _R.ERROR for state in _R if state is not _R.CLOSED},
}

#: (state, direction, frame type) -> next state, for a sender's channel.
SENDER_TRANSITIONS: Final[dict[tuple[SenderState, Direction, FrameType], SenderState]] = {
    (_S.IDLE, SEND, _T.HELLO): _S.AWAIT_WELCOME,
    # With a pre-shared key (docs/protocol.md "Authentication").
    (_S.IDLE, SEND, _T.CHALLENGE): _S.AWAIT_CHALLENGE,
    (_S.AWAIT_CHALLENGE, RECV, _T.CHALLENGE): _S.AUTHENTICATED,
    (_S.AUTHENTICATED, SEND, _T.HELLO): _S.AWAIT_WELCOME,
    (_S.AWAIT_WELCOME, RECV, _T.WELCOME): _S.STREAMING,
    (_S.STREAMING, SEND, _T.PACKET): _S.STREAMING,
    (_S.STREAMING, SEND, _T.ZERO_RANGE): _S.STREAMING,
    (_S.STREAMING, SEND, _T.END): _S.ENDED,
    (_S.ENDED, SEND, _T.COMMIT_REQUEST): _S.AWAIT_COMMIT,
    (_S.AWAIT_COMMIT, RECV, _T.COMMIT): _S.DONE,
    # With FEATURE_ACKS / FEATURE_RESUME (negotiated in HELLO / WELCOME).
    (_S.STREAMING, RECV, _T.RESUME_STATE): _S.STREAMING,
    (_S.STREAMING, RECV, _T.ACK): _S.STREAMING,
    (_S.ENDED, RECV, _T.ACK): _S.ENDED,
    (_S.AWAIT_COMMIT, RECV, _T.ACK): _S.AWAIT_COMMIT,
    **{(state, RECV, _T.ERROR): _S.ERROR for state in _S if state is not _S.ERROR},
    **{(state, SEND, _T.ERROR): _S.ERROR for state in _S if state is not _S.DONE},
}


_StateT = TypeVar("_StateT", ReceiverState, SenderState)


#: States in which the peer may close the connection cleanly (besides ENDED
#: on a channel other than 0, which has nothing left to do).
RECEIVER_CLOSE_OK: Final = frozenset({_R.CLOSED, _R.ERROR})
# Where a receiver may read HELLO: directly, or after CHALLENGE with a key.
_HELLO_STATES: Final = frozenset({_R.AWAIT_HELLO, _R.AWAIT_AUTH_HELLO})
SENDER_CLOSE_OK: Final = frozenset({_S.DONE, _S.ERROR})


def _expected(
    table: dict[tuple[_StateT, Direction, FrameType], _StateT],
    state: _StateT,
    direction: Direction,
) -> str:
    """Name the frame types the table allows in ``state``, for error messages."""
    names = [t.name for (s, d, t) in table if s is state and d is direction and t is not _T.ERROR]
    return " or ".join(names) if names else "nothing"


class ReceiverChannelState:
    """Order of frames on one channel, seen from the receiver.

    Call :meth:`on_frame` for every frame the decoder yields and
    :meth:`on_send` for every frame before sending it. Counts the packets and
    payload bytes of the channel to check them against its END.
    """

    __slots__ = (
        "_error_sent",
        "_psk",
        "_receiver_nonce",
        "_sender_nonce",
        "channel_index",
        "end",
        "error",
        "hello",
        "packets",
        "payload_bytes",
        "state",
    )

    def __init__(self, psk: bytes | None = None) -> None:
        self.state = ReceiverState.AWAIT_HELLO
        #: With a pre-shared key every channel must authenticate before HELLO.
        self._psk = psk
        self._sender_nonce = b""
        self._receiver_nonce = b""
        self.hello: Hello | None = None
        #: From the HELLO; None until it arrived.
        self.channel_index: int | None = None
        #: Packets announced on this channel (a ZERO_RANGE counts each packet).
        self.packets = 0
        #: Payload bytes announced by this channel's PACKET headers.
        self.payload_bytes = 0
        self.end: End | None = None
        #: The peer's ERROR frame, once one arrived.
        self.error: Error | None = None
        self._error_sent = False

    def on_frame(self, frame: Frame) -> None:
        """Apply a frame received from the sender.

        Raises RemoteProtocolError (the channel then is in ERROR) if the frame
        is not allowed now or disagrees with the channel's counters.
        """
        try:
            self._on_frame(frame)
        except RemoteProtocolError:
            self.state = ReceiverState.ERROR
            raise

    def _on_frame(self, frame: Frame) -> None:
        ftype = frame_type(frame)
        state = self.state
        if state is ReceiverState.AWAIT_HELLO or state is ReceiverState.AWAIT_AUTH_HELLO:
            self._authenticate(frame, state)
        if isinstance(frame, Hello) and state in _HELLO_STATES:
            # Checked before the table row applies: a HELLO of another version
            # gets a VERSION answer, not a confusing PROTOCOL one.
            if frame.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"protocol version {frame.version} not supported "
                    f"(this receiver speaks {PROTOCOL_VERSION})",
                    ErrorCode.VERSION,
                )
            if frame.channel_index == 0 and frame.manifest is None:
                raise RemoteProtocolError("HELLO on channel 0 without a manifest")
            if frame.channel_index != 0 and frame.manifest is not None:
                raise RemoteProtocolError(
                    f"HELLO on channel {frame.channel_index} with a manifest "
                    "(only channel 0 has one)"
                )
        new_state = RECEIVER_TRANSITIONS.get((state, RECV, ftype))
        if new_state is None:
            where = "" if self.channel_index is None else f" on channel {self.channel_index}"
            raise RemoteProtocolError(
                f"{ftype.name} received in state {state.name}{where}; expected "
                f"{_expected(RECEIVER_TRANSITIONS, state, RECV)}"
            )
        if isinstance(frame, PacketHeader):
            self.packets += 1
            self.payload_bytes += frame.payload_length
        elif isinstance(frame, ZeroRange):
            self.packets += frame.packet_count
        elif isinstance(frame, Hello):
            self.hello = frame
            self.channel_index = frame.channel_index
        elif isinstance(frame, End):
            if frame.packets != self.packets:
                raise RemoteProtocolError(
                    f"END packets {frame.packets} does not match the {self.packets} "
                    f"packets received on channel {self.channel_index}"
                )
            if frame.payload_bytes != self.payload_bytes:
                raise RemoteProtocolError(
                    f"END payload_bytes {frame.payload_bytes} does not match the "
                    f"{self.payload_bytes} payload bytes received on channel {self.channel_index}"
                )
            self.end = frame
        elif isinstance(frame, CommitRequest):
            if self.channel_index != 0:
                raise RemoteProtocolError(
                    f"COMMIT_REQUEST on channel {self.channel_index} (only channel 0 may commit)"
                )
        elif isinstance(frame, Error):
            self.error = frame
        self.state = new_state

    def _authenticate(self, frame: Frame, state: ReceiverState) -> None:
        """The pre-shared-key rules, checked before the table: failures are AUTH.

        Without a key a channel must not try to authenticate; with one, the
        only way to a HELLO is CHALLENGE both ways and a HELLO whose MAC
        binds it to both nonces.
        """
        psk = self._psk
        if isinstance(frame, Challenge) and state is ReceiverState.AWAIT_HELLO:
            if psk is None:
                raise RemoteProtocolError(
                    "the sender authenticates with a pre-shared key, but this receiver has "
                    "none configured (--psk-file)",
                    ErrorCode.AUTH,
                )
            if frame.scheme != AUTH_HMAC_SHA256:
                raise RemoteProtocolError(
                    f"CHALLENGE scheme {frame.scheme} not supported "
                    f"({AUTH_HMAC_SHA256} = HMAC-SHA256 with a pre-shared key)",
                    ErrorCode.AUTH,
                )
            if any(frame.proof):
                raise RemoteProtocolError("CHALLENGE from the sender must carry a zero proof")
            self._sender_nonce = frame.nonce
        elif isinstance(frame, Hello):
            if state is ReceiverState.AWAIT_AUTH_HELLO:
                assert psk is not None  # reached only through a CHALLENGE we accepted
                check_hello(psk, self._receiver_nonce, self._sender_nonce, frame)
            elif psk is not None:
                raise RemoteProtocolError(
                    "HELLO without authentication: this receiver requires a pre-shared key "
                    "(--psk-file)",
                    ErrorCode.AUTH,
                )
            elif frame.auth:
                raise RemoteProtocolError(
                    f"HELLO carries {len(frame.auth)} bytes of authentication, but this "
                    "receiver has no pre-shared key configured (--psk-file)",
                    ErrorCode.AUTH,
                )

    def answer_challenge(self, receiver_nonce: bytes) -> Challenge:
        """Our CHALLENGE for the sender's: ``receiver_nonce`` (fresh, random) and
        the proof that we hold the key. Send it with :meth:`on_send`."""
        if self._psk is None or self.state is not ReceiverState.CHALLENGED:
            raise LocalProtocolError(f"cannot answer a CHALLENGE in state {self.state.name}")
        check_nonce(receiver_nonce)
        proof = receiver_proof(self._psk, self._sender_nonce, receiver_nonce)
        return Challenge(receiver_nonce, proof)

    def on_eof(self) -> None:
        """Apply the peer closing the connection (the decoder returned CLOSED).

        Closing is clean after COMMIT, after an ERROR, and after END on a
        channel other than 0; anywhere else the sender gave up half way, and
        RemoteProtocolError is raised (the channel then is in ERROR).
        """
        state = self.state
        if state in RECEIVER_CLOSE_OK or (state is _R.ENDED and self.channel_index != 0):
            return
        self.state = _R.ERROR
        where = "" if self.channel_index is None else f" on channel {self.channel_index}"
        raise RemoteProtocolError(f"connection closed by the sender in state {state.name}{where}")

    def on_send(self, frame: Frame) -> None:
        """Check a frame we are about to send; raises LocalProtocolError if out of order."""
        ftype = frame_type(frame)
        state = self.state
        new_state = RECEIVER_TRANSITIONS.get((state, SEND, ftype))
        if new_state is None or (ftype is _T.ERROR and self._error_sent):
            raise LocalProtocolError(f"cannot send {ftype.name} in state {state.name}")
        if isinstance(frame, Challenge):
            if frame != self.answer_challenge(frame.nonce):
                raise LocalProtocolError("CHALLENGE proof is not this receiver's proof")
            self._receiver_nonce = frame.nonce
        if isinstance(frame, Welcome):
            assert self.hello is not None  # HANDSHAKE is only reached through HELLO
            if frame.job_id != self.hello.job_id:
                raise LocalProtocolError(
                    f"WELCOME job_id {frame.job_id} does not echo HELLO job_id {self.hello.job_id}"
                )
            if frame.version != PROTOCOL_VERSION:
                raise LocalProtocolError(
                    f"WELCOME version {frame.version} is not {PROTOCOL_VERSION}"
                )
            if frame.features & ~self.hello.features:
                raise LocalProtocolError(
                    f"WELCOME features 0x{frame.features:x} not offered by HELLO "
                    f"(0x{self.hello.features:x})"
                )
        elif isinstance(frame, Error):
            self._error_sent = True
        self.state = new_state


class SenderChannelState:
    """Order of frames on one channel, seen from the sender.

    Call :meth:`on_send` before sending each frame and :meth:`on_frame` for
    each frame the receiver sent (WELCOME, COMMIT, ERROR).
    """

    __slots__ = (
        "_error_sent",
        "_psk",
        "_receiver_nonce",
        "_sender_nonce",
        "channel_index",
        "commit",
        "commit_request",
        "error",
        "hello",
        "packets",
        "payload_bytes",
        "state",
        "welcome",
    )

    def __init__(self, psk: bytes | None = None) -> None:
        self.state = SenderState.IDLE
        #: With a pre-shared key the channel opens with CHALLENGE, not HELLO.
        self._psk = psk
        self._sender_nonce = b""
        self._receiver_nonce = b""
        self.hello: Hello | None = None
        self.channel_index: int | None = None
        self.welcome: Welcome | None = None
        #: Packets sent on this channel (a ZERO_RANGE counts each packet).
        self.packets = 0
        #: Payload bytes announced by this channel's PACKET headers.
        self.payload_bytes = 0
        self.commit_request: CommitRequest | None = None
        self.commit: Commit | None = None
        #: The receiver's ERROR frame, once one arrived.
        self.error: Error | None = None
        self._error_sent = False

    def on_send(self, frame: Frame) -> None:
        """Check a frame we are about to send; raises LocalProtocolError if out of order."""
        ftype = frame_type(frame)
        state = self.state
        new_state = SENDER_TRANSITIONS.get((state, SEND, ftype))
        if new_state is None or (ftype is _T.ERROR and self._error_sent):
            raise LocalProtocolError(f"cannot send {ftype.name} in state {state.name}")
        if isinstance(frame, PacketHeader):
            self.packets += 1
            self.payload_bytes += frame.payload_length
        elif isinstance(frame, ZeroRange):
            self.packets += frame.packet_count
        elif isinstance(frame, Challenge):
            if self._psk is None:
                raise LocalProtocolError("cannot send CHALLENGE without a pre-shared key")
            check_nonce(frame.nonce)
            if any(frame.proof) or frame.scheme != AUTH_HMAC_SHA256:
                raise LocalProtocolError("the sender's CHALLENGE carries a nonce only")
            self._sender_nonce = frame.nonce
        elif isinstance(frame, Hello):
            if self._psk is not None and frame != self.sign_hello(frame):
                raise LocalProtocolError("HELLO is not signed: pass it through sign_hello()")
            if frame.version != PROTOCOL_VERSION:
                raise LocalProtocolError(f"HELLO version {frame.version} is not {PROTOCOL_VERSION}")
            if (frame.channel_index == 0) != (frame.manifest is not None):
                raise LocalProtocolError(
                    f"HELLO on channel {frame.channel_index}: the manifest goes on channel 0 only"
                )
            self.hello = frame
            self.channel_index = frame.channel_index
        elif isinstance(frame, End):
            if (frame.packets, frame.payload_bytes) != (self.packets, self.payload_bytes):
                raise LocalProtocolError(
                    f"END packets {frame.packets} payload_bytes {frame.payload_bytes} does not "
                    f"match the {self.packets} packets and {self.payload_bytes} payload bytes sent"
                )
        elif isinstance(frame, CommitRequest):
            if self.channel_index != 0:
                raise LocalProtocolError(
                    f"COMMIT_REQUEST on channel {self.channel_index} (only channel 0 may commit)"
                )
            self.commit_request = frame
        elif isinstance(frame, Error):
            self._error_sent = True
        self.state = new_state

    @property
    def authenticates(self) -> bool:
        """Whether this channel opens with the pre-shared-key CHALLENGE."""
        return self._psk is not None

    def sign_hello(self, hello: Hello) -> Hello:
        """``hello`` with its auth block set to the MAC the receiver expects.

        Only after the receiver's CHALLENGE proved that it holds the key.
        """
        if self._psk is None or self.state is not SenderState.AUTHENTICATED:
            raise LocalProtocolError(f"cannot sign a HELLO in state {self.state.name}")
        mac = hello_mac(self._psk, self._receiver_nonce, self._sender_nonce, hello)
        return dataclasses.replace(hello, auth=mac)

    def on_send_data(self, packets: int, payload_bytes: int) -> None:
        """Count data frames sent without building frame objects (the hot path).

        Equivalent to :meth:`on_send` for PACKET and ZERO_RANGE frames that
        together cover ``packets`` packets and ``payload_bytes`` bytes.
        """
        if self.state is not SenderState.STREAMING:
            raise LocalProtocolError(f"cannot send data in state {self.state.name}")
        self.packets += packets
        self.payload_bytes += payload_bytes

    def on_eof(self) -> None:
        """Apply the receiver closing the connection (the decoder returned CLOSED).

        Closing is clean after COMMIT, after an ERROR, and after END on a
        channel other than 0; anywhere else RemoteProtocolError is raised
        (the channel then is in ERROR).
        """
        state = self.state
        if state in SENDER_CLOSE_OK or (state is _S.ENDED and self.channel_index != 0):
            return
        self.state = _S.ERROR
        where = "" if self.channel_index is None else f" on channel {self.channel_index}"
        raise RemoteProtocolError(f"connection closed by the receiver in state {state.name}{where}")

    def on_frame(self, frame: Frame) -> None:
        """Apply a frame received from the receiver.

        Raises RemoteProtocolError (the channel then is in ERROR) if the frame
        is not allowed now, names another job or version, or its COMMIT
        digest differs from the one we requested.
        """
        try:
            self._on_frame(frame)
        except RemoteProtocolError:
            self.state = SenderState.ERROR
            raise

    def _on_frame(self, frame: Frame) -> None:
        ftype = frame_type(frame)
        state = self.state
        new_state = SENDER_TRANSITIONS.get((state, RECV, ftype))
        if new_state is None:
            raise RemoteProtocolError(
                f"{ftype.name} received in state {state.name}; expected "
                f"{_expected(SENDER_TRANSITIONS, state, RECV)}"
            )
        if isinstance(frame, Challenge):
            assert self._psk is not None  # AWAIT_CHALLENGE follows our own CHALLENGE
            if frame.scheme != AUTH_HMAC_SHA256:
                raise RemoteProtocolError(
                    f"CHALLENGE scheme {frame.scheme} not supported "
                    f"({AUTH_HMAC_SHA256} = HMAC-SHA256 with a pre-shared key)",
                    ErrorCode.AUTH,
                )
            check_receiver_proof(self._psk, self._sender_nonce, frame.nonce, frame.proof)
            self._receiver_nonce = frame.nonce
        if isinstance(frame, Welcome):
            assert self.hello is not None  # AWAIT_WELCOME is only reached through HELLO
            if frame.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"WELCOME version {frame.version} not supported "
                    f"(this sender speaks {PROTOCOL_VERSION})",
                    ErrorCode.VERSION,
                )
            if frame.job_id != self.hello.job_id:
                raise RemoteProtocolError(
                    f"WELCOME job_id {frame.job_id} does not match HELLO job_id {self.hello.job_id}"
                )
            if frame.features & ~self.hello.features:
                raise RemoteProtocolError(
                    f"WELCOME features 0x{frame.features:x} not offered by HELLO "
                    f"(0x{self.hello.features:x})"
                )
            self.welcome = frame
        elif isinstance(frame, Commit):
            assert self.commit_request is not None  # AWAIT_COMMIT follows COMMIT_REQUEST
            if frame.digest != self.commit_request.digest:
                raise RemoteProtocolError(
                    f"COMMIT digest {frame.digest.hex()} does not match the requested "
                    f"{self.commit_request.digest.hex()}",
                    ErrorCode.INTEGRITY,
                )
            self.commit = frame
        elif isinstance(frame, Error):
            self.error = frame
        self.state = new_state


def packet_record(zero_bitmap: bytes, payload_crc: int) -> int:
    """A packet's digest record: CRC32C(zero_bitmap ‖ payload_crc as u32 LE)."""
    return crc32c(zero_bitmap + _U32_LE.pack(payload_crc))


class JobDigest:
    """The job digest: SHA-256 over every packet's record, in packet order.

    Records live in one ``array('I')`` so that a ZERO_RANGE of any length is
    a single slice assignment, not a Python loop.
    """

    __slots__ = ("_full_record", "_last_record", "_packet_count", "_records")

    def __init__(self, manifest: Manifest) -> None:
        count = manifest.packet_count
        self._packet_count = count
        self._records = array("I", [0]) * count
        full = ((1 << manifest.packet_pages) - 1).to_bytes(
            Manifest.bitmap_length(manifest.packet_pages), "little"
        )
        self._full_record = packet_record(full, 0)
        # The last packet may have fewer pages, hence another full-zero bitmap.
        self._last_record = (
            packet_record(manifest.full_zero_bitmap(count - 1), 0) if count else self._full_record
        )

    def _check_range(self, first: int, count: int) -> None:
        if not (first >= 0 and count >= 1 and first + count <= self._packet_count):
            raise ValueError(
                f"packets {first}..{first + count - 1} out of range "
                f"(packet_count {self._packet_count})"
            )

    def record_packet(self, packet_number: int, zero_bitmap: bytes, payload_crc: int) -> None:
        """Record a packet sent (or verified) with this bitmap and payload CRC."""
        self.set_record(packet_number, packet_record(zero_bitmap, payload_crc))

    def set_record(self, packet_number: int, record: int) -> None:
        """Store a record computed with :func:`packet_record`."""
        self._check_range(packet_number, 1)
        self._records[packet_number] = record

    def record_zero_range(self, first_packet: int, packet_count: int) -> None:
        """Record whole packets that are all zero (as ZERO_RANGE sends them)."""
        self._check_range(first_packet, packet_count)
        end = first_packet + packet_count
        self._records[first_packet:end] = array("I", [self._full_record]) * packet_count
        if end == self._packet_count:
            self._records[end - 1] = self._last_record

    def zero_record(self, packet_number: int) -> int:
        """The record of packet ``packet_number`` if all its pages are zero."""
        self._check_range(packet_number, 1)
        return self._last_record if packet_number == self._packet_count - 1 else self._full_record

    def records_where(self, first: int, digits: bytes | bytearray) -> bytes:
        """The records (u32 LE) of packets ``first + i`` where ``digits[i]`` is
        ``ord("1")``, in order: one C-level pass, for RESUME_STATE."""
        n = len(digits)
        held = digits.count(b"1")
        if held == n:  # the common case: a whole stretch is held
            selected = self._records[first : first + n]
        else:
            selected = array("I", compress(self._records[first : first + n],
                                           digits.translate(_DIGIT_TRUTH)))
        if sys.byteorder != "little":  # pragma: no cover - no big-endian DSA hosts
            selected.byteswap()
        return selected.tobytes()

    def records_bytes(self) -> bytes:
        """All records as u32 LE, packet order (for a checkpoint)."""
        if sys.byteorder != "little":  # pragma: no cover - no big-endian DSA hosts
            records = array("I", self._records)
            records.byteswap()
            return records.tobytes()
        return self._records.tobytes()

    def load_records(self, data: bytes) -> None:
        """Replace the records with a checkpoint's (``records_bytes`` output)."""
        records = array("I")
        records.frombytes(data)
        if sys.byteorder != "little":  # pragma: no cover - no big-endian DSA hosts
            records.byteswap()
        if len(records) != self._packet_count:
            raise ValueError(f"{len(records)} records for {self._packet_count} packets")
        self._records = records

    def record(self, packet_number: int) -> int:
        """The record stored for ``packet_number`` (0 if none was recorded)."""
        self._check_range(packet_number, 1)
        return self._records[packet_number]

    def digest(self) -> bytes:
        """SHA-256 over the records, each as u32 LE, packets 0 .. packet_count-1."""
        records = self._records
        if sys.byteorder != "little":  # pragma: no cover - no big-endian DSA hosts
            records = array("I", records)
            records.byteswap()
        return hashlib.sha256(memoryview(records).cast("B")).digest()


# Per-packet status in PacketTracker._status. A done packet whose record is
# the all-zero one is _ZERO, so that a ZERO_RANGE over done packets is checked
# with one find() over the range instead of a record comparison per packet.
_FREE: Final = 0
_CLAIMED: Final = 1
_DONE: Final = 2
_ZERO: Final = 3
_B_CLAIMED: Final = bytes([_CLAIMED])
_B_DONE: Final = bytes([_DONE])
_B_ZERO: Final = bytes([_ZERO])
# Status bytes -> b"1" for a done packet (either kind) / a zero one, else b"0".
_DONE_DIGITS: Final = bytes(49 if s in (_DONE, _ZERO) else 48 for s in range(256))
_ZERO_DIGITS: Final = bytes(49 if s == _ZERO else 48 for s in range(256))
# _FREE -> _CLAIMED, the rest unchanged: claims the free packets of a range.
_CLAIM_FREE: Final = bytes([_CLAIMED]) + bytes(range(1, 256))
# b"0" / b"1" -> 0 / 1.
_DIGIT_VALUE: Final = bytes(b & 1 for b in range(256))

_PROGRESS_MAGIC: Final = b"DSAMIGP2"
_PROGRESS_STRUCT: Final = struct.Struct("<8sQIIQQQQQ")


def _bitmap(status: bytes | bytearray, digits: bytes) -> bytes:
    """A bitmap (LSB first) with bit n set where ``digits[status[n]]`` is "1".

    Built in C: the status bytes become a string of binary digits, most
    significant first, parsed as one integer.
    """
    text = status.translate(digits)[::-1]
    value = int(text, 2) if text else 0
    return value.to_bytes((len(status) + 7) >> 3, "little")


def _flags(bitmap: bytes, count: int) -> int:
    """The first ``count`` bits of ``bitmap`` as an int with one byte (0/1) per
    bit, LSB first; built in C from the integer's binary digits."""
    value = int.from_bytes(bitmap, "little") & ((1 << count) - 1)
    digits = format(value, "b").zfill(count)[::-1].encode("ascii")
    return int.from_bytes(digits.translate(_DIGIT_VALUE), "little")


@dataclass(frozen=True)
class Progress:
    """A receiver checkpoint: which packets are durable, with their records.

    Serialised beside the partial file so that a restarted receiver can resume
    (``to_bytes`` / ``from_bytes``; the pages layer does the file I/O).
    ``zero`` marks the done packets that are all zero (a subset of ``done``).
    """

    manifest: Manifest
    done: bytes  # one bit per packet, LSB first
    zero: bytes  # one bit per packet: done and all zero
    records: bytes  # u32 LE per packet
    received_packets: int
    zero_pages: int
    normal_pages: int
    payload_bytes: int

    def to_bytes(self) -> bytes:
        m = self.manifest
        head = _PROGRESS_STRUCT.pack(
            _PROGRESS_MAGIC, m.image_size, m.page_size, m.packet_pages, m.packet_count,
            self.received_packets, self.zero_pages, self.normal_pages, self.payload_bytes,
        )
        return head + self.done + self.zero + self.records

    @classmethod
    def from_bytes(cls, data: bytes) -> Progress:
        """Parse a checkpoint; ValueError if it is damaged or of another version."""
        if len(data) < _PROGRESS_STRUCT.size:
            raise ValueError("checkpoint too short")
        (magic, size, page_size, packet_pages, packet_count, received, zero, normal,
         payload) = _PROGRESS_STRUCT.unpack_from(data)
        if magic != _PROGRESS_MAGIC:
            raise ValueError("not a dsamig checkpoint of this version")
        manifest = Manifest(image_size=size, page_size=page_size, packet_pages=packet_pages)
        problem = manifest.problem()
        if problem or manifest.packet_count != packet_count:
            raise ValueError(f"checkpoint manifest is invalid: {problem or 'packet count'}")
        bits = (packet_count + 7) >> 3
        if len(data) != _PROGRESS_STRUCT.size + 2 * bits + 4 * packet_count:
            raise ValueError("checkpoint length does not match its packet count")
        off = _PROGRESS_STRUCT.size
        done = data[off : off + bits]
        zero_bits = data[off + bits : off + 2 * bits]
        done_int = int.from_bytes(done, "little")
        if done_int.bit_count() != received:
            raise ValueError("checkpoint counters do not match its bitmap")
        if int.from_bytes(zero_bits, "little") & ~done_int:
            raise ValueError("checkpoint marks packets zero that are not done")
        return cls(manifest, done, zero_bits, data[off + 2 * bits :], received, zero, normal,
                   payload)


class PacketTracker:
    """Receiver's job-wide record of which packets arrived, checked against the manifest.

    ``check_packet`` / ``check_zero_range`` validate a frame and claim its
    packets at once, so that the same packet arriving on two channels is
    caught before its payload is written; ``packet_done`` /
    ``zero_range_done`` record them once the payload is stored and verified.

    Every operation costs time in proportion to its frame, or to the packets
    of a range as one C-level pass over a bytearray, never a Python loop per
    packet: a peer must not turn a 24-byte frame into seconds of CPU. With
    ``tolerant`` (acknowledgements) packets may arrive again; those repeats
    are counted, and a peer that repeats more than ``repeat_budget`` packets
    in a job is refused.
    """

    __slots__ = (
        "_digest",
        "_status",
        "done_bytes",
        "manifest",
        "normal_pages",
        "payload_bytes",
        "received_packets",
        "repeat_budget",
        "repeated_packets",
        "tolerant",
        "zero_pages",
    )

    def __init__(self, manifest: Manifest, *, max_packets: int = DEFAULT_MAX_PACKETS) -> None:
        manifest.validate()
        if manifest.packet_count > max_packets:
            raise RemoteProtocolError(
                f"manifest packet_count {manifest.packet_count} exceeds this receiver's "
                f"limit of {max_packets}",
                ErrorCode.REJECTED,
            )
        self.manifest = manifest
        # Per packet: _FREE, _CLAIMED, _DONE or _ZERO (done, all zero).
        self._status = bytearray(manifest.packet_count)
        self._digest = JobDigest(manifest)
        #: Packets recorded as done (a ZERO_RANGE counts each packet).
        self.received_packets = 0
        #: Bytes of the image in done packets: how far the job has come.
        self.done_bytes = 0
        self.zero_pages = 0
        self.normal_pages = 0
        self.payload_bytes = 0
        #: With FEATURE_ACKS a packet may arrive again (retransmitted after a
        #: channel broke before its ACK): accepted if its record is the same.
        self.tolerant = False
        #: Packets that arrived again, and how many repeats a job may cost.
        #: A sender re-sends at most what was not acknowledged when a
        #: session broke; twice the image is far more than that.
        self.repeated_packets = 0
        self.repeat_budget = 2 * manifest.packet_count + 1024

    def _repeated(self, packets: int) -> None:
        self.repeated_packets += packets
        if self.repeated_packets > self.repeat_budget:
            raise RemoteProtocolError(
                f"the sender sent {self.repeated_packets} packets that were already received "
                f"(at most {self.repeat_budget} in a job of {self.manifest.packet_count} packets)"
            )

    def check_packet(self, hdr: PacketHeader) -> bool:
        """Validate a PACKET header against the manifest and claim its packet.

        Raises RemoteProtocolError for a packet number out of range, a wrong
        first_page, page_count or payload_length, or a packet already
        received (unless ``tolerant``). ``hdr`` must come from the decoder
        (well-formed bitmap). Returns True when the packet is already done and
        only its record needs comparing (tolerant mode), False otherwise.
        """
        manifest = self.manifest
        n = hdr.packet_number
        if n >= manifest.packet_count:
            raise RemoteProtocolError(
                f"PACKET packet_number {n} out of range (packet_count {manifest.packet_count})"
            )
        status = self._status[n]
        if status and not self.tolerant:
            raise RemoteProtocolError(f"PACKET packet_number {n} received twice")
        if status == _CLAIMED:
            raise RemoteProtocolError(
                f"PACKET packet_number {n} is already being received on another channel"
            )
        first_page = n * manifest.packet_pages
        if hdr.first_page != first_page:
            raise RemoteProtocolError(
                f"PACKET {n} first_page {hdr.first_page}, expected {first_page}"
            )
        pages = manifest.pages_in_packet(n)
        if hdr.page_count != pages:
            raise RemoteProtocolError(f"PACKET {n} page_count {hdr.page_count}, expected {pages}")
        length = manifest.payload_length(n, hdr.zero_bitmap)
        if hdr.payload_length != length:
            raise RemoteProtocolError(
                f"PACKET {n} payload_length {hdr.payload_length}, expected {length} "
                "for its zero_bitmap"
            )
        if status:  # done already (tolerant): compared in packet_done
            self._repeated(1)
            return True
        self._status[n] = _CLAIMED
        return False

    def packet_done(self, hdr: PacketHeader, payload_crc_verified: int) -> None:
        """Record a packet whose payload is stored; ``payload_crc_verified`` is
        the CRC32C computed over what arrived.

        Raises RemoteProtocolError with code INTEGRITY if it differs from the
        header's payload_crc, and LocalProtocolError if the packet was not
        claimed by check_packet.
        """
        n = hdr.packet_number
        if not (0 <= n < self.manifest.packet_count and self._status[n]):
            raise LocalProtocolError(f"packet_done({n}) without a successful check_packet")
        if payload_crc_verified != hdr.payload_crc:
            raise RemoteProtocolError(
                f"PACKET {n} payload_crc 0x{hdr.payload_crc:08x} does not match the "
                f"payload (CRC32C 0x{payload_crc_verified:08x})",
                ErrorCode.INTEGRITY,
            )
        record = packet_record(hdr.zero_bitmap, payload_crc_verified)
        if self._status[n] != _CLAIMED:
            self._check_same(n, record)
            return
        self._digest.set_record(n, record)
        self._status[n] = _ZERO if record == self._digest.zero_record(n) else _DONE
        zero = int.from_bytes(hdr.zero_bitmap, "little").bit_count()
        self.received_packets += 1
        self.done_bytes += self.manifest.range_bytes(n, 1)[1]
        self.zero_pages += zero
        self.normal_pages += hdr.page_count - zero
        self.payload_bytes += hdr.payload_length

    def check_zero_range(self, zr: ZeroRange) -> None:
        """Validate a ZERO_RANGE against the manifest and what arrived so far.

        Raises RemoteProtocolError if it reaches past the last packet,
        overlaps a packet being received on another channel, or overlaps a
        packet already received (tolerant mode: one that held data, which is
        an INTEGRITY error; repeats of zero packets count against the budget).
        """
        packet_count = self.manifest.packet_count
        first, count = zr.first_packet, zr.packet_count
        if first >= packet_count:
            raise RemoteProtocolError(
                f"ZERO_RANGE first_packet {first} out of range (packet_count {packet_count})"
            )
        if count < 1 or first + count > packet_count:
            raise RemoteProtocolError(
                f"ZERO_RANGE first_packet {first} + packet_count {count} exceeds "
                f"packet_count {packet_count}"
            )
        end = first + count
        status = self._status
        free = status.count(_FREE, first, end)
        if free == count:
            status[first:end] = _B_CLAIMED * count
            return
        claimed = status.find(_B_CLAIMED, first, end)
        if claimed >= 0:
            raise RemoteProtocolError(
                f"ZERO_RANGE packets {first}..{end - 1} overlap packet {claimed}, "
                "being received on another channel"
            )
        if not self.tolerant:
            taken = min(i for i in (status.find(_B_DONE, first, end),
                                    status.find(_B_ZERO, first, end)) if i >= 0)
            raise RemoteProtocolError(
                f"ZERO_RANGE packets {first}..{end - 1} overlap packet {taken}, already received"
            )
        data = status.find(_B_DONE, first, end)
        if data >= 0:
            zero = self._digest.zero_record(data)
            raise RemoteProtocolError(
                f"packet {data} arrived again with different contents (record 0x{zero:08x}, "
                f"first time 0x{self._digest.record(data):08x}): the image changed during "
                "the job",
                ErrorCode.INTEGRITY,
            )
        self._repeated(count - free)
        status[first:end] = status[first:end].translate(_CLAIM_FREE)

    def zero_range_done(self, zr: ZeroRange) -> None:
        """Record a ZERO_RANGE accepted by check_zero_range."""
        first, count = zr.first_packet, zr.packet_count
        end = first + count
        status = self._status
        if not (first >= 0 and count >= 1 and end <= len(status)):
            raise LocalProtocolError(f"zero_range_done({first}, {count}) out of range")
        new = status.count(_CLAIMED, first, end)
        if new + status.count(_ZERO, first, end) != count:
            raise LocalProtocolError(
                f"zero_range_done({first}, {count}) without a successful check_zero_range"
            )
        if not new:
            return
        manifest = self.manifest
        last = manifest.packet_count - 1
        # The image's last packet may be short: count its own size if it is new.
        pages = new * manifest.packet_pages
        nbytes = new * manifest.packet_pages * manifest.page_size
        if first <= last < end and status[last] == _CLAIMED:
            pages -= manifest.packet_pages - manifest.pages_in_packet(last)
            nbytes -= manifest.packet_pages * manifest.page_size - manifest.range_bytes(last, 1)[1]
        status[first:end] = _B_ZERO * count
        self._digest.record_zero_range(first, count)
        self.received_packets += new
        self.done_bytes += nbytes
        self.zero_pages += pages

    def _check_same(self, n: int, record: int) -> None:
        if self._digest.record(n) != record:
            raise RemoteProtocolError(
                f"packet {n} arrived again with different contents (record 0x{record:08x}, "
                f"first time 0x{self._digest.record(n):08x}): the image changed during the job",
                ErrorCode.INTEGRITY,
            )

    def unclaim(self, packet_number: int) -> None:
        """Forget a claim whose payload will never complete (its channel broke)."""
        if self._status[packet_number] == _CLAIMED:
            self._status[packet_number] = _FREE

    def is_done(self, packet_number: int) -> bool:
        """Whether ``packet_number`` is verified and stored."""
        return self._status[packet_number] >= _DONE

    def not_done_runs(self) -> list[tuple[int, int]]:
        """``(first_packet, packet_count)`` of every run of packets not done.

        After a crash these are the packets whose bytes in a kept partial file
        are unknown: written perhaps, but never recorded.
        """
        runs: list[tuple[int, int]] = []
        flags = self._status.translate(_DONE_DIGITS)
        n, count = 0, len(flags)
        while n < count:
            start = flags.find(b"0", n)
            if start < 0:
                break
            stop = flags.find(b"1", start)
            stop = count if stop < 0 else stop
            runs.append((start, stop - start))
            n = stop
        return runs

    def snapshot(self) -> Progress:
        """What is done now: for a durable checkpoint beside the partial file."""
        status = self._status
        return Progress(
            manifest=self.manifest,
            done=_bitmap(status, _DONE_DIGITS),
            zero=_bitmap(status, _ZERO_DIGITS),
            records=self._digest.records_bytes(),
            received_packets=self.received_packets,
            zero_pages=self.zero_pages,
            normal_pages=self.normal_pages,
            payload_bytes=self.payload_bytes,
        )

    def restore(self, progress: Progress) -> None:
        """Start from a checkpoint (resume): its packets are done."""
        if progress.manifest != self.manifest:
            raise LocalProtocolError("checkpoint of another manifest")
        count = self.manifest.packet_count
        # One byte per packet, computed on big ints (no carries: each byte <= 3):
        # _DONE for a done packet, plus one more (_ZERO) if it is all zero.
        status = _DONE * _flags(progress.done, count) + _flags(progress.zero, count)
        self._status = bytearray(status.to_bytes(count, "little"))
        self._digest.load_records(progress.records)
        self.received_packets = progress.received_packets
        manifest = self.manifest
        packet_bytes = manifest.packet_pages * manifest.page_size
        self.done_bytes = progress.received_packets * packet_bytes
        if count and self._status[count - 1] >= _DONE:
            self.done_bytes -= packet_bytes - manifest.range_bytes(count - 1, 1)[1]
        self.zero_pages = progress.zero_pages
        self.normal_pages = progress.normal_pages
        self.payload_bytes = progress.payload_bytes

    def resume_frames(self) -> list[ResumeState]:
        """RESUME_STATE frames describing every done packet, the last one marked.

        Each frame costs a few C-level passes over its 8192 packets.
        """
        frames: list[ResumeState] = []
        count = self.manifest.packet_count
        for first in range(0, count, MAX_RESUME_PACKETS):
            n = min(MAX_RESUME_PACKETS, count - first)
            status = self._status[first : first + n]
            done = status.translate(_DONE_DIGITS)
            held = self._digest.records_where(first, done)
            frames.append(ResumeState(first, n, _bitmap(status, _DONE_DIGITS), held))
        if frames:
            last = frames[-1]
            frames[-1] = ResumeState(
                last.first_packet, last.packet_count, last.done_bitmap, last.records, True
            )
        return frames

    @property
    def complete(self) -> bool:
        """Whether every packet of the image has been recorded."""
        return self.received_packets == self.manifest.packet_count

    def missing(self) -> int:
        """Packets not recorded yet."""
        return self.manifest.packet_count - self.received_packets

    def digest(self) -> bytes:
        """The job digest of what was verified so far."""
        return self._digest.digest()

    def check_commit_request(self, request: CommitRequest) -> bytes:
        """Compare a COMMIT_REQUEST with what arrived; return the digest to echo.

        Call it once every channel has ENDed (channels are separate
        connections, so COMMIT_REQUEST can be read before another channel's
        last frames). Raises RemoteProtocolError: PROTOCOL if packets are
        still missing, INTEGRITY if a total or the digest differs.
        """
        if not self.complete:
            raise RemoteProtocolError(
                f"COMMIT_REQUEST with {self.missing()} of {self.manifest.packet_count} "
                "packets missing"
            )
        for what, theirs, ours in (
            ("packet_count", request.packet_count, self.manifest.packet_count),
            ("zero_pages", request.zero_pages, self.zero_pages),
            ("normal_pages", request.normal_pages, self.normal_pages),
        ):
            if theirs != ours:
                raise RemoteProtocolError(
                    f"COMMIT_REQUEST {what} {theirs} does not match the receiver's {ours}",
                    ErrorCode.INTEGRITY,
                )
        digest = self.digest()
        if request.digest != digest:
            raise RemoteProtocolError(
                f"COMMIT_REQUEST digest {request.digest.hex()} does not match the "
                f"receiver's {digest.hex()}",
                ErrorCode.INTEGRITY,
            )
        return digest


__all__ = [
    "DEFAULT_MAX_PACKETS",
    "RECEIVER_CLOSE_OK",
    "RECEIVER_TRANSITIONS",
    "SENDER_CLOSE_OK",
    "SENDER_TRANSITIONS",
    "Direction",
    "JobDigest",
    "PacketTracker",
    "ReceiverChannelState",
    "ReceiverState",
    "SenderChannelState",
    "SenderState",
    "packet_record",
]
