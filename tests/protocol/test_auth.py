"""Pre-shared-key authentication: CHALLENGE frames, the MACs, and the keyed states."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
import uuid

import pytest

from dsamig.proto import (
    AUTH_MAC_SIZE,
    PREAMBLE,
    Challenge,
    ChannelState,
    End,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    LocalProtocolError,
    Manifest,
    PacketHeader,
    ReceiverState,
    RemoteProtocolError,
    SenderState,
    Welcome,
    ZeroRange,
    encode,
)
from dsamig.proto.auth import hello_mac, receiver_proof
from tests.protocol.helpers import feed, transfer

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
JOB = uuid.UUID(int=7)
MANIFEST = Manifest(10 * 4096, 4096, 4)
SENDER_NONCE = b"s" * 32
RECEIVER_NONCE = b"r" * 32


def hello(index: int = 0) -> Hello:
    return Hello(JOB, index, 2, MANIFEST if index == 0 else None, name="vm-7")


def handshake(
    sender_key: bytes = KEY, receiver_key: bytes = KEY
) -> tuple[ChannelState, ChannelState, Challenge]:
    """Both sides through the CHALLENGE exchange, frames passed as bytes."""
    sender = ChannelState.sender(psk=sender_key)
    receiver = ChannelState.receiver(psk=receiver_key)
    ours = Challenge(SENDER_NONCE)
    sender.on_send(ours)
    (decoded,) = transfer(PREAMBLE + encode(ours))
    receiver.on_frame(decoded)
    answer = receiver.answer_challenge(RECEIVER_NONCE)
    receiver.on_send(answer)
    (theirs,) = transfer(encode(answer), expect_preamble=False)
    assert isinstance(theirs, Challenge)
    return sender, receiver, theirs


# -- the CHALLENGE frame -----------------------------------------------------------


@pytest.mark.parametrize("step", [None, 1, 7])
def test_challenge_round_trip(step: int | None) -> None:
    frame = Challenge(bytes(range(32)), bytes(range(100, 132)))
    data = encode(frame)
    assert data[:8] == struct.pack("<BBHI", 0x03, 0, 0, 68)
    assert data[8] == 1 and data[9:12] == bytes(3)  # scheme, reserved
    assert feed(FrameDecoder(expect_preamble=False), data, step) == [frame]


def test_challenge_reserved_must_be_zero() -> None:
    data = bytearray(encode(Challenge(SENDER_NONCE)))
    data[10] = 1
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(bytes(data))
    with pytest.raises(RemoteProtocolError, match="CHALLENGE reserved 000100 must be 0"):
        decoder.next_event()


@pytest.mark.parametrize("length", [0, 36, 67, 69, 100])
def test_challenge_body_length_is_exact(length: int) -> None:
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(struct.pack("<BBHI", 0x03, 0, 0, length) + bytes(length))
    with pytest.raises(RemoteProtocolError, match=f"CHALLENGE body_length {length}, expected 68"):
        decoder.next_event()


def test_challenge_encode_checks_sizes() -> None:
    with pytest.raises(LocalProtocolError, match="nonce of 31"):
        encode(Challenge(bytes(31)))
    with pytest.raises(LocalProtocolError, match="scheme 256"):
        encode(Challenge(bytes(32), scheme=256))


# -- the MACs, written out independently from docs/protocol.md ---------------------


def test_receiver_proof_is_the_documented_hmac() -> None:
    expected = hmac.new(
        KEY, b"dsamig-v1 receiver\x00" + SENDER_NONCE + RECEIVER_NONCE, hashlib.sha256
    ).digest()
    assert receiver_proof(KEY, SENDER_NONCE, RECEIVER_NONCE) == expected


def test_hello_mac_is_the_documented_hmac() -> None:
    frame = hello()
    unsigned = bytearray(encode(dataclasses.replace(frame, auth=b"\xff" * 32)))
    # The auth block sits after the fixed body and the manifest, before the name.
    auth_at = 8 + 32 + 32
    assert unsigned[auth_at : auth_at + 32] == b"\xff" * 32
    unsigned[auth_at : auth_at + 32] = bytes(32)
    expected = hmac.new(
        KEY, b"dsamig-v1 sender\x00" + RECEIVER_NONCE + SENDER_NONCE + bytes(unsigned),
        hashlib.sha256,
    ).digest()
    assert hello_mac(KEY, RECEIVER_NONCE, SENDER_NONCE, frame) == expected


# -- whole handshakes ---------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
def test_keyed_handshake(index: int) -> None:
    sender, receiver, theirs = handshake()
    sender.on_frame(theirs)
    assert sender.state is SenderState.AUTHENTICATED
    assert receiver.state is ReceiverState.AWAIT_AUTH_HELLO
    signed = sender.sign_hello(hello(index))
    assert len(signed.auth) == AUTH_MAC_SIZE
    sender.on_send(signed)
    (decoded,) = transfer(encode(signed), expect_preamble=False)
    receiver.on_frame(decoded)
    assert receiver.state is ReceiverState.HANDSHAKE
    assert receiver.hello == signed
    receiver.on_send(Welcome(JOB))
    sender.on_frame(Welcome(JOB))
    assert (sender.state, receiver.state) == (SenderState.STREAMING, ReceiverState.STREAMING)


def test_wrong_key_fails_on_the_sender_first() -> None:
    sender, _receiver, theirs = handshake(sender_key=KEY, receiver_key=OTHER_KEY)
    with pytest.raises(RemoteProtocolError, match="does not hold this sender's pre-shared key") \
            as info:
        sender.on_frame(theirs)
    assert info.value.code is ErrorCode.AUTH
    assert sender.state is SenderState.ERROR


def test_hello_signed_with_another_key_is_refused() -> None:
    # A sender that skips the proof check (or an attacker) still cannot get in.
    _sender, receiver, _theirs = handshake(receiver_key=KEY)
    forged = dataclasses.replace(
        hello(), auth=hello_mac(OTHER_KEY, RECEIVER_NONCE, SENDER_NONCE, hello())
    )
    with pytest.raises(RemoteProtocolError, match="not signed with this receiver's") as info:
        receiver.on_frame(forged)
    assert info.value.code is ErrorCode.AUTH
    assert receiver.state is ReceiverState.ERROR


def test_replayed_hello_is_refused() -> None:
    sender, _receiver, theirs = handshake()
    sender.on_frame(theirs)
    recorded = sender.sign_hello(hello())
    # A new connection: the receiver picks a new nonce, so the old MAC is worthless.
    receiver = ChannelState.receiver(psk=KEY)
    receiver.on_frame(Challenge(SENDER_NONCE))
    receiver.on_send(receiver.answer_challenge(b"n" * 32))
    with pytest.raises(RemoteProtocolError, match="not signed") as info:
        receiver.on_frame(recorded)
    assert info.value.code is ErrorCode.AUTH


@pytest.mark.parametrize(
    "change",
    [
        {"channel_index": 1, "manifest": None},
        {"channel_count": 3},
        {"job_id": uuid.UUID(int=8)},
        {"name": "vm-8"},
        {"manifest": Manifest(11 * 4096, 4096, 4)},
        {"features": 1},
    ],
    ids=["index", "count", "job", "name", "manifest", "features"],
)
def test_tampered_hello_is_refused(change: dict[str, object]) -> None:
    sender, receiver, theirs = handshake()
    sender.on_frame(theirs)
    tampered = dataclasses.replace(sender.sign_hello(hello()), **change)  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError) as info:
        receiver.on_frame(tampered)
    assert info.value.code is ErrorCode.AUTH


def test_receiver_proof_cannot_be_reflected_as_a_hello_mac() -> None:
    _sender, receiver, theirs = handshake()
    reflected = dataclasses.replace(hello(), auth=theirs.proof)
    with pytest.raises(RemoteProtocolError) as info:
        receiver.on_frame(reflected)
    assert info.value.code is ErrorCode.AUTH


# -- mismatched configurations: AUTH, with a message that says what to do ----------


def test_keyless_receiver_refuses_a_challenge() -> None:
    receiver = ChannelState.receiver()
    with pytest.raises(RemoteProtocolError, match="none configured") as info:
        receiver.on_frame(Challenge(SENDER_NONCE))
    assert info.value.code is ErrorCode.AUTH


def test_keyed_receiver_refuses_an_unauthenticated_hello() -> None:
    receiver = ChannelState.receiver(psk=KEY)
    with pytest.raises(RemoteProtocolError, match="requires a pre-shared key") as info:
        receiver.on_frame(hello())
    assert info.value.code is ErrorCode.AUTH


def test_keyless_receiver_refuses_auth_data() -> None:
    receiver = ChannelState.receiver()
    with pytest.raises(RemoteProtocolError, match="carries 32 bytes of authentication") as info:
        receiver.on_frame(dataclasses.replace(hello(), auth=bytes(32)))
    assert info.value.code is ErrorCode.AUTH


def test_signed_hello_of_the_wrong_length_is_refused() -> None:
    _sender, receiver, _theirs = handshake()
    with pytest.raises(RemoteProtocolError, match="auth block of 0 bytes") as info:
        receiver.on_frame(hello())
    assert info.value.code is ErrorCode.AUTH


def test_unknown_scheme_is_refused_on_both_sides() -> None:
    receiver = ChannelState.receiver(psk=KEY)
    with pytest.raises(RemoteProtocolError, match="scheme 9 not supported") as info:
        receiver.on_frame(Challenge(SENDER_NONCE, scheme=9))
    assert info.value.code is ErrorCode.AUTH
    sender = ChannelState.sender(psk=KEY)
    sender.on_send(Challenge(SENDER_NONCE))
    proof = receiver_proof(KEY, SENDER_NONCE, RECEIVER_NONCE)
    with pytest.raises(RemoteProtocolError, match="scheme 2 not supported") as info:
        sender.on_frame(Challenge(RECEIVER_NONCE, proof, scheme=2))
    assert info.value.code is ErrorCode.AUTH


def test_sender_challenge_carries_no_proof() -> None:
    receiver = ChannelState.receiver(psk=KEY)
    with pytest.raises(RemoteProtocolError, match="zero proof") as info:
        receiver.on_frame(Challenge(SENDER_NONCE, b"\x01" * 32))
    assert info.value.code is ErrorCode.PROTOCOL


# -- local misuse ---------------------------------------------------------------------


def test_sender_cannot_skip_authentication() -> None:
    sender = ChannelState.sender(psk=KEY)
    with pytest.raises(LocalProtocolError, match="cannot sign a HELLO in state IDLE"):
        sender.on_send(hello())
    sender.on_send(Challenge(SENDER_NONCE))
    with pytest.raises(LocalProtocolError, match="cannot send HELLO in state AWAIT_CHALLENGE"):
        sender.on_send(hello())


def test_sender_must_send_the_signed_hello() -> None:
    sender, _receiver, theirs = handshake()
    sender.on_frame(theirs)
    with pytest.raises(LocalProtocolError, match="not signed"):
        sender.on_send(dataclasses.replace(hello(), auth=bytes(32)))
    assert sender.state is SenderState.AUTHENTICATED


def test_keyless_sender_sends_no_challenge() -> None:
    with pytest.raises(LocalProtocolError, match="without a pre-shared key"):
        ChannelState.sender().on_send(Challenge(SENDER_NONCE))


def test_receiver_answers_with_its_own_proof_only() -> None:
    receiver = ChannelState.receiver(psk=KEY)
    receiver.on_frame(Challenge(SENDER_NONCE))
    with pytest.raises(LocalProtocolError, match="not this receiver's proof"):
        receiver.on_send(Challenge(RECEIVER_NONCE, bytes(32)))
    with pytest.raises(LocalProtocolError, match="nonce of 5 bytes"):
        receiver.answer_challenge(b"short")
    with pytest.raises(LocalProtocolError, match="cannot answer a CHALLENGE"):
        ChannelState.receiver(psk=KEY).answer_challenge(RECEIVER_NONCE)


# -- the keyed rows of the state tables, every frame type ----------------------------

SAMPLE: dict[FrameType, Frame] = {
    FrameType.HELLO: hello(),
    FrameType.PACKET: PacketHeader(0, 0, 4, 0, 0, b"\x0f"),
    FrameType.ZERO_RANGE: ZeroRange(0, 1),
    FrameType.END: End(0, 0),
    FrameType.ERROR: Error(ErrorCode.CANCELLED, "stop"),
}


def keyed_receiver_in(state: ReceiverState) -> ChannelState:
    receiver = ChannelState.receiver(psk=KEY)
    if state is ReceiverState.AWAIT_HELLO:
        return receiver
    receiver.on_frame(Challenge(SENDER_NONCE))
    if state is ReceiverState.AWAIT_AUTH_HELLO:
        receiver.on_send(receiver.answer_challenge(RECEIVER_NONCE))
    assert receiver.state is state
    return receiver


@pytest.mark.parametrize("ftype", [FrameType.PACKET, FrameType.ZERO_RANGE, FrameType.END])
@pytest.mark.parametrize(
    "state",
    [ReceiverState.AWAIT_HELLO, ReceiverState.CHALLENGED, ReceiverState.AWAIT_AUTH_HELLO],
)
def test_no_data_before_authentication(state: ReceiverState, ftype: FrameType) -> None:
    receiver = keyed_receiver_in(state)
    with pytest.raises(RemoteProtocolError, match=f"{ftype.name} received in state {state.name}"):
        receiver.on_frame(SAMPLE[ftype])
    assert receiver.state is ReceiverState.ERROR


@pytest.mark.parametrize("state", [ReceiverState.CHALLENGED, ReceiverState.AWAIT_AUTH_HELLO])
def test_keyed_receiver_rows(state: ReceiverState) -> None:
    for ftype in FrameType:
        receiver = keyed_receiver_in(state)
        frame: Frame = SAMPLE.get(ftype, Challenge(SENDER_NONCE))
        if ftype is FrameType.ERROR:
            receiver.on_frame(frame)
            assert receiver.state is ReceiverState.ERROR
        elif ftype is FrameType.HELLO and state is ReceiverState.AWAIT_AUTH_HELLO:
            continue  # the signed HELLO: test_keyed_handshake
        elif ftype in SAMPLE or ftype is FrameType.CHALLENGE:
            with pytest.raises(RemoteProtocolError, match=f"received in state {state.name}"):
                receiver.on_frame(frame)
    # What the receiver itself may send: CHALLENGE only in CHALLENGED.
    receiver = keyed_receiver_in(state)
    with pytest.raises(LocalProtocolError, match=f"cannot send WELCOME in state {state.name}"):
        receiver.on_send(Welcome(JOB))
    if state is ReceiverState.AWAIT_AUTH_HELLO:
        with pytest.raises(LocalProtocolError, match="cannot send CHALLENGE"):
            receiver.on_send(Challenge(b"x" * 32))


@pytest.mark.parametrize(
    "state",
    [
        ReceiverState.CHALLENGED,
        ReceiverState.AWAIT_AUTH_HELLO,
        ReceiverState.HANDSHAKE,
        ReceiverState.STREAMING,
    ],
)
def test_challenge_only_opens_a_channel(state: ReceiverState) -> None:
    if state in (ReceiverState.CHALLENGED, ReceiverState.AWAIT_AUTH_HELLO):
        receiver = keyed_receiver_in(state)
    else:
        receiver = ChannelState.receiver(psk=KEY)
        sender = ChannelState.sender(psk=KEY)
        sender.on_send(Challenge(SENDER_NONCE))
        receiver.on_frame(Challenge(SENDER_NONCE))
        answer = receiver.answer_challenge(RECEIVER_NONCE)
        receiver.on_send(answer)
        sender.on_frame(answer)
        receiver.on_frame(sender.sign_hello(hello()))
        if state is ReceiverState.STREAMING:
            receiver.on_send(Welcome(JOB))
    assert receiver.state is state
    with pytest.raises(RemoteProtocolError, match=f"CHALLENGE received in state {state.name}"):
        receiver.on_frame(Challenge(SENDER_NONCE))


@pytest.mark.parametrize(
    "state",
    [SenderState.IDLE, SenderState.AWAIT_WELCOME, SenderState.STREAMING, SenderState.AUTHENTICATED],
)
def test_sender_reads_challenge_only_when_it_asked(state: SenderState) -> None:
    if state is SenderState.AUTHENTICATED:
        sender, _receiver, theirs = handshake()
        sender.on_frame(theirs)
    else:
        sender = ChannelState.sender()
        if state is not SenderState.IDLE:
            sender.on_send(hello())
        if state is SenderState.STREAMING:
            sender.on_frame(Welcome(JOB))
    proof = receiver_proof(KEY, SENDER_NONCE, RECEIVER_NONCE)
    with pytest.raises(RemoteProtocolError, match=f"CHALLENGE received in state {state.name}"):
        sender.on_frame(Challenge(RECEIVER_NONCE, proof))


def test_sender_in_await_challenge_accepts_only_challenge_or_error() -> None:
    for frame in (Welcome(JOB), End(0, 0)):
        sender = ChannelState.sender(psk=KEY)
        sender.on_send(Challenge(SENDER_NONCE))
        with pytest.raises(RemoteProtocolError, match="received in state AWAIT_CHALLENGE"):
            sender.on_frame(frame)
    sender = ChannelState.sender(psk=KEY)
    sender.on_send(Challenge(SENDER_NONCE))
    sender.on_frame(Error(ErrorCode.AUTH, "no key here"))
    assert sender.state is SenderState.ERROR
