"""The token bucket and the fair division of a daemon-wide bandwidth cap."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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


class FakeTime:
    """A clock that only its own ``sleep`` moves, with actions due at set times.

    A waiter's sleep moves the clock by exactly what it asked for and yields
    once to the loop, so a test sees precisely how long the bucket made its
    callers wait, in no real time at all.
    """

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []
        self._due: list[tuple[float, Callable[[], None]]] = []

    def __call__(self) -> float:
        return self.now

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run ``action`` once the clock has passed ``when``."""
        self._due.append((when, action))

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        for due in [d for d in self._due if d[0] <= self.now]:
            self._due.remove(due)
            due[1]()
        await asyncio.sleep(0)

    def bucket(self, rate: float | None, **kwargs: float) -> TokenBucket:
        return TokenBucket(rate, clock=self, sleep=self.sleep, **kwargs)


async def test_bucket_holds_the_rate() -> None:
    fake = FakeTime()
    bucket = fake.bucket(1_000_000)
    began = fake.now
    for _ in range(5):  # bounded in real time: rounding must not keep it asleep
        await asyncio.wait_for(bucket.acquire(50_000), 10)
    # 250 kB at 1 MB/s from an empty bucket: a quarter of a second, exactly.
    assert fake.now - began == pytest.approx(0.25)
    assert bucket.waited_s == pytest.approx(0.25)
    assert max(fake.slept) <= 0.1  # a waiter looks at the rate again at least every 0.1 s


async def test_unlimited_and_empty_acquires_do_not_wait() -> None:
    fake = FakeTime()
    await fake.bucket(None).acquire(10**12)
    await fake.bucket(1.0).acquire(0)
    assert fake.slept == []


async def test_channels_share_a_bucket_and_rate_changes_apply_to_waiters() -> None:
    fake = FakeTime()
    bucket = fake.bucket(100_000)
    got: list[float] = []

    async def channel() -> None:
        await bucket.acquire(100_000)  # a second at the first rate
        got.append(fake.now)

    began = fake.now
    # A job ended 0.15 s in: this one may go faster now.
    fake.at(began + 0.15, lambda: bucket.set_rate(10_000_000))
    await asyncio.wait_for(asyncio.gather(*(channel() for _ in range(3))), 10)
    # The first waiter had 0.2 s at 100 kB/s (20 kB), the rest of its 100 kB
    # and the next two 100 kB each at 10 MB/s: 8 ms + 10 ms + 10 ms.
    assert [t - began for t in got] == pytest.approx([0.208, 0.218, 0.228])
    assert bucket.waited_s == pytest.approx(0.228)


async def test_a_cancelled_acquire_leaves_no_debt() -> None:
    clock = FakeTime()
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
    clock = FakeTime()
    bucket = TokenBucket(1000.0, burst_s=0.05, clock=clock)
    waiting = asyncio.ensure_future(bucket.acquire(500))
    while bucket.tokens == 0:
        await asyncio.sleep(0)
    clock.now += 10.0  # long enough to earn far more than the burst
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert bucket.tokens == 50  # 0.05 s at 1000 B/s
