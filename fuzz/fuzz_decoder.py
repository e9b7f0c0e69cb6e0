"""Coverage-guided fuzzing of the wire codec with atheris (not part of the test suite).

The rule is the test suite's (tests/protocol/test_fuzz.py), run for longer
and guided by coverage: any bytes, cut anywhere, fed to a FrameDecoder whose
frames drive a channel state machine and, on the receiving side, a
PacketTracker, either parse or raise RemoteProtocolError.  Anything else
escaping is a crash that atheris reports with the input that caused it.

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/fuzz_decoder.py --make-corpus fuzz/corpus
    .venv/bin/python fuzz/fuzz_decoder.py fuzz/corpus -max_total_time=300

Every argument but ``--make-corpus`` goes to libFuzzer (``-runs=N``,
``-max_total_time=S``, ``-jobs=N``, a corpus directory, a crash file to
replay).  See docs/fuzzing.md.
"""

from __future__ import annotations

import os
import sys
import uuid

import atheris

with atheris.instrument_imports():
    from dsamig.checksum import crc32c
    from dsamig.proto import (
        CLOSED,
        NEED_DATA,
        PREAMBLE,
        Challenge,
        ChannelState,
        FrameDecoder,
        Hello,
        Manifest,
        PacketHeader,
        PacketTracker,
        PayloadChunk,
        RemoteProtocolError,
        Welcome,
        ZeroRange,
    )

KEY = bytes(range(32))
MAX_PACKETS = 4096  # a tracker for a bigger manifest is refused (REJECTED), not allocated


def split(data: bytes) -> tuple[bool, bool, list[int], bytes]:
    """An input is: a flags byte (bit 0: the receiving side, bit 1: with a key),
    a count byte (1..8 cut sizes), that many sizes (each byte x 2, 1..510), and
    the byte stream itself.  A plain layout keeps seed inputs easy to write."""
    flags = data[0] if data else 1
    count = (data[1] % 8 + 1) if len(data) > 1 else 1
    cuts = [max(1, 2 * b) for b in data[2 : 2 + count]] or [1]
    return bool(flags & 1), bool(flags & 2), cuts, data[2 + count :]


def run(data: bytes) -> None:
    """Feed one input to a decoder and the state it drives; see the module docstring."""
    receiving, keyed, cuts, stream = split(data)
    decoder = FrameDecoder(expect_preamble=receiving)
    psk = KEY if keyed else None
    receiver = ChannelState.receiver(psk=psk)
    sender = ChannelState.sender(psk=psk)
    if not receiving:
        # Put the sender where answers are expected: after its CHALLENGE or HELLO.
        if keyed:
            sender.on_send(Challenge(bytes(32)))
        else:
            sender.on_send(Hello(uuid.UUID(int=1), 0, 1, Manifest(1 << 20)))
    tracker: PacketTracker | None = None
    current: PacketHeader | None = None
    payload = bytearray()
    try:
        pos = i = 0
        while True:
            piece = stream[pos : pos + cuts[i % len(cuts)]]
            pos += len(piece)
            i += 1
            decoder.receive_data(piece)  # b"" at the end: the peer closed
            while True:
                event = decoder.next_event()
                if event is NEED_DATA:
                    break
                if event is CLOSED:
                    (receiver if receiving else sender).on_eof()
                    return
                if isinstance(event, PayloadChunk):
                    if current is None or tracker is None:
                        continue  # a channel without the job's manifest: not tracked here
                    payload += event.data
                    if len(payload) == current.payload_length:
                        tracker.packet_done(current, crc32c(payload))
                        current = None
                    continue
                if not receiving:
                    sender.on_frame(event)
                    continue
                receiver.on_frame(event)
                # Answer as the receiver would, so that the stream can go on.
                if isinstance(event, Challenge):
                    receiver.on_send(receiver.answer_challenge(bytes(32)))
                elif isinstance(event, Hello):
                    receiver.on_send(Welcome(event.job_id))
                    if event.manifest is not None:
                        tracker = PacketTracker(event.manifest, max_packets=MAX_PACKETS)
                elif isinstance(event, PacketHeader) and tracker is not None:
                    tracker.check_packet(event)
                    current, payload = event, bytearray()
                    if not event.payload_length:
                        tracker.packet_done(event, 0)
                        current = None
                elif isinstance(event, ZeroRange) and tracker is not None:
                    tracker.check_zero_range(event)
                    tracker.zero_range_done(event)
            if not piece:
                return
    except RemoteProtocolError:
        pass


def make_corpus(directory: str) -> None:
    """Seed inputs: whole valid jobs (both roles, with and without a key)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.protocol.pair import job_streams, make_image

    os.makedirs(directory, exist_ok=True)
    image = make_image(512, [1, None, 2, None, None, 3, 4, None, 5, 6, None, None, 7], 100)
    for n, stream in enumerate(job_streams(image, channels=2)):
        # Receiving, no key; one cut size (2 x 4 bytes, then 2 x 255).
        for cut in (4, 255):
            with open(os.path.join(directory, f"job-{n}-{cut}"), "wb") as f:
                f.write(bytes([1, 0, cut]) + stream)
    challenge = PREAMBLE + bytes([3, 0, 0, 0, 68, 0, 0, 0, 1]) + bytes(67)
    with open(os.path.join(directory, "challenge"), "wb") as f:
        f.write(bytes([3, 0, 16]) + challenge)
    # The sending side: a WELCOME, an ACK and a COMMIT as a receiver sends them.
    welcome = bytes([2, 0, 0, 0, 24, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]) + bytes(16)
    with open(os.path.join(directory, "welcome"), "wb") as f:
        f.write(bytes([0, 0, 3]) + welcome)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        make_corpus(sys.argv[2])
        sys.exit(0)
    atheris.Setup(sys.argv, run)
    atheris.Fuzz()
