"""The state machine of one channel, with one transition table per role.

Every allowed transition is one row of :data:`TRANSITIONS` for the channel's
role; anything not in the table is a protocol error: RemoteProtocolError when
the peer did it, LocalProtocolError when we were about to. Every frame goes
through :meth:`ChannelState.on_frame` (received) or :meth:`ChannelState.on_send`
(about to be sent), ERROR frames included: either side may report a failure
at any time, once.

The checks that only one role makes (authentication, WELCOME against HELLO,
END against what was counted, COMMIT against COMMIT_REQUEST) live in the
methods below, named for the frame and the direction.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Final

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
    PROTOCOL_VERSION,
    Ack,
    Challenge,
    Commit,
    CommitRequest,
    End,
    Error,
    Frame,
    FrameType,
    Hello,
    PacketHeader,
    Round,
    Sums,
    SumsRequest,
    Welcome,
    ZeroRange,
    frame_type,
)


class Role(enum.Enum):
    """Which end of the channel this state machine is."""

    SENDER = "sender"
    RECEIVER = "receiver"


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


State = ReceiverState | SenderState
_R = ReceiverState
_S = SenderState
_T = FrameType
Table = dict[tuple[State, Direction, FrameType], State]

#: (state, direction, frame type) -> next state, for a receiver's channel.
RECEIVER_TRANSITIONS: Final[Table] = {
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
    # With FEATURE_LIVE (the job core refuses them otherwise).
    (_R.STREAMING, RECV, _T.ROUND): _R.STREAMING,
    (_R.STREAMING, SEND, _T.ROUND_DONE): _R.STREAMING,
    # With FEATURE_REFRESH, on channel 0 (checked below).
    (_R.STREAMING, RECV, _T.SUMS_REQUEST): _R.STREAMING,
    (_R.STREAMING, SEND, _T.SUMS): _R.STREAMING,
    (_R.ENDED, SEND, _T.ACK): _R.ENDED,
    (_R.COMMITTING, SEND, _T.ACK): _R.COMMITTING,
    # The peer may report a failure in any state but after its own ERROR; we
    # may report one in any state but after a clean close (once: see below).
    **{(state, RECV, _T.ERROR): _R.ERROR for state in _R if state is not _R.ERROR},
    **{(state, SEND, _T.ERROR): _R.ERROR for state in _R if state is not _R.CLOSED},
}

#: (state, direction, frame type) -> next state, for a sender's channel.
SENDER_TRANSITIONS: Final[Table] = {
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
    # With FEATURE_LIVE.
    (_S.STREAMING, SEND, _T.ROUND): _S.STREAMING,
    (_S.STREAMING, RECV, _T.ROUND_DONE): _S.STREAMING,
    # With FEATURE_REFRESH, on channel 0 (checked below).
    (_S.STREAMING, SEND, _T.SUMS_REQUEST): _S.STREAMING,
    (_S.STREAMING, RECV, _T.SUMS): _S.STREAMING,
    (_S.ENDED, RECV, _T.ACK): _S.ENDED,
    (_S.AWAIT_COMMIT, RECV, _T.ACK): _S.AWAIT_COMMIT,
    **{(state, RECV, _T.ERROR): _S.ERROR for state in _S if state is not _S.ERROR},
    **{(state, SEND, _T.ERROR): _S.ERROR for state in _S if state is not _S.DONE},
}

TRANSITIONS: Final[dict[Role, Table]] = {
    Role.RECEIVER: RECEIVER_TRANSITIONS,
    Role.SENDER: SENDER_TRANSITIONS,
}

#: States in which the peer may close the connection cleanly (besides ENDED
#: on a channel other than 0, which has nothing left to do).
RECEIVER_CLOSE_OK: Final = frozenset({_R.CLOSED, _R.ERROR})
SENDER_CLOSE_OK: Final = frozenset({_S.DONE, _S.ERROR})
_CLOSE_OK: Final[dict[Role, frozenset[State]]] = {
    Role.RECEIVER: RECEIVER_CLOSE_OK,
    Role.SENDER: SENDER_CLOSE_OK,
}
_FIRST: Final[dict[Role, State]] = {Role.RECEIVER: _R.AWAIT_HELLO, Role.SENDER: _S.IDLE}
_FAILED: Final[dict[Role, State]] = {Role.RECEIVER: _R.ERROR, Role.SENDER: _S.ERROR}
# Where a receiver may read HELLO: directly, or after CHALLENGE with a key.
_HELLO_STATES: Final = frozenset({_R.AWAIT_HELLO, _R.AWAIT_AUTH_HELLO})
_PEER: Final[dict[Role, str]] = {Role.RECEIVER: "sender", Role.SENDER: "receiver"}


def _expected(table: Table, state: State, direction: Direction) -> str:
    """Name the frame types the table allows in ``state``, for error messages."""
    names = [t.name for (s, d, t) in table if s is state and d is direction and t is not _T.ERROR]
    return " or ".join(names) if names else "nothing"


class ChannelState:
    """Order and counts of the frames on one channel, for either role.

    Call :meth:`on_frame` for every frame the decoder yields and
    :meth:`on_send` for every frame before it is sent. The channel counts the
    data frames (PACKET, ZERO_RANGE), their packets and payload bytes in both
    directions' terms, to check END and ACK against them.
    """

    __slots__ = (
        "_error_sent",
        "_psk",
        "_receiver_nonce",
        "_sender_nonce",
        "_table",
        "channel_index",
        "commit",
        "commit_request",
        "data_frames",
        "end",
        "error",
        "hello",
        "packets",
        "payload_bytes",
        "role",
        "state",
        "welcome",
    )

    def __init__(self, role: Role, psk: bytes | None = None) -> None:
        self.role = role
        self._table = TRANSITIONS[role]
        self.state: State = _FIRST[role]
        #: With a pre-shared key every channel authenticates before HELLO.
        self._psk = psk
        self._sender_nonce = b""
        self._receiver_nonce = b""
        self.hello: Hello | None = None
        #: From the HELLO; None until it went out or arrived.
        self.channel_index: int | None = None
        self.welcome: Welcome | None = None
        #: Data frames (PACKET, ZERO_RANGE) on this channel, the packets they
        #: cover (a ZERO_RANGE counts each) and the payload bytes announced.
        self.data_frames = 0
        self.packets = 0
        self.payload_bytes = 0
        self.end: End | None = None
        self.commit_request: CommitRequest | None = None
        self.commit: Commit | None = None
        #: The peer's ERROR frame, once one arrived.
        self.error: Error | None = None
        self._error_sent = False

    @classmethod
    def receiver(cls, psk: bytes | None = None) -> ChannelState:
        """A receiver's channel, waiting for the preamble and HELLO."""
        return cls(Role.RECEIVER, psk)

    @classmethod
    def sender(cls, psk: bytes | None = None) -> ChannelState:
        """A sender's channel, about to send HELLO (or CHALLENGE, with a key)."""
        return cls(Role.SENDER, psk)

    @property
    def authenticates(self) -> bool:
        """Whether this channel opens with the pre-shared-key CHALLENGE."""
        return self._psk is not None

    @property
    def can_send_error(self) -> bool:
        """Whether an ERROR may still be sent (once, and not after a clean end)."""
        return not self._error_sent and (self.state, SEND, _T.ERROR) in self._table

    def _where(self) -> str:
        return "" if self.channel_index is None else f" on channel {self.channel_index}"

    # --- frames from the peer ------------------------------------------------------------

    def on_frame(self, frame: Frame) -> None:
        """Apply a frame received from the peer.

        Raises RemoteProtocolError (the channel then is in ERROR) if the frame
        is not allowed now or disagrees with what the channel knows.
        """
        try:
            self._on_frame(frame)
        except RemoteProtocolError:
            self.state = _FAILED[self.role]
            raise

    def _on_frame(self, frame: Frame) -> None:
        ftype = frame_type(frame)
        state = self.state
        if self.role is Role.RECEIVER and state in _HELLO_STATES:
            self._receive_before_hello(frame, state)
        new_state = self._table.get((state, RECV, ftype))
        if new_state is None:
            raise RemoteProtocolError(
                f"{ftype.name} received in state {state.name}{self._where()}; expected "
                f"{_expected(self._table, state, RECV)}"
            )
        if isinstance(frame, PacketHeader):
            self.data_frames += 1
            self.packets += 1
            self.payload_bytes += frame.payload_length
        elif isinstance(frame, ZeroRange):
            self.data_frames += 1
            self.packets += frame.packet_count
        elif isinstance(frame, Hello):
            self.hello = frame
            self.channel_index = frame.channel_index
        elif isinstance(frame, End | Round):
            self._receive_totals(frame)
        elif isinstance(frame, CommitRequest):
            if self.channel_index != 0:
                raise RemoteProtocolError(
                    f"COMMIT_REQUEST on channel {self.channel_index} (only channel 0 may commit)"
                )
        elif isinstance(frame, SumsRequest | Sums):
            if self.channel_index != 0:
                raise RemoteProtocolError(
                    f"{ftype.name} on channel {self.channel_index} (refresh uses channel 0)")
        elif isinstance(frame, Challenge):
            self._receive_challenge(frame)
        elif isinstance(frame, Welcome):
            self._receive_welcome(frame)
        elif isinstance(frame, Ack):
            if frame.frames > self.data_frames:
                raise RemoteProtocolError(
                    f"ACK of {frame.frames} frames{self._where()}, only {self.data_frames} sent"
                )
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

    def _receive_before_hello(self, frame: Frame, state: State) -> None:
        """The receiver's rules before HELLO, checked before the table so that
        their failures carry AUTH or VERSION rather than PROTOCOL.

        Without a key a channel must not try to authenticate; with one, the
        only way to a HELLO is CHALLENGE both ways and a HELLO whose MAC
        binds it to both nonces.
        """
        psk = self._psk
        if isinstance(frame, Challenge) and state is _R.AWAIT_HELLO:
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
            return
        if not isinstance(frame, Hello):
            return
        if state is _R.AWAIT_AUTH_HELLO:
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
        # A HELLO of another version gets a VERSION answer, not a confusing PROTOCOL one.
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

    def _receive_totals(self, frame: End | Round) -> None:
        """END and ROUND carry the channel's totals so far: they must match."""
        name = "END" if isinstance(frame, End) else "ROUND"
        if frame.packets != self.packets:
            raise RemoteProtocolError(
                f"{name} packets {frame.packets} does not match the {self.packets} "
                f"packets received on channel {self.channel_index}"
            )
        if frame.payload_bytes != self.payload_bytes:
            raise RemoteProtocolError(
                f"{name} payload_bytes {frame.payload_bytes} does not match the "
                f"{self.payload_bytes} payload bytes received on channel {self.channel_index}"
            )
        if isinstance(frame, End):
            self.end = frame

    def _receive_challenge(self, frame: Challenge) -> None:
        if self.role is Role.RECEIVER:
            return  # checked in _receive_before_hello
        assert self._psk is not None  # AWAIT_CHALLENGE follows our own CHALLENGE
        if frame.scheme != AUTH_HMAC_SHA256:
            raise RemoteProtocolError(
                f"CHALLENGE scheme {frame.scheme} not supported "
                f"({AUTH_HMAC_SHA256} = HMAC-SHA256 with a pre-shared key)",
                ErrorCode.AUTH,
            )
        check_receiver_proof(self._psk, self._sender_nonce, frame.nonce, frame.proof)
        self._receiver_nonce = frame.nonce

    def _receive_welcome(self, frame: Welcome) -> None:
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

    def on_eof(self) -> None:
        """Apply the peer closing the connection (the decoder returned CLOSED).

        Closing is clean after the job's end (COMMIT, DONE), after an ERROR,
        and after END on a channel other than 0; anywhere else the peer gave
        up half way, and RemoteProtocolError is raised (the channel then is
        in ERROR).
        """
        state = self.state
        ended = _R.ENDED if self.role is Role.RECEIVER else _S.ENDED
        if state in _CLOSE_OK[self.role] or (state is ended and self.channel_index != 0):
            return
        self.state = _FAILED[self.role]
        raise RemoteProtocolError(
            f"connection closed by the {_PEER[self.role]} in state {state.name}{self._where()}"
        )

    # --- frames to the peer --------------------------------------------------------------

    def on_send(self, frame: Frame) -> None:
        """Check a frame we are about to send; raises LocalProtocolError if out of order."""
        ftype = frame_type(frame)
        state = self.state
        new_state = self._table.get((state, SEND, ftype))
        if new_state is None or (ftype is _T.ERROR and self._error_sent):
            raise LocalProtocolError(f"cannot send {ftype.name} in state {state.name}")
        if isinstance(frame, PacketHeader):
            self.data_frames += 1
            self.packets += 1
            self.payload_bytes += frame.payload_length
        elif isinstance(frame, ZeroRange):
            self.data_frames += 1
            self.packets += frame.packet_count
        elif isinstance(frame, Challenge):
            self._send_challenge(frame)
        elif isinstance(frame, Hello):
            self._send_hello(frame)
        elif isinstance(frame, Welcome):
            self._send_welcome(frame)
        elif isinstance(frame, End | Round):
            if (frame.packets, frame.payload_bytes) != (self.packets, self.payload_bytes):
                name = "END" if isinstance(frame, End) else "ROUND"
                raise LocalProtocolError(
                    f"{name} packets {frame.packets} payload_bytes {frame.payload_bytes} does "
                    f"not match the {self.packets} packets and {self.payload_bytes} payload "
                    "bytes sent"
                )
        elif isinstance(frame, CommitRequest):
            if self.channel_index != 0:
                raise LocalProtocolError(
                    f"COMMIT_REQUEST on channel {self.channel_index} (only channel 0 may commit)"
                )
            self.commit_request = frame
        elif isinstance(frame, SumsRequest | Sums):
            if self.channel_index != 0:
                raise LocalProtocolError(
                    f"{ftype.name} on channel {self.channel_index} (refresh uses channel 0)")
        elif isinstance(frame, Error):
            self._error_sent = True
        self.state = new_state

    def on_send_data(self, frames: int, packets: int, payload_bytes: int) -> None:
        """Count data frames sent without building frame objects (the hot path).

        Equivalent to :meth:`on_send` for ``frames`` PACKET and ZERO_RANGE
        frames that together cover ``packets`` packets and ``payload_bytes``.
        """
        if self.state is not _S.STREAMING:
            raise LocalProtocolError(f"cannot send data in state {self.state.name}")
        self.data_frames += frames
        self.packets += packets
        self.payload_bytes += payload_bytes

    def _send_challenge(self, frame: Challenge) -> None:
        if self.role is Role.RECEIVER:
            if frame != self.answer_challenge(frame.nonce):
                raise LocalProtocolError("CHALLENGE proof is not this receiver's proof")
            self._receiver_nonce = frame.nonce
            return
        if self._psk is None:
            raise LocalProtocolError("cannot send CHALLENGE without a pre-shared key")
        check_nonce(frame.nonce)
        if any(frame.proof) or frame.scheme != AUTH_HMAC_SHA256:
            raise LocalProtocolError("the sender's CHALLENGE carries a nonce only")
        self._sender_nonce = frame.nonce

    def _send_hello(self, frame: Hello) -> None:
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

    def _send_welcome(self, frame: Welcome) -> None:
        assert self.hello is not None  # HANDSHAKE is only reached through HELLO
        if frame.job_id != self.hello.job_id:
            raise LocalProtocolError(
                f"WELCOME job_id {frame.job_id} does not echo HELLO job_id {self.hello.job_id}"
            )
        if frame.version != PROTOCOL_VERSION:
            raise LocalProtocolError(f"WELCOME version {frame.version} is not {PROTOCOL_VERSION}")
        if frame.features & ~self.hello.features:
            raise LocalProtocolError(
                f"WELCOME features 0x{frame.features:x} not offered by HELLO "
                f"(0x{self.hello.features:x})"
            )

    # --- authentication ------------------------------------------------------------------

    def answer_challenge(self, receiver_nonce: bytes) -> Challenge:
        """The receiver's CHALLENGE for the sender's: ``receiver_nonce`` (fresh,
        random) and the proof that we hold the key. Send it with :meth:`on_send`."""
        if self._psk is None or self.state is not _R.CHALLENGED:
            raise LocalProtocolError(f"cannot answer a CHALLENGE in state {self.state.name}")
        check_nonce(receiver_nonce)
        proof = receiver_proof(self._psk, self._sender_nonce, receiver_nonce)
        return Challenge(receiver_nonce, proof)

    def sign_hello(self, hello: Hello) -> Hello:
        """The sender's ``hello`` with its auth block set to the MAC the receiver
        expects; only after the receiver's CHALLENGE proved that it holds the key."""
        if self._psk is None or self.state is not _S.AUTHENTICATED:
            raise LocalProtocolError(f"cannot sign a HELLO in state {self.state.name}")
        mac = hello_mac(self._psk, self._receiver_nonce, self._sender_nonce, hello)
        return dataclasses.replace(hello, auth=mac)


__all__ = [
    "RECEIVER_CLOSE_OK",
    "RECEIVER_TRANSITIONS",
    "SENDER_CLOSE_OK",
    "SENDER_TRANSITIONS",
    "TRANSITIONS",
    "ChannelState",
    "Direction",
    "ReceiverState",
    "Role",
    "SenderState",
    "State",
]
