"""Zero-page detection engines behind one asynchronous contract."""

from dsamig.engine.base import Detection, EngineClosedError, NativeEngine, ZeroPageEngine
from dsamig.engine.dsa import DsaConfig, DsaEngine, FaultSpec
from dsamig.engine.pool import EngineLease, EnginePool, EngineSource
from dsamig.engine.select import ENGINE_NAMES, create_engine

__all__ = [
    "ENGINE_NAMES",
    "Detection",
    "DsaConfig",
    "DsaEngine",
    "EngineClosedError",
    "EngineLease",
    "EnginePool",
    "EngineSource",
    "FaultSpec",
    "NativeEngine",
    "ZeroPageEngine",
    "create_engine",
]
