"""What a job asks of the DSA backend: work queues, emulation, faults (a leaf).

:class:`DsaConfig` says which work queues to use (device paths, or a number
of software WQs with their faults) and :class:`FaultSpec` the faults the
software device injects.  Plain values with their validation and their YAML
form, apart from the engine (``dsamig.engine.dsa``), so that the job schema
and the CLI can read them without loading the native engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from dsamig.errors import ConfigError

DEFAULT_TIMEOUT_S = 1.0
DEFAULT_EMULATED_SIZE = 32
DEFAULT_EMULATED_BATCH = 128
DEFAULT_EMULATED_TRANSFER = 2 << 20
MAX_WQS = 16

#: Fault classes of the software device, as written in a fault spec.
FAULT_KEYS = ("page-fault", "batch-fail", "list-fault", "hw-error", "hang", "wq-full")


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """Fault injection of the software DSA device.

    Each rate is a probability: per descriptor (``page-fault``, ``hw-error``),
    per batch descriptor (``batch-fail``: one member fails; ``list-fault``:
    reading the descriptor list faults part way), per submitted descriptor
    (``hang``: never completes) or per submission attempt (``wq-full``: the
    WQ answers "retry", or on a dedicated WQ silently drops it).  Decisions
    are a hash of ``seed`` and the descriptor's submission number, so a run
    is reproducible.
    """

    page_fault: float = 0.0
    batch_fail: float = 0.0
    list_fault: float = 0.0
    hw_error: float = 0.0
    hang: float = 0.0
    wq_full: float = 0.0
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse ``"page-fault=0.05,batch-fail=0.01,hang=0.001,seed=7"``."""
        values: dict[str, Any] = {}
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or not raw:
                raise ConfigError(f"DSA fault spec: {item!r} is not KEY=VALUE")
            if key in values:
                raise ConfigError(f"DSA fault spec: {key!r} given twice")
            values[key] = raw
        return cls.from_mapping(values, where="DSA fault spec")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "faults") -> FaultSpec:
        """Build from ``{"page-fault": 0.05, ..., "seed": 7}`` (YAML keys)."""
        kwargs: dict[str, Any] = {}
        for key, raw in data.items():
            if key == "seed":
                try:
                    seed = int(raw)
                except (TypeError, ValueError):
                    raise ConfigError(f"{where}: seed must be an integer, not {raw!r}") from None
                if seed < 0:
                    raise ConfigError(f"{where}: seed must not be negative, not {seed}")
                kwargs["seed"] = seed
                continue
            if key not in FAULT_KEYS:
                raise ConfigError(
                    f"{where}: unknown fault {key!r} (known: {', '.join(FAULT_KEYS)}, seed)"
                )
            try:
                rate = float(raw)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{where}: {key} must be a probability 0..1, not {raw!r}"
                ) from None
            if not 0.0 <= rate <= 1.0 or math.isnan(rate):
                raise ConfigError(f"{where}: {key} must be a probability 0..1, not {raw!r}")
            kwargs[key.replace("-", "_")] = rate
        return cls(**kwargs)

    def to_dict(self) -> dict[str, float | int]:
        """The spec as YAML/JSON keys (rates that are set, and the seed)."""
        out: dict[str, float | int] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "seed" or value:
                out[f.name.replace("_", "-")] = value
        return out

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.to_dict().items())


