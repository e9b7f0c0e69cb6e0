"""Zero-page detection engines behind one asynchronous contract."""

from dsamig.engine.base import Detection, EngineClosedError, NativeEngine, ZeroPageEngine
from dsamig.engine.dsa import DsaEngine
from dsamig.engine.pool import EngineLease, EnginePool, EngineSource
from dsamig.engine.select import create_engine

__all__ = [
    "Detection",
    "DsaEngine",
    "EngineClosedError",
    "EngineLease",
    "EnginePool",
    "EngineSource",
    "NativeEngine",
    "ZeroPageEngine",
    "create_engine",
]
