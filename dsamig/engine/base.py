"""The engine contract: batches of pages in, zero bitmaps out, asynchronously."""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Detection:
    """Result of one batch.

    ``bitmaps`` are the wire zero bitmaps of the batch's consecutive groups
    (packets), each starting on a byte; ``zero_pages`` counts set bits;
    ``cpu_pages`` counts pages the CPU examined (all of them for the CPU
    backend, fallbacks only for DSA).
    """

    bitmaps: bytes
    zero_pages: int
    cpu_pages: int


class EngineClosedError(RuntimeError):
    """A batch was still queued when its engine was closed."""


class ZeroPageEngine(ABC):
    """A zero-page detector.

    ``submit`` returns a future resolved on the event loop thread; the work
    happens elsewhere (worker threads, a DSA device) and never touches Python
    objects.  ``close`` is idempotent and returns only once no native thread
    can touch a submitted buffer any more.
    """

    name: str = "?"

    @abstractmethod
    def submit(
        self, data: memoryview, page_size: int, group_pages: int
    ) -> asyncio.Future[Detection]:
        """Scan ``data`` page by page; group bitmaps are byte-aligned."""

    async def detect(self, data: memoryview, page_size: int, group_pages: int) -> Detection:
        """Convenience: ``await submit(...)``."""
        return await self.submit(data, page_size, group_pages)

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Engine figures for the job's stats (``backend`` at least)."""

    @abstractmethod
    def close(self) -> None:
        """Stop and release everything; pending batches fail with EngineClosedError."""


class NativeEngine(ZeroPageEngine):
    """Bridge from a native engine core to asyncio.

    The core (``dsamig._native.CpuEngineCore``, its pure twin, or a DSA core)
    posts finished batches to one eventfd; ``loop.add_reader`` wakes us once
    per burst and ``collect()`` hands back every finished batch.
    """

    def __init__(self, core: Any, name: str) -> None:
        self.name = name
        self._core = core
        self._loop = asyncio.get_running_loop()
        self._waiters: dict[int, asyncio.Future[Detection]] = {}
        self._fd = core.fileno()
        self._loop.add_reader(self._fd, self._on_ready)
        self._closed = False
        self._batches = 0
        self._pages = 0
        self._zero_pages = 0
        self._wakeups = 0

    def submit(
        self, data: memoryview, page_size: int, group_pages: int
    ) -> asyncio.Future[Detection]:
        if self._closed:
            raise EngineClosedError(f"{self.name} engine is closed")
        future: asyncio.Future[Detection] = self._loop.create_future()
        token = self._core.submit(data, page_size, group_pages)
        self._waiters[token] = future
        return future

    def _on_ready(self) -> None:
        self._wakeups += 1
        for token, bitmaps, zero_pages, status, cpu_pages in self._core.collect():
            future = self._waiters.pop(token, None)
            if future is None or future.done():
                continue
            if status == 0:
                self._batches += 1
                self._zero_pages += zero_pages
                self._pages += cpu_pages
                future.set_result(Detection(bitmaps, zero_pages, cpu_pages))
            else:
                future.set_exception(
                    EngineClosedError(f"{self.name} batch failed: {os.strerror(status)}")
                )

    def stats(self) -> dict[str, Any]:
        core = self._core.stats()
        return {
            "backend": self.name,
            "batches": self._batches,
            "pages": self._pages,
            "zero-pages": self._zero_pages,
            "wakeups": self._wakeups,
            "threads": getattr(self._core, "threads", 0),
            "worker-cpu-s": round(float(core.get("worker-cpu-s", 0.0)), 4),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._core.close()  # joins the workers: no native thread runs after this
        self._on_ready()  # fail what came back cancelled, unpin every buffer
        self._loop.remove_reader(self._fd)
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(EngineClosedError(f"{self.name} engine closed"))
        self._waiters.clear()
