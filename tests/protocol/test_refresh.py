"""The refresh exchange's rules (SUMS, SUMS_REQUEST), on both sides, without I/O."""

from __future__ import annotations

from array import array

import pytest

from dsamig.proto import (
    FrameDecoder,
    Manifest,
    RemoteProtocolError,
    Sums,
    SumsRequest,
    encode,
)
from dsamig.proto.frames import MAX_SUMS_PAGES, SUMS_PAGES, FrameType
from dsamig.proto.refresh import SumsBudget, SumsExchange, packet_fingerprint, packet_runs

SEED = bytes(range(1, 17))
MANIFEST = Manifest(image_size=10 * 128 * 4096 + 4096 * 3, page_size=4096, packet_pages=128)


def packet_sums(first: int, count: int, *, last: bool = False, seed: bytes = SEED) -> Sums:
    return Sums(first, count, seed, array("Q", range(first, first + count)).tobytes(),
                array("I", range(count)).tobytes(), last=last)


def page_sums(first: int, count: int, pages: int) -> Sums:
    return Sums(first, count, SEED, bytes(8 * pages), page_count=pages,
                zero_bitmap=bytes((pages + 7) // 8), pages=True)


def test_frames_round_trip() -> None:
    for frame in (packet_sums(3, 2, last=True), page_sums(1, 2, 256), SumsRequest(7, 3)):
        decoder = FrameDecoder(expect_preamble=False)
        decoder.receive_data(encode(frame))
        assert decoder.next_event() == frame


@pytest.mark.parametrize(("body", "message"), [
    (lambda b: b[:-1], "body_length"),
    (lambda b: b + b"\x00", "body_length"),
])
def test_a_sums_frame_of_the_wrong_length_is_refused(body, message) -> None:
    raw = bytearray(encode(page_sums(0, 1, 128)))
    header, rest = raw[:8], body(bytes(raw[8:]))
    header[4:8] = len(rest).to_bytes(4, "little")
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(bytes(header) + rest)
    with pytest.raises(RemoteProtocolError, match=message):
        decoder.next_event()


def test_page_sums_with_bits_past_their_pages_are_refused() -> None:
    raw = bytearray(encode(page_sums(0, 1, 3)))
    raw[8 + 32] = 0xFF  # the zero bitmap: 3 pages, 5 padding bits set
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(bytes(raw))
    with pytest.raises(RemoteProtocolError, match="bits set past its pages"):
        decoder.next_event()


def test_page_sums_need_as_many_pages_as_packets_at_least() -> None:
    raw = bytearray(encode(page_sums(0, 1, 8)))
    assert raw[0] == FrameType.SUMS and raw[1] == SUMS_PAGES
    raw[8 + 8 : 8 + 12] = (9).to_bytes(4, "little")  # packet_count 9 > page_count 8
    decoder = FrameDecoder(expect_preamble=False)
    decoder.receive_data(bytes(raw))
    with pytest.raises(RemoteProtocolError, match="out of range"):
        decoder.next_event()


def test_packet_sums_arrive_in_order_from_zero_with_one_seed() -> None:
    exchange = SumsExchange(MANIFEST)
    with pytest.raises(RemoteProtocolError, match="from packet 2, expected 0"):
        exchange.packet_sums(packet_sums(2, 1))
    exchange.packet_sums(packet_sums(0, 4))
    with pytest.raises(RemoteProtocolError, match="seed changed"):
        exchange.packet_sums(packet_sums(4, 1, seed=bytes(15) + b"\x01"))
    with pytest.raises(RemoteProtocolError, match="is not flagged last"):
        exchange.packet_sums(packet_sums(4, 7))
    with pytest.raises(RemoteProtocolError, match="past the image's 11 packets"):
        exchange.packet_sums(packet_sums(4, 8, last=True))
    with pytest.raises(RemoteProtocolError, match="is flagged last"):
        exchange.packet_sums(packet_sums(4, 2, last=True))
    exchange.packet_sums(packet_sums(4, 7, last=True))
    assert (exchange.received, exchange.complete) == (11, True)
    assert list(exchange.fingerprints) == list(range(11))
    with pytest.raises(RemoteProtocolError, match="after the last one"):
        exchange.packet_sums(packet_sums(11, 1))


def test_an_all_zero_seed_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="16 random bytes"):
        SumsExchange(MANIFEST).packet_sums(packet_sums(0, 1, seed=bytes(16)))


def test_page_sums_answer_the_oldest_request_exactly() -> None:
    exchange = SumsExchange(MANIFEST)
    with pytest.raises(RemoteProtocolError, match="nobody asked for"):
        exchange.page_sums(page_sums(0, 1, 128))
    exchange.asked(SumsRequest(2, 1))
    exchange.asked(SumsRequest(10, 1))
    with pytest.raises(RemoteProtocolError, match="asked for 2\\+1"):
        exchange.page_sums(page_sums(10, 1, 3))
    # The refused answer closed its request: the oldest is 10+1 now, of 3 pages.
    with pytest.raises(RemoteProtocolError, match="those packets have 3"):
        exchange.page_sums(page_sums(10, 1, 4))
    exchange = SumsExchange(MANIFEST)
    exchange.asked(SumsRequest(9, 2))
    zero, fingerprints = exchange.page_sums(page_sums(9, 2, 131))
    assert (len(zero), len(fingerprints), exchange.waiting) == (17, 131, 0)


def test_requests_are_runs_within_the_page_bound() -> None:
    manifest = Manifest(image_size=200 * 64 * 4096, page_size=4096, packet_pages=64)
    runs = packet_runs(manifest, [1, 2, 3, 7, *range(50, 200)])
    per_frame = MAX_SUMS_PAGES // 64
    assert runs[:2] == [SumsRequest(1, 3), SumsRequest(7, 1)]
    assert [r.packet_count for r in runs[2:]] == [per_frame, 150 - per_frame]
    assert packet_runs(manifest, []) == []


def test_the_receiver_answers_only_what_it_summed_within_a_budget() -> None:
    budget = SumsBudget(MANIFEST)
    with pytest.raises(RemoteProtocolError, match="not sent yet"):
        budget.check(SumsRequest(3, 2), summed_packets=4)
    with pytest.raises(RemoteProtocolError, match="past the image's 11 packets"):
        budget.check(SumsRequest(10, 2), summed_packets=11)
    assert budget.check(SumsRequest(10, 1), summed_packets=11) == 3
    spent = 3
    with pytest.raises(RemoteProtocolError, match="more than this job's"):
        while True:
            spent += budget.check(SumsRequest(0, 10), summed_packets=11)
    assert spent <= budget.budget


def test_the_packet_fingerprint_is_keyed() -> None:
    pages = array("Q", [1, 2, 3]).tobytes()
    assert packet_fingerprint(pages, SEED) != packet_fingerprint(pages, bytes(16 * [9]))
    assert packet_fingerprint(pages, SEED) == packet_fingerprint(memoryview(pages), SEED)
