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
        self._check_range(packet_number, 1)
        self._records[packet_number] = packet_record(zero_bitmap, payload_crc)

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


_FREE: Final = 0
_CLAIMED: Final = 1
_DONE: Final = 2

_PROGRESS_MAGIC: Final = b"DSAMIGP1"
_PROGRESS_STRUCT: Final = struct.Struct("<8sQIIQQQQQ")


@dataclass(frozen=True)
class Progress:
    """A receiver checkpoint: which packets are durable, with their records.

    Serialised beside the partial file so that a restarted receiver can resume
    (``to_bytes`` / ``from_bytes``; the pages layer does the file I/O).
    """

    manifest: Manifest
    done: bytes  # one bit per packet, LSB first
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
        return head + self.done + self.records

    @classmethod
    def from_bytes(cls, data: bytes) -> Progress:
        """Parse a checkpoint; ValueError if it is damaged or of another version."""
        if len(data) < _PROGRESS_STRUCT.size:
            raise ValueError("checkpoint too short")
        (magic, size, page_size, packet_pages, packet_count, received, zero, normal,
         payload) = _PROGRESS_STRUCT.unpack_from(data)
        if magic != _PROGRESS_MAGIC:
            raise ValueError("not a dsamig checkpoint")
        manifest = Manifest(image_size=size, page_size=page_size, packet_pages=packet_pages)
        problem = manifest.problem()
        if problem or manifest.packet_count != packet_count:
            raise ValueError(f"checkpoint manifest is invalid: {problem or 'packet count'}")
        done_length = (packet_count + 7) >> 3
        if len(data) != _PROGRESS_STRUCT.size + done_length + 4 * packet_count:
            raise ValueError("checkpoint length does not match its packet count")
        off = _PROGRESS_STRUCT.size
        done = data[off : off + done_length]
        if int.from_bytes(done, "little").bit_count() != received:
            raise ValueError("checkpoint counters do not match its bitmap")
        return cls(manifest, done, data[off + done_length :], received, zero, normal, payload)


