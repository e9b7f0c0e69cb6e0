"""Every decision of a job on the sending side, without I/O.

:class:`SendJobCore` plans the image into chunks, decides for each scanned
packet whether it goes out as a PACKET, inside a ZERO_RANGE or not at all
(the receiver holds it), keeps the digest records and the page counts, checks
what the receiver says it holds against the image, and builds the
COMMIT_REQUEST. The transport maps the image, runs the engine, moves the
bytes and calls in here; the in-memory protocol tests drive the same object.

A job runs in *sessions* (docs/protocol.md, "Sessions"): each starts with
:meth:`SendJobCore.new_session`, learns what the receiver holds from its
RESUME_STATE frames, and :meth:`SendJobCore.verify_known` checks those
records against the ones this job already computed. A packet of the image
that changed under us is an :class:`ImageChangedError`: the job then starts
clean (:meth:`SendJobCore.restart_clean`).
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from dsamig.checksum import crc32c
from dsamig.native import impl
from dsamig.proto.counters import JobCounters
from dsamig.proto.digest import JobDigest, packet_record
from dsamig.proto.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from dsamig.proto.frames import Commit, CommitRequest, Manifest, PacketHeader, ResumeState

Buffer = bytes | bytearray | memoryview

#: Bytes per chunk (one engine batch, whole packets): the sender maps, scans
#: and writes this much at a time per channel.
CHUNK_BYTES: Final = 4 * 1024 * 1024


def chunk_packets(manifest: Manifest) -> int:
    """Packets per chunk: CHUNK_BYTES of them, at least one."""
    return max(1, CHUNK_BYTES // (manifest.page_size * manifest.packet_pages))


class ImageChangedError(ProtocolError):
    """The receiver holds packets that differ from the image (or a packet of
    the image changed during the job): start clean."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A run of consecutive packets: scanned by the engine, or a known hole."""

    first_packet: int
    packets: int
    hole: bool


def plan_chunks(
    manifest: Manifest, data_ranges: list[tuple[int, int]], packets: int | None = None
) -> Iterator[Chunk]:
    """Cut the image into chunks of ``packets`` packets (default:
    :func:`chunk_packets`); consecutive chunks inside holes become one.

    ``data_ranges`` are the byte ranges that may hold data (sorted, as
    ``SEEK_DATA`` finds them); a chunk that touches none is a hole and is
    never scanned.
    """
    packet_bytes = manifest.page_size * manifest.packet_pages
    step = chunk_packets(manifest) if packets is None else packets
    starts = [start for start, _ in data_ranges]
    hole_from: int | None = None
    for first in range(0, manifest.packet_count, step):
        count = min(step, manifest.packet_count - first)
        lo, hi = first * packet_bytes, (first + count) * packet_bytes
        i = bisect.bisect_left(starts, hi)  # ranges starting before hi ...
        has_data = i > 0 and data_ranges[i - 1][1] > lo  # ... and ending after lo
        if not has_data:
            if hole_from is None:
                hole_from = first
            continue
        if hole_from is not None:
            yield Chunk(hole_from, first - hole_from, True)
            hole_from = None
        yield Chunk(first, count, False)
    if hole_from is not None:
        yield Chunk(hole_from, manifest.packet_count - hole_from, True)


#: What :meth:`SendJobCore.chunk_items` yields: a run of all-zero packets
#: ``(ZERO, first, count)`` or a packet with data ``(PACKET, number, bitmap)``.
ZERO: Final = 0
PACKET: Final = 1


