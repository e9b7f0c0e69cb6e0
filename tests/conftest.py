"""Shared test fixtures: image builders and a guard against a missing extension."""

from __future__ import annotations

import os
import random

import pytest

from dsamig.native import native

PAGE = 4096

#: A test of the extension's own code (its threads, its implementations).
#: CI's second run sets DSAMIG_NO_EXTENSIONS, where the pure-Python twin has
#: none of it to test.
requires_extension = pytest.mark.skipif(
    native is None, reason="DSAMIG_NO_EXTENSIONS: the pure-Python twin has no native code")


def write_image(path: str, size: int, *, seed: int = 0, zero_every: int = 3,
                holes: bool = False) -> tuple[int, int]:
    """Write an image of random pages where every ``zero_every``-th page is zero.

    Returns ``(zero_pages, normal_pages)``.  With ``holes`` the zero pages are
    left as holes instead of written zeros.
    """
    rng = random.Random(seed)
    pages = -(-size // PAGE)
    zero = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(pages):
            length = min(PAGE, size - i * PAGE)
            if zero_every and i % zero_every == 0:
                zero += 1
                if not holes:
                    f.seek(i * PAGE)
                    f.write(bytes(length))
                continue
            page = bytearray(rng.randbytes(length))
            page[0] |= 1  # never accidentally zero
            f.seek(i * PAGE)
            f.write(page)
    return zero, pages - zero


@pytest.fixture
def image_factory(tmp_path):
    """``make(size, **kw) -> (path, zero_pages, normal_pages)``."""
    counter = iter(range(1_000_000))

    def make(size: int, **kwargs) -> tuple[str, int, int]:
        path = str(tmp_path / f"image-{next(counter)}.img")
        zero, normal = write_image(path, size, **kwargs)
        return path, zero, normal

    return make


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def extension_expected() -> bool:
    """The native extension must load unless the pure twin was asked for."""
    return os.environ.get("DSAMIG_NO_EXTENSIONS", "") in ("", "0")