class PacketTracker:
    """Receiver's job-wide record of which packets arrived, checked against the manifest.

    ``check_packet`` / ``check_zero_range`` validate a frame and claim its
    packets at once, so that the same packet arriving on two channels is
    caught before its payload is written; ``packet_done`` /
    ``zero_range_done`` record them once the payload is stored and verified.
    """

    __slots__ = (
        "_digest",
        "_done_bits",
        "_status",
        "manifest",
        "normal_pages",
        "payload_bytes",
        "received_packets",
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
        # Per packet: _FREE, _CLAIMED or _DONE; and the done ones as a bitmap,
        # kept up to date so that a checkpoint is two copies, not a scan.
        self._status = bytearray(manifest.packet_count)
        self._done_bits = bytearray((manifest.packet_count + 7) >> 3)
        self._digest = JobDigest(manifest)
        #: Packets recorded as done (a ZERO_RANGE counts each packet).
        self.received_packets = 0
        self.zero_pages = 0
        self.normal_pages = 0
        self.payload_bytes = 0
        #: With FEATURE_ACKS a packet may arrive again (retransmitted after a
        #: channel broke before its ACK): accepted if its record is the same.
        self.tolerant = False

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
        if status == _DONE:
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
        if self._status[n] == _DONE:
            self._check_same(n, packet_record(hdr.zero_bitmap, payload_crc_verified))
            return
        self._status[n] = _DONE
        self._done_bits[n >> 3] |= 1 << (n & 7)
        self._digest.record_packet(n, hdr.zero_bitmap, payload_crc_verified)
        zero = int.from_bytes(hdr.zero_bitmap, "little").bit_count()
        self.received_packets += 1
        self.zero_pages += zero
        self.normal_pages += hdr.page_count - zero
        self.payload_bytes += hdr.payload_length

    def check_zero_range(self, zr: ZeroRange) -> None:
        """Validate a ZERO_RANGE against the manifest and claim its packets.

        Raises RemoteProtocolError if it reaches past the last packet or
        overlaps a packet already received.
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
        if self.tolerant:
            # Done packets are compared in zero_range_done; claim the others.
            for i in range(first, end):
                if status[i] != _DONE:
                    status[i] = _CLAIMED
            return
        if status.count(_FREE, first, end) != count:
            # Error path only: name the first packet that is taken.
            taken = min(
                i
                for i in (status.find(_CLAIMED, first, end), status.find(_DONE, first, end))
                if i >= 0
            )
            raise RemoteProtocolError(
                f"ZERO_RANGE packets {first}..{end - 1} overlap packet {taken}, already received"
            )
        status[first:end] = bytes([_CLAIMED]) * count

    def zero_range_done(self, zr: ZeroRange) -> None:
        """Record a ZERO_RANGE accepted by check_zero_range."""
        first, count = zr.first_packet, zr.packet_count
        end = first + count
        status = self._status
        if self.tolerant and status.count(_CLAIMED, first, end) != count:
            self._zero_range_again(first, end)
            return
        if not (
            first >= 0
            and count >= 1
            and end <= len(status)
            and status.count(_CLAIMED, first, end) == count
        ):
            raise LocalProtocolError(
                f"zero_range_done({first}, {count}) without a successful check_zero_range"
            )
        status[first:end] = bytes([_DONE]) * count
        self._set_done_bits(first, end)
        self._digest.record_zero_range(first, count)
        self.received_packets += count
        self.zero_pages += self.manifest.range_pages(first, count)

    def _zero_range_again(self, first: int, end: int) -> None:
        """A ZERO_RANGE some of whose packets are done already (tolerant mode)."""
        zero = JobDigest(self.manifest)
        zero.record_zero_range(first, end - first)
        for n in range(first, end):
            if self._status[n] == _DONE:
                self._check_same(n, zero.record(n))
            else:
                self._status[n] = _DONE
                self._done_bits[n >> 3] |= 1 << (n & 7)
                self._digest.record_zero_range(n, 1)
                self.received_packets += 1
                self.zero_pages += self.manifest.range_pages(n, 1)

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
        return self._status[packet_number] == _DONE

    def _set_done_bits(self, first: int, end: int) -> None:
        bits = self._done_bits
        while first < end and first & 7:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1
        whole = (end - first) >> 3
        if whole:
            bits[first >> 3 : (first >> 3) + whole] = b"\xff" * whole
            first += whole << 3
        while first < end:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1

    def snapshot(self) -> Progress:
        """What is done now: for a durable checkpoint beside the partial file."""
        return Progress(
            manifest=self.manifest,
            done=bytes(self._done_bits),
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
        done = progress.done
        self._done_bits[:] = done
        for n in range(self.manifest.packet_count):
            if done[n >> 3] >> (n & 7) & 1:
                self._status[n] = _DONE
        self._digest.load_records(progress.records)
        self.received_packets = progress.received_packets
        self.zero_pages = progress.zero_pages
        self.normal_pages = progress.normal_pages
        self.payload_bytes = progress.payload_bytes

    def resume_frames(self) -> list[ResumeState]:
        """RESUME_STATE frames describing every done packet, the last one marked."""
        frames: list[ResumeState] = []
        count = self.manifest.packet_count
        status = self._status
        for first in range(0, max(count, 1), MAX_RESUME_PACKETS):
            n = min(MAX_RESUME_PACKETS, count - first)
            if n <= 0:
                break
            bits = 0
            records = bytearray()
            for i in range(n):
                if status[first + i] == _DONE:
                    bits |= 1 << i
                    records += self._digest.record(first + i).to_bytes(4, "little")
            frames.append(
                ResumeState(first, n, bits.to_bytes((n + 7) >> 3, "little"), bytes(records))
            )
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
