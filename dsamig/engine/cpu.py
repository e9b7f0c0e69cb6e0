"""CPU backend: native SIMD scan on worker threads, or its pure-Python twin."""

from __future__ import annotations

from dsamig.engine.base import NativeEngine
from dsamig.native import impl


class CpuEngine(NativeEngine):
    """Zero-page detection on ``threads`` named worker threads (``dsamig-cpu-N``)."""

    def __init__(self, threads: int = 1, prefault: bool = True) -> None:
        super().__init__(impl.CpuEngineCore(threads, prefault), "cpu")

    def stats(self) -> dict[str, object]:
        return {**super().stats(), "simd": impl.simd_level()}
