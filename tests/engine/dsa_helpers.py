"""Helpers for the DSA tests: raw descriptors, aligned memory, crafted pages.

The constants are the hardware's (linux/idxd.h), written out here on purpose:
the tests check the software device and the engine against them, not against
the extension's own definitions.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import select
import struct
import time
from typing import Any

import pytest

from dsamig import _pure
from dsamig.native import native

PAGE = 4096

# opcodes
OP_NOOP, OP_BATCH, OP_DRAIN, OP_MEMMOVE, OP_MEMFILL, OP_COMPARE, OP_COMPVAL = range(7)
# flags
F_FENCE, F_BOF, F_CRAV, F_RCR, F_RCI, F_CRSTS = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
F_CR, F_CC = 0x80, 0x100
# completion status
S_NONE, S_SUCCESS, S_SUCCESS_PRED, S_PAGE_FAULT_NOBOF, S_PAGE_FAULT_IR = 0, 1, 2, 3, 4
S_BATCH_FAIL, S_BATCH_PAGE_FAULT = 5, 6
S_BAD_OPCODE, S_INVALID_FLAGS, S_NOZERO_RESERVE, S_XFER_ERANGE = 0x10, 0x11, 0x12, 0x13
S_DESC_CNT_ERANGE, S_DESCLIST_ALIGN, S_HW_ERR1 = 0x14, 0x18, 0x20

# struct dsa_hw_desc: pasid/priv word, flags:24|opcode:8, completion_addr,
# src_addr, dst_addr, xfer_size, int_handle, rsvd1, 24 bytes op-specific.
DESC = struct.Struct("<IIQQQIHH24s")
# struct dsa_completion_record: status, result, rsvd, bytes_completed,
# fault_addr, 16 bytes op-specific (invalid_flags in the first 24 bits).
CR = struct.Struct("<BBHIQ16s")
assert DESC.size == 64 and CR.size == 32

requires_native = pytest.mark.skipif(
    native is None or not hasattr(native, "DsaEngineCore"),
    reason="the DSA engine is native only",
)


def desc(
    opcode: int,
    flags: int = F_CRAV | F_RCR,
    *,
    cr: int = 0,
    src: int = 0,
    dst: int = 0,
    size: int = 0,
    pasid_word: int = 0,
    int_handle: int = 0,
    rsvd1: int = 0,
    op_specific: bytes = b"",
) -> bytes:
    """A 64-byte descriptor."""
    return DESC.pack(pasid_word, (opcode << 24) | (flags & 0xFFFFFF), cr, src, dst, size,
                     int_handle, rsvd1, op_specific.ljust(24, b"\0"))


class Arena:
    """Page-aligned memory with known addresses, for records, lists and data."""

    def __init__(self, size: int) -> None:
        self.mem = mmap.mmap(-1, size)
        self.mem.write(b"\0" * size)  # mapped and resident, so nothing faults
        self._anchor = (ctypes.c_char * size).from_buffer(self.mem)
        self.base = ctypes.addressof(self._anchor)
        self.size = size

    def addr(self, offset: int) -> int:
        return self.base + offset

    def write(self, offset: int, data: bytes) -> None:
        self.mem[offset : offset + len(data)] = data

    def read(self, offset: int, n: int) -> bytes:
        return self.mem[offset : offset + n]

    def cr(self, offset: int) -> dict[str, int]:
        status, result, _rsvd, bc, fault, rest = CR.unpack(self.read(offset, 32))
        return {
            "status": status,
            "result": result,
            "bytes_completed": bc,
            "fault_addr": fault,
            "invalid_flags": int.from_bytes(rest[:3], "little"),
        }

    def wait_cr(self, offset: int, timeout_s: float = 5.0) -> dict[str, int]:
        """Poll a record's status byte until it is set."""
        deadline = time.monotonic() + timeout_s
        while self.mem[offset] == 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"no completion record at +{offset:#x} in {timeout_s} s")
            time.sleep(0.0002)
        return self.cr(offset)

    def close(self) -> None:
        del self._anchor
        self.mem.close()


def crafted_pages(pages: int, seed: int = 0, short_tail: int = 0) -> bytearray:
    """Pages of every kind the engine must tell apart: zero, one non-zero
    byte at 0, 2047 or 4095, random; plus a short last page if asked."""
    rng = random.Random(seed)
    data = bytearray(pages * PAGE + short_tail)
    for p in range(pages):
        kind = p % 6
        base = p * PAGE
        if kind == 1:
            data[base] = 1
        elif kind == 2:
            data[base + 2047] = 0x80
        elif kind == 3:
            data[base + 4095] = 1
        elif kind == 4:
            data[base : base + PAGE] = rng.randbytes(PAGE)
        elif kind == 5 and rng.random() < 0.5:
            data[base + rng.randrange(PAGE)] = rng.randrange(1, 256)
    if short_tail:
        data[pages * PAGE + short_tail - 1] = 1 if seed % 2 else 0
    return data


def oracle(data: Any, page_size: int = PAGE, group_pages: int = 128) -> tuple[bytes, int]:
    """The pure-Python zero bitmap: what every backend must produce."""
    return _pure.zero_bitmap(data, page_size, group_pages)


def run_core(core: Any, buffers: list[Any], page_size: int = PAGE, group_pages: int = 128,
             timeout_s: float = 30.0) -> list[tuple[int, bytes, int, int, int]]:
    """Submit every buffer to an engine core and wait (bounded) for all of
    them; results in submission order."""
    tokens = [core.submit(b, page_size, group_pages) for b in buffers]
    results: dict[int, tuple[int, bytes, int, int, int]] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < len(tokens):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{len(tokens) - len(results)} batches never came back")
        select.select([core.fileno()], [], [], min(left, 0.5))
        for item in core.collect():
            results[item[0]] = item
    return [results[t] for t in tokens]


def assert_oracle(results: list[tuple[int, bytes, int, int, int]], buffers: list[Any],
                  page_size: int = PAGE, group_pages: int = 128) -> None:
    for (_token, bitmap, zero, status, _cpu), data in zip(results, buffers, strict=True):
        assert status == 0
        expected, expected_zero = oracle(data, page_size, group_pages)
        assert bitmap == expected
        assert zero == expected_zero


def emulated(n: int = 1, **spec: Any) -> list[dict[str, Any]]:
    """n software work queue specs for DsaEngineCore."""
    return [dict(spec) for _ in range(n)]


def device_total(core: Any, key: str) -> int:
    """A software-device counter summed over the core's work queues."""
    return sum(wq["device"][key] for wq in core.wq_stats())


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def workload(n: int = 12) -> list[bytearray]:
    """Batches of crafted pages, sizes around the sender's 1024-page chunk,
    some with a short last page."""
    return [crafted_pages(1024 + (i % 3) * 37, seed=i, short_tail=(0, 100, 4095)[i % 3])
            for i in range(n)]


def settled(core: Any, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The core's WQ stats once no WQ is in quarantine (every probe has
    completed or failed), polled with a bound."""
    deadline = time.monotonic() + timeout_s
    while True:
        wqs = core.wq_stats()
        if all(wq["state"] != "quarantined" for wq in wqs):
            return wqs
        if time.monotonic() > deadline:
            raise AssertionError(f"still quarantined after {timeout_s} s: {wqs}")
        time.sleep(0.005)
