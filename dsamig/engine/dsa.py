"""The DSA backend: zero-page checks on Intel DSA work queues, real or emulated.

``DsaConfig`` (``dsamig.dsa_config``) says which work queues to use (device
paths, or a number of software WQs with their faults), ``DsaEngine`` drives them through the native
``DsaEngineCore`` (one completion thread, descriptors built and polled in C)
and reports its figures under the job's ``engine`` stats object.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import Iterable
from typing import Any

from dsamig.dsa_config import DsaConfig
from dsamig.engine.base import Detection, NativeEngine
from dsamig.errors import EngineError
from dsamig.logs import get_logger
from dsamig.native import native, native_error


def dsa_available() -> str | None:
    """None when the native DSA core can be used, else why not."""
    if native is None:
        return f"the native extension is not loaded ({native_error})"
    if not hasattr(native, "DsaEngineCore"):
        return "the native extension was built without the DSA engine"
    return None


class DsaEngine(NativeEngine):
    """Zero-page detection on DSA work queues through ``DsaEngineCore``.

    ``specs`` are the core's work-queue dicts (see ``DsaConfig.core_specs``
    and ``dsa_discovery.core_spec``).  The core probes every WQ before it is
    used and leaves out those that fail (logged with the reason).  A WQ sent
    to quarantine (timeout, full for too long, hardware or translation error)
    is logged with its reason and comes back after a NOOP probe; one taken
    out for good (it keeps failing, rejects descriptors, or the completion
    thread died) is logged once.  Batches go on meanwhile, on the other WQs
    or the CPU.
    """

    def __init__(self, specs: list[dict[str, Any]], config: DsaConfig) -> None:
        why_not = dsa_available()
        if why_not is not None:
            raise EngineError(f"engine dsa: {why_not}")
        assert native is not None
        try:
            core = native.DsaEngineCore(
                specs,
                timeout_s=config.timeout_s,
                prefault=config.prefault,
                spin_us=config.spin_us,
            )
        except OSError as exc:
            raise EngineError(f"engine dsa: {exc.strerror or exc}") from None
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"engine dsa: {exc}") from None
        self._emulated = bool(config.emulate)
        self._names = [str(s.get("path", f"emulated:{i}")) for i, s in enumerate(specs)]
        self._log = get_logger(component="engine", backend="dsa")
        # Per WQ: (state, quarantines, readmissions) as last logged.
        self._seen: list[tuple[str, int, int]] = [("in-service", 0, 0)] * len(self._names)
        try:
            super().__init__(core, "dsa")
        except BaseException:
            core.close()
            raise
        self._log_health()

    def _on_ready(self) -> None:
        super()._on_ready()
        self._log_health()

    def _log_health(self) -> None:
        """One log line per change of a WQ's health since the last look."""
        for i, wq in enumerate(self._core.wq_stats()):
            state, quarantines, readmissions = self._seen[i]
            now = (wq["state"], wq["quarantines"], wq["readmissions"])
            if now == self._seen[i]:
                continue
            self._seen[i] = now
            if wq["state"] == "out" and state != "out":
                self._log.warning(
                    "DSA work queue out of service; its pages go to the other WQs or the CPU",
                    wq=self._names[i], reason=wq["reason"],
                )
            elif wq["quarantines"] > quarantines:
                self._log.info(
                    "DSA work queue quarantined until a NOOP probe completes",
                    wq=self._names[i], reason=wq["reason"],
                    quarantines=wq["quarantines"],
                )
            if wq["readmissions"] > readmissions and wq["state"] != "out":
                self._log.debug("DSA work queue re-admitted", wq=self._names[i],
                                readmissions=wq["readmissions"])

    @property
    def usable(self) -> bool:
        """Whether any work queue is not out for good."""
        return not self._closed and any(wq["state"] != "out" for wq in self._core.wq_stats())

    def wait_returned(self, futures: Iterable[asyncio.Future[Detection]],
                      timeout_s: float) -> bool:
        """Wait, at most ``timeout_s``, until the batches behind ``futures``
        (cancelled ones included) have come back from the native engine,
        resolving every completion meanwhile.  True when they all did.

        For a caller that shares this engine and must not let go of its
        buffers while the engine holds them; it blocks the loop thread, as
        ``close()`` does, and every batch comes back within the timeout."""
        wanted = {id(f) for f in futures}
        deadline = time.monotonic() + timeout_s
        while not self._closed:
            if not any(id(f) in wanted for f in self._waiters.values()):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self._fd], [], [], min(left, 0.1))
            self._on_ready()
        return True

    def submission(self, wqs: list[dict[str, Any]] | None = None) -> str:
        """How descriptors reach the WQs: portal-enqcmd, portal-movdir64b,
        write, emulated (or several of these joined by '+')."""
        if self._emulated:
            return "emulated"
        names = {"enqcmd": "portal-enqcmd", "movdir64b": "portal-movdir64b", "write": "write"}
        found = sorted({names.get(w["method"], w["method"]) for w in wqs or self._core.wq_stats()})
        return "+".join(found)

    def stats(self) -> dict[str, Any]:
        base = super().stats()
        core = self._core.stats()
        wqs = self._core.wq_stats()
        for name, wq in zip(self._names, wqs, strict=False):  # none after close
            wq["name"] = name
        base.pop("worker-cpu-s", None)
        return {
            **base,
            "backend": "dsa",
            "submission": self.submission(wqs),
            "engine-batches": base["batches"],
            # The base counts the pages the CPU examined; here that is the
            # fallbacks (cpu-fallback-pages), and "pages" means all of them.
            "pages": core["pages"],
            "batches": core["batches"],
            "descriptors": core["descriptors"],
            "submit-retries": core["submit-retries"],
            "retry-exhausted": core["retry-exhausted"],
            "submit-failures": core["submit-failures"],
            "page-faults": core["page-faults"],
            "batch-failures": core["batch-failures"],
            "cpu-fallback-pages": core["cpu-fallback-pages"],
            "timeouts": core["timeouts"],
            "errors": core["errors"],
            "quarantines": core["quarantines"],
            "readmissions": core["readmissions"],
            "probe-failures": core["probe-failures"],
            "probe-timeouts": core["probe-timeouts"],
            "wqs-out": core["wqs-out"],
            "held": core["held"],
            "completion-thread-cpu-s": round(float(core["completion-thread-cpu-s"]), 4),
            "wqs": wqs,
        }

    def close(self) -> None:
        if not self._closed:
            self._log_health()
        super().close()
