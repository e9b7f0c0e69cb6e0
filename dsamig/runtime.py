"""Running a command's coroutine: one fresh uvloop event loop per command.

A leaf, beside ``dsamig.settings``: the one-shot commands, the control
commands and the daemons all run their loop through :func:`run_loop`.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
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


__all__ = ["run_loop"]
