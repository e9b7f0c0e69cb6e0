"""Zero-page detection engines behind one asynchronous contract."""

from dsamig.engine.base import Detection, EngineClosedError, NativeEngine, ZeroPageEngine
from dsamig.engine.dsa import DsaConfig, DsaEngine, FaultSpec
from dsamig.engine.select import ENGINE_NAMES, create_engine

__all__ = [
    "ENGINE_NAMES",
    "Detection",
    "DsaConfig",
    "DsaEngine",
    "EngineClosedError",
    "FaultSpec",
    "NativeEngine",
    "ZeroPageEngine",
    "create_engine",
]
