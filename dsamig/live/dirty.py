"""Change detection for live rounds: which pages may differ from what the receiver holds.

A live transfer sends the image in rounds while its writer keeps writing.
Before each round after the first, a *dirty source* names the pages whose
content may have changed since they were sent; the round sends those again.

The contract of every :class:`DirtySource`:

* ``begin_round()`` comes before a round's pages are read, so a write that
  races with the round's reads is reported by the next round at the latest;
* ``dirty_packets(image)`` yields, on the job's packet grid, every packet in
  which at least one page may differ from what the receiver holds, with a
  bitmap of those pages.  Reporting a clean page is allowed (it costs a
  resend); missing a changed page is not (for the content source: at most
  with probability 2^-63 per changed page, see below);
* every page the sender sends, in every round (round 0 included), goes
  through ``copy_out(dst, src, first_page)``: the page is copied into the
  sender's bounce buffer and the source records what was copied.  The bytes
  recorded and the bytes sent must be the same bytes, since the guest writes
  while we read: send from ``dst``, never again from the image, and run the
  zero-page engine on ``dst`` as well;
* ``forget(first_page, page_count)`` says that what the receiver holds for
  those pages is no longer known (a packet was lost and will not be resent):
  the next ``dirty_packets`` reports them.

With the writer stopped, a final ``dirty_packets`` plus sending what it
reports leaves the receiver with exactly the image, provided the receiver
applies each page's rounds in order.

Sources
-------
:class:`ContentDirtySource` works everywhere: it keeps one 64-bit keyed
fingerprint per page (8 bytes of memory per page) of what was sent, and
each scan fingerprints the whole image again and compares.  Its cost is a
full read of the image per round, about ``image_bytes / rate`` with the
rate in docs/performance.md; the final round, with the writer stopped,
must rescan everything too, so the downtime can never be shorter than one
full scan: at about 9 GB/s per scanning core, a 300 ms budget stops being
reachable near 2.7 GB of image per core.

A kernel dirty-tracking source would implement the same protocol, with
``begin_round`` clearing the tracking and ``dirty_packets`` reading it, and
``copy_out`` a plain copy (it needs no fingerprints):

* soft-dirty bits: write ``4`` to ``/proc/PID/clear_refs`` of the VMM
  process, then read bit 55 of ``/proc/PID/pagemap`` for the guest-RAM
  mapping (needs ``CONFIG_MEM_SOFT_DIRTY``);
* ``PAGEMAP_SCAN`` (Linux 6.7+): the ``ioctl`` on ``/proc/PID/pagemap`` with
  ``PAGE_IS_WRITTEN`` over a range registered for userfaultfd
  write-protection, clearing as it reads.

Both report writes rather than changes (a superset, which is allowed) and
need the VMM's PID and the address of its guest-RAM mapping.  Neither is
available on the kernels dsamig is developed on, so neither is implemented.
"""

from __future__ import annotations

import mmap
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from dsamig.native import impl

Buffer = bytes | bytearray | memoryview | mmap.mmap

#: The value :meth:`ContentDirtySource.forget` stores: no page's fingerprint
#: is expected to equal it (a real one does with probability 2^-64).
UNKNOWN_FINGERPRINT = 0
#: Packets scanned per native call: the bitmap of one call is bounded by it.
SCAN_PACKETS = 64


@dataclass(frozen=True, slots=True)
class DirtyPacket:
    """One packet of the job's packet grid with pages that may have to be sent again.

    ``bitmap``: bit i (byte i // 8, LSB first) is set when page
    ``first_page + i`` may differ from what the receiver holds.
    """

    first_page: int
    page_count: int
    bitmap: bytes
    dirty_pages: int

    def runs(self) -> list[tuple[int, int]]:
        """Runs of dirty pages as ``[(first_page, count), ...]``, in image page numbers."""
        inverted = bytes(b ^ 0xFF for b in self.bitmap)
        return [(self.first_page + first, count)
                for first, count in impl.normal_runs(inverted, self.page_count)]


@dataclass(slots=True)
class ScanStats:
    """Figures of the last (or running) scan of a dirty source."""

    pages: int = 0
    dirty_pages: int = 0
    packets: int = 0
    dirty_packets: int = 0


class DirtySource(Protocol):
    """Names the pages that may differ from what the receiver holds (module docstring)."""

    name: str
    last_scan: ScanStats

    def begin_round(self) -> None:
        """Called before a round's pages are read."""
        ...

    def dirty_packets(self, image: Buffer) -> Iterator[DirtyPacket]:
        """The packets with pages that may differ from what the receiver holds."""
        ...

    def copy_out(self, dst: Buffer, src: Buffer, first_page: int) -> int:
        """Copy pages about to be sent into ``dst``; record them as sent. Returns pages."""
        ...

    def forget(self, first_page: int, page_count: int) -> None:
        """What the receiver holds for these pages is unknown: report them next scan."""
        ...


