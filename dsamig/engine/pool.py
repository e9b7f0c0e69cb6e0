"""Engines a daemon shares among its concurrent jobs.

Only one process can open a dedicated DSA work queue: a second ``open()``
fails with EBUSY, so a sender daemon that opened one engine per job would
fail its second concurrent job.  An ``EnginePool`` opens the DSA work queues
once, on the first job that asks for them, and hands every job that asks
for the same work queues a lease on that one engine.  A lease is a
``ZeroPageEngine`` of its own: its ``close()`` gives back the job's share
(after the job's batches are back), and its stats count the job's own
batches and pages, with the shared engine's figures under ``shared``.  The
engines stay open until the pool is closed, so a daemon probes its WQs once.

CPU engines are not shared: they hold no device and cost nothing to open.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any, Protocol

from dsamig.dsa_config import DsaConfig
from dsamig.engine.base import Detection, EngineClosedError, ZeroPageEngine
from dsamig.engine.dsa import DsaEngine
from dsamig.engine.select import create_engine, resolve_dsa
from dsamig.errors import ConfigError, EngineError
from dsamig.logs import get_logger
from dsamig.settings import ENGINE_NAMES


class EngineSource(Protocol):
    """Where a job gets its engine: ``create_engine`` of ``dsamig.engine.select``,
    or an ``EnginePool``."""

    def create_engine(
        self, kind: str, *, threads: int | None = None, dsa: DsaConfig | None = None
    ) -> tuple[ZeroPageEngine, str]: ...


class _Shared:
    """One open DSA engine and the leases on it."""

    def __init__(self, engine: DsaEngine, config: DsaConfig) -> None:
        self.engine = engine
        self.config = config
        self.leases: set[EngineLease] = set()


class EngineLease(ZeroPageEngine):
    """A job's share of a pooled engine."""

    def __init__(self, pool: EnginePool, shared: _Shared) -> None:
        self.name = shared.engine.name
        self._pool = pool
        self._shared = shared
        self._futures: set[asyncio.Future[Detection]] = set()
        self._closed = False
        self._batches = self._pages = self._zero_pages = self._cpu_pages = 0

    def submit(
        self, data: memoryview, page_size: int, group_pages: int
    ) -> asyncio.Future[Detection]:
        if self._closed:
            raise EngineClosedError(f"{self.name} engine lease is closed")
        future = self._shared.engine.submit(data, page_size, group_pages)
        self._futures.add(future)
        future.add_done_callback(functools.partial(self._done, -(-len(data) // page_size)))
        return future

    def _done(self, pages: int, future: asyncio.Future[Detection]) -> None:
        if future.cancelled():
            return  # its batch may still be in the engine: close() waits for it
        self._futures.discard(future)  # resolved: its batch is back
        if future.exception() is not None:
            return
        result = future.result()
        self._batches += 1
        self._pages += pages
        self._zero_pages += result.zero_pages
        self._cpu_pages += result.cpu_pages

    #: The counters a lease keeps for its job alone; the shared engine's other
    #: counters belong to the engine (see :meth:`EnginePool.engine_stats`).
    JOB_KEYS = ("engine-batches", "pages", "zero-pages", "cpu-fallback-pages")

    def stats(self) -> dict[str, Any]:
        shared = self._shared.engine.stats()
        return {
            "backend": shared["backend"],
            "submission": shared.get("submission", ""),
            "engine-batches": self._batches,
            "pages": self._pages,
            "zero-pages": self._zero_pages,
            "cpu-fallback-pages": self._cpu_pages,
            "wqs": shared.get("wqs", []),
            "shared": {**{k: v for k, v in shared.items() if k != "wqs"},
                       "users": len(self._shared.leases)},
        }

    def close(self) -> None:
        """Give the job's share back once its batches are back from the
        engine (bounded by the engine's timeout); the engine stays open."""
        if self._closed:
            return
        self._closed = True
        engine = self._shared.engine
        bound_s = 2 * self._shared.config.timeout_s + 5.0
        if not engine.wait_returned(self._futures, bound_s):
            get_logger(component="engine").error(
                "a job's DSA batches did not come back in time; their buffers stay pinned",
                bound_s=bound_s,
            )
        for future in self._futures:
            if not future.done():
                future.set_exception(EngineClosedError(f"{self.name} engine lease closed"))
        self._futures.clear()
        self._pool._release(self._shared, self)


class EnginePool:
    """Opens each set of DSA work queues once and leases the engine to jobs.

    ``create_engine`` has the signature of ``dsamig.engine.select.create_engine``;
    a ``Sender`` given the pool takes its engine from it.  Call ``close()``
    once no job runs any more (idempotent).
    """

    def __init__(self) -> None:
        self._shared: dict[str, _Shared] = {}
        self._closed = False
        self._log = get_logger(component="engine")

    def create_engine(
        self, kind: str, *, threads: int | None = None, dsa: DsaConfig | None = None
    ) -> tuple[ZeroPageEngine, str]:
        """A lease on the shared DSA engine for these WQs (opened on first
        use), or a job's own engine for cpu, none, and auto without DSA."""
        if kind not in ENGINE_NAMES:
            raise ConfigError(f"unknown engine {kind!r} (choose from {', '.join(ENGINE_NAMES)})")
        if self._closed:
            raise EngineError("the engine pool is closed")
        if kind not in ("dsa", "auto"):
            return create_engine(kind, threads=threads, dsa=dsa)
        config = dsa or DsaConfig()
        specs, reason = resolve_dsa(config)
        if specs is None:
            if kind == "dsa":
                raise EngineError(f"engine dsa: {reason}")
            return create_engine("auto", threads=threads, dsa=config)
        # The same WQs are the same engine, whatever the job's other settings.
        key = json.dumps(specs, sort_keys=True)
        shared = self._shared.get(key)
        if shared is not None and not shared.leases and not shared.engine.usable:
            self._log.info("reopening a DSA engine whose work queues are all out of service")
            shared.engine.close()
            del self._shared[key]
            shared = None
        if shared is None:
            try:
                engine = DsaEngine(specs, config)
            except EngineError as exc:
                if kind == "dsa":
                    raise
                cpu, cpu_reason = create_engine("cpu", threads=threads, dsa=config)
                return cpu, f"{cpu_reason}: DSA not used: {exc}"
            shared = self._shared[key] = _Shared(engine, config)
        elif shared.leases:
            reason += f" (shared with {len(shared.leases)} running job(s))"
        lease = EngineLease(self, shared)
        shared.leases.add(lease)
        return lease, reason

    def _release(self, shared: _Shared, lease: EngineLease) -> None:
        shared.leases.discard(lease)

    def engine_stats(self) -> list[dict[str, Any]]:
        """The counters of each shared engine that no job counts as its own
        (timeouts, errors, quarantines...): a daemon's metrics add these once,
        whatever the number of jobs that used the engine."""
        out = []
        for shared in self._shared.values():
            stats = shared.engine.stats()
            out.append({k: v for k, v in stats.items() if k not in EngineLease.JOB_KEYS})
        return out

    @property
    def open_engines(self) -> int:
        """DSA engines open now."""
        return len(self._shared)

    def close(self) -> None:
        """Close every shared engine; leases still out fail their batches."""
        if self._closed:
            return
        self._closed = True
        for shared in self._shared.values():
            shared.engine.close()
        self._shared.clear()
