"""Refreshing a committed copy: what each side sends and accepts, without I/O.

With feature REFRESH the receiver already holds an older copy of the image.
It sends the *packet sums* of that copy (per packet: a 64-bit fingerprint of
its page fingerprints, and its digest record), in order, unprompted; the
sender compares them with its own, asks for the *page sums* of the packets
that differ (SUMS_REQUEST), and then sends only the pages whose fingerprint
differs, as a live round's PAGE_LIST packets. See docs/protocol.md "Refresh".

:class:`SumsExchange` is the sender's side: it checks every SUMS frame
against the manifest and against what it asked for. :class:`SumsBudget` is
the receiver's: it bounds what a sender may make it read and hash.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import deque
from collections.abc import Iterable
from typing import Final

from dsamig.proto.errors import RemoteProtocolError
from dsamig.proto.frames import (
    MAX_SUMS_PACKETS,
    MAX_SUMS_PAGES,
    SUMS_SEED_SIZE,
    Manifest,
    Sums,
    SumsRequest,
)

#: A sender may ask for the page sums of each packet this many times over
#: (a new session may ask again), plus a little: past that it is refused.
PAGE_SUMS_BUDGET: Final = 2


def packet_fingerprint(page_fingerprints: bytes | memoryview, seed: bytes) -> int:
    """The fingerprint of a packet: keyed BLAKE2b (64 bits) of its pages'
    fingerprints as u64 LE, in order."""
    digest = hashlib.blake2b(page_fingerprints, digest_size=8, key=seed).digest()
    return int.from_bytes(digest, "little")


def packet_runs(manifest: Manifest, packets: Iterable[int]) -> list[SumsRequest]:
    """SUMS_REQUEST frames for ``packets`` (ascending): runs of consecutive
    packets, each within MAX_SUMS_PAGES pages."""
    requests: list[SumsRequest] = []
    first = count = pages = 0
    for n in packets:
        size = manifest.pages_in_packet(n)
        if count and n == first + count and pages + size <= MAX_SUMS_PAGES:
            count += 1
            pages += size
            continue
        if count:
            requests.append(SumsRequest(first, count))
        first, count, pages = n, 1, size
    if count:
        requests.append(SumsRequest(first, count))
    return requests


class SumsExchange:
    """The sender's record of the receiver's sums, each frame checked.

    Packet sums must arrive in order from packet 0, all with one seed, the
    last one flagged; page sums must answer the oldest request still open,
    exactly.
    """

    def __init__(self, manifest: Manifest) -> None:
        if manifest.packet_pages > MAX_SUMS_PAGES:
            raise ValueError(f"packets of {manifest.packet_pages} pages are too large to refresh")
        self.manifest = manifest
        self.seed: bytes | None = None
        count = manifest.packet_count
        self.fingerprints = array("Q", [0]) * count
        self.records = array("I", [0]) * count
        #: Packet sums received: those of packets 0 .. received - 1.
        self.received = 0
        self.complete = count == 0
        self._open: deque[SumsRequest] = deque()
        #: Bytes of SUMS received, for the stats.
        self.sums_bytes = 0

    def packet_sums(self, frame: Sums) -> None:
        """Take a frame of packet sums (RemoteProtocolError if it is not the next)."""
        assert not frame.pages
        self._check_seed(frame.seed)
        if self.complete:
            raise RemoteProtocolError("packet SUMS after the last one")
        if frame.first_packet != self.received:
            raise RemoteProtocolError(
                f"packet SUMS from packet {frame.first_packet}, expected {self.received}")
        end = frame.first_packet + frame.packet_count
        if end > self.manifest.packet_count:
            raise RemoteProtocolError(
                f"packet SUMS up to packet {end - 1}, past the image's "
                f"{self.manifest.packet_count} packets")
        if frame.last != (end == self.manifest.packet_count):
            raise RemoteProtocolError(f"packet SUMS ending at packet {end - 1} "
                                      f"{'is' if frame.last else 'is not'} flagged last")
        self.fingerprints[frame.first_packet : end] = array("Q", frame.fingerprints)
        self.records[frame.first_packet : end] = array("I", frame.records)
        self.received = end
        self.complete = frame.last
        self.sums_bytes += 12 * frame.packet_count

    def _check_seed(self, seed: bytes) -> None:
        if self.seed is None:
            if len(seed) != SUMS_SEED_SIZE or not any(seed):
                raise RemoteProtocolError("SUMS seed must be 16 random bytes")
            self.seed = seed
        elif seed != self.seed:
            raise RemoteProtocolError("SUMS seed changed during the job")

    def asked(self, request: SumsRequest) -> None:
        """A SUMS_REQUEST went out: its answer is due, after the ones before it."""
        self._open.append(request)

    @property
    def waiting(self) -> int:
        """Requests not answered yet."""
        return len(self._open)

    def page_sums(self, frame: Sums) -> tuple[bytes, array[int]]:
        """Take the answer to the oldest open request: ``(zero_bitmap,
        fingerprints)`` of its pages (RemoteProtocolError if it is not that)."""
        assert frame.pages
        if not self._open:
            raise RemoteProtocolError("page SUMS that nobody asked for")
        self._check_seed(frame.seed)
        request = self._open.popleft()
        if (frame.first_packet, frame.packet_count) != (request.first_packet,
                                                         request.packet_count):
            raise RemoteProtocolError(
                f"page SUMS of packets {frame.first_packet}+{frame.packet_count}, asked for "
                f"{request.first_packet}+{request.packet_count}")
        pages = self.manifest.range_pages(request.first_packet, request.packet_count)
        if frame.page_count != pages:
            raise RemoteProtocolError(
                f"page SUMS of {frame.page_count} pages, those packets have {pages}")
        self.sums_bytes += len(frame.zero_bitmap) + len(frame.fingerprints)
        return frame.zero_bitmap, array("Q", frame.fingerprints)


class SumsBudget:
    """The receiver's check of SUMS_REQUEST frames: in range, of packets whose
    sums were sent, and within a budget of page sums per job."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.budget = PAGE_SUMS_BUDGET * manifest.page_count + MAX_SUMS_PAGES
        self.spent = 0

    def check(self, request: SumsRequest, summed_packets: int) -> int:
        """The number of pages ``request`` covers; RemoteProtocolError if it
        may not be answered. ``summed_packets``: packet sums sent so far
        (packets 0 .. summed_packets - 1)."""
        count = self.manifest.packet_count
        end = request.first_packet + request.packet_count
        if end > count:
            raise RemoteProtocolError(
                f"SUMS_REQUEST for packets up to {end - 1}, past the image's {count} packets")
        if end > summed_packets:
            raise RemoteProtocolError(
                f"SUMS_REQUEST for packet {end - 1}, whose packet sums were not sent yet")
        pages = self.manifest.range_pages(request.first_packet, request.packet_count)
        if pages > MAX_SUMS_PAGES:
            raise RemoteProtocolError(
                f"SUMS_REQUEST for {pages} pages, more than {MAX_SUMS_PAGES} at once")
        self.spent += pages
        if self.spent > self.budget:
            raise RemoteProtocolError(
                f"SUMS_REQUEST for {self.spent} page sums in all, more than this job's "
                f"{self.budget}")
        return pages


__all__ = [
    "MAX_SUMS_PACKETS",
    "PAGE_SUMS_BUDGET",
    "SumsBudget",
    "SumsExchange",
    "packet_fingerprint",
    "packet_runs",
]
