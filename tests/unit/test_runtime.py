"""The runtime leaf: bounded waits that never lose a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from dsamig.runtime import bounded


async def test_a_cancel_that_arrives_with_the_result_is_kept() -> None:
    # asyncio.wait_for on 3.11 returns the result here and its caller runs
    # on: a cancelled job then waited out its next timeout.
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    ran_on: list[int] = []

    async def waiter() -> None:
        ran_on.append(await bounded(fut, 10))

    task = asyncio.ensure_future(waiter())
    await asyncio.sleep(0)  # it waits on fut now
    fut.set_result(1)
    task.cancel()  # in the same pass as the result
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran_on == []


async def test_a_wait_past_its_bound_raises_timeout_and_cancels_what_it_awaited() -> None:
    event = asyncio.Event()
    inner = asyncio.ensure_future(event.wait())
    with pytest.raises(TimeoutError):
        await bounded(inner, 0.01)
    assert inner.cancelled()


async def test_a_result_within_the_bound_is_returned() -> None:
    assert await bounded(asyncio.sleep(0, result="done"), 10) == "done"
    assert await bounded(asyncio.sleep(0, result="unbounded"), None) == "unbounded"
