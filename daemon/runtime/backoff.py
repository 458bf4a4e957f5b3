"""Restart policy arithmetic, pure (no I/O, no clock of its own): easy to test exactly.

Capped exponential backoff with jitter, reset after a healthy stretch; and a restart-intensity
window (OTP's "more than N restarts in T seconds escalates").
"""

from __future__ import annotations

import random
from collections import deque

import attrs

__all__ = ["Backoff", "IntensityWindow"]


@attrs.define
class Backoff:
    """Delays ``min_s``, 2×, 4× … capped at ``max_s``, each jittered by ±``jitter`` (a fraction)
    and kept within [``min_s``, ``max_s``]: with the defaults, 1 s to 60 s, never outside.

    The jitter spreads the restarts of many daemons that failed together (a Redis or Postgres
    outage) so they do not come back in lockstep; it applies at the cap too (45–60 s).
    """

    min_s: float = 1.0
    max_s: float = 60.0
    healthy_after_s: float = 30.0
    jitter: float = 0.25
    rng: random.Random = attrs.field(factory=random.Random)
    attempt: int = 0

    def next_delay(self, ran_for_s: float) -> float:
        """The delay before the next restart of a service that ran ``ran_for_s`` seconds; a run
        of at least ``healthy_after_s`` resets the sequence to ``min_s``."""
        if ran_for_s >= self.healthy_after_s:
            self.attempt = 0
        # 2**attempt overflows a float after ~1000 attempts; the cap is reached long before.
        base = min(self.max_s, self.min_s * (2 ** min(self.attempt, 62)))
        self.attempt += 1
        delay = base * (1 + self.jitter * (2 * self.rng.random() - 1))
        return min(self.max_s, max(self.min_s, delay))

    def reset(self) -> None:
        self.attempt = 0


@attrs.define
class IntensityWindow:
    """Counts restarts in a sliding window; :meth:`exceeded` after more than ``limit``."""

    limit: int = 5
    window_s: float = 60.0
    _times: deque[float] = attrs.field(factory=deque)

    def record(self, now: float) -> None:
        self._times.append(now)
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()

    def exceeded(self) -> bool:
        return len(self._times) > self.limit
