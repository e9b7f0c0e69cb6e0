"""Helpers for the protocol tests: feed decoders whole, byte by byte, or as the
receiver's transport reads. Whole jobs are in tests/protocol/pair.py."""

from __future__ import annotations

from dsamig.proto import (
    CLOSED,
    NEED_DATA,
    PREAMBLE,
    Event,
    FrameDecoder,
    PayloadChunk,
)


def chunks(data: bytes, step: int | None) -> list[bytes]:
    """``data`` cut into pieces of ``step`` bytes (one piece when step is None)."""
    if step is None:
        return [data]
    return [data[i : i + step] for i in range(0, len(data), step)]


def drain(decoder: FrameDecoder, events: list[Event]) -> None:
    """Append events until NEED_DATA or CLOSED, merging a packet's payload chunks."""
    while True:
        event = decoder.next_event()
        if event is NEED_DATA:
            return
        if isinstance(event, PayloadChunk) and events and isinstance(events[-1], PayloadChunk):
            events[-1] = PayloadChunk(events[-1].data + event.data)
        else:
            events.append(event)
        if event is CLOSED:
            return


def feed(decoder: FrameDecoder, data: bytes, step: int | None = None) -> list[Event]:
    """Feed ``data`` in pieces of ``step`` bytes and collect the events.

    NEED_DATA is left out; consecutive PayloadChunks (one packet's payload)
    are concatenated into one.
    """
    events: list[Event] = []
    for piece in chunks(data, step):
        decoder.receive_data(piece)
        drain(decoder, events)
    return events


def transfer(
    sender_bytes: bytes, *, step: int | None = None, expect_preamble: bool | None = None
) -> list[Event]:
    """Decode a whole stream, then its end; the stream must end between frames.

    The receiver side (expecting a preamble) is chosen when the stream starts
    with one, unless ``expect_preamble`` says otherwise.
    """
    if expect_preamble is None:
        expect_preamble = sender_bytes.startswith(PREAMBLE)
    decoder = FrameDecoder(expect_preamble=expect_preamble)
    events = feed(decoder, sender_bytes, step)
    decoder.receive_data(b"")
    drain(decoder, events)
    assert events and events[-1] is CLOSED, events[-3:]
    return events[:-1]


def feed_zero_copy(decoder: FrameDecoder, data: bytes, max_read: int = 1 << 30) -> list[Event]:
    """Decode ``data`` the way the I/O shell does, never buffering payload bytes.

    Headers are read exactly as header_bytes_wanted() asks; payload goes
    "straight to its destination" (here a bytearray) and is reported with
    payload_received(). Payloads come back as one PayloadChunk per packet.
    """
    events: list[Event] = []
    pos = 0
    payload = bytearray()
    while True:
        if decoder.payload_remaining:
            assert decoder.buffered == 0
            n = min(decoder.payload_remaining, max_read, len(data) - pos)
            if n == 0:
                break
            payload += data[pos : pos + n]
            pos += n
            decoder.payload_received(n)
            if decoder.payload_remaining == 0:
                events.append(PayloadChunk(bytes(payload)))
                payload.clear()
            continue
        wanted = decoder.header_bytes_wanted()
        if wanted:
            n = min(wanted, max_read, len(data) - pos)
            if n == 0:
                break
            decoder.receive_data(data[pos : pos + n])
            pos += n
            continue
        event = decoder.next_event()
        assert event is not NEED_DATA
        assert not isinstance(event, PayloadChunk), "payload bytes reached the decoder's buffer"
        events.append(event)
    decoder.receive_data(b"")
    drain(decoder, events)
    return events


__all__ = ["chunks", "drain", "feed", "feed_zero_copy", "transfer"]
