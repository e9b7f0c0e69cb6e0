"""Pure-Python twin of ``dsamig._native``: the readable specification.

Every function and class here has the same name, signature and results as its
native counterpart.  Tests run both and compare; ``DSAMIG_NO_EXTENSIONS=1``
makes dsamig run on this module alone (slowly: it does per-page work in
Python, which the native module exists to avoid).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import mmap
import os
import sys
import threading
import time
from array import array

Buffer = bytes | bytearray | memoryview | mmap.mmap

SIMD_LEVELS = ("generic", "sse2", "avx2")

_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _make_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _make_table()


def crc32c(data: Buffer, crc: int = 0) -> int:
    """CRC32C of ``data`` continuing from ``crc``: crc32c(b, crc32c(a)) == crc32c(a+b)."""
    table = _TABLE
    value = crc ^ 0xFFFFFFFF
    for byte in bytes(data):
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ 0xFFFFFFFF


_POLY = 0x82F63B78


def _mult_mod_p(a: int, b: int) -> int:
    """a * b modulo the reflected CRC32C polynomial (x^0 in the top bit)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _crc32c_op(length: int) -> int:
    """x^(8 * length) mod P: what appending ``length`` bytes multiplies a CRC by."""
    p, x = 1 << 31, 1 << 30  # x^0, x^1
    bits = length * 8
    while bits:
        if bits & 1:
            p = _mult_mod_p(x, p)
        x = _mult_mod_p(x, x)
        bits >>= 1
    return p


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC32C of A||B from the CRC32Cs of A and of B, and B's length."""
    return _mult_mod_p(_crc32c_op(len_b), crc_a) ^ crc_b


