"""Choosing an engine backend from a name: ``auto``, ``cpu``, ``none``."""

from __future__ import annotations

import os

from dsamig.engine.base import ZeroPageEngine
from dsamig.engine.cpu import CpuEngine
from dsamig.engine.none import NoneEngine
from dsamig.errors import ConfigError
from dsamig.native import native_error

ENGINE_NAMES = ("auto", "cpu", "none")


def default_cpu_threads() -> int:
    """One scan thread per two cores (the loop and the kernel need the rest), 1..4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def create_engine(kind: str, *, threads: int | None = None) -> tuple[ZeroPageEngine, str]:
    """Start the engine ``kind`` on the running loop; return it and why it was chosen."""
    if kind not in ENGINE_NAMES:
        raise ConfigError(f"unknown engine {kind!r} (choose from {', '.join(ENGINE_NAMES)})")
    if kind == "none":
        return NoneEngine(), "engine none: every page is sent as normal"
    threads = threads or default_cpu_threads()
    impl_note = "native SIMD" if native_error is None else f"pure Python ({native_error})"
    reason = f"engine cpu ({impl_note}, {threads} thread{'s' if threads > 1 else ''})"
    if kind == "auto":
        reason += ": no DSA work queue configured"
    return CpuEngine(threads), reason
