"""The token bucket and the fair division of a daemon-wide bandwidth cap."""

from __future__ import annotations

import asyncio
import time

import pytest

from dsamig.transport.pacing import TokenBucket, fair_shares


@pytest.mark.parametrize(
    ("total", "caps", "shares"),
    [
        (None, [None, 5.0], [None, 5.0]),
        (90.0, [None, None, None], [30.0, 30.0, 30.0]),
        (90.0, [10.0, None, None], [10.0, 40.0, 40.0]),
        (90.0, [10.0, 20.0, 100.0], [10.0, 20.0, 60.0]),
        (90.0, [50.0, 50.0], [45.0, 45.0]),
        (90.0, [10.0, 10.0], [10.0, 10.0]),  # the cap is not reached: nobody goes faster
        (90.0, [], []),
    ],
)
def test_fair_shares_are_max_min_fair(total, caps, shares) -> None:
    assert fair_shares(total, caps) == pytest.approx(shares)


async def test_bucket_holds_the_rate() -> None:
    bucket = TokenBucket(1_000_000)
    began = time.monotonic()
    for _ in range(5):
        await bucket.acquire(50_000)
    elapsed = time.monotonic() - began
    assert 0.24 <= elapsed < 1.0  # 250 kB at 1 MB/s, the bucket starting empty


async def test_unlimited_and_empty_acquires_do_not_wait() -> None:
    bucket = TokenBucket(None)
    began = time.monotonic()
    await bucket.acquire(10**12)
    await TokenBucket(1.0).acquire(0)
    assert time.monotonic() - began < 0.05


async def test_channels_share_a_bucket_and_rate_changes_apply_to_waiters() -> None:
    bucket = TokenBucket(100_000)
    got: list[float] = []

    async def channel() -> None:
        await bucket.acquire(100_000)  # a second at the first rate
        got.append(time.monotonic())

    began = time.monotonic()
    tasks = [asyncio.ensure_future(channel()) for _ in range(3)]
    await asyncio.sleep(0.15)
    bucket.set_rate(10_000_000)  # a job ended: this one may go faster now
    await asyncio.gather(*tasks)
    assert max(got) - began < 0.5
    assert bucket.waited_s > 0.1
