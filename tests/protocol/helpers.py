"""Helpers for the protocol tests: feed decoders, build and receive whole jobs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from dsamig.checksum import crc32c
from dsamig.proto import (
    CLOSED,
    NEED_DATA,
    PREAMBLE,
    ChannelState,
    Commit,
    CommitRequest,
    End,
    ErrorCode,
    Event,
    FrameDecoder,
    Hello,
    JobDigest,
    Manifest,
    PacketHeader,
    PacketTracker,
    PayloadChunk,
    RemoteProtocolError,
    Welcome,
    ZeroRange,
    encode,
    encode_packet_header,
    encode_preamble,
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


def make_image(page_size: int, pages: list[int | None], tail: int = 0) -> bytes:
    """An image whose page i is zero (None) or filled with byte ``pages[i]``.

    With ``tail`` > 0 the last page is only ``tail`` bytes long.
    """
    image = bytearray()
    for value in pages:
        image += bytes(page_size) if value is None else bytes([value]) * page_size
    if tail and pages:
        del image[len(image) - page_size + tail :]
    return bytes(image)


def scan_packet(manifest: Manifest, image: bytes, n: int) -> tuple[bytes, bytes]:
    """(zero_bitmap, payload) of packet ``n``, computed page by page: the oracle."""
    first = n * manifest.packet_pages
    bits = 0
    payload = bytearray()
    for i in range(manifest.pages_in_packet(n)):
        start = (first + i) * manifest.page_size
        page = image[start : start + manifest.page_size]
        if page.count(0) == len(page):
            bits |= 1 << i
        else:
            payload += page
    return bits.to_bytes(Manifest.bitmap_length(manifest.pages_in_packet(n)), "little"), bytes(
        payload
    )


@dataclass
class SentJob:
    """A job encoded by :func:`send_job`: one byte stream per channel and totals."""

    job_id: uuid.UUID
    manifest: Manifest
    streams: list[bytes]
    digest: bytes
    zero_pages: int
    normal_pages: int
    commit_request: CommitRequest
    senders: list[ChannelState] = field(default_factory=list)


def send_job(
    image: bytes,
    *,
    page_size: int = 512,
    packet_pages: int = 4,
    channel_count: int = 2,
    zero_ranges: bool = True,
    name: str = "test-job",
) -> SentJob:
    """Encode ``image`` as a job, checked by ChannelState on every channel.

    Packets go round robin; a run of all-zero packets becomes one ZERO_RANGE
    (when ``zero_ranges``) on the channel of its first packet.
    """
    job_id = uuid.UUID(int=0x1234)
    manifest = Manifest(len(image), page_size, packet_pages)
    senders = [ChannelState.sender() for _ in range(channel_count)]
    streams = [bytearray(encode_preamble()) for _ in range(channel_count)]
    digest = JobDigest(manifest)
    zero_pages = normal_pages = 0

    def send(index: int, frame: object, payload: bytes = b"") -> None:
        senders[index].on_send(frame)  # type: ignore[arg-type]
        streams[index].extend(encode(frame) + payload)  # type: ignore[arg-type]

    for index in range(channel_count):
        send(index, Hello(job_id, index, channel_count, manifest if index == 0 else None, name))
        senders[index].on_frame(Welcome(job_id))
    n = 0
    while n < manifest.packet_count:
        index = n % channel_count
        bitmap, payload = scan_packet(manifest, image, n)
        pages = manifest.pages_in_packet(n)
        if zero_ranges and not payload:
            run = 1
            while n + run < manifest.packet_count and not scan_packet(manifest, image, n + run)[1]:
                run += 1
            send(index, ZeroRange(n, run))
            digest.record_zero_range(n, run)
            zero_pages += min((n + run) * packet_pages, manifest.page_count) - n * packet_pages
            n += run
            continue
        crc = crc32c(payload)
        header = PacketHeader(n, n * packet_pages, pages, len(payload), crc, bitmap)
        assert encode(header) == encode_packet_header(
            n, n * packet_pages, pages, len(payload), crc, bitmap
        )
        send(index, header, payload)
        digest.record_packet(n, bitmap, crc)
        zeros = int.from_bytes(bitmap, "little").bit_count()
        zero_pages += zeros
        normal_pages += pages - zeros
        n += 1
    for index, sender in enumerate(senders):
        send(index, End(sender.packets, sender.payload_bytes))
    request = CommitRequest(manifest.packet_count, zero_pages, normal_pages, digest.digest())
    send(0, request)
    return SentJob(
        job_id,
        manifest,
        [bytes(s) for s in streams],
        digest.digest(),
        zero_pages,
        normal_pages,
        request,
        senders,
    )


@dataclass
class ReceivedJob:
    """What :func:`receive_job` rebuilt: the image, the tracker and the states."""

    image: bytes
    tracker: PacketTracker
    channels: list[ChannelState]
    commit: Commit | None


def receive_job(
    streams: list[bytes], *, step: int | None = None, max_packets: int = 1 << 20
) -> ReceivedJob:
    """Run the receiver side of a job over its channel streams, in memory.

    Decoder, ChannelState and PacketTracker together, as the daemon
    will use them: channel 0 first (it opens the job), then the others;
    payloads are written into the rebuilt image and their CRC verified; the
    commit is checked once every channel is read. Raises whatever the
    protocol objects raise.
    """
    tracker: PacketTracker | None = None
    image = bytearray()
    channels: list[ChannelState] = []
    commit_request: CommitRequest | None = None
    # Channels whose sender closed; applied after COMMIT, since in memory the
    # whole stream (end included) is read before the receiver answers.
    closed: list[ChannelState] = []
    for data in streams:
        decoder = FrameDecoder(expect_preamble=True)
        channel = ChannelState.receiver()
        channels.append(channel)
        events = feed(decoder, data, step)
        decoder.receive_data(b"")
        drain(decoder, events)
        pending: PacketHeader | None = None
        payload = b""
        for event in events:
            if isinstance(event, PayloadChunk):
                payload = event.data
                continue
            if pending is not None:
                _store(tracker, image, pending, payload)
                pending, payload = None, b""
            if event is CLOSED:
                closed.append(channel)
                break
            assert not isinstance(event, PayloadChunk) and event is not NEED_DATA
            channel.on_frame(event)
            if isinstance(event, Hello):
                if event.manifest is not None:
                    tracker = PacketTracker(event.manifest, max_packets=max_packets)
                    image = bytearray(event.manifest.image_size)
                elif tracker is None:
                    # As the daemon does: channel 0 opens the job, others join it.
                    raise RemoteProtocolError(
                        f"HELLO job_id {event.job_id} names no open job", ErrorCode.REJECTED
                    )
                channel.on_send(Welcome(event.job_id))
            elif isinstance(event, PacketHeader):
                assert tracker is not None
                tracker.check_packet(event)
                pending = event
            elif isinstance(event, ZeroRange):
                assert tracker is not None
                tracker.check_zero_range(event)
                tracker.zero_range_done(event)
            elif isinstance(event, CommitRequest):
                commit_request = event
        if pending is not None:
            _store(tracker, image, pending, payload)
    # The shell waits for every channel to END before it commits: a channel
    # that closed early fails the job here.
    for channel in closed:
        if channel is not channels[0]:
            channel.on_eof()
    if tracker is None:
        channels[0].on_eof()  # channel 0 closed before its HELLO: raises
    assert tracker is not None
    commit = None
    if commit_request is not None:
        commit = Commit(tracker.check_commit_request(commit_request))
        channels[0].on_send(commit)
    channels[0].on_eof()
    return ReceivedJob(bytes(image), tracker, channels, commit)


def _store(
    tracker: PacketTracker | None, image: bytearray, hdr: PacketHeader, payload: bytes
) -> None:
    """Write a packet's normal pages where they belong and record it."""
    assert tracker is not None
    manifest = tracker.manifest
    assert len(payload) == hdr.payload_length
    bits = int.from_bytes(hdr.zero_bitmap, "little")
    pos = 0
    for i in range(hdr.page_count):
        page = hdr.first_page + i
        if bits >> i & 1:
            continue
        length = manifest.page_length(page)
        start = page * manifest.page_size
        image[start : start + length] = payload[pos : pos + length]
        pos += length
    tracker.packet_done(hdr, crc32c(payload))


__all__ = [
    "ReceivedJob",
    "SentJob",
    "chunks",
    "drain",
    "feed",
    "feed_zero_copy",
    "make_image",
    "receive_job",
    "scan_packet",
    "send_job",
    "transfer",
]
