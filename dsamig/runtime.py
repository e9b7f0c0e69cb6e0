"""Running a command's coroutine: one fresh uvloop event loop per command.

A leaf, beside ``dsamig.settings``: the one-shot commands, the control
commands and the daemons all run their loop through :func:`run_loop`.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import uvloop

from dsamig.logs import loop_exception_handler

T = TypeVar("T")


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh uvloop event loop.

    Everything allocated so far (modules, classes) goes to the permanent GC
    generation: the transfer makes many short-lived objects per packet and
    none of them form cycles, so full collections would only rescan imports.
    What the loop reports goes through the logger (one event, no traceback).
    """
    gc.freeze()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.get_loop().set_exception_handler(loop_exception_handler)
        return runner.run(coro)


async def bounded(aw: Awaitable[T], timeout_s: float | None) -> T:
    """Await ``aw`` for at most ``timeout_s`` seconds (TimeoutError after;
    None: no bound).  Every bounded wait of dsamig goes through here.

    ``asyncio.wait_for`` on Python 3.11 loses a cancellation that arrives in
    the same pass of the loop as ``aw``'s result: it returns the result, and
    its caller runs on as if never cancelled, into its next wait (CPython
    gh-86296, fixed in 3.12).  A job cancelled as its END was written then
    sat out a whole idle timeout waiting for ACKs.  ``asyncio.timeout``
    keeps the cancellation.
    """
    async with asyncio.timeout(timeout_s):
        return await aw


__all__ = ["bounded", "run_loop"]