def page_crcs(data: Buffer, page_size: int, out: array[int], index: int = 0) -> int:
    """The CRC32C of each page of ``data`` into ``out[index:]``; the pages."""
    view = memoryview(data).cast("B")
    pages = -(-len(view) // page_size)
    if page_size <= 0 or index + pages > len(out):
        raise ValueError("out is too short for the pages of data")
    for i in range(pages):
        out[index + i] = crc32c(view[i * page_size : (i + 1) * page_size])
    return pages


def packet_crc(crcs: array[int], first_page: int, page_count: int, zero_bitmap: Buffer,
               page_size: int, last_length: int) -> int:
    """The payload CRC32C of a packet from the CRC32Cs of its pages."""
    bits = bytes(zero_bitmap)
    if first_page + page_count > len(crcs) or len(bits) * 8 < page_count:
        raise ValueError("crcs or zero_bitmap do not hold these pages")
    crc = 0
    for i in range(page_count):
        if bits[i >> 3] >> (i & 7) & 1:
            continue
        length = last_length if i == page_count - 1 else page_size
        crc = crc32c_combine(crc, crcs[first_page + i], length)
    return crc


def crc32c_impl() -> str:
    """Which CRC32C implementation runs."""
    return "python"


CRC32C_IMPLS = ("python",)


def crc32c_force(name: str | None) -> None:
    """The twin has only one implementation."""
    if name not in (None, "python"):
        raise ValueError(f"CRC32C implementation {name!r} is not available on this CPU")


def simd_level() -> str:
    """The twin compares bytes in Python: no SIMD."""
    return "python"


def force_simd(level: str | None) -> None:
    """No-op: the twin has only one implementation."""


def _group_bitmap_bytes(pages: int, group_pages: int) -> int:
    full, rest = divmod(pages, group_pages)
    return full * ((group_pages + 7) // 8) + (rest + 7) // 8


def bitmap_bytes(length: int, page_size: int, group_pages: int = 0) -> int:
    """Bytes of the bitmap that zero_bitmap() returns for these arguments."""
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    pages = -(-length // page_size)
    return _group_bitmap_bytes(pages, group_pages or max(1, pages))


def zero_bitmap(data: Buffer, page_size: int, group_pages: int = 0) -> tuple[bytes, int]:
    """Scan ``data`` page by page; return ``(bitmap, zero_pages)``.

    Bit i of a group's bitmap (byte i//8, bit i%8, LSB first) is set when page
    i of the group is all zero.  Each group of ``group_pages`` pages (0: one
    group for everything) starts on a new byte.  The last page may be short.
    """
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    view = memoryview(data).cast("B")
    length = len(view)
    pages = -(-length // page_size)
    group_pages = group_pages or max(1, pages)
    out = bytearray(_group_bitmap_bytes(pages, group_pages))
    zero_page = bytes(page_size)
    zero = 0
    byte_base = 0
    for first in range(0, pages, group_pages):
        count = min(group_pages, pages - first)
        for i in range(count):
            start = (first + i) * page_size
            page = view[start : start + page_size]
            if page == zero_page[: len(page)]:
                out[byte_base + i // 8] |= 1 << (i % 8)
                zero += 1
        byte_base += (count + 7) // 8
    return bytes(out), zero


def normal_runs(bitmap: Buffer, page_count: int) -> list[tuple[int, int]]:
    """Runs of normal (clear-bit) pages as ``[(first, count), ...]``."""
    bm = bytes(bitmap)
    if len(bm) * 8 < page_count:
        raise ValueError("bitmap shorter than page_count")
    runs: list[tuple[int, int]] = []
    start = -1
    for i in range(page_count):
        is_zero = (bm[i >> 3] >> (i & 7)) & 1
        if not is_zero and start < 0:
            start = i
        elif is_zero and start >= 0:
            runs.append((start, i - start))
            start = -1
    if start >= 0:
        runs.append((start, page_count - start))
    return runs


def packet_payload(
    data: Buffer, bitmap: Buffer, page_size: int
) -> tuple[list[memoryview], int, int]:
    """The payload of one packet: ``(views, payload_length, crc32c)``."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    length = len(mv)
    views: list[memoryview] = []
    crc = 0
    total = 0
    for first, count in normal_runs(bitmap, -(-length // page_size)):
        piece = mv[first * page_size : min((first + count) * page_size, length)]
        crc = crc32c(piece, crc)
        total += len(piece)
        views.append(piece)
    return views, total, crc


def write_runs(
    fd: int, payload: Buffer, bitmap: Buffer, page_size: int, offset: int, span: int
) -> int:
    """Write each run of normal pages of a packet at its place in ``fd``."""
    data = memoryview(payload).cast("B")
    pos = 0
    for first, count in normal_runs(bitmap, -(-span // page_size)):
        start = first * page_size
        size = min((first + count) * page_size, span) - start
        if pos + size > len(data):
            raise ValueError("payload shorter than the normal pages of its bitmap")
        done = 0
        while done < size:
            n = os.pwrite(fd, data[pos + done : pos + size], offset + start + done)
            if n == 0:
                raise OSError(28, os.strerror(28))
            done += n
        pos += size
    if pos != len(data):
        raise ValueError("payload longer than the normal pages of its bitmap")
    return pos


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_PR_SET_NAME = 15
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make ``length`` bytes of ``fd`` from ``offset`` read as zeros (PUNCH_HOLE)."""
    if length == 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_thread_name(name: str) -> None:
    """Name the calling OS thread (15 characters at most)."""
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def thread_cpu_s() -> float:
    """CPU seconds used so far by the calling thread."""
    return time.thread_time()


class CpuEngineCore:
    """Twin of the native CPU core: worker threads, an eventfd, a done list."""

    def __init__(self, threads: int = 1, prefault: bool = True) -> None:
        if not 1 <= threads <= 64:
            raise OSError(22, "cannot start CPU engine workers")
        self.threads = threads
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: list[tuple[int, memoryview, int, int]] = []
        self._done: list[tuple[int, bytes, int, int, int]] = []
        self._inflight = 0
        self._next_token = 0
        self._closed = False
        self._stopping = False
        self._stats = {"batches": 0, "pages": 0, "zero-pages": 0, "wakeups": 0}
        self._workers = [
            threading.Thread(target=self._work, args=(i,), name=f"dsamig-cpu-{i}", daemon=True)
            for i in range(threads)
        ]
        for worker in self._workers:
            worker.start()

    def fileno(self) -> int:
        """The eventfd that becomes readable when batches have completed."""
        if self._efd < 0:
            raise ValueError("engine core is closed")
        return self._efd

    def submit(self, buffer: Buffer, page_size: int, group_pages: int) -> int:
        """Queue a batch of pages; return its token."""
        if self._closed:
            raise RuntimeError("engine is closed")
        if page_size <= 0 or group_pages <= 0:
            raise ValueError("page_size and group_pages must be positive")
        with self._cond:
            self._next_token += 1
            self._queue.append((self._next_token, memoryview(buffer), page_size, group_pages))
            self._inflight += 1
            self._cond.notify()
            return self._next_token

    def _post(self, item: tuple[int, bytes, int, int, int]) -> None:
        with self._lock:
            was_empty = not self._done
            self._done.append(item)
            if was_empty:
                self._stats["wakeups"] += 1
        if was_empty:
            os.eventfd_write(self._efd, 1)

    def _work(self, index: int) -> None:
        set_thread_name(f"dsamig-cpu-{index}")
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                token, view, page_size, group_pages = self._queue.pop(0)
            bitmaps, zero = zero_bitmap(view, page_size, group_pages)
            pages = -(-len(view) // page_size)
            with self._lock:
                self._stats["batches"] += 1
                self._stats["pages"] += pages
                self._stats["zero-pages"] += zero
            self._post((token, bitmaps, zero, 0, pages))

    def collect(self) -> list[tuple[int, bytes, int, int, int]]:
        """Finished batches: ``[(token, bitmaps, zero_pages, status, cpu_pages)]``."""
        if self._efd < 0:
            return []
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        with self._lock:
            done, self._done = self._done, []
            self._inflight -= len(done)
        return done

    @property
    def in_flight(self) -> int:
        return self._inflight

    def stats(self) -> dict[str, float]:
        """Counters of this core."""
        with self._lock:
            return {**self._stats, "worker-cpu-s": 0.0}

    def close(self) -> None:
        """Stop the workers (idempotent); unstarted batches come back ECANCELED."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._stopping = True
            left, self._queue = self._queue, []
            self._cond.notify_all()
        for worker in self._workers:
            worker.join()
        for token, view, page_size, group_pages in left:
            self._post((token, b"\0" * bitmap_bytes(len(view), page_size, group_pages), 0,
                        125, 0))


# Page fingerprints (cython/fingerprint.pyx, cython/src/fingerprint.c).
#
# The readable specification: for a page of L bytes, zero-padded to n 32-bit
# little-endian words m_0 .. m_{n-1}, and a key made of two NH keys k, k'
# (page_size bytes each, as 32-bit words) and three 128-bit constants a0, a1, b:
#
#   h  = sum_i ((m_2i + k_2i) mod 2^32) * ((m_2i+1 + k_2i+1) mod 2^32)  mod 2^64
#   h' = the same with k'
#   fingerprint = ((a0 * h + a1 * h' + b) mod 2^128) >> 64
#
# fingerprint.c says why a change then goes unseen with probability <= 2^-63.

FINGERPRINT_SEED_BYTES = 16
_FP_DOMAIN = b"dsamig page fingerprint v1\0"
_M32 = (1 << 32) - 1
_M64 = (1 << 64) - 1
_M128 = (1 << 128) - 1


def _fp_check_page_size(page_size: int) -> None:
    if page_size <= 0 or page_size % 8:
        raise ValueError(f"page_size must be a positive multiple of 8, not {page_size}")


def _fp_key_bytes(page_size: int) -> int:
    return 2 * page_size + 48


def _le_words(data: bytes) -> array:
    words = array("I", data)
    if sys.byteorder == "big":
        words.byteswap()
    return words


class _FpKey:
    """A key split into the NH word arrays and the final-stage constants."""

    def __init__(self, key: Buffer, page_size: int) -> None:
        raw = bytes(key)
        need = _fp_key_bytes(page_size)
        if len(raw) != need:
            raise ValueError(f"the key is {len(raw)} bytes; pages of {page_size} bytes need a "
                             f"key of {need} (see fingerprint_key)")
        self.k0 = _le_words(raw[:page_size])
        self.k1 = _le_words(raw[page_size : 2 * page_size])
        final = raw[2 * page_size :]
        self.a0 = int.from_bytes(final[0:16], "little")
        self.a1 = int.from_bytes(final[16:32], "little")
        self.b = int.from_bytes(final[32:48], "little")

    def page(self, page: bytes) -> int:
        """The fingerprint of one page (at most page_size bytes)."""
        words = _le_words(page + bytes(-len(page) % 8))
        k0, k1 = self.k0, self.k1
        h0 = h1 = 0
        for i in range(0, len(words), 2):
            m0, m1 = words[i], words[i + 1]
            h0 += ((m0 + k0[i]) & _M32) * ((m1 + k0[i + 1]) & _M32)
            h1 += ((m0 + k1[i]) & _M32) * ((m1 + k1[i + 1]) & _M32)
        return ((self.a0 * (h0 & _M64) + self.a1 * (h1 & _M64) + self.b) & _M128) >> 64


def _fp_slots(buffer: Buffer, what: str, index: int, pages: int, *, write: bool) -> memoryview:
    view = memoryview(buffer)
    if write and view.readonly:
        raise BufferError(f"{what} is not writable")
    view = view.cast("B")
    if index < 0:
        raise ValueError(f"index must not be negative, not {index}")
    if len(view) // 8 < index + pages:
        raise ValueError(f"{what} holds {len(view) // 8} fingerprints; pages {index}.."
                         f"{index + pages - 1} do not fit")
    return view


def fingerprint_key(seed: Buffer, page_size: int) -> bytes:
    """The key of the page fingerprints for pages of ``page_size`` bytes (SHAKE-128 of
    ``seed``, at least FINGERPRINT_SEED_BYTES random bytes drawn once per job)."""
    _fp_check_page_size(page_size)
    raw = bytes(seed)
    if len(raw) < FINGERPRINT_SEED_BYTES:
        raise ValueError(f"the seed must be at least {FINGERPRINT_SEED_BYTES} bytes, "
                         f"not {len(raw)}")
    material = _FP_DOMAIN + page_size.to_bytes(8, "little") + raw
    return hashlib.shake_128(material).digest(_fp_key_bytes(page_size))


def _fp_each(data: bytes, page_size: int, fp: _FpKey) -> list[int]:
    return [fp.page(data[off : off + page_size]) for off in range(0, len(data), page_size)]


def _fp_store(view: memoryview, index: int, values: list[int]) -> None:
    for i, value in enumerate(values):
        view[(index + i) * 8 : (index + i + 1) * 8] = value.to_bytes(8, sys.byteorder)


def fingerprint_pages(data: Buffer, page_size: int, key: Buffer, out: Buffer,
                      index: int = 0) -> int:
    """Fingerprint ``data`` page by page into ``out[index:]`` (native-endian u64
    slots); the last page may be short.  Returns the number of pages."""
    _fp_check_page_size(page_size)
    fp = _FpKey(key, page_size)
    raw = bytes(data)
    pages = -(-len(raw) // page_size)
    _fp_store(_fp_slots(out, "out", index, pages, write=True), index,
              _fp_each(raw, page_size, fp))
    return pages


def copy_fingerprint(dst: Buffer, src: Buffer, page_size: int, key: Buffer, out: Buffer,
                     index: int = 0) -> int:
    """Copy ``src`` into ``dst`` and fingerprint what was copied into ``out[index:]``."""
    _fp_check_page_size(page_size)
    target = memoryview(dst)
    if target.readonly:
        raise BufferError("dst is not writable")
    target = target.cast("B")
    raw = bytes(src)  # read once: what is hashed is what is written
    if len(target) < len(raw):
        raise ValueError(f"dst is {len(target)} bytes, shorter than src ({len(raw)} bytes)")
    fp = _FpKey(key, page_size)
    pages = -(-len(raw) // page_size)
    slots = _fp_slots(out, "out", index, pages, write=True)
    target[: len(raw)] = raw
    _fp_store(slots, index, _fp_each(raw, page_size, fp))
    return pages


def fingerprint_changes(data: Buffer, page_size: int, key: Buffer, previous: Buffer,
                        index: int = 0, group_pages: int = 0) -> tuple[bytes, int]:
    """Pages of ``data`` whose fingerprint differs from ``previous[index:]``:
    ``(bitmap, changed_pages)``, grouped as zero_bitmap() groups its bits."""
    _fp_check_page_size(page_size)
    fp = _FpKey(key, page_size)
    raw = bytes(data)
    pages = -(-len(raw) // page_size)
    slots = _fp_slots(previous, "previous", index, pages, write=False)
    group_pages = group_pages or max(1, pages)
    out = bytearray(_group_bitmap_bytes(pages, group_pages))
    changed = 0
    byte_base = 0
    now = _fp_each(raw, page_size, fp)
    for first in range(0, pages, group_pages):
        count = min(group_pages, pages - first)
        for i in range(count):
            slot = (index + first + i) * 8
            was = int.from_bytes(slots[slot : slot + 8], sys.byteorder)
            if now[first + i] != was:
                out[byte_base + i // 8] |= 1 << (i % 8)
                changed += 1
        byte_base += (count + 7) // 8
    return bytes(out), changed
