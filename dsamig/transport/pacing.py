"""Bandwidth limits: a token bucket per job, rates shared fairly by the daemon.

Each running job has one :class:`TokenBucket` that all its channels await
before writing a chunk (the sender's ``pacer`` hook).  The daemon sets every
bucket's rate from :func:`fair_shares`: the daemon-wide cap divided max-min
fairly among the running jobs, none above its own ``max_bandwidth``, so a job
capped low leaves its unused share to the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

#: How long a waiting acquire sleeps at most before it looks at the rate
#: again, so a rate change (a job started or finished) applies quickly.
RECHECK_S = 0.1
#: A debt smaller than this (bytes) is paid: rounding in the refill must not
#: send a waiter back to sleep for a few femtoseconds, again and again.
ROUNDING_BYTES = 1e-3


class TokenBucket:
    """Lets ``rate`` bytes per second through, on average; None is unlimited.

    ``acquire(n)`` takes ``n`` tokens at once and, if that leaves the bucket
    in debt, sleeps until the debt is paid.  The bucket starts empty and holds
    at most ``burst_s`` seconds' worth of tokens, so a transfer of ``B``
    bytes can never finish much before ``B / rate`` seconds.  Waiters are
    served in order (one lock), so a job's channels share its rate evenly.
    An acquire that is cancelled (its job stopped, its session ended) gives
    its tokens back: bytes never sent leave no debt for the next session.
    ``clock`` is the time source and ``sleep`` how a waiter waits (tests
    inject a clock that only their sleep moves).
    """

    def __init__(self, rate: float | None = None, burst_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._rate = rate
        self.burst_s = burst_s
        self._clock = clock
        self._sleep = sleep
        self._tokens = 0.0
        self._stamp = clock()
        self._lock = asyncio.Lock()
        self.waited_s = 0.0  # total time acquirers slept: how much the limit bit

    @property
    def rate(self) -> float | None:
        """Bytes per second; None is unlimited."""
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        """Change the rate; tokens earned so far are kept."""
        self._refill()
        self._rate = rate

    @property
    def tokens(self) -> float:
        """Bytes that may go at once, as of the last look (negative: in debt)."""
        return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        if self._rate is not None:
            self._tokens = min(self._tokens + (now - self._stamp) * self._rate, self._cap())
        self._stamp = now

    def _cap(self) -> float:
        return float("inf") if self._rate is None else self._rate * self.burst_s

    async def acquire(self, nbytes: int) -> None:
        """Return once ``nbytes`` more bytes may be sent."""
        if nbytes <= 0 or self._rate is None:
            return
        async with self._lock:
            self._refill()
            self._tokens -= nbytes
            started = self._clock()
            try:
                while self._rate is not None and self._tokens < -ROUNDING_BYTES:
                    await self._sleep(min(-self._tokens / self._rate, RECHECK_S))
                    self._refill()
            except asyncio.CancelledError:
                # The bytes will not be sent: give their tokens back.
                self._refill()
                self._tokens = min(self._tokens + nbytes, self._cap())
                raise
            finally:
                self.waited_s += self._clock() - started


def fair_shares(total: float | None, caps: Sequence[float | None]) -> list[float | None]:
    """Split ``total`` bytes/s max-min fairly among jobs capped at ``caps``.

    Jobs are served from the smallest cap up: each gets its cap or an equal
    share of what is left, whichever is less.  Without a ``total`` every job
    simply gets its own cap (None: unlimited).
    """
    if total is None:
        return list(caps)
    shares: list[float | None] = [None] * len(caps)
    order = sorted(range(len(caps)), key=lambda i: _cap_or_inf(caps[i]))
    remaining = total
    for served, i in enumerate(order):
        equal = remaining / (len(caps) - served)
        cap = caps[i]
        share = equal if cap is None else min(cap, equal)
        shares[i] = share
        remaining -= share
    return shares


def _cap_or_inf(cap: float | None) -> float:
    return float("inf") if cap is None else cap
