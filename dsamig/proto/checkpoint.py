"""The receiver's checkpoint: which packets are durable, in a file beside the partial one.

The format is versioned by its magic and ends with a CRC32C of everything
before it; a checkpoint of another version, of another image layout or
damaged in any way is refused with ValueError, and the receiver then starts
the partial file afresh.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from dsamig.checksum import crc32c
from dsamig.proto.frames import Manifest

# P3: P2, a flags word (FLAG_LIVE) and a trailing CRC32C, without which a bit
# flipped in the bitmaps or records went unnoticed (only the counters and the
# length were checked).
_PROGRESS_MAGIC: Final = b"DSAMIGP3"
_PROGRESS_STRUCT: Final = struct.Struct("<8sQIIQQQQQI")
_CRC_SIZE: Final = 4
#: The job took live rounds: packets it holds may have been rewritten after
#: this checkpoint was written, so their records must be read again from the
#: partial file before they are trusted.
FLAG_LIVE: Final = 1


@dataclass(frozen=True)
class Progress:
    """A receiver checkpoint: which packets are durable, with their records.

    Serialised beside the partial file so that a restarted receiver can resume
    (``to_bytes`` / ``from_bytes``; the pages layer does the file I/O).
    ``zero`` marks the done packets that are all zero (a subset of ``done``).
    ``live``: the job took live rounds (see FLAG_LIVE).
    """

    manifest: Manifest
    done: bytes  # one bit per packet, LSB first
    zero: bytes  # one bit per packet: done and all zero
    records: bytes  # u32 LE per packet
    received_packets: int
    zero_pages: int
    normal_pages: int
    payload_bytes: int
    live: bool = False

    def to_bytes(self) -> bytes:
        m = self.manifest
        head = _PROGRESS_STRUCT.pack(
            _PROGRESS_MAGIC, m.image_size, m.page_size, m.packet_pages, m.packet_count,
            self.received_packets, self.zero_pages, self.normal_pages, self.payload_bytes,
            FLAG_LIVE if self.live else 0,
        )
        body = head + self.done + self.zero + self.records
        return body + crc32c(body).to_bytes(_CRC_SIZE, "little")

    @classmethod
    def from_bytes(cls, data: bytes) -> Progress:
        """Parse a checkpoint; ValueError if it is damaged or of another version."""
        if len(data) < _PROGRESS_STRUCT.size + _CRC_SIZE:
            raise ValueError("checkpoint too short")
        (magic, size, page_size, packet_pages, packet_count, received, zero, normal,
         payload, flags) = _PROGRESS_STRUCT.unpack_from(data)
        if magic != _PROGRESS_MAGIC:
            raise ValueError("not a dsamig checkpoint of this version")
        body = memoryview(data)[:-_CRC_SIZE]  # a record may be tens of MiB: no copy
        if crc32c(body) != int.from_bytes(data[-_CRC_SIZE:], "little"):
            raise ValueError("checkpoint damaged (CRC32C)")
        if flags & ~FLAG_LIVE:
            raise ValueError(f"checkpoint has unknown flags 0x{flags:x}")
        manifest = Manifest(image_size=size, page_size=page_size, packet_pages=packet_pages)
        problem = manifest.problem()
        if problem or manifest.packet_count != packet_count:
            raise ValueError(f"checkpoint manifest is invalid: {problem or 'packet count'}")
        bits = (packet_count + 7) >> 3
        if len(body) != _PROGRESS_STRUCT.size + 2 * bits + 4 * packet_count:
            raise ValueError("checkpoint length does not match its packet count")
        off = _PROGRESS_STRUCT.size
        done = bytes(body[off : off + bits])
        zero_bits = bytes(body[off + bits : off + 2 * bits])
        done_int = int.from_bytes(done, "little")
        if done_int.bit_count() != received:
            raise ValueError("checkpoint counters do not match its bitmap")
        if int.from_bytes(zero_bits, "little") & ~done_int:
            raise ValueError("checkpoint marks packets zero that are not done")
        return cls(manifest, done, zero_bits, bytes(body[off + 2 * bits :]), received, zero,
                   normal, payload, bool(flags & FLAG_LIVE))


__all__ = ["FLAG_LIVE", "Progress"]
