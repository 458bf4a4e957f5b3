"""Restart policy arithmetic, pure (no I/O, no clock of its own): easy to test exactly.

Capped exponential backoff with full jitter, reset after a healthy stretch; and a restart-intensity
window (OTP's "more than N restarts in T seconds escalates").
"""

from __future__ import annotations

import random
from collections import deque

import attrs

__all__ = ["Backoff", "IntensityWindow"]


@attrs.define
class Backoff:
    """Delays ``min_s``, 2×, 4× … capped at ``max_s``, each jittered into [d/2, d]."""

    min_s: float = 1.0
    max_s: float = 60.0
    healthy_after_s: float = 30.0
    rng: random.Random = attrs.field(factory=random.Random)
    attempt: int = 0

    def next_delay(self, ran_for_s: float) -> float:
        """The delay before the next restart of a service that ran ``ran_for_s`` seconds."""
        if ran_for_s >= self.healthy_after_s:
            self.attempt = 0
        base = min(self.max_s, self.min_s * (2**self.attempt))
        self.attempt += 1
        return base / 2 + self.rng.random() * base / 2

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
