"""Page-fingerprint benchmark: one core, every SIMD level, against floors of the same run.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_fingerprint.py --rounds 5

Figures, each the median of --rounds rounds (every round printed):

* ``hash, in cache``: fingerprint_pages() over a 256 KiB buffer again and
  again: the speed of the code itself;
* ``hash, from memory``: fingerprint_pages() over a --size buffer touched
  beforehand (what a rescan of the image costs per byte);
* ``copy+hash``: copy_fingerprint() from the --size buffer into a 512 KiB
  bounce buffer, packet by packet (what the sender does for every page it
  sends in a live round);
* ``changes``: fingerprint_changes() over the --size buffer (the rescan of a
  round: hash and compare);
* floors: ``memcpy`` of the same packets into the same bounce buffer and
  ``crc32c`` of the in-cache buffer, measured in the same round; each case
  is also given as the median of its per-round ratio to its floor (the
  in-cache hash against CRC32C, the others against memcpy).

GB/s are 10^9 bytes per second of page data.  On shared virtual machines the
absolute figures move from run to run; the ratios to the floors hold better.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from array import array
from collections.abc import Callable

from dsamig.native import native

PAGE = 4096
PACKET = 128 * PAGE
CACHE_BYTES = 256 << 10


def rate(fn: Callable[[], int]) -> float:
    """GB/s of ``fn``, which returns the bytes it processed."""
    start = time.perf_counter()
    done = fn()
    return done / (time.perf_counter() - start) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=512 << 20, help="bytes of the big buffer")
    parser.add_argument("--levels", default="generic,sse2,avx2")
    args = parser.parse_args()
    if native is None:
        raise SystemExit("the native extension is not built")
    key = native.fingerprint_key(os.urandom(16), PAGE)
    big = bytearray(os.urandom(1 << 20)) * (args.size >> 20)  # touched: in RAM
    small = bytearray(os.urandom(CACHE_BYTES))
    bounce = bytearray(PACKET)
    slots = array("Q", bytes(8 * (args.size // PAGE)))
    previous = array("Q", slots)
    native.fingerprint_pages(big, PAGE, key, previous)
    view = memoryview(big)
    bounce_addr = ctypes.addressof(ctypes.c_char.from_buffer(bounce))
    big_addr = ctypes.addressof(ctypes.c_char.from_buffer(big))
    reps = max(1, (1 << 30) // CACHE_BYTES)

    def in_cache() -> int:
        for _ in range(reps):
            native.fingerprint_pages(small, PAGE, key, slots)
        return reps * CACHE_BYTES

    def from_memory() -> int:
        native.fingerprint_pages(big, PAGE, key, slots)
        return len(big)

    def copy_hash() -> int:
        for off in range(0, len(big), PACKET):
            native.copy_fingerprint(bounce, view[off : off + PACKET], PAGE, key, slots,
                                    off // PAGE)
        return len(big)

    def changes() -> int:
        _, changed = native.fingerprint_changes(big, PAGE, key, previous, 0, 128)
        assert changed == 0
        return len(big)

    def memcpy() -> int:
        for off in range(0, len(big), PACKET):
            ctypes.memmove(bounce_addr, big_addr + off, PACKET)
        return len(big)

    def crc() -> int:
        for _ in range(reps):
            native.crc32c(small)
        return reps * CACHE_BYTES

    floors = {"memcpy": memcpy, "crc32c": crc}
    cases = {"hash, in cache": (in_cache, "crc32c"), "hash, from memory": (from_memory, "memcpy"),
             "copy+hash": (copy_hash, "memcpy"), "changes": (changes, "memcpy")}
    levels = args.levels.split(",")
    print(f"buffer {args.size >> 20} MiB, {args.rounds} rounds, simd {native.simd_level()}")
    rates: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    # Each round measures the floors and then every case, so that a ratio
    # compares figures taken moments apart on a machine whose speed drifts.
    for _ in range(args.rounds):
        floor_now = {name: rate(fn) for name, fn in floors.items()}
        for name, value in floor_now.items():
            rates.setdefault(f"floor: {name}", []).append(value)
        for level in levels:
            native.force_simd(level)
            for name, (fn, floor) in cases.items():
                key_name = f"{level}: {name}"
                value = rate(fn)
                rates.setdefault(key_name, []).append(value)
                ratios.setdefault(key_name, []).append(value / floor_now[floor])
            native.force_simd(None)
    width = max(map(len, rates))
    for name, runs in rates.items():
        line = f"{name:<{width}}  median {statistics.median(runs):6.2f} GB/s"
        if name in ratios:
            floor = cases[name.split(": ", 1)[1]][1]
            line += f"  = {statistics.median(ratios[name]):.2f}x {floor:<6}"
        else:
            line += " " * 17
        print(line + "  runs " + " ".join(f"{r:.2f}" for r in runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
