"""Choosing an engine backend from a name: ``auto``, ``cpu``, ``dsa``, ``none``."""

from __future__ import annotations

import os
from typing import Any

from dsamig.dsa_config import DsaConfig
from dsamig.engine.base import ZeroPageEngine
from dsamig.engine.cpu import CpuEngine
from dsamig.engine.dsa import DsaEngine, dsa_available
from dsamig.engine.dsa_discovery import discover
from dsamig.engine.none import NoneEngine
from dsamig.errors import ConfigError, EngineError
from dsamig.native import native_error
from dsamig.settings import ENGINE_NAMES


def default_cpu_threads() -> int:
    """One scan thread per two cores (the loop and the kernel need the rest), 1..4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def create_engine(
    kind: str, *, threads: int | None = None, dsa: DsaConfig | None = None
) -> tuple[ZeroPageEngine, str]:
    """Start the engine ``kind`` on the running loop; return it and why it was chosen.

    ``dsa`` with no usable work queue is an error, never a silent CPU
    fallback; ``auto`` takes DSA when a usable WQ exists (or emulated ones
    are configured), else the CPU, and the reason says which and why.
    """
    if kind not in ENGINE_NAMES:
        raise ConfigError(f"unknown engine {kind!r} (choose from {', '.join(ENGINE_NAMES)})")
    if kind == "none":
        return NoneEngine(), "engine none: every page is sent as normal"
    dsa_reason = ""
    if kind in ("dsa", "auto"):
        engine, dsa_reason = _start_dsa(kind, dsa or DsaConfig())
        if engine is not None:
            return engine, dsa_reason
        if kind == "dsa":
            raise EngineError(f"engine dsa: {dsa_reason}")
    threads = threads or default_cpu_threads()
    impl_note = "native SIMD" if native_error is None else f"pure Python ({native_error})"
    reason = f"engine cpu ({impl_note}, {threads} thread{'s' if threads > 1 else ''})"
    if kind == "auto":
        reason += f": DSA not used: {dsa_reason}"
    return CpuEngine(threads), reason


def resolve_dsa(config: DsaConfig) -> tuple[list[dict[str, Any]] | None, str]:
    """The DsaEngineCore work-queue specs ``config`` asks for, and the reason
    line; or None and why not.

    Chosen automatically (no paths, no emulation), the shared WQs are taken
    when there are any: only one process can open a dedicated WQ, so those
    are left to whoever configured them for that.
    """
    config.validate()
    why_not = dsa_available()
    if why_not is not None:
        return None, why_not
    if config.emulate:
        rate = f"{config.rate} B/s" if config.rate else "unlimited rate"
        faults = f", faults {config.emulate_faults}" if config.emulate_faults else ""
        return config.core_specs(), (
            f"engine dsa: {config.emulate} software work queue(s) ({config.emulate_mode}, "
            f"{config.emulate_submit}, {rate}{faults})"
        )
    found = discover(config.sysfs_root, config.dev_root)
    note = ""
    if config.wqs:
        chosen = []
        for path in config.wqs:
            info = found.find(path)
            if info is None:
                what = "no such file" if not os.path.exists(path) else (
                    f"not listed under {config.sysfs_root}")
                return None, f"{path} is not a DSA work queue ({what})"
            if not info.usable:
                return None, f"{path} cannot be used: {'; '.join(info.reasons)}"
            chosen.append(info)
    else:
        usable = found.usable()
        if not usable:
            return None, found.why_none()
        shared = [wq for wq in usable if wq.mode == "shared"]
        chosen = shared or usable
        if shared and len(shared) < len(usable):
            note = (f"; dedicated WQs left alone: "
                    f"{', '.join(wq.dev_path for wq in usable if wq.mode != 'shared')}")
    return [wq.core_spec() for wq in chosen], "engine dsa: " + ", ".join(
        f"{wq.dev_path} ({wq.mode}, {wq.submission})" for wq in chosen
    ) + note


def _start_dsa(kind: str, config: DsaConfig) -> tuple[DsaEngine | None, str]:
    """The DSA engine for ``config``, or None and why not."""
    specs, reason = resolve_dsa(config)
    if specs is None:
        return None, reason
    try:
        return DsaEngine(specs, config), reason
    except EngineError as exc:
        if kind == "dsa":
            raise
        return None, str(exc)
