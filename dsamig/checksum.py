"""Checksums used on the wire: CRC32C, native when the extension loaded."""

from __future__ import annotations

from dsamig.native import impl

crc32c = impl.crc32c

__all__ = ["crc32c"]
