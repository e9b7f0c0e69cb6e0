"""``dsamig verify IMAGE DEST``: compare a received copy with its source.

Both files are read once, in chunks of whole packets.  For each file the job
digest of docs/protocol.md ("Job digest") is recomputed exactly as a sender
computes it (zero bitmaps from the native scan, CRC32C of each packet's
normal pages), and the two files are compared byte by byte, so an operator
gets both the digest to match against the job's log and the first page that
differs.  Files are read, not mapped: a file truncated while it is being
verified is a short read, never a SIGBUS.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from dsamig.errors import ConfigError, DsamigError, SourceError
from dsamig.native import impl
from dsamig.pages import image_size, open_image
from dsamig.proto import JobDigest, Manifest
from dsamig.settings import (
    DEFAULT_PAGE_SIZE,
    EXIT_OK,
    SNAPSHOT_PACKET_SIZE,
    geometry_problem,
)

#: Bytes read per step from each file (whole packets, at least one).
STEP_BYTES = 16 * 1024 * 1024


class ImagesDifferError(DsamigError):
    """The two files are not identical (exit code 1)."""


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` found: both sizes and digests, and the first differing page."""

    image_size: int
    dest_size: int
    image_digest: bytes
    dest_digest: bytes
    first_difference: int | None  # page index, None when the files are identical

    @property
    def identical(self) -> bool:
        return self.first_difference is None


class _DigestFile:
    """One file being read in packet-aligned chunks while its job digest is computed."""

    def __init__(self, path: str, page_size: int, packet_pages: int) -> None:
        self.path = path
        self.fd = open_image(path)
        try:
            self.size = image_size(self.fd, path)
        except BaseException:
            os.close(self.fd)
            raise
        self.manifest = Manifest(self.size, page_size, packet_pages)
        self.digest = JobDigest(self.manifest)

    def read(self, offset: int, buffer: bytearray) -> memoryview:
        """The file's bytes at ``offset``, at most ``len(buffer)`` of them."""
        want = max(0, min(len(buffer), self.size - offset))
        view = memoryview(buffer)[:want]
        done = 0
        while done < want:
            try:
                n = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as exc:
                raise SourceError(f"cannot read {self.path!r}: {exc.strerror}") from None
            if n == 0:
                raise SourceError(
                    f"{self.path!r} shrank while being verified (now {os.fstat(self.fd).st_size} "
                    "bytes)"
                )
            done += n
        return view

    def record(self, first_packet: int, data: memoryview) -> None:
        """Add the records of the packets in ``data`` (which starts at ``first_packet``)."""
        manifest = self.manifest
        page_size = manifest.page_size
        packet_bytes = page_size * manifest.packet_pages
        if not data:
            return
        bitmaps, _ = impl.zero_bitmap(data, page_size, manifest.packet_pages)
        offset = 0
        for i in range(0, len(data), packet_bytes):
            number = first_packet + i // packet_bytes
            blen = Manifest.bitmap_length(manifest.pages_in_packet(number))
            bitmap = bitmaps[offset : offset + blen]
            offset += blen
            _, _, crc = impl.packet_payload(data[i : i + packet_bytes], bitmap, page_size)
            self.digest.record_packet(number, bitmap, crc)

    def close(self) -> None:
        os.close(self.fd)


def _first_different_page(a: memoryview, b: memoryview, page_size: int) -> int:
    """Index (within the chunk) of the first page where ``a`` and ``b`` differ."""
    for page in range(0, max(len(a), len(b)), page_size):
        if a[page : page + page_size] != b[page : page + page_size]:
            return page // page_size
    raise AssertionError("the chunks were equal")


def compare(image: str, dest: str, page_size: int, packet_size: int) -> Comparison:
    """Recompute both files' job digests and find the first page that differs."""
    problem = geometry_problem(page_size, packet_size=packet_size)
    if problem is not None:
        raise ConfigError(str(problem))
    packet_pages = packet_size // page_size
    files = [_DigestFile(image, page_size, packet_pages)]
    try:
        files.append(_DigestFile(dest, page_size, packet_pages))
        source, copy = files
        step = packet_size * max(1, STEP_BYTES // packet_size)
        buffers = bytearray(step), bytearray(step)
        first_difference: int | None = None
        for offset in range(0, max(source.size, copy.size), step):
            a = source.read(offset, buffers[0])
            b = copy.read(offset, buffers[1])
            source.record(offset // packet_size, a)
            copy.record(offset // packet_size, b)
            if first_difference is None and a != b:
                first_difference = offset // page_size + _first_different_page(a, b, page_size)
        return Comparison(source.size, copy.size, source.digest.digest(), copy.digest.digest(),
                          first_difference)
    finally:
        for f in files:
            f.close()


@dataclass
class VerifyCommand:
    """``dsamig verify IMAGE DEST [--page-size SIZE] [--packet-size SIZE]``."""

    image: str
    dest: str
    page_size: int = DEFAULT_PAGE_SIZE
    packet_size: int = SNAPSHOT_PACKET_SIZE

    def run(self) -> int:
        result = compare(self.image, self.dest, self.page_size, self.packet_size)
        if result.identical:
            print(
                f"dsamig: {self.image} and {self.dest} are identical: {result.image_size} bytes, "
                f"job digest {result.image_digest.hex()}",
                file=sys.stdout, flush=True,
            )
            return EXIT_OK
        page = result.first_difference
        assert page is not None
        sizes = ""
        if result.image_size != result.dest_size:
            sizes = f"; sizes {result.image_size} and {result.dest_size} bytes"
        raise ImagesDifferError(
            f"{self.image} and {self.dest} differ: first differing page {page} "
            f"(offset {page * self.page_size}){sizes}; job digests "
            f"{result.image_digest.hex()[:16]}… and {result.dest_digest.hex()[:16]}…"
        )


__all__ = ["Comparison", "ImagesDifferError", "VerifyCommand", "compare"]