class ContentDirtySource:
    """The dirty source that works everywhere: 64-bit fingerprints of what was sent.

    ``receiver_has_zeros``: the receiver starts from a fresh (sparse, all
    zero) destination, so every page is recorded as a zero page and the
    first scan reports exactly the non-zero pages; else every page starts
    unknown.  ``seed`` (FINGERPRINT_SEED_BYTES or more random bytes, fresh
    from ``os.urandom`` by default) keys the fingerprints; the key must not
    be derivable by whatever writes the image for the 2^-63 bound to hold,
    so draw a new seed per job.

    ``copy_out`` may be called from several threads at once for different
    pages (the native call holds no Python state and releases the GIL);
    ``dirty_packets`` runs on one thread.
    """

    name = "content"

    def __init__(self, image_size: int, page_size: int, packet_pages: int, *,
                 seed: bytes | None = None, receiver_has_zeros: bool = True,
                 scan_packets: int = SCAN_PACKETS) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, not {image_size}")
        if packet_pages <= 0 or scan_packets <= 0:
            raise ValueError("packet_pages and scan_packets must be positive")
        self.image_size = image_size
        self.page_size = page_size
        self.packet_pages = packet_pages
        self.scan_packets = scan_packets
        self.seed = os.urandom(impl.FINGERPRINT_SEED_BYTES) if seed is None else bytes(seed)
        self.key = impl.fingerprint_key(self.seed, page_size)
        self.page_count = -(-image_size // page_size)
        self.last_scan = ScanStats()
        if receiver_has_zeros:
            self.fingerprints = self._zero_fingerprints()
        else:
            self.fingerprints = array("Q", [UNKNOWN_FINGERPRINT]) * self.page_count

    def _zero_fingerprints(self) -> array[int]:
        zero = array("Q", [0, 0])
        impl.fingerprint_pages(bytes(self.page_size), self.page_size, self.key, zero, 0)
        tail = self.image_size - (self.page_count - 1) * self.page_size
        impl.fingerprint_pages(bytes(tail), self.page_size, self.key, zero, 1)
        values = array("Q", [zero[0]]) * self.page_count
        values[-1] = zero[1]
        return values

    def begin_round(self) -> None:
        """Nothing to clear: the fingerprints are updated as pages are copied out."""

    def dirty_packets(self, image: Buffer) -> Iterator[DirtyPacket]:
        """Fingerprint the whole image again and yield the packets that differ.

        The scan reads the image while the writer writes: a page written
        after it was scanned is reported by the next scan.
        """
        with memoryview(image) as raw, raw.cast("B") as view:
            if len(view) != self.image_size:
                raise ValueError(f"the image is {len(view)} bytes, not the {self.image_size} "
                                 f"bytes this source tracks")
            # The views are released however the caller leaves the loop, so
            # that the image's mapping can be closed.
            yield from self._scan(view)

    def _scan(self, view: memoryview) -> Iterator[DirtyPacket]:
        stats = self.last_scan = ScanStats()
        pp, ps = self.packet_pages, self.page_size
        group_bytes = (pp + 7) // 8
        step = pp * self.scan_packets
        for chunk_first in range(0, self.page_count, step):
            chunk_pages = min(step, self.page_count - chunk_first)
            start = chunk_first * ps
            with view[start : min(start + chunk_pages * ps, self.image_size)] as chunk:
                bitmap, changed = impl.fingerprint_changes(chunk, ps, self.key, self.fingerprints,
                                                           chunk_first, pp)
            packets = -(-chunk_pages // pp)
            stats.pages += chunk_pages
            stats.packets += packets
            if not changed:
                continue
            stats.dirty_pages += changed
            for k in range(packets):
                first = chunk_first + k * pp
                count = min(pp, self.page_count - first)
                bits = bitmap[k * group_bytes : k * group_bytes + (count + 7) // 8]
                if any(bits):
                    stats.dirty_packets += 1
                    yield DirtyPacket(first, count, bits,
                                      int.from_bytes(bits, "little").bit_count())

    def copy_out(self, dst: Buffer, src: Buffer, first_page: int) -> int:
        """Copy whole pages from ``src`` into ``dst`` and record their fingerprints.

        ``src`` starts at page ``first_page`` of the image and holds whole
        pages (the image's last page may be short).
        """
        length = memoryview(src).nbytes
        end = first_page * self.page_size + length
        if first_page < 0 or end > self.image_size:
            raise ValueError(f"pages from {first_page} ({length} bytes) are not inside the "
                             f"image ({self.image_size} bytes)")
        if length % self.page_size and end != self.image_size:
            raise ValueError(f"{length} bytes from page {first_page} are not whole pages")
        return int(impl.copy_fingerprint(dst, src, self.page_size, self.key,
                                         self.fingerprints, first_page))

    def forget(self, first_page: int, page_count: int) -> None:
        """Mark pages unknown, so that the next scan reports them."""
        if first_page < 0 or page_count < 0 or first_page + page_count > self.page_count:
            raise ValueError(f"pages {first_page}..{first_page + page_count - 1} are not in "
                             f"the image's {self.page_count} pages")
        self.fingerprints[first_page : first_page + page_count] = (
            array("Q", [UNKNOWN_FINGERPRINT]) * page_count)


__all__ = [
    "SCAN_PACKETS",
    "UNKNOWN_FINGERPRINT",
    "ContentDirtySource",
    "DirtyPacket",
    "DirtySource",
    "ScanStats",
]