class SendJobCore:
    """The sending side of one job: plan, records, counts, resume bookkeeping."""

    def __init__(self, manifest: Manifest, *, live: bool = False) -> None:
        self.manifest = manifest
        self.counters = JobCounters()
        #: Live rounds (docs/protocol.md "Live rounds"): the packets' contents
        #: may change while the job runs, and later rounds send what changed.
        self.live = live
        # The all-zero bitmaps: of a full packet, and of the (maybe shorter) last one.
        last = manifest.packet_count - 1
        self._last = last
        self._full_zero = manifest.full_zero_bitmap(0) if manifest.packet_count else b""
        self._last_zero = manifest.full_zero_bitmap(last) if manifest.packet_count else b""
        self._new_job()
        self._new_session_state()

    # --- job and sessions ----------------------------------------------------------------

    def _new_job(self) -> None:
        """What one job accumulates: the digest and which packets it counted."""
        self.digest = JobDigest(self.manifest)
        #: Packets whose record (and pages) this job has counted.
        self.recorded = bytearray(self.manifest.packet_count)
        counters = self.counters
        counters.zero_pages = counters.normal_pages = counters.normal_bytes = 0
        counters.done_bytes = counters.resumed_packets = counters.retransmitted_bytes = 0
        counters.reused_zero_pages = counters.reused_normal_pages = counters.reused_bytes = 0
        if self.live:
            self._new_live_model()

    def _new_live_model(self) -> None:
        """What a live job knows of the receiver's copy, page by page: the CRC32C
        of the bytes last sent for each page, and each packet's zero bitmap (a
        fresh destination: every page zero). From them the record of a packet
        changed in part follows without reading its other pages again."""
        manifest = self.manifest
        page_size = manifest.page_size
        pages = manifest.page_count
        self.page_crcs = array("I", [crc32c(bytes(page_size))]) * pages
        if pages:
            tail = manifest.image_size - (pages - 1) * page_size
            self.page_crcs[-1] = crc32c(bytes(tail))
        count = manifest.packet_count
        self._bitmap_len = (manifest.packet_pages + 7) >> 3
        self.zero_bits = bytearray(self._full_zero * count)
        if count:
            self.zero_bits[(count - 1) * self._bitmap_len :] = self._last_zero.ljust(
                self._bitmap_len, b"\x00")
        #: Packets the receiver holds in an older version than the last sent:
        #: the transport marks their pages changed, so a round sends them whole.
        self.stale: set[int] = set()

    def _new_session_state(self) -> None:
        count = self.manifest.packet_count
        #: Packets the receiver holds, and their records, as its RESUME_STATE said.
        self.skip = bytearray(count)
        self.remote_records = array("I", [0]) * count
        self._resume_done = False

    def new_session(self) -> None:
        """A session begins: the receiver will say afresh what it holds."""
        self.counters.sessions += 1
        self._new_session_state()

    def restart_clean(self) -> None:
        """Forget the job (the image changed): the next session sends everything."""
        self._new_job()
        self._new_session_state()

    def resume_state(self, frame: ResumeState) -> None:
        """Note which packets the receiver already holds, and their records."""
        count = self.manifest.packet_count
        if self._resume_done:
            raise RemoteProtocolError("RESUME_STATE after the one marked last")
        if frame.first_packet + frame.packet_count > count:
            raise RemoteProtocolError(
                f"RESUME_STATE packets {frame.first_packet}+{frame.packet_count} beyond "
                f"packet_count {count}"
            )
        bits = int.from_bytes(frame.done_bitmap, "little")
        offset = 0
        while bits:
            low = bits & -bits
            n = frame.first_packet + low.bit_length() - 1
            self.skip[n] = 1
            self.remote_records[n] = int.from_bytes(frame.records[offset : offset + 4], "little")
            offset += 4
            bits ^= low
        self._resume_done = frame.last

    def verify_known(self) -> None:
        """Packets this job counted in an earlier session must come back unchanged;
        count what the receiver holds."""
        index = self.skip.find(1)
        while index >= 0:
            if self.recorded[index]:
                self._check_remote(index, self.digest.record(index))
            index = self.skip.find(1, index + 1)
        self.counters.resumed_packets = self.skip.count(1)

    def _check_remote(self, packet: int, record: int) -> None:
        if self.remote_records[packet] != record:
            if self.live:
                # A live image changes: the receiver's older copy is replaced
                # in a later round, not a reason to start over.
                self.stale.add(packet)
                return
            raise ImageChangedError(
                f"the receiver's copy of packet {packet} differs from the image: the image "
                "changed since the interrupted transfer"
            )

    # --- planning ------------------------------------------------------------------------

    def plan(self, data_ranges: list[tuple[int, int]]) -> Iterator[Chunk]:
        """The chunks of this session (see :func:`plan_chunks`)."""
        return plan_chunks(self.manifest, data_ranges)

    def needs_scan(self, chunk: Chunk) -> bool:
        """Whether a chunk must be scanned: not a hole, and not wholly held by
        the receiver and already checked."""
        if chunk.hole:
            return False
        first, end = chunk.first_packet, chunk.first_packet + chunk.packets
        return bool(self.skip.count(0, first, end) or self.recorded.count(0, first, end))

    def chunk_items(self, chunk: Chunk, bitmaps: bytes) -> Iterator[tuple[int, int, object]]:
        """What a scanned chunk holds, in packet order: runs of all-zero packets
        ``(ZERO, first, count)`` and packets with data ``(PACKET, number, bitmap)``.

        ``bitmaps`` is the engine's result: each packet's zero bitmap, each
        starting on a byte. Packets the receiver holds and this job already
        checked are left out.
        """
        manifest = self.manifest
        last, full_zero, last_zero = self._last, self._full_zero, self._last_zero
        skip, recorded = self.skip, self.recorded
        zero_from: int | None = None
        offset = 0
        end_packet = chunk.first_packet + chunk.packets
        for number in range(chunk.first_packet, end_packet):
            pages = manifest.pages_in_packet(number)
            blen = (pages + 7) >> 3
            bitmap = bitmaps[offset : offset + blen]
            offset += blen
            if bitmap == (last_zero if number == last else full_zero):
                if zero_from is None:
                    zero_from = number
                continue
            if zero_from is not None:
                yield ZERO, zero_from, number - zero_from
                zero_from = None
            if skip[number] and recorded[number]:
                continue  # checked against the receiver's record when the session began
            yield PACKET, number, bitmap
        if zero_from is not None:
            yield ZERO, zero_from, end_packet - zero_from

    # --- decisions per packet ------------------------------------------------------------

    def zero_runs(self, first: int, count: int) -> list[tuple[int, int]]:
        """Record packets ``first .. first+count-1`` as all zero; the runs of them
        to send as ZERO_RANGE (those the receiver holds are checked, not sent).

        Raises ImageChangedError if one of them held data earlier in the job
        or at the receiver.
        """
        self._count_zero_packets(first, count)
        end = first + count
        skip = self.skip
        if not skip.count(1, first, end):
            return [(first, count)]
        runs: list[tuple[int, int]] = []
        n = first
        while n < end:
            if skip[n]:
                self._check_remote(n, self.digest.record(n))
                n += 1
                continue
            run_end = skip.find(1, n, end)
            run_end = end if run_end < 0 else run_end
            runs.append((n, run_end - n))
            n = run_end
        return runs

    def _count_zero_packets(self, first: int, count: int) -> None:
        """Record zero packets in the digest and the counts, once per packet."""
        manifest = self.manifest
        counters = self.counters
        end = first + count
        new = self.recorded.count(0, first, end)
        if new == count and not self.skip.count(1, first, end):
            self.digest.record_zero_range(first, count)
            counters.zero_pages += manifest.range_pages(first, count)
            counters.done_bytes += manifest.range_bytes(first, count)[1]
        else:  # some counted before, or held by the receiver: packet by packet
            for n in range(first, end):
                if not self.recorded[n]:
                    self.digest.record_zero_range(n, 1)
                    pages, span = manifest.range_pages(n, 1), manifest.range_bytes(n, 1)[1]
                    counters.zero_pages += pages
                    counters.done_bytes += span
                    if self.skip[n]:
                        counters.reused_zero_pages += pages
                        counters.reused_bytes += span
                elif self.digest.record(n) != self.digest.zero_record(n):
                    if not self.live:
                        raise ImageChangedError(f"packet {n} of the image changed during the job")
                    self._rerecord(n, self.manifest.full_zero_bitmap(n), 0)
        self.recorded[first:end] = b"\x01" * count
        if self.live:
            for n in range(first, end):
                self._set_zero_bits(n, self.manifest.full_zero_bitmap(n))

    def packet(self, number: int, bitmap: bytes, payload_length: int, payload_crc: int) -> bool:
        """Record a packet with data (its payload measured: length and CRC32C);
        True if it must be sent, False if the receiver holds it (checked).

        Raises ImageChangedError when the packet differs from what this job
        or the receiver recorded for it before.
        """
        counters = self.counters
        if not self.recorded[number]:
            self.recorded[number] = 1
            self.digest.record_packet(number, bitmap, payload_crc)
            zero_pages = int.from_bytes(bitmap, "little").bit_count()
            normal_pages = self.manifest.pages_in_packet(number) - zero_pages
            span = self.manifest.range_bytes(number, 1)[1]
            counters.zero_pages += zero_pages
            counters.normal_pages += normal_pages
            counters.done_bytes += span
            if self.skip[number]:
                counters.reused_zero_pages += zero_pages
                counters.reused_normal_pages += normal_pages
                counters.reused_bytes += span
            else:
                counters.normal_bytes += payload_length
        elif self.digest.record(number) != packet_record(bitmap, payload_crc):
            if not self.live:
                raise ImageChangedError(f"packet {number} of the image changed during the job")
            self._rerecord(number, bitmap, payload_crc)
        elif not self.skip[number]:
            counters.retransmitted_bytes += payload_length
        if self.live:
            self._set_zero_bits(number, bitmap)
        if self.skip[number]:
            self._check_remote(number, self.digest.record(number))
            return False
        return True

    # --- live rounds ---------------------------------------------------------------------

    def _packet_bits(self, number: int) -> bytes:
        start = number * self._bitmap_len
        return bytes(self.zero_bits[start : start + (self.manifest.pages_in_packet(number) + 7
                                                     >> 3)])

    def _set_zero_bits(self, number: int, bitmap: bytes) -> None:
        start = number * self._bitmap_len
        self.zero_bits[start : start + len(bitmap)] = bitmap

    def _rerecord(self, number: int, bitmap: bytes, payload_crc: int) -> None:
        """A recorded packet's new content (live): its record and the page counts."""
        old = int.from_bytes(self._packet_bits(number), "little").bit_count()
        new = int.from_bytes(bitmap, "little").bit_count()
        self.digest.record_packet(number, bitmap, payload_crc)
        self.counters.zero_pages += new - old
        self.counters.normal_pages -= new - old

    def live_pages(self, first_page: int, data: Buffer) -> None:
        """Whole pages about to be sent from ``data`` (round 0, or a packet sent
        whole): note the CRC32C of each, for the records of later rounds."""
        impl.page_crcs(data, self.manifest.page_size, self.page_crcs, first_page)

    def page_list(
        self, number: int, present: bytes, pages: memoryview, zero: bytes
    ) -> tuple[PacketHeader, list[memoryview]]:
        """A live round's PAGE_LIST for packet ``number``: the pages whose bit is
        set in ``present``, their bytes in ``pages`` (in order, as sent) and
        ``zero`` their zero bitmap (bit k: the k-th present page is zero).

        Updates what the receiver will hold (page CRCs, zero bits, the packet's
        record and the page counts) and returns the frame with the payload
        slices to send after it.
        """
        manifest = self.manifest
        page_size = manifest.page_size
        page_count = manifest.pages_in_packet(number)
        first_page = number * manifest.packet_pages
        present_bits = int.from_bytes(present, "little")
        zero_bits = int.from_bytes(zero, "little")
        old_bits = int.from_bytes(self._packet_bits(number), "little")
        new_bits = old_bits
        packet_zero = 0
        crcs = array("I", [0]) * present_bits.bit_count()
        impl.page_crcs(pages, page_size, crcs, 0)
        payload: list[memoryview] = []
        payload_length = 0
        payload_crc = 0
        k = 0
        at = 0
        for i in range(page_count):
            if not present_bits >> i & 1:
                continue
            length = manifest.page_length(first_page + i)
            self.page_crcs[first_page + i] = crcs[k]
            if zero_bits >> k & 1:
                packet_zero |= 1 << i
                new_bits |= 1 << i
            else:
                new_bits &= ~(1 << i)
                piece = pages[at : at + length]
                payload.append(piece)
                payload_crc = impl.crc32c(piece, payload_crc)
                payload_length += length
            at += length
            k += 1
        nbytes = (page_count + 7) >> 3
        bitmap = new_bits.to_bytes(nbytes, "little")
        crc = impl.packet_crc(self.page_crcs, first_page, page_count, bitmap, page_size,
                              manifest.page_length(first_page + page_count - 1))
        self._rerecord(number, bitmap, crc)
        self._set_zero_bits(number, bitmap)
        self.counters.normal_bytes += payload_length
        header = PacketHeader(number, first_page, page_count, payload_length, payload_crc,
                              packet_zero.to_bytes(nbytes, "little"), 0, present,
                              self.digest.record(number))
        return header, payload

    def refresh_packet(self, number: int, record: int, zero_bitmap: bytes) -> None:
        """A packet the receiver holds in the committed copy it refreshes: its
        ``record`` and ``zero_bitmap`` there. The CRCs of the pages that match
        ours must have been noted (:meth:`live_pages`); later rounds send the
        others. Counted as reused: those pages were moved by an earlier job."""
        if not self.live:
            raise LocalProtocolError("a refresh needs a live job core")
        if self.recorded[number]:
            raise LocalProtocolError(f"packet {number} refreshed twice")
        manifest = self.manifest
        self.recorded[number] = 1
        self.digest.set_record(number, record)
        self._set_zero_bits(number, zero_bitmap)
        zero = int.from_bytes(zero_bitmap, "little").bit_count()
        normal = manifest.pages_in_packet(number) - zero
        span = manifest.range_bytes(number, 1)[1]
        counters = self.counters
        counters.zero_pages += zero
        counters.normal_pages += normal
        counters.done_bytes += span
        counters.reused_zero_pages += zero
        counters.reused_normal_pages += normal
        counters.reused_bytes += span

    def take_stale(self) -> list[int]:
        """Packets the receiver holds in an older version (live): their pages
        must be reported changed, so that the next round sends them whole."""
        stale = sorted(self.stale)
        self.stale.clear()
        return stale

    # --- commit --------------------------------------------------------------------------

    def commit_request(self) -> CommitRequest:
        """The COMMIT_REQUEST of the whole image (every packet recorded)."""
        missing = self.recorded.count(0)
        if missing:
            raise LocalProtocolError(f"COMMIT_REQUEST with {missing} packets never recorded")
        return CommitRequest(
            packet_count=self.manifest.packet_count,
            zero_pages=self.counters.zero_pages,
            normal_pages=self.counters.normal_pages,
            digest=self.digest.digest(),
        )

    def check_commit(self, commit: Commit) -> None:
        """The receiver's COMMIT must echo our digest (RemoteProtocolError otherwise)."""
        digest = self.digest.digest()
        if commit.digest != digest:
            raise RemoteProtocolError(
                "receiver committed a different job digest "
                f"({commit.digest.hex()[:16]}… != {digest.hex()[:16]}…)"
            )


__all__ = [
    "CHUNK_BYTES",
    "PACKET",
    "ZERO",
    "Chunk",
    "ImageChangedError",
    "SendJobCore",
    "chunk_packets",
    "plan_chunks",
]
