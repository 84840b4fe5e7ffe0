"""Client-side token buckets, one per HealthImaging operation, so the gateway keeps
under the service's quotas instead of being throttled (429) in the middle of a
C-MOVE: a request waits for its token rather than being refused.

The bucket holds one second's worth of tokens: the service allows a burst of twice
its rate, so a client that never exceeds its rate per second never meets a refusal
from its own traffic (other clients of the account share the quota: lower the rates
in ``[upstream.rate_limits]`` then).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping


class TokenBucket:
    """``rate`` requests per second, at most ``rate`` (at least one) at once."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait for a token; waiters are served in arrival order."""
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self._tokens) / self.rate)


class RateLimits:
    """A bucket per operation named in ``rates``; other operations are not limited."""

    def __init__(self, rates: Mapping[str, float]) -> None:
        self._buckets = {operation: TokenBucket(rate) for operation, rate in rates.items()}

    async def acquire(self, operation: str) -> None:
        bucket = self._buckets.get(operation)
        if bucket is not None:
            await bucket.acquire()
