"""The job digest: one 4-byte record per packet, hashed in packet order.

Both sides compute it independently, the sender from what it sent and the
receiver from what it verified, and the receiver commits only when they are
equal (docs/protocol.md, "Job digest").
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from itertools import compress
from typing import Final

from dsamig.checksum import crc32c
from dsamig.proto.frames import Manifest

# Records are u32 on the wire; 'I' is 4 bytes on every platform we build for.
if array("I").itemsize != 4:  # pragma: no cover - exotic platforms only
    raise ImportError("dsamig.proto.digest needs a 4-byte array('I')")

_U32_LE: Final = struct.Struct("<I")
# b"1" -> 1, anything else -> 0: a digit string as truth values for compress().
_DIGIT_TRUTH: Final = bytes(1 if b == 49 else 0 for b in range(256))


def packet_record(zero_bitmap: bytes, payload_crc: int) -> int:
    """A packet's digest record: CRC32C(zero_bitmap ‖ payload_crc as u32 LE)."""
    return crc32c(zero_bitmap + _U32_LE.pack(payload_crc))


class JobDigest:
    """The job digest: SHA-256 over every packet's record, in packet order.

    Records live in one ``array('I')`` so that a ZERO_RANGE of any length is
    a single slice assignment, not a Python loop.
    """

    __slots__ = ("_full_record", "_last_record", "_packet_count", "_records")

    def __init__(self, manifest: Manifest) -> None:
        count = manifest.packet_count
        self._packet_count = count
        self._records = array("I", [0]) * count
        full = ((1 << manifest.packet_pages) - 1).to_bytes(
            Manifest.bitmap_length(manifest.packet_pages), "little"
        )
        self._full_record = packet_record(full, 0)
        # The last packet may have fewer pages, hence another full-zero bitmap.
        self._last_record = (
            packet_record(manifest.full_zero_bitmap(count - 1), 0) if count else self._full_record
        )

    def _check_range(self, first: int, count: int) -> None:
        if not (first >= 0 and count >= 1 and first + count <= self._packet_count):
            raise ValueError(
                f"packets {first}..{first + count - 1} out of range "
                f"(packet_count {self._packet_count})"
            )

    def record_packet(self, packet_number: int, zero_bitmap: bytes, payload_crc: int) -> None:
        """Record a packet sent (or verified) with this bitmap and payload CRC."""
        self.set_record(packet_number, packet_record(zero_bitmap, payload_crc))

    def set_record(self, packet_number: int, record: int) -> None:
        """Store a record computed with :func:`packet_record`."""
        self._check_range(packet_number, 1)
        self._records[packet_number] = record

    def record_zero_range(self, first_packet: int, packet_count: int) -> None:
        """Record whole packets that are all zero (as ZERO_RANGE sends them)."""
        self._check_range(first_packet, packet_count)
        end = first_packet + packet_count
        self._records[first_packet:end] = array("I", [self._full_record]) * packet_count
        if end == self._packet_count:
            self._records[end - 1] = self._last_record

    def zero_record(self, packet_number: int) -> int:
        """The record of packet ``packet_number`` if all its pages are zero."""
        self._check_range(packet_number, 1)
        return self._last_record if packet_number == self._packet_count - 1 else self._full_record

    def records_where(self, first: int, digits: bytes | bytearray) -> bytes:
        """The records (u32 LE) of packets ``first + i`` where ``digits[i]`` is
        ``ord("1")``, in order: one C-level pass, for RESUME_STATE."""
        n = len(digits)
        held = digits.count(b"1")
        if held == n:  # the common case: a whole stretch is held
            selected = self._records[first : first + n]
        else:
            selected = array("I", compress(self._records[first : first + n],
                                           digits.translate(_DIGIT_TRUTH)))
        if sys.byteorder != "little":  # pragma: no cover - no big-endian DSA hosts
            selected.byteswap()
        return selected.tobytes()

    def records_bytes(self) -> bytes:
        """All records as u32 LE, packet order (for a checkpoint)."""
        if sys.byteorder != "little":  # pragma: no cover - no big-endian DSA hosts
            records = array("I", self._records)
            records.byteswap()
            return records.tobytes()
        return self._records.tobytes()

    def load_records(self, data: bytes) -> None:
        """Replace the records with a checkpoint's (``records_bytes`` output)."""
        records = array("I")
        records.frombytes(data)
        if sys.byteorder != "little":  # pragma: no cover - no big-endian DSA hosts
            records.byteswap()
        if len(records) != self._packet_count:
            raise ValueError(f"{len(records)} records for {self._packet_count} packets")
        self._records = records

    def record(self, packet_number: int) -> int:
        """The record stored for ``packet_number`` (0 if none was recorded)."""
        self._check_range(packet_number, 1)
        return self._records[packet_number]

    def digest(self) -> bytes:
        """SHA-256 over the records, each as u32 LE, packets 0 .. packet_count-1."""
        records = self._records
        if sys.byteorder != "little":  # pragma: no cover - no big-endian DSA hosts
            records = array("I", records)
            records.byteswap()
        return hashlib.sha256(memoryview(records).cast("B")).digest()


__all__ = ["JobDigest", "packet_record"]
