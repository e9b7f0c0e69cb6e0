"""Channel state machines, PacketTracker and JobDigest.

Whole jobs through them, with the job cores, are in test_jobs.py.
"""

from __future__ import annotations

import hashlib
import uuid

import pytest

from dsamig.checksum import crc32c
from dsamig.proto import (
    Ack,
    ChannelState,
    Commit,
    CommitRequest,
    End,
    Error,
    ErrorCode,
    Frame,
    FrameType,
    Hello,
    JobDigest,
    LocalProtocolError,
    Manifest,
    PacketHeader,
    PacketTracker,
    ReceiverState,
    RemoteProtocolError,
    ResumeState,
    Round,
    RoundDone,
    SenderState,
    Sums,
    SumsRequest,
    Welcome,
    ZeroRange,
    packet_record,
)

JOB = uuid.UUID(int=42)
OTHER_JOB = uuid.UUID(int=43)
DIGEST = bytes(range(32))
MANIFEST = Manifest(10 * 512 + 100, 512, 4)  # 11 pages: packets of 4, 4, 3 pages

# One frame of each type that passes every guard in a fresh channel 0.
SAMPLE: dict[FrameType, Frame] = {
    FrameType.HELLO: Hello(JOB, 0, 2, MANIFEST),
    FrameType.WELCOME: Welcome(JOB),
    FrameType.PACKET: PacketHeader(0, 0, 4, 0, 0, b"\x0f"),
    FrameType.ZERO_RANGE: ZeroRange(1, 1),
    FrameType.END: End(0, 0),
    FrameType.COMMIT_REQUEST: CommitRequest(3, 11, 0, DIGEST),
    FrameType.COMMIT: Commit(DIGEST),
    FrameType.ACK: Ack(0, 0),
    FrameType.RESUME_STATE: ResumeState(0, 3, b"\x05", bytes(8), last=True),
    FrameType.ROUND: Round(0, 0, 0),
    FrameType.ROUND_DONE: RoundDone(0),
    FrameType.SUMS_REQUEST: SumsRequest(0, 1),
    FrameType.SUMS: Sums(0, 1, bytes(range(1, 17)), bytes(8), bytes(4), last=True),
    FrameType.ERROR: Error(ErrorCode.CANCELLED, "stop"),
}

# CHALLENGE and the states it leads to exist only with a pre-shared key; those
# rows of the tables are walked in tests/protocol/test_auth.py.
KEYLESS_TYPES = [t for t in FrameType if t is not FrameType.CHALLENGE]
KEYLESS_RECEIVER = [
    s for s in ReceiverState
    if s not in (ReceiverState.CHALLENGED, ReceiverState.AWAIT_AUTH_HELLO)
]
KEYLESS_SENDER = [
    s for s in SenderState if s not in (SenderState.AWAIT_CHALLENGE, SenderState.AUTHENTICATED)
]

# -- receiver -------------------------------------------------------------------


def receiver_in(state: ReceiverState) -> ChannelState:
    """A channel-0 receiver driven to ``state`` by legal steps."""
    channel = ChannelState.receiver()
    steps: list[tuple[str, Frame]] = [
        ("recv", Hello(JOB, 0, 2, MANIFEST)),
        ("send", Welcome(JOB)),
        ("recv", End(0, 0)),
        ("recv", CommitRequest(3, 11, 0, DIGEST)),
        ("send", Commit(DIGEST)),
    ]
    order = [
        ReceiverState.AWAIT_HELLO,
        ReceiverState.HANDSHAKE,
        ReceiverState.STREAMING,
        ReceiverState.ENDED,
        ReceiverState.COMMITTING,
        ReceiverState.CLOSED,
    ]
    if state is ReceiverState.ERROR:
        channel.on_frame(Error(ErrorCode.IO, "x"))
        return channel
    for direction, frame in steps[: order.index(state)]:
        (channel.on_frame if direction == "recv" else channel.on_send)(frame)
    assert channel.state is state
    return channel


