"""The ``none`` backend: every page is normal (the throughput test knob)."""

from __future__ import annotations

import asyncio

from dsamig.engine.base import Detection, ZeroPageEngine


class NoneEngine(ZeroPageEngine):
    """Reports every page as normal without reading it."""

    name = "none"

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._batches = 0

    def submit(
        self, data: memoryview, page_size: int, group_pages: int
    ) -> asyncio.Future[Detection]:
        pages = -(-len(data) // page_size)
        full, rest = divmod(pages, group_pages)
        nbytes = full * ((group_pages + 7) // 8) + (rest + 7) // 8
        self._batches += 1
        future: asyncio.Future[Detection] = self._loop.create_future()
        future.set_result(Detection(bytes(nbytes), 0, 0))
        return future

    def stats(self) -> dict[str, object]:
        return {"backend": self.name, "batches": self._batches}

    def close(self) -> None:
        pass
