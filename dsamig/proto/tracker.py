"""The receiver's job-wide record of which packets arrived, checked against the manifest."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from dsamig.proto.checkpoint import Progress
from dsamig.proto.counters import JobCounters
from dsamig.proto.digest import JobDigest, packet_record
from dsamig.proto.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from dsamig.proto.frames import (
    MAX_RESUME_PACKETS,
    CommitRequest,
    Manifest,
    PacketHeader,
    ResumeState,
    ZeroRange,
)

#: Default ceiling on a receiver job's packet_count: 8 TiB at the default
#: 512 KiB packets, with 5 bytes of bookkeeping per packet (80 MiB). A hostile
#: manifest must not make the receiver allocate before any data arrives.
DEFAULT_MAX_PACKETS: Final = 1 << 24

# Per-packet status in PacketTracker._status. A done packet whose record is
# the all-zero one is _ZERO, so that a ZERO_RANGE over done packets is checked
# with one find() over the range instead of a record comparison per packet.
_FREE: Final = 0
_CLAIMED: Final = 1
_DONE: Final = 2
_ZERO: Final = 3
_B_CLAIMED: Final = bytes([_CLAIMED])
_B_DONE: Final = bytes([_DONE])
_B_ZERO: Final = bytes([_ZERO])
# Status bytes -> b"1" for a done packet (either kind) / a zero one, else b"0".
_DONE_DIGITS: Final = bytes(49 if s in (_DONE, _ZERO) else 48 for s in range(256))
_ZERO_DIGITS: Final = bytes(49 if s == _ZERO else 48 for s in range(256))
# _FREE -> _CLAIMED, the rest unchanged: claims the free packets of a range.
_CLAIM_FREE: Final = bytes([_CLAIMED]) + bytes(range(1, 256))
# b"0" / b"1" -> 0 / 1.
_DIGIT_VALUE: Final = bytes(b & 1 for b in range(256))




def _bitmap(status: bytes | bytearray, digits: bytes) -> bytes:
    """A bitmap (LSB first) with bit n set where ``digits[status[n]]`` is "1".

    Built in C: the status bytes become a string of binary digits, most
    significant first, parsed as one integer.
    """
    text = status.translate(digits)[::-1]
    value = int(text, 2) if text else 0
    return value.to_bytes((len(status) + 7) >> 3, "little")


def _flags(bitmap: bytes, count: int) -> int:
    """The first ``count`` bits of ``bitmap`` as an int with one byte (0/1) per
    bit, LSB first; built in C from the integer's binary digits."""
    value = int.from_bytes(bitmap, "little") & ((1 << count) - 1)
    digits = format(value, "b").zfill(count)[::-1].encode("ascii")
    return int.from_bytes(digits.translate(_DIGIT_VALUE), "little")


