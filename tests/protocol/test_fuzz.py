"""The fuzz rule: any bytes, cut anywhere, either decode or raise RemoteProtocolError.

Nothing else may escape (no struct.error, IndexError, UnicodeDecodeError,
LocalProtocolError ...), and the decoder never holds more than one frame
header and body beyond what was fed in one call.
"""

from __future__ import annotations

import contextlib
import os
import struct
import typing
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsamig.proto import (
    CLOSED,
    FRAME_HEADER_SIZE,
    MAX_BODY,
    NEED_DATA,
    PREAMBLE,
    Commit,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    Manifest,
    PacketHeader,
    PayloadChunk,
    RemoteProtocolError,
    Welcome,
    encode,
)
from tests.protocol.helpers import feed_zero_copy
from tests.protocol.pair import JobPair, SendFailed, job_streams, make_image

# DSAMIG_FUZZ_EXAMPLES raises the count for a long local or nightly run.
FUZZ = settings(
    max_examples=int(os.environ.get("DSAMIG_FUZZ_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Every frame the decoder may return: the members of the Frame alias, so a new
# frame type cannot be forgotten here.
FRAME_CLASSES = typing.get_args(Frame)
BUFFER_LIMIT = FRAME_HEADER_SIZE + MAX_BODY

splits = st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=16)


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` in pieces whose sizes cycle through ``sizes``."""
    pieces = []
    pos = 0
    i = 0
    while pos < len(data):
        pieces.append(data[pos : pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    return pieces


def run_decoder(data: bytes, sizes: list[int], *, expect_preamble: bool) -> list[object]:
    """Feed ``data`` cut by ``sizes`` and then EOF; return the events.

    RemoteProtocolError ends the run (it is allowed); anything else escapes
    and fails the test. Checks every event's type and the buffer bound.
    """
    decoder = FrameDecoder(expect_preamble=expect_preamble)
    events: list[object] = []
    payload_due = 0
    try:
        for piece in [*cut(data, sizes), b""]:
            decoder.receive_data(piece)
            while True:
                event = decoder.next_event()
                if event is NEED_DATA:
                    assert decoder.buffered < BUFFER_LIMIT
                    break
                if event is CLOSED:
                    assert decoder.buffered == 0
                    return events
                if isinstance(event, PayloadChunk):
                    assert 0 < len(event.data) <= payload_due
                    payload_due -= len(event.data)
                else:
                    assert isinstance(event, FRAME_CLASSES), event
                    assert payload_due == 0
                    if isinstance(event, PacketHeader):
                        payload_due = event.payload_length
                assert decoder.payload_remaining == payload_due
                events.append(event)
    except RemoteProtocolError:
        return events
    raise AssertionError("EOF produced neither CLOSED nor RemoteProtocolError")


@FUZZ
@given(data=st.binary(max_size=3000), sizes=splits, expect_preamble=st.booleans())
def test_arbitrary_bytes(data: bytes, sizes: list[int], expect_preamble: bool) -> None:
    run_decoder(data, sizes, expect_preamble=expect_preamble)


@st.composite
def plausible_frame(draw: st.DrawFn) -> bytes:
    """A frame header with a known type and a body of about the right size.

    Random bytes almost never get past the type byte; these reach the
    per-type body checks.
    """
    ftype = draw(st.sampled_from([int(t) for t in FrameType]))
    flags = draw(st.sampled_from([0, 0, 0, 1, 2, 0x80]))
    natural = {
        0x01: [32, 64, 67, 99],
        0x02: [24],
        0x03: [68],
        0x10: [33, 34, 48, 544],
        0x11: [16],
        0x12: [16],
        0x13: [56],
        0x14: [32],
        0x15: [16],
        0x16: [17, 18, 21, 22, 1040],
        0x7F: [4, 9, 100],
    }.get(ftype, [0, 8, 40])
    length = draw(st.one_of(st.sampled_from(natural), st.integers(0, 700)))
    body = draw(st.binary(min_size=length, max_size=length))
    if ftype == 0x01 and length >= 32 and draw(st.booleans()):
        # Make the counts of a HELLO plausible so its tail gets parsed.
        body = (
            struct.pack("<HHI16sHHHH", 1, 0, 0, bytes(16), 0, 1, 0, max(0, length - 64)) + body[32:]
        )
    if ftype == 0x10 and length >= 32 and draw(st.booleans()):
        page_count = draw(st.integers(1, 4096))
        payload_length = draw(st.integers(0, 64))
        body = struct.pack("<QQIIIHH", 0, 0, page_count, payload_length, 0, 0, 0) + body[32:]
    return struct.pack("<BBHI", ftype, flags, 0, length) + body


@FUZZ
@given(
    frames=st.lists(plausible_frame(), max_size=6),
    tail=st.binary(max_size=200),
    sizes=splits,
    preamble=st.booleans(),
)
def test_plausible_frames(
    frames: list[bytes], tail: bytes, sizes: list[int], preamble: bool
) -> None:
    data = (PREAMBLE if preamble else b"") + b"".join(frames) + tail
    run_decoder(data, sizes, expect_preamble=preamble)


@FUZZ
@given(data=st.binary(max_size=2000), sizes=splits)
def test_preamble_then_arbitrary_bytes(data: bytes, sizes: list[int]) -> None:
    run_decoder(PREAMBLE + data, sizes, expect_preamble=True)


JOB_IMAGE = make_image(512, [1, None, 2, None, None, None, None, None, 3, 4], tail=100)


JOB_STREAMS = job_streams(JOB_IMAGE, packet_pages=2, channels=2)


def _valid_streams() -> list[tuple[bytes, bool]]:
    """A few well-formed streams of both directions, to mutate."""
    job = JOB_STREAMS
    job_id = uuid.UUID(int=99)
    receiver_side = (
        encode(Welcome(job_id))
        + encode(Error(ErrorCode.IO, "disk full: ü"))
        + encode(Commit(bytes(range(32))))
    )
    one_channel = job_streams(make_image(512, [None, 7, None], tail=3), channels=1)
    manifest_hello = PREAMBLE + encode(Hello(job_id, 0, 3, Manifest(12345, 512, 3), "name"))
    return [
        *((s, True) for s in job),
        *((s, True) for s in one_channel),
        (receiver_side, False),
        (manifest_hello, True),
    ]


VALID_STREAMS = _valid_streams()


def job_pair(offer_acks: bool = True) -> JobPair:
    return JobPair(JOB_IMAGE, packet_pages=2, channels=2, chunk_packets=1, offer_acks=offer_acks)


JOB_DIGEST = job_pair().run().digest


def test_valid_streams_decode_cleanly() -> None:
    """The unmutated inputs of the tests below are valid, so mutations matter."""
    for data, preamble in VALID_STREAMS:
        events = run_decoder(data, [7], expect_preamble=preamble)
        assert events
        assert all(not isinstance(e, Error) or e.code is ErrorCode.IO for e in events)
    pair = job_pair()
    assert pair.run(step=13) == Commit(JOB_DIGEST)
    assert pair.sink.committed == JOB_IMAGE


@FUZZ
@given(
    which=st.integers(0, len(VALID_STREAMS) - 1),
    position=st.integers(min_value=0),
    xor=st.integers(1, 255),
    sizes=splits,
)
def test_one_mutated_byte(which: int, position: int, xor: int, sizes: list[int]) -> None:
    data, preamble = VALID_STREAMS[which]
    mutated = bytearray(data)
    mutated[position % len(data)] ^= xor
    run_decoder(bytes(mutated), sizes, expect_preamble=preamble)
    with contextlib.suppress(RemoteProtocolError):
        feed_zero_copy(FrameDecoder(expect_preamble=preamble), bytes(mutated), max_read=sizes[0])


@FUZZ
@given(
    channel=st.integers(0, len(JOB_STREAMS) - 1),
    position=st.integers(min_value=0),
    xor=st.integers(1, 255),
    truncate=st.booleans(),
    offer_acks=st.booleans(),
)
def test_job_with_one_mutated_byte(
    channel: int, position: int, xor: int, truncate: bool, offer_acks: bool
) -> None:
    """A whole job (the cores, the state machines, the decoder) with one byte
    of one channel changed, or the channel cut there: it fails with the
    receiver's ERROR, or, with ACKS, heals by sending again, or the byte did
    not matter; nothing but the image is ever committed, and nothing but a
    RemoteProtocolError's failure comes out of the receiver."""
    pair = job_pair(offer_acks)
    position %= len(JOB_STREAMS[channel])  # where in the first connection of the channel
    mangled = False

    def mangle(index: int, offset: int, data: bytes) -> bytes:
        nonlocal mangled
        if index != channel or mangled or not offset <= position < offset + len(data):
            return data
        mangled = True
        at = position - offset
        if truncate:
            return data[:at]
        return data[:at] + bytes([data[at] ^ xor]) + data[at + 1 :]

    pair.mangle = mangle
    try:
        commit = pair.run()
    except SendFailed:
        assert all(sink.final is None for sink in pair.receiver.sinks.values())
        return
    assert mangled
    assert commit == Commit(JOB_DIGEST)
    assert [sink.committed for sink in pair.receiver.sinks.values()] == [JOB_IMAGE]
