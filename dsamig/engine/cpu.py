"""CPU backend: native SIMD scan on worker threads, or its pure-Python twin."""

from __future__ import annotations

from dsamig.engine.base import NativeEngine
from dsamig.native import impl


class CpuEngine(NativeEngine):
    """Zero-page detection on ``threads`` named worker threads (``dsamig-cpu-N``)."""

    # No prefault by default: a CPU scan takes its faults synchronously and the
    # kernel maps 16 pages per fault around it; MADV_POPULATE_READ measured no
    # faster (docs/performance.md).  DSA, whose faults are costly, prefaults.
    def __init__(self, threads: int = 1, prefault: bool = False) -> None:
        super().__init__(impl.CpuEngineCore(threads, prefault), "cpu")

    def stats(self) -> dict[str, object]:
        return {**super().stats(), "simd": impl.simd_level()}