# Written out by hand from docs/protocol.md, independent of the code's table.
RECEIVER_MAY_RECEIVE = {
    ReceiverState.AWAIT_HELLO: {FrameType.HELLO, FrameType.ERROR},
    ReceiverState.HANDSHAKE: {FrameType.ERROR},
    ReceiverState.STREAMING: {
        FrameType.PACKET,
        FrameType.ZERO_RANGE,
        FrameType.END,
        FrameType.ROUND,
        FrameType.SUMS_REQUEST,
        FrameType.ERROR,
    },
    ReceiverState.ENDED: {FrameType.COMMIT_REQUEST, FrameType.ERROR},
    ReceiverState.COMMITTING: {FrameType.ERROR},
    ReceiverState.CLOSED: {FrameType.ERROR},
    ReceiverState.ERROR: set(),
}
RECEIVER_AFTER = {
    FrameType.HELLO: ReceiverState.HANDSHAKE,
    FrameType.PACKET: ReceiverState.STREAMING,
    FrameType.ZERO_RANGE: ReceiverState.STREAMING,
    FrameType.END: ReceiverState.ENDED,
    FrameType.ROUND: ReceiverState.STREAMING,
    FrameType.SUMS_REQUEST: ReceiverState.STREAMING,
    FrameType.COMMIT_REQUEST: ReceiverState.COMMITTING,
    FrameType.ERROR: ReceiverState.ERROR,
}


