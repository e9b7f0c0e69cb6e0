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


class FrozenClock:
    """Time that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_cancelled_acquire_leaves_no_debt() -> None:
    clock = FrozenClock()
    # Binary fractions throughout, so the sums are exact.
    bucket = TokenBucket(1024.0, burst_s=0.0625, clock=clock)
    waiting = asyncio.ensure_future(bucket.acquire(500))
    while bucket.tokens == 0:  # bounded: the acquire takes its tokens on its first step
        await asyncio.sleep(0)
    assert bucket.tokens == -500
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert bucket.tokens == 0  # no time passed: exactly what it had before
    # The next acquire owes nothing for the bytes that were never sent.
    clock.now += 0.0625
    await asyncio.wait_for(bucket.acquire(64), 1.0)
    assert bucket.tokens == 0


async def test_a_refund_never_exceeds_the_burst() -> None:
    clock = FrozenClock()
    bucket = TokenBucket(1000.0, burst_s=0.05, clock=clock)
    waiting = asyncio.ensure_future(bucket.acquire(500))
    while bucket.tokens == 0:
        await asyncio.sleep(0)
    clock.now += 10.0  # long enough to earn far more than the burst
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert bucket.tokens == 50  # 0.05 s at 1000 B/s