class PacketTracker:
    """Receiver's job-wide record of which packets arrived, checked against the manifest.

    ``check_packet`` / ``check_zero_range`` validate a frame and claim its
    packets at once, so that the same packet arriving on two channels is
    caught before its payload is written; ``packet_done`` /
    ``zero_range_done`` record them once the payload is stored and verified.

    Every operation costs time in proportion to its frame, or to the packets
    of a range as one C-level pass over a bytearray, never a Python loop per
    packet: a peer must not turn a 24-byte frame into seconds of CPU. With
    ``tolerant`` (acknowledgements) packets may arrive again; those repeats
    are counted, and a peer that repeats more than ``repeat_budget`` packets
    in a job is refused.
    """

    __slots__ = (
        "_digest",
        "_status",
        "changes",
        "counters",
        "live",
        "manifest",
        "payload_bytes",
        "received_packets",
        "repeat_budget",
        "repeated_packets",
        "tolerant",
    )

    def __init__(
        self,
        manifest: Manifest,
        *,
        max_packets: int = DEFAULT_MAX_PACKETS,
        counters: JobCounters | None = None,
    ) -> None:
        manifest.validate()
        if manifest.packet_count > max_packets:
            raise RemoteProtocolError(
                f"manifest packet_count {manifest.packet_count} exceeds this receiver's "
                f"limit of {max_packets}",
                ErrorCode.REJECTED,
            )
        self.manifest = manifest
        # Per packet: _FREE, _CLAIMED, _DONE or _ZERO (done, all zero).
        self._status = bytearray(manifest.packet_count)
        self._digest = JobDigest(manifest)
        #: Packets recorded as done (a ZERO_RANGE counts each packet).
        self.received_packets = 0
        #: The job's zero and normal pages and done bytes: kept here, read
        #: by the job core and the stats (one source of truth).
        self.counters = counters if counters is not None else JobCounters()
        #: Payload bytes of the done packets (a checkpoint carries it).
        self.payload_bytes = 0
        #: With FEATURE_ACKS a packet may arrive again (retransmitted after a
        #: channel broke before its ACK): accepted if its record is the same.
        self.tolerant = False
        #: Packets that arrived again, and how many repeats a job may cost.
        #: A sender re-sends at most what was not acknowledged when a
        #: session broke; twice the image is far more than that.
        self.repeated_packets = 0
        self.repeat_budget = 2 * manifest.packet_count + 1024
        #: Bumped by every change of what is recorded (a checkpoint is due
        #: when it moved since the last one): new packets and replaced ones.
        self.changes = 0
        #: The job took live rounds (sticky across restores; see FLAG_LIVE).
        self.live = False

    def _repeated(self, packets: int) -> None:
        self.repeated_packets += packets
        if self.repeated_packets > self.repeat_budget:
            raise RemoteProtocolError(
                f"the sender sent {self.repeated_packets} packets that were already received "
                f"(at most {self.repeat_budget} in a job of {self.manifest.packet_count} packets)"
            )

    def check_packet(self, hdr: PacketHeader) -> bool:
        """Validate a PACKET header against the manifest and claim its packet.

        Raises RemoteProtocolError for a packet number out of range, a wrong
        first_page, page_count or payload_length, or a packet already
        received (unless ``tolerant``). ``hdr`` must come from the decoder
        (well-formed bitmap). Returns True when the packet is already done and
        only its record needs comparing (tolerant mode), False otherwise.
        """
        manifest = self.manifest
        n = hdr.packet_number
        if n >= manifest.packet_count:
            raise RemoteProtocolError(
                f"PACKET packet_number {n} out of range (packet_count {manifest.packet_count})"
            )
        status = self._status[n]
        if status and not self.tolerant:
            raise RemoteProtocolError(f"PACKET packet_number {n} received twice")
        if status == _CLAIMED:
            raise RemoteProtocolError(
                f"PACKET packet_number {n} is already being received on another channel"
            )
        first_page = n * manifest.packet_pages
        if hdr.first_page != first_page:
            raise RemoteProtocolError(
                f"PACKET {n} first_page {hdr.first_page}, expected {first_page}"
            )
        pages = manifest.pages_in_packet(n)
        if hdr.page_count != pages:
            raise RemoteProtocolError(f"PACKET {n} page_count {hdr.page_count}, expected {pages}")
        length = manifest.payload_length(n, hdr.zero_bitmap)
        if hdr.payload_length != length:
            raise RemoteProtocolError(
                f"PACKET {n} payload_length {hdr.payload_length}, expected {length} "
                "for its zero_bitmap"
            )
        if status:  # done already (tolerant): compared in packet_done
            self._repeated(1)
            return True
        self._status[n] = _CLAIMED
        return False

    def packet_done(self, hdr: PacketHeader, payload_crc_verified: int) -> None:
        """Record a packet whose payload is stored; ``payload_crc_verified`` is
        the CRC32C computed over what arrived.

        Raises RemoteProtocolError with code INTEGRITY if it differs from the
        header's payload_crc, and LocalProtocolError if the packet was not
        claimed by check_packet.
        """
        n = hdr.packet_number
        if not (0 <= n < self.manifest.packet_count and self._status[n]):
            raise LocalProtocolError(f"packet_done({n}) without a successful check_packet")
        if payload_crc_verified != hdr.payload_crc:
            raise RemoteProtocolError(
                f"PACKET {n} payload_crc 0x{hdr.payload_crc:08x} does not match the "
                f"payload (CRC32C 0x{payload_crc_verified:08x})",
                ErrorCode.INTEGRITY,
            )
        record = packet_record(hdr.zero_bitmap, payload_crc_verified)
        if self._status[n] != _CLAIMED:
            self._check_same(n, record)
            return
        self._digest.set_record(n, record)
        self._status[n] = _ZERO if record == self._digest.zero_record(n) else _DONE
        zero = int.from_bytes(hdr.zero_bitmap, "little").bit_count()
        self.received_packets += 1
        self.changes += 1
        counters = self.counters
        counters.done_bytes += self.manifest.range_bytes(n, 1)[1]
        counters.zero_pages += zero
        counters.normal_pages += hdr.page_count - zero
        self.payload_bytes += hdr.payload_length

    def check_zero_range(self, zr: ZeroRange) -> None:
        """Validate a ZERO_RANGE against the manifest and what arrived so far.

        Raises RemoteProtocolError if it reaches past the last packet,
        overlaps a packet being received on another channel, or overlaps a
        packet already received (tolerant mode: one that held data, which is
        an INTEGRITY error; repeats of zero packets count against the budget).
        """
        packet_count = self.manifest.packet_count
        first, count = zr.first_packet, zr.packet_count
        if first >= packet_count:
            raise RemoteProtocolError(
                f"ZERO_RANGE first_packet {first} out of range (packet_count {packet_count})"
            )
        if count < 1 or first + count > packet_count:
            raise RemoteProtocolError(
                f"ZERO_RANGE first_packet {first} + packet_count {count} exceeds "
                f"packet_count {packet_count}"
            )
        end = first + count
        status = self._status
        free = status.count(_FREE, first, end)
        if free == count:
            status[first:end] = _B_CLAIMED * count
            return
        claimed = status.find(_B_CLAIMED, first, end)
        if claimed >= 0:
            raise RemoteProtocolError(
                f"ZERO_RANGE packets {first}..{end - 1} overlap packet {claimed}, "
                "being received on another channel"
            )
        if not self.tolerant:
            taken = min(i for i in (status.find(_B_DONE, first, end),
                                    status.find(_B_ZERO, first, end)) if i >= 0)
            raise RemoteProtocolError(
                f"ZERO_RANGE packets {first}..{end - 1} overlap packet {taken}, already received"
            )
        data = status.find(_B_DONE, first, end)
        if data >= 0:
            zero = self._digest.zero_record(data)
            raise RemoteProtocolError(
                f"packet {data} arrived again with different contents (record 0x{zero:08x}, "
                f"first time 0x{self._digest.record(data):08x}): the image changed during "
                "the job",
                ErrorCode.INTEGRITY,
            )
        self._repeated(count - free)
        status[first:end] = status[first:end].translate(_CLAIM_FREE)

    def zero_range_done(self, zr: ZeroRange) -> None:
        """Record a ZERO_RANGE accepted by check_zero_range."""
        first, count = zr.first_packet, zr.packet_count
        end = first + count
        status = self._status
        if not (first >= 0 and count >= 1 and end <= len(status)):
            raise LocalProtocolError(f"zero_range_done({first}, {count}) out of range")
        new = status.count(_CLAIMED, first, end)
        if new + status.count(_ZERO, first, end) != count:
            raise LocalProtocolError(
                f"zero_range_done({first}, {count}) without a successful check_zero_range"
            )
        if not new:
            return
        manifest = self.manifest
        last = manifest.packet_count - 1
        # The image's last packet may be short: count its own size if it is new.
        pages = new * manifest.packet_pages
        nbytes = new * manifest.packet_pages * manifest.page_size
        if first <= last < end and status[last] == _CLAIMED:
            pages -= manifest.packet_pages - manifest.pages_in_packet(last)
            nbytes -= manifest.packet_pages * manifest.page_size - manifest.range_bytes(last, 1)[1]
        status[first:end] = _B_ZERO * count
        self._digest.record_zero_range(first, count)
        self.received_packets += new
        self.changes += 1
        self.counters.done_bytes += nbytes
        self.counters.zero_pages += pages

    def _check_same(self, n: int, record: int) -> None:
        if self._digest.record(n) != record:
            raise RemoteProtocolError(
                f"packet {n} arrived again with different contents (record 0x{record:08x}, "
                f"first time 0x{self._digest.record(n):08x}): the image changed during the job",
                ErrorCode.INTEGRITY,
            )

    def check_replace(self, hdr: PacketHeader) -> None:
        """Validate a PAGE_LIST packet (a live round's change to a packet the
        receiver holds) against the manifest: RemoteProtocolError otherwise."""
        manifest = self.manifest
        n = hdr.packet_number
        if n >= manifest.packet_count:
            raise RemoteProtocolError(
                f"PACKET packet_number {n} out of range (packet_count {manifest.packet_count})"
            )
        if hdr.first_page != n * manifest.packet_pages:
            raise RemoteProtocolError(
                f"PACKET {n} first_page {hdr.first_page}, expected {n * manifest.packet_pages}"
            )
        pages = manifest.pages_in_packet(n)
        if hdr.page_count != pages:
            raise RemoteProtocolError(f"PACKET {n} page_count {hdr.page_count}, expected {pages}")
        if self._status[n] < _DONE:
            raise RemoteProtocolError(
                f"PAGE_LIST for packet {n}, which this receiver does not hold (send it whole)"
            )
        length = manifest.page_list_payload_length(n, hdr.zero_bitmap, hdr.present_bitmap)
        if hdr.payload_length != length:
            raise RemoteProtocolError(
                f"PACKET {n} payload_length {hdr.payload_length}, expected {length} "
                "for its zero and present bitmaps"
            )

    def replace(self, n: int, old_zero_pages: int, zero_bitmap: bytes, payload_crc: int,
                record: int) -> None:
        """Record a packet's new content after a PAGE_LIST was applied: its whole
        zero bitmap and payload CRC as now stored, which must give ``record``
        (the sender's; INTEGRITY otherwise). ``old_zero_pages``: how many of
        its pages were zero before."""
        mine = packet_record(zero_bitmap, payload_crc)
        if mine != record:
            raise RemoteProtocolError(
                f"packet {n} after its PAGE_LIST has record 0x{mine:08x}, the sender's is "
                f"0x{record:08x}: the copy went wrong",
                ErrorCode.INTEGRITY,
            )
        zero = int.from_bytes(zero_bitmap, "little").bit_count()
        self._digest.set_record(n, record)
        self._status[n] = _ZERO if record == self._digest.zero_record(n) else _DONE
        self.counters.zero_pages += zero - old_zero_pages
        self.counters.normal_pages -= zero - old_zero_pages
        self.changes += 1

    def unclaim(self, packet_number: int) -> None:
        """Forget a claim whose payload will never complete (its channel broke)."""
        if self._status[packet_number] == _CLAIMED:
            self._status[packet_number] = _FREE

    def is_done(self, packet_number: int) -> bool:
        """Whether ``packet_number`` is verified and stored."""
        return self._status[packet_number] >= _DONE

    def not_done_runs(self) -> Iterator[tuple[int, int]]:
        """``(first_packet, packet_count)`` of every run of packets not done,
        in order, as of this call (yielded one by one: there may be many).

        After a crash these are the packets whose bytes in a kept partial file
        are unknown: written perhaps, but never recorded.
        """
        flags = self._status.translate(_DONE_DIGITS)

        def runs() -> Iterator[tuple[int, int]]:
            n, count = 0, len(flags)
            while n < count:
                start = flags.find(b"0", n)
                if start < 0:
                    return
                stop = flags.find(b"1", start)
                stop = count if stop < 0 else stop
                yield start, stop - start
                n = stop

        return runs()

    def not_done_run_count(self) -> int:
        """How many runs :meth:`not_done_runs` yields, counted in C."""
        flags = self._status.translate(_DONE_DIGITS)
        return flags.count(b"10") + flags.startswith(b"0")

    def snapshot(self) -> Progress:
        """What is done now: for a durable checkpoint beside the partial file."""
        status = self._status
        return Progress(
            manifest=self.manifest,
            done=_bitmap(status, _DONE_DIGITS),
            zero=_bitmap(status, _ZERO_DIGITS),
            records=self._digest.records_bytes(),
            received_packets=self.received_packets,
            zero_pages=self.counters.zero_pages,
            normal_pages=self.counters.normal_pages,
            payload_bytes=self.payload_bytes,
            live=self.live,
        )

    def restore(self, progress: Progress) -> None:
        """Start from a checkpoint (resume): its packets are done."""
        if progress.manifest != self.manifest:
            raise LocalProtocolError("checkpoint of another manifest")
        count = self.manifest.packet_count
        # One byte per packet, computed on big ints (no carries: each byte <= 3):
        # _DONE for a done packet, plus one more (_ZERO) if it is all zero.
        status = _DONE * _flags(progress.done, count) + _flags(progress.zero, count)
        self._status = bytearray(status.to_bytes(count, "little"))
        self.changes += 1
        self._digest.load_records(progress.records)
        self.received_packets = progress.received_packets
        manifest = self.manifest
        packet_bytes = manifest.packet_pages * manifest.page_size
        counters = self.counters
        counters.done_bytes = progress.received_packets * packet_bytes
        if count and self._status[count - 1] >= _DONE:
            counters.done_bytes -= packet_bytes - manifest.range_bytes(count - 1, 1)[1]
        counters.zero_pages = progress.zero_pages
        counters.normal_pages = progress.normal_pages
        self.payload_bytes = progress.payload_bytes
        self.live = self.live or progress.live

    def refreshed(self, packets: list[tuple[int, bytes, int]]) -> None:
        """Take packets of a committed copy being refreshed as held:
        ``(number, zero_bitmap, payload_crc)`` of each, as read from it."""
        manifest = self.manifest
        counters = self.counters
        for n, zero_bitmap, payload_crc in packets:
            if self._status[n] != _FREE:
                raise LocalProtocolError(f"packet {n} refreshed twice")
            record = packet_record(zero_bitmap, payload_crc)
            self._digest.set_record(n, record)
            self._status[n] = _ZERO if record == self._digest.zero_record(n) else _DONE
            zero = int.from_bytes(zero_bitmap, "little").bit_count()
            self.received_packets += 1
            counters.done_bytes += manifest.range_bytes(n, 1)[1]
            counters.zero_pages += zero
            counters.normal_pages += manifest.pages_in_packet(n) - zero
        self.changes += 1

    def done_packets(self) -> list[int]:
        """The packets done (verified and stored), in order."""
        status = self._status
        return [n for n in range(len(status)) if status[n] >= _DONE]

    def reload(self, packets: list[tuple[int, bytes, int]]) -> None:
        """Take the records of every done packet from what the partial file
        holds now: ``(number, zero_bitmap, payload_crc)`` of each, read back
        after the restore of a live job, whose packets may have been rewritten
        after its checkpoint. The page counts follow from the bitmaps."""
        if [n for n, _, _ in packets] != self.done_packets():
            raise LocalProtocolError("reload must cover exactly the done packets, in order")
        manifest = self.manifest
        zero = normal = 0
        for n, zero_bitmap, payload_crc in packets:
            record = packet_record(zero_bitmap, payload_crc)
            self._digest.set_record(n, record)
            self._status[n] = _ZERO if record == self._digest.zero_record(n) else _DONE
            pages = int.from_bytes(zero_bitmap, "little").bit_count()
            zero += pages
            normal += manifest.pages_in_packet(n) - pages
        self.counters.zero_pages = zero
        self.counters.normal_pages = normal
        self.changes += 1

    def resume_frames(self) -> list[ResumeState]:
        """RESUME_STATE frames describing every done packet, the last one marked.

        Each frame costs a few C-level passes over its 8192 packets.
        """
        frames: list[ResumeState] = []
        count = self.manifest.packet_count
        for first in range(0, count, MAX_RESUME_PACKETS):
            n = min(MAX_RESUME_PACKETS, count - first)
            status = self._status[first : first + n]
            done = status.translate(_DONE_DIGITS)
            held = self._digest.records_where(first, done)
            frames.append(ResumeState(first, n, _bitmap(status, _DONE_DIGITS), held))
        if frames:
            last = frames[-1]
            frames[-1] = ResumeState(
                last.first_packet, last.packet_count, last.done_bitmap, last.records, True
            )
        return frames

    @property
    def status_array(self) -> bytearray:
        """The status byte of every packet (FREE 0, CLAIMED 1, DONE 2, ZERO 3),
        for native receiving threads that claim packets in it atomically."""
        return self._status

    @property
    def zero_pages(self) -> int:
        """Zero pages of the done packets."""
        return self.counters.zero_pages

    @property
    def normal_pages(self) -> int:
        """Normal pages of the done packets."""
        return self.counters.normal_pages

    @property
    def done_bytes(self) -> int:
        """Bytes of the image in done packets: how far the job has come."""
        return self.counters.done_bytes

    @property
    def complete(self) -> bool:
        """Whether every packet of the image has been recorded."""
        return self.received_packets == self.manifest.packet_count

    def missing(self) -> int:
        """Packets not recorded yet."""
        return self.manifest.packet_count - self.received_packets

    def digest(self) -> bytes:
        """The job digest of what was verified so far."""
        return self._digest.digest()

    def check_commit_request(self, request: CommitRequest) -> bytes:
        """Compare a COMMIT_REQUEST with what arrived; return the digest to echo.

        Call it once every channel has ENDed (channels are separate
        connections, so COMMIT_REQUEST can be read before another channel's
        last frames). Raises RemoteProtocolError: PROTOCOL if packets are
        still missing, INTEGRITY if a total or the digest differs.
        """
        if not self.complete:
            raise RemoteProtocolError(
                f"COMMIT_REQUEST with {self.missing()} of {self.manifest.packet_count} "
                "packets missing"
            )
        for what, theirs, ours in (
            ("packet_count", request.packet_count, self.manifest.packet_count),
            ("zero_pages", request.zero_pages, self.counters.zero_pages),
            ("normal_pages", request.normal_pages, self.counters.normal_pages),
        ):
            if theirs != ours:
                raise RemoteProtocolError(
                    f"COMMIT_REQUEST {what} {theirs} does not match the receiver's {ours}",
                    ErrorCode.INTEGRITY,
                )
        digest = self.digest()
        if request.digest != digest:
            raise RemoteProtocolError(
                f"COMMIT_REQUEST digest {request.digest.hex()} does not match the "
                f"receiver's {digest.hex()}",
                ErrorCode.INTEGRITY,
            )
        return digest


__all__ = ["DEFAULT_MAX_PACKETS", "PacketTracker"]