@pytest.mark.parametrize("ftype", KEYLESS_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("state", KEYLESS_RECEIVER, ids=lambda s: s.name)
def test_receiver_receive_table(state: ReceiverState, ftype: FrameType) -> None:
    channel = receiver_in(state)
    if ftype in RECEIVER_MAY_RECEIVE[state]:
        channel.on_frame(SAMPLE[ftype])
        assert channel.state is RECEIVER_AFTER[ftype]
    else:
        with pytest.raises(RemoteProtocolError) as info:
            channel.on_frame(SAMPLE[ftype])
        assert str(info.value).startswith(f"{ftype.name} received in state {state.name}")
        assert info.value.code is ErrorCode.PROTOCOL
        assert channel.state is ReceiverState.ERROR


RECEIVER_MAY_SEND = {
    ReceiverState.AWAIT_HELLO: {FrameType.ERROR},
    ReceiverState.HANDSHAKE: {FrameType.WELCOME, FrameType.ERROR},
    ReceiverState.STREAMING: {FrameType.ACK, FrameType.RESUME_STATE, FrameType.ROUND_DONE,
                              FrameType.SUMS, FrameType.ERROR},
    ReceiverState.ENDED: {FrameType.ACK, FrameType.ERROR},
    ReceiverState.COMMITTING: {FrameType.COMMIT, FrameType.ACK, FrameType.ERROR},
    ReceiverState.CLOSED: set(),
    ReceiverState.ERROR: {FrameType.ERROR},
}


@pytest.mark.parametrize("ftype", KEYLESS_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("state", KEYLESS_RECEIVER, ids=lambda s: s.name)
def test_receiver_send_table(state: ReceiverState, ftype: FrameType) -> None:
    channel = receiver_in(state)
    if ftype in RECEIVER_MAY_SEND[state]:
        channel.on_send(SAMPLE[ftype])
        expected = {
            FrameType.WELCOME: ReceiverState.STREAMING,
            FrameType.COMMIT: ReceiverState.CLOSED,
            FrameType.ERROR: ReceiverState.ERROR,
        }.get(ftype, state)  # ACK and RESUME_STATE keep the state
        assert channel.state is expected
    else:
        with pytest.raises(LocalProtocolError, match=f"cannot send {ftype.name} in state"):
            channel.on_send(SAMPLE[ftype])
        assert channel.state is state


def test_receiver_full_channel() -> None:
    channel = ChannelState.receiver()
    channel.on_frame(Hello(JOB, 1, 2))
    assert (channel.state, channel.channel_index) == (ReceiverState.HANDSHAKE, 1)
    channel.on_send(Welcome(JOB))
    channel.on_frame(PacketHeader(1, 4, 4, 1024, 5, b"\x05"))
    channel.on_frame(ZeroRange(3, 5))
    channel.on_frame(PacketHeader(9, 36, 4, 2048, 6, b"\x00"))
    assert (channel.packets, channel.payload_bytes) == (7, 3072)
    channel.on_frame(End(7, 3072))
    assert channel.state is ReceiverState.ENDED
    assert channel.end == End(7, 3072)
    channel.on_eof()  # channel 1 has nothing left to do after END
    assert channel.state is ReceiverState.ENDED


def test_receiver_version_mismatch() -> None:
    channel = ChannelState.receiver()
    with pytest.raises(RemoteProtocolError) as info:
        channel.on_frame(Hello(JOB, 0, 1, MANIFEST, version=2))
    assert str(info.value) == "protocol version 2 not supported (this receiver speaks 1)"
    assert info.value.code is ErrorCode.VERSION
    assert channel.state is ReceiverState.ERROR
    # The answer to it may still be sent.
    channel.on_send(Error(ErrorCode.VERSION, str(info.value)))
    with pytest.raises(LocalProtocolError, match="cannot send ERROR in state ERROR"):
        channel.on_send(Error(ErrorCode.VERSION, "twice"))


def test_receiver_manifest_placement() -> None:
    with pytest.raises(RemoteProtocolError, match="HELLO on channel 0 without a manifest"):
        ChannelState.receiver().on_frame(Hello(JOB, 0, 2))
    with pytest.raises(RemoteProtocolError, match="HELLO on channel 1 with a manifest"):
        ChannelState.receiver().on_frame(Hello(JOB, 1, 2, MANIFEST))


def test_receiver_specific_order_errors() -> None:
    with pytest.raises(RemoteProtocolError, match="PACKET received in state AWAIT_HELLO"):
        ChannelState.receiver().on_frame(SAMPLE[FrameType.PACKET])
    # Data before our WELCOME went out: the sender did not wait for it.
    with pytest.raises(
        RemoteProtocolError, match="PACKET received in state HANDSHAKE on channel 0"
    ):
        receiver_in(ReceiverState.HANDSHAKE).on_frame(SAMPLE[FrameType.PACKET])
    with pytest.raises(
        RemoteProtocolError, match="PACKET received in state ENDED on channel 0; expected"
    ):
        receiver_in(ReceiverState.ENDED).on_frame(SAMPLE[FrameType.PACKET])
    with pytest.raises(RemoteProtocolError, match="HELLO received in state STREAMING"):
        receiver_in(ReceiverState.STREAMING).on_frame(SAMPLE[FrameType.HELLO])
    with pytest.raises(
        RemoteProtocolError,
        match="COMMIT_REQUEST received in state STREAMING on channel 0; expected PACKET or "
        "ZERO_RANGE or END",
    ):
        receiver_in(ReceiverState.STREAMING).on_frame(SAMPLE[FrameType.COMMIT_REQUEST])


def test_receiver_commit_request_on_other_channel() -> None:
    channel = ChannelState.receiver()
    channel.on_frame(Hello(JOB, 3, 4))
    channel.on_send(Welcome(JOB))
    channel.on_frame(End(0, 0))
    with pytest.raises(RemoteProtocolError) as info:
        channel.on_frame(CommitRequest(0, 0, 0, DIGEST))
    assert str(info.value) == "COMMIT_REQUEST on channel 3 (only channel 0 may commit)"
    assert channel.state is ReceiverState.ERROR


@pytest.mark.parametrize(
    ("end", "message"),
    [
        (End(3, 300), "END packets 3 does not match the 2 packets received on channel 0"),
        (End(1, 300), "END packets 1 does not match the 2 packets received on channel 0"),
        (
            End(2, 301),
            "END payload_bytes 301 does not match the 300 payload bytes received on channel 0",
        ),
    ],
)
def test_receiver_end_mismatch(end: End, message: str) -> None:
    channel = receiver_in(ReceiverState.STREAMING)
    channel.on_frame(PacketHeader(0, 0, 4, 300, 1, b"\x00"))
    channel.on_frame(ZeroRange(1, 1))
    with pytest.raises(RemoteProtocolError) as info:
        channel.on_frame(end)
    assert str(info.value) == message
    assert channel.state is ReceiverState.ERROR


def test_receiver_peer_error_is_recorded() -> None:
    channel = receiver_in(ReceiverState.STREAMING)
    channel.on_frame(Error(ErrorCode.CANCELLED, "operator"))
    assert channel.state is ReceiverState.ERROR
    assert channel.error == Error(ErrorCode.CANCELLED, "operator")
    with pytest.raises(
        RemoteProtocolError, match="PACKET received in state ERROR on channel 0; expected nothing"
    ):
        channel.on_frame(SAMPLE[FrameType.PACKET])


def test_receiver_welcome_must_match_hello() -> None:
    channel = receiver_in(ReceiverState.HANDSHAKE)
    with pytest.raises(LocalProtocolError, match="does not echo HELLO job_id"):
        channel.on_send(Welcome(OTHER_JOB))
    with pytest.raises(LocalProtocolError, match="WELCOME features 0x1 not offered by HELLO"):
        channel.on_send(Welcome(JOB, features=1))
    with pytest.raises(LocalProtocolError, match="WELCOME version 2 is not 1"):
        channel.on_send(Welcome(JOB, version=2))
    assert channel.state is ReceiverState.HANDSHAKE


@pytest.mark.parametrize(
    ("state", "clean"),
    [
        (ReceiverState.AWAIT_HELLO, False),
        (ReceiverState.HANDSHAKE, False),
        (ReceiverState.STREAMING, False),
        (ReceiverState.ENDED, False),  # channel 0 still owes COMMIT_REQUEST
        (ReceiverState.COMMITTING, False),
        (ReceiverState.CLOSED, True),
        (ReceiverState.ERROR, True),
    ],
)
def test_receiver_eof(state: ReceiverState, clean: bool) -> None:
    channel = receiver_in(state)
    if clean:
        channel.on_eof()
        assert channel.state is state
    else:
        with pytest.raises(
            RemoteProtocolError, match=f"closed by the sender in state {state.name}"
        ):
            channel.on_eof()
        assert channel.state is ReceiverState.ERROR


# -- sender -------------------------------------------------------------------


def sender_in(state: SenderState, channel_index: int = 0) -> ChannelState:
    """A sender channel driven to ``state`` by legal steps."""
    channel = ChannelState.sender()
    manifest = MANIFEST if channel_index == 0 else None
    steps: list[tuple[str, Frame]] = [
        ("send", Hello(JOB, channel_index, 2, manifest)),
        ("recv", Welcome(JOB)),
        ("send", End(0, 0)),
        ("send", CommitRequest(3, 11, 0, DIGEST)),
        ("recv", Commit(DIGEST)),
    ]
    order = [
        SenderState.IDLE,
        SenderState.AWAIT_WELCOME,
        SenderState.STREAMING,
        SenderState.ENDED,
        SenderState.AWAIT_COMMIT,
        SenderState.DONE,
    ]
    if state is SenderState.ERROR:
        channel.on_frame(Error(ErrorCode.REJECTED, "busy"))
        return channel
    for direction, frame in steps[: order.index(state)]:
        (channel.on_frame if direction == "recv" else channel.on_send)(frame)
    assert channel.state is state
    return channel


SENDER_MAY_SEND = {
    SenderState.IDLE: {FrameType.HELLO, FrameType.ERROR},
    SenderState.AWAIT_WELCOME: {FrameType.ERROR},
    SenderState.STREAMING: {
        FrameType.PACKET,
        FrameType.ZERO_RANGE,
        FrameType.END,
        FrameType.ROUND,
        FrameType.SUMS_REQUEST,
        FrameType.ERROR,
    },
    SenderState.ENDED: {FrameType.COMMIT_REQUEST, FrameType.ERROR},
    SenderState.AWAIT_COMMIT: {FrameType.ERROR},
    SenderState.DONE: set(),
    SenderState.ERROR: {FrameType.ERROR},
}
SENDER_MAY_RECEIVE = {
    SenderState.IDLE: {FrameType.ERROR},
    SenderState.AWAIT_WELCOME: {FrameType.WELCOME, FrameType.ERROR},
    SenderState.STREAMING: {FrameType.ACK, FrameType.RESUME_STATE, FrameType.ROUND_DONE,
                            FrameType.SUMS, FrameType.ERROR},
    SenderState.ENDED: {FrameType.ACK, FrameType.ERROR},
    SenderState.AWAIT_COMMIT: {FrameType.COMMIT, FrameType.ACK, FrameType.ERROR},
    SenderState.DONE: {FrameType.ERROR},
    SenderState.ERROR: set(),
}


@pytest.mark.parametrize("ftype", KEYLESS_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("state", KEYLESS_SENDER, ids=lambda s: s.name)
def test_sender_send_table(state: SenderState, ftype: FrameType) -> None:
    channel = sender_in(state)
    if ftype in SENDER_MAY_SEND[state]:
        channel.on_send(SAMPLE[ftype])
        expected = {
            FrameType.HELLO: SenderState.AWAIT_WELCOME,
            FrameType.PACKET: SenderState.STREAMING,
            FrameType.ZERO_RANGE: SenderState.STREAMING,
            FrameType.ROUND: SenderState.STREAMING,
            FrameType.SUMS_REQUEST: SenderState.STREAMING,
            FrameType.END: SenderState.ENDED,
            FrameType.COMMIT_REQUEST: SenderState.AWAIT_COMMIT,
            FrameType.ERROR: SenderState.ERROR,
        }[ftype]
        assert channel.state is expected
    else:
        with pytest.raises(LocalProtocolError, match=f"cannot send {ftype.name} in state"):
            channel.on_send(SAMPLE[ftype])
        assert channel.state is state


@pytest.mark.parametrize("ftype", KEYLESS_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("state", KEYLESS_SENDER, ids=lambda s: s.name)
def test_sender_receive_table(state: SenderState, ftype: FrameType) -> None:
    channel = sender_in(state)
    if ftype in SENDER_MAY_RECEIVE[state]:
        channel.on_frame(SAMPLE[ftype])
        expected = {
            FrameType.WELCOME: SenderState.STREAMING,
            FrameType.COMMIT: SenderState.DONE,
            FrameType.ERROR: SenderState.ERROR,
        }.get(ftype, state)  # ACK and RESUME_STATE keep the state
        assert channel.state is expected
    else:
        with pytest.raises(RemoteProtocolError) as info:
            channel.on_frame(SAMPLE[ftype])
        assert str(info.value).startswith(f"{ftype.name} received in state {state.name}")
        assert channel.state is SenderState.ERROR


def test_sender_full_channel_and_counters() -> None:
    channel = sender_in(SenderState.STREAMING, channel_index=1)
    channel.on_send(PacketHeader(1, 4, 4, 1024, 5, b"\x05"))
    channel.on_send(ZeroRange(2, 1))
    assert (channel.packets, channel.payload_bytes) == (2, 1024)
    with pytest.raises(
        LocalProtocolError,
        match="END packets 3 payload_bytes 1024 does not match the 2 packets and 1024",
    ):
        channel.on_send(End(3, 1024))
    channel.on_send(End(2, 1024))
    with pytest.raises(LocalProtocolError, match=r"COMMIT_REQUEST on channel 1 \(only channel 0"):
        channel.on_send(CommitRequest(3, 11, 0, DIGEST))
    channel.on_eof()
    assert channel.state is SenderState.ENDED


def test_sender_on_send_data_counts_like_on_send() -> None:
    channel = sender_in(SenderState.STREAMING, channel_index=1)
    channel.on_send_data(1, 1, 1024)  # a PACKET
    channel.on_send_data(1, 3, 0)  # a ZERO_RANGE of 3 packets
    assert (channel.data_frames, channel.packets, channel.payload_bytes) == (2, 4, 1024)
    channel.on_send(End(4, 1024))
    with pytest.raises(LocalProtocolError, match="cannot send data in state ENDED"):
        channel.on_send_data(1, 1, 0)
    with pytest.raises(LocalProtocolError, match="cannot send data in state AWAIT_WELCOME"):
        sender_in(SenderState.AWAIT_WELCOME).on_send_data(1, 1, 0)


def test_sender_hello_checks() -> None:
    with pytest.raises(LocalProtocolError, match="the manifest goes on channel 0 only"):
        ChannelState.sender().on_send(Hello(JOB, 0, 2))
    with pytest.raises(LocalProtocolError, match="the manifest goes on channel 0 only"):
        ChannelState.sender().on_send(Hello(JOB, 1, 2, MANIFEST))
    with pytest.raises(LocalProtocolError, match="HELLO version 2 is not 1"):
        ChannelState.sender().on_send(Hello(JOB, 0, 2, MANIFEST, version=2))


def test_sender_welcome_checks() -> None:
    channel = sender_in(SenderState.AWAIT_WELCOME)
    with pytest.raises(RemoteProtocolError) as info:
        channel.on_frame(Welcome(JOB, version=3))
    assert str(info.value) == "WELCOME version 3 not supported (this sender speaks 1)"
    assert info.value.code is ErrorCode.VERSION
    assert channel.state is SenderState.ERROR

    with pytest.raises(RemoteProtocolError, match="does not match HELLO job_id"):
        sender_in(SenderState.AWAIT_WELCOME).on_frame(Welcome(OTHER_JOB))
    with pytest.raises(RemoteProtocolError, match="WELCOME features 0x4 not offered by HELLO"):
        sender_in(SenderState.AWAIT_WELCOME).on_frame(Welcome(JOB, features=4))


def test_sender_commit_digest_must_match() -> None:
    channel = sender_in(SenderState.AWAIT_COMMIT)
    with pytest.raises(RemoteProtocolError) as info:
        channel.on_frame(Commit(bytes(32)))
    assert info.value.code is ErrorCode.INTEGRITY
    assert "COMMIT digest 0000" in str(info.value)
    assert channel.state is SenderState.ERROR
    done = sender_in(SenderState.AWAIT_COMMIT)
    done.on_frame(Commit(DIGEST))
    assert done.commit == Commit(DIGEST)


def test_sender_records_receiver_error() -> None:
    channel = sender_in(SenderState.STREAMING)
    channel.on_frame(Error(ErrorCode.IO, "disk full"))
    assert channel.error == Error(ErrorCode.IO, "disk full")
    assert channel.state is SenderState.ERROR


@pytest.mark.parametrize(
    ("state", "clean"),
    [
        (SenderState.IDLE, False),
        (SenderState.AWAIT_WELCOME, False),
        (SenderState.STREAMING, False),
        (SenderState.ENDED, False),
        (SenderState.AWAIT_COMMIT, False),
        (SenderState.DONE, True),
        (SenderState.ERROR, True),
    ],
)
def test_sender_eof(state: SenderState, clean: bool) -> None:
    channel = sender_in(state)
    if clean:
        channel.on_eof()
        assert channel.state is state
    else:
        with pytest.raises(
            RemoteProtocolError, match=f"closed by the receiver in state {state.name}"
        ):
            channel.on_eof()
        assert channel.state is SenderState.ERROR


# -- PacketTracker ---------------------------------------------------------------

# 30 pages of 512 bytes, the last one 100 bytes: 8 packets of 4 pages, the
# last packet has 2 pages.
TM = Manifest(29 * 512 + 100, 512, 4)


def header(n: int, bitmap: bytes = b"\x00", crc: int = 0, **changes: int) -> PacketHeader:
    """A PACKET header for TM packet ``n`` that passes check_packet, unless changed."""
    pages = TM.pages_in_packet(n)
    fields = {
        "packet_number": n,
        "first_page": n * 4,
        "page_count": pages,
        "payload_length": TM.payload_length(n, bitmap),
        "payload_crc": crc,
    }
    fields.update(changes)
    return PacketHeader(zero_bitmap=bitmap, **fields)


def test_tracker_counts_and_completion() -> None:
    tracker = PacketTracker(TM)
    assert (TM.packet_count, TM.page_count) == (8, 30)
    assert (tracker.missing(), tracker.complete) == (8, False)
    for n, bitmap in [(0, b"\x00"), (1, b"\x05"), (7, b"\x01")]:
        hdr = header(n, bitmap, crc=n)
        tracker.check_packet(hdr)
        tracker.packet_done(hdr, n)
    tracker.check_zero_range(ZeroRange(2, 5))
    tracker.zero_range_done(ZeroRange(2, 5))
    assert tracker.complete
    assert tracker.missing() == 0
    assert tracker.received_packets == 8
    # Zero pages: 0 + 2 + 5 * 4 + 1; normal: the rest of the 30.
    assert (tracker.zero_pages, tracker.normal_pages) == (23, 7)
    assert tracker.payload_bytes == 4 * 512 + 2 * 512 + 100


def test_tracker_packet_out_of_range() -> None:
    tracker = PacketTracker(TM)
    with pytest.raises(RemoteProtocolError) as info:
        tracker.check_packet(header(7, packet_number=9))
    assert str(info.value) == "PACKET packet_number 9 out of range (packet_count 8)"


def test_tracker_duplicate_packet() -> None:
    tracker = PacketTracker(TM)
    tracker.check_packet(header(3))
    # Claimed at check time: the same packet on another channel fails before
    # its payload is written.
    with pytest.raises(RemoteProtocolError, match="PACKET packet_number 3 received twice"):
        tracker.check_packet(header(3))
    tracker.packet_done(header(3), 0)
    with pytest.raises(RemoteProtocolError, match="PACKET packet_number 3 received twice"):
        tracker.check_packet(header(3))


@pytest.mark.parametrize(
    ("hdr", "message"),
    [
        (header(2, first_page=9), "PACKET 2 first_page 9, expected 8"),
        (header(2, page_count=3, first_page=8), "PACKET 2 page_count 3, expected 4"),
        (header(7, page_count=4), "PACKET 7 page_count 4, expected 2"),
        (header(2, payload_length=2047), "PACKET 2 payload_length 2047, expected 2048"),
        (header(7, payload_length=1024), "PACKET 7 payload_length 1024, expected 612"),
        (header(7, b"\x01", payload_length=512), "PACKET 7 payload_length 512, expected 100"),
    ],
)
def test_tracker_packet_against_manifest(hdr: PacketHeader, message: str) -> None:
    tracker = PacketTracker(TM)
    with pytest.raises(RemoteProtocolError) as info:
        tracker.check_packet(hdr)
    assert str(info.value).startswith(message)
    # A refused packet is not claimed.
    tracker.check_packet(header(hdr.packet_number))


def test_tracker_payload_crc_mismatch() -> None:
    tracker = PacketTracker(TM)
    hdr = header(0, crc=0x1234)
    tracker.check_packet(hdr)
    with pytest.raises(RemoteProtocolError) as info:
        tracker.packet_done(hdr, 0x1235)
    assert info.value.code is ErrorCode.INTEGRITY
    assert str(info.value) == (
        "PACKET 0 payload_crc 0x00001234 does not match the payload (CRC32C 0x00001235)"
    )
    assert tracker.received_packets == 0


def test_tracker_done_without_check() -> None:
    tracker = PacketTracker(TM)
    with pytest.raises(LocalProtocolError, match=r"packet_done\(1\) without a successful check"):
        tracker.packet_done(header(1), 0)
    with pytest.raises(LocalProtocolError, match=r"zero_range_done\(1, 2\) without"):
        tracker.zero_range_done(ZeroRange(1, 2))


@pytest.mark.parametrize(
    ("zr", "message"),
    [
        (ZeroRange(8, 1), "ZERO_RANGE first_packet 8 out of range (packet_count 8)"),
        (ZeroRange(6, 3), "ZERO_RANGE first_packet 6 + packet_count 3 exceeds packet_count 8"),
        (ZeroRange(0, 2**64 - 1), "ZERO_RANGE first_packet 0 + packet_count"),
    ],
)
def test_tracker_zero_range_bounds(zr: ZeroRange, message: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        PacketTracker(TM).check_zero_range(zr)
    assert str(info.value).startswith(message)


def test_tracker_zero_range_overlap() -> None:
    tracker = PacketTracker(TM)
    tracker.check_packet(header(4))
    tracker.packet_done(header(4), 0)
    tracker.check_zero_range(ZeroRange(6, 2))
    with pytest.raises(RemoteProtocolError) as info:
        tracker.check_zero_range(ZeroRange(2, 3))
    assert str(info.value) == "ZERO_RANGE packets 2..4 overlap packet 4, already received"
    with pytest.raises(RemoteProtocolError, match=r"packets 5\.\.6 overlap packet 6"):
        tracker.check_zero_range(ZeroRange(5, 2))
    with pytest.raises(RemoteProtocolError, match="PACKET packet_number 7 received twice"):
        tracker.check_packet(header(7))
    tracker.check_zero_range(ZeroRange(0, 4))  # the free ones are still free
    assert tracker.received_packets == 1


def test_tracker_refuses_huge_manifest() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        PacketTracker(Manifest(1 << 30, 512, 1), max_packets=1 << 20)
    assert info.value.code is ErrorCode.REJECTED
    assert str(info.value) == (
        "manifest packet_count 2097152 exceeds this receiver's limit of 1048576"
    )
    with pytest.raises(RemoteProtocolError, match="manifest checksum 3"):
        PacketTracker(Manifest(100, checksum=3))


def complete_tracker() -> tuple[PacketTracker, CommitRequest]:
    tracker = PacketTracker(TM)
    for n in range(7):
        tracker.check_packet(header(n, crc=n))
        tracker.packet_done(header(n, crc=n), n)
    tracker.check_zero_range(ZeroRange(7, 1))
    tracker.zero_range_done(ZeroRange(7, 1))
    return tracker, CommitRequest(8, 2, 28, tracker.digest())


def test_tracker_commit_request() -> None:
    tracker, request = complete_tracker()
    assert tracker.check_commit_request(request) == tracker.digest()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"packet_count": 9}, "COMMIT_REQUEST packet_count 9 does not match the receiver's 8"),
        ({"zero_pages": 3}, "COMMIT_REQUEST zero_pages 3 does not match the receiver's 2"),
        ({"normal_pages": 27}, "COMMIT_REQUEST normal_pages 27 does not match the receiver's 28"),
        ({"digest": bytes(32)}, "COMMIT_REQUEST digest 0000"),
    ],
)
def test_tracker_commit_request_mismatch(change: dict[str, object], message: str) -> None:
    tracker, request = complete_tracker()
    fields = {
        "packet_count": request.packet_count,
        "zero_pages": request.zero_pages,
        "normal_pages": request.normal_pages,
        "digest": request.digest,
        **change,
    }
    with pytest.raises(RemoteProtocolError) as info:
        tracker.check_commit_request(CommitRequest(**fields))  # type: ignore[arg-type]
    assert str(info.value).startswith(message)
    assert info.value.code is ErrorCode.INTEGRITY


def test_tracker_commit_request_incomplete() -> None:
    tracker = PacketTracker(TM)
    tracker.check_zero_range(ZeroRange(0, 5))
    tracker.zero_range_done(ZeroRange(0, 5))
    with pytest.raises(RemoteProtocolError) as info:
        tracker.check_commit_request(CommitRequest(8, 30, 0, tracker.digest()))
    assert str(info.value) == "COMMIT_REQUEST with 3 of 8 packets missing"
    assert info.value.code is ErrorCode.PROTOCOL


# -- JobDigest ------------------------------------------------------------------


def test_packet_record() -> None:
    assert packet_record(b"\x05", 0xDEADBEEF) == crc32c(b"\x05\xef\xbe\xad\xde")


@pytest.mark.parametrize(
    ("manifest", "zero_range"),
    [
        (Manifest(30 * 512, 512, 4), (0, 8)),  # last packet: 2 full pages
        (Manifest(29 * 512 + 1, 512, 4), (5, 3)),  # last packet: 2 pages, short tail
        (Manifest(24 * 512, 512, 12), (0, 2)),  # bitmap of two bytes
        (Manifest(100, 512, 4), (0, 1)),  # one packet, one short page
    ],
)
def test_zero_packet_records_agree(manifest: Manifest, zero_range: tuple[int, int]) -> None:
    """A PACKET of zero pages (all bits, no payload) and a ZERO_RANGE give the same records."""
    as_packets = JobDigest(manifest)
    as_range = JobDigest(manifest)
    first, count = zero_range
    for n in range(first, first + count):
        as_packets.record_packet(n, manifest.full_zero_bitmap(n), 0)
    as_range.record_zero_range(first, count)
    for n in range(manifest.packet_count):
        assert as_packets.record(n) == as_range.record(n)
    assert as_packets.digest() == as_range.digest()
    last = manifest.packet_count - 1
    if first + count - 1 == last:
        expected = crc32c(manifest.full_zero_bitmap(last) + bytes(4))
        assert as_range.record(last) == expected


def test_last_short_packet_record_differs() -> None:
    manifest = Manifest(9 * 512, 512, 4)  # last packet has one page: bitmap 0x01
    digest = JobDigest(manifest)
    digest.record_zero_range(0, 3)
    assert digest.record(0) == crc32c(b"\x0f" + bytes(4))
    assert digest.record(2) == crc32c(b"\x01" + bytes(4))


def test_digest_of_empty_image() -> None:
    assert JobDigest(Manifest(0)).digest() == hashlib.sha256(b"").digest()


def test_digest_range_checks_do_not_resize() -> None:
    digest = JobDigest(Manifest(8 * 512, 512, 4))  # 2 packets
    before = digest.digest()
    for first, count in [(1, 2), (2, 1), (-1, 1), (0, 0)]:
        with pytest.raises(ValueError, match="out of range"):
            digest.record_zero_range(first, count)
    with pytest.raises(ValueError, match="out of range"):
        digest.record_packet(2, b"\x00", 0)
    with pytest.raises(ValueError, match="out of range"):
        digest.record_packet(-1, b"\x00", 0)
    assert digest.digest() == before


def test_an_ack_of_frames_never_sent_is_refused() -> None:
    channel = ChannelState.sender()
    channel.on_send(Hello(JOB, 0, 1, MANIFEST))
    channel.on_frame(Welcome(JOB))
    channel.on_send_data(2, 9, 4096)
    channel.on_frame(Ack(2, 9))
    with pytest.raises(RemoteProtocolError, match="ACK of 3 frames on channel 0, only 2 sent"):
        channel.on_frame(Ack(3, 10))
    assert channel.state is SenderState.ERROR