@dataclass
class DsaConfig:
    """Which DSA work queues a job uses, and how.

    ``wqs`` are device paths (``/dev/dsa/wq0.0``); with none and no
    ``emulate``, the usable WQs found in sysfs are used (the shared ones when
    there are any: a dedicated WQ belongs to one process).  ``emulate`` asks
    for that many software work queues instead, configured by the
    ``emulate_*`` fields (``rate`` in bytes per second, 0: unlimited;
    ``emulate_model`` ``dsa1`` for Sapphire Rapids or ``dsa2``; the
    ``emulate_kernel_*`` fields model the kernel around the WQ: ``mmap``
    ``allow`` or ``eperm``, ``write`` False for a kernel without the write()
    method, ``foreign_mm`` for write() from another address space).
    """

    wqs: list[str] = field(default_factory=list)
    emulate: int = 0
    emulate_faults: FaultSpec | None = None
    emulate_mode: str = "shared"
    emulate_submit: str = "portal"
    emulate_size: int = DEFAULT_EMULATED_SIZE
    emulate_threshold: int | None = None
    emulate_engines: int = 1
    max_batch_size: int = DEFAULT_EMULATED_BATCH
    max_transfer_size: int = DEFAULT_EMULATED_TRANSFER
    rate: int = 0
    emulate_model: str = "dsa1"
    emulate_kernel_mmap: str = "allow"
    emulate_kernel_write: bool = True
    emulate_foreign_mm: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    prefault: bool = True
    spin_us: float = 5.0
    sysfs_root: str = "/sys/bus/dsa/devices"
    dev_root: str = "/dev/dsa"

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        if self.wqs and self.emulate:
            raise ConfigError("DSA: give work queue paths or an emulated count, not both")
        if len(self.wqs) > MAX_WQS:
            raise ConfigError(f"DSA: at most {MAX_WQS} work queues, not {len(self.wqs)}")
        if len(set(self.wqs)) != len(self.wqs):
            raise ConfigError("DSA: a work queue path is given twice")
        if not 0 <= self.emulate <= MAX_WQS:
            raise ConfigError(f"DSA: emulate must be 0..{MAX_WQS} work queues, not {self.emulate}")
        if self.emulate_mode not in ("shared", "dedicated"):
            raise ConfigError(
                f"DSA: emulated mode must be shared or dedicated, not {self.emulate_mode!r}"
            )
        if self.emulate_submit not in ("portal", "write"):
            raise ConfigError(
                f"DSA: emulated submission must be portal or write, not {self.emulate_submit!r}"
            )
        if self.emulate_model not in ("dsa1", "dsa2"):
            raise ConfigError(
                f"DSA: emulated model must be dsa1 or dsa2, not {self.emulate_model!r}"
            )
        if self.emulate_kernel_mmap not in ("allow", "eperm"):
            mmap_text = self.emulate_kernel_mmap
            raise ConfigError(
                f"DSA: emulated kernel-mmap must be allow or eperm, not {mmap_text!r}"
            )
        if not 1 <= self.emulate_size <= 4096:
            raise ConfigError(f"DSA: emulated WQ size must be 1..4096, not {self.emulate_size}")
        threshold = self.emulate_threshold
        if threshold is not None and not 1 <= threshold <= self.emulate_size:
            raise ConfigError(
                f"DSA: emulated threshold must be 1..{self.emulate_size}, not {threshold}"
            )
        if not 1 <= self.emulate_engines <= 8:
            raise ConfigError(f"DSA: emulated engines must be 1..8, not {self.emulate_engines}")
        if not 1 <= self.max_batch_size <= 4096:
            raise ConfigError(f"DSA: max batch size must be 1..4096, not {self.max_batch_size}")
        if not 1 <= self.max_transfer_size <= 1 << 31:
            raise ConfigError(
                f"DSA: max transfer size must be 1..2GiB, not {self.max_transfer_size}"
            )
        if self.rate < 0:
            raise ConfigError(f"DSA: rate must not be negative, not {self.rate}")
        if not 0 < self.timeout_s <= 3600 or math.isnan(self.timeout_s):
            raise ConfigError(f"DSA: timeout must be 0..3600 s, not {self.timeout_s}")
        if self.spin_us < 0:
            raise ConfigError(f"DSA: spin must not be negative, not {self.spin_us}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "dsa") -> DsaConfig:
        """Build from a job's structured ``dsa:`` mapping.

        ``wqs: [{path: /dev/dsa/wq0.0}, ...]``, ``timeout-s: 1.0``,
        ``prefault: true`` and ``emulate: {count: 2, mode: shared, size: 32,
        threshold: 32, engines: 1, max-batch-size: 128, max-transfer-size:
        2097152, rate: 0, submit: portal, model: dsa1, kernel-mmap: allow,
        kernel-write: true, foreign-mm: false, faults: {page-fault: 0.01, seed: 7}}``.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, not {type(data).__name__}")
        known = {"wqs", "emulate", "timeout-s", "prefault", "spin-us"}
        for key in data:
            if key not in known:
                raise ConfigError(
                    f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})"
                )
        config = cls()
        wqs = data.get("wqs", [])
        if not isinstance(wqs, list):
            raise ConfigError(f"{where}.wqs: expected a list of {{path: ...}}")
        for i, entry in enumerate(wqs):
            if not isinstance(entry, Mapping) or set(entry) != {"path"}:
                raise ConfigError(f"{where}.wqs[{i}]: expected {{path: /dev/dsa/wqX.Y}}")
            config.wqs.append(str(entry["path"]))
        emulate = data.get("emulate")
        if emulate is not None:
            _apply_emulate(config, emulate, f"{where}.emulate")
        if "timeout-s" in data:
            config.timeout_s = _number(data["timeout-s"], f"{where}.timeout-s", float)
        if "spin-us" in data:
            config.spin_us = _number(data["spin-us"], f"{where}.spin-us", float)
        if "prefault" in data:
            if not isinstance(data["prefault"], bool):
                raise ConfigError(f"{where}.prefault: expected true or false")
            config.prefault = data["prefault"]
        config.validate()
        return config

    def to_mapping(self) -> dict[str, Any]:
        """The job-document form that :meth:`from_mapping` reads back."""
        out: dict[str, Any] = {
            "timeout-s": self.timeout_s, "prefault": self.prefault, "spin-us": self.spin_us,
        }
        if self.wqs:
            out["wqs"] = [{"path": path} for path in self.wqs]
        if self.emulate:
            emulate: dict[str, Any] = {
                "count": self.emulate, "mode": self.emulate_mode, "submit": self.emulate_submit,
                "size": self.emulate_size, "engines": self.emulate_engines,
                "max-batch-size": self.max_batch_size,
                "max-transfer-size": self.max_transfer_size, "rate": self.rate,
                "model": self.emulate_model, "kernel-mmap": self.emulate_kernel_mmap,
                "kernel-write": self.emulate_kernel_write, "foreign-mm": self.emulate_foreign_mm,
            }
            if self.emulate_threshold is not None:
                emulate["threshold"] = self.emulate_threshold
            if self.emulate_faults is not None:
                emulate["faults"] = self.emulate_faults.to_dict()
            out["emulate"] = emulate
        return out

    def core_specs(self) -> list[dict[str, Any]]:
        """The emulated work queues as DsaEngineCore specs."""
        faults = (self.emulate_faults or FaultSpec()).to_dict()
        spec: dict[str, Any] = {
            "mode": self.emulate_mode,
            "submit": self.emulate_submit,
            "size": self.emulate_size,
            "max_batch_size": self.max_batch_size,
            "max_transfer_size": self.max_transfer_size,
            "engines": self.emulate_engines,
            "rate": self.rate,
            "faults": faults,
            "model": self.emulate_model,
            "kernel_mmap": self.emulate_kernel_mmap,
            "kernel_write": self.emulate_kernel_write,
            "foreign_mm": self.emulate_foreign_mm,
        }
        if self.emulate_mode == "shared":
            spec["threshold"] = self.emulate_threshold or self.emulate_size
        return [dict(spec) for _ in range(self.emulate)]


def dsa_config_converter(value: Any, where: Any) -> DsaConfig:
    """A converter for the job schema (``dsamig.jobs.schema``): ``where`` is
    its position object, so errors read ``FILE:LINE: engine.dsa.KEY: ...``."""
    return DsaConfig.from_mapping(value, where=where.describe("")[:-2])


def _number(raw: Any, where: str, kind: type) -> Any:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ConfigError(f"{where}: expected a number, not {raw!r}")
    return kind(raw)


def _apply_emulate(config: DsaConfig, emulate: Any, where: str) -> None:
    if isinstance(emulate, int) and not isinstance(emulate, bool):
        config.emulate = emulate
        return
    if not isinstance(emulate, Mapping):
        raise ConfigError(f"{where}: expected a count or a mapping")
    keys = {
        "count": ("emulate", int),
        "mode": ("emulate_mode", str),
        "submit": ("emulate_submit", str),
        "size": ("emulate_size", int),
        "threshold": ("emulate_threshold", int),
        "engines": ("emulate_engines", int),
        "max-batch-size": ("max_batch_size", int),
        "max-transfer-size": ("max_transfer_size", int),
        "rate": ("rate", int),
        "model": ("emulate_model", str),
        "kernel-mmap": ("emulate_kernel_mmap", str),
        "kernel-write": ("emulate_kernel_write", bool),
        "foreign-mm": ("emulate_foreign_mm", bool),
    }
    for key, raw in emulate.items():
        if key == "faults":
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{where}.faults: expected a mapping such as {{hang: 0.001}}")
            config.emulate_faults = FaultSpec.from_mapping(raw, f"{where}.faults")
            continue
        if key not in keys:
            raise ConfigError(
                f"{where}: unknown key {key!r} (known: {', '.join([*keys, 'faults'])})"
            )
        attr, kind = keys[key]
        if kind is str:
            if not isinstance(raw, str):
                raise ConfigError(f"{where}.{key}: expected a string, not {raw!r}")
            setattr(config, attr, raw)
        elif kind is bool:
            if not isinstance(raw, bool):
                raise ConfigError(f"{where}.{key}: expected true or false, not {raw!r}")
            setattr(config, attr, raw)
        else:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise ConfigError(f"{where}.{key}: expected an integer, not {raw!r}")
            setattr(config, attr, raw)


__all__ = ["FAULT_KEYS", "MAX_WQS", "DsaConfig", "FaultSpec", "dsa_config_converter"]
