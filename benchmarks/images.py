"""Benchmark images: written fast with numpy, with an exact share of zero pages."""

from __future__ import annotations

import os

import numpy as np

PAGE = 4096


def zero_mask_for(pages: int, zero_fraction: float, run_pages: int, seed: int) -> np.ndarray:
    """Which pages are zero: ``zero_fraction`` of them, in runs of ``run_pages``.

    ``run_pages=1`` spreads single zero pages evenly (the worst case for
    per-run costs); larger runs look like a guest's RAM, where unused memory
    comes in stretches.  Run positions are random but the count is exact.
    """
    mask = np.zeros(pages, dtype=bool)
    nzero = round(pages * zero_fraction)
    if nzero == pages:
        mask[:] = True
    elif nzero:
        runs = max(1, nzero // run_pages)
        slots = pages // run_pages
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(slots, size=min(runs, slots), replace=False))
        for start in chosen * run_pages:
            mask[start : start + run_pages] = True
    return mask


def make_image(path: str, size: int, zero_fraction: float, *, holes: bool = False,
               run_pages: int = 16, seed: int = 1) -> int:
    """Write ``size`` bytes of which ``zero_fraction`` of the pages are zero, in
    runs of ``run_pages`` (see zero_mask_for).  Zero pages are written as zeros,
    or left as holes with ``holes``.  Returns the number of normal pages."""
    rng = np.random.default_rng(seed)
    pages = size // PAGE
    tile = rng.integers(1, 255, size=PAGE * 256, dtype=np.uint8)  # 1 MiB of non-zero bytes
    zero_mask = zero_mask_for(pages, zero_fraction, run_pages, seed)
    chunk_pages = 16384  # 64 MiB
    with open(path, "wb") as f:
        f.truncate(size)
        for first in range(0, pages, chunk_pages):
            n = min(chunk_pages, pages - first)
            mask = zero_mask[first : first + n]
            if holes and mask.all():
                continue
            block = np.resize(tile, n * PAGE).reshape(n, PAGE)
            # Make every page distinct: stamp its index into the first 8 bytes.
            block[:, :8] = (np.arange(first, first + n, dtype=np.uint64) + 1).view(
                np.uint8).reshape(n, 8)
            block[mask] = 0
            if holes:
                for i in np.flatnonzero(~mask):
                    f.seek((first + i) * PAGE)
                    f.write(block[i].tobytes())
            else:
                f.seek(first * PAGE)
                f.write(block.tobytes())
    return int(pages - zero_mask.sum())


if __name__ == "__main__":
    import sys

    make_image(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
    print(os.path.getsize(sys.argv[1]))
