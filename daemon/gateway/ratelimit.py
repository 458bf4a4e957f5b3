"""The per-user rate limit's local mirror.

The rate limit that counts is the token bucket in ``enqueue.lua`` (Redis's clock, shared by every
daemon). This is the same bucket kept per daemon: a user's blocks through *this* daemon are a
subset of their blocks through all daemons, so a request this bucket refuses would be refused by
Redis too. Checking it first lets a client that floods ``synthesize`` be turned away without a
Redis round trip. The same buckets, keyed by client address, throttle failed token look-ups.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

__all__ = ["RateLimiter"]


class RateLimiter:
    """Token buckets per user: at most ``per_min`` blocks held, refilled at ``per_min`` a minute."""

    def __init__(self, per_min: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_min = per_min
        self.clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key → (tokens, at)

    def _tokens(self, user_id: Hashable) -> float:
        now = self.clock()
        tokens, at = self._buckets.get(user_id, (float(self.per_min), now))
        return min(float(self.per_min), tokens + max(0.0, now - at) * self.per_min / 60.0)

    def retry_after_s(self, user_id: Hashable, n: int) -> float | None:
        """``None`` when ``n`` blocks fit now; else seconds until they would (``inf``: never)."""
        if n > self.per_min:
            return float("inf")
        tokens = self._tokens(user_id)
        if tokens >= n:
            return None
        return (n - tokens) * 60.0 / self.per_min

    def consume(self, user_id: Hashable, n: int) -> None:
        """Take ``n`` blocks (after Redis accepted them); the bucket may not go below zero."""
        self._buckets[user_id] = (max(0.0, self._tokens(user_id) - n), self.clock())

    def forget(self, user_id: Hashable) -> None:
        """Drop a user's bucket (their last connection closed): memory stays bounded by the
        connected users. Redis keeps the real one."""
        self._buckets.pop(user_id, None)

    def prune(self, max_keys: int) -> None:
        """Past ``max_keys`` buckets, drop the full ones (they say nothing a new bucket would
        not): memory stays bounded by the keys that are actually limited."""
        if len(self._buckets) <= max_keys:
            return
        for key in list(self._buckets):
            if self._tokens(key) >= self.per_min:
                del self._buckets[key]
