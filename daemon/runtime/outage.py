"""Waiting out an outage of Redis or Postgres inside a service loop, without flooding anything.

Lesson 4 of the system this design came from: a loop retrying every second wrote 168k error rows a
day. Here a failing dependency is retried with capped exponential backoff and jitter, and logged
once when the outage starts, at most once a minute while it lasts, and once when it ends.
"""

from __future__ import annotations

import trio

from daemon.contracts.events import Error, Recovered
from daemon.ops.events import EventLog, Throttle
from daemon.runtime.backoff import Backoff

__all__ = ["Outage"]


class Outage:
    def __init__(
        self,
        service: str,
        events: EventLog,
        *,
        min_s: float = 0.1,
        max_s: float = 5.0,
        log_every_s: float = 60.0,
    ) -> None:
        self.service = service
        self.events = events
        self.backoff = Backoff(min_s=min_s, max_s=max_s, healthy_after_s=float("inf"))
        self._log = Throttle(log_every_s, clock=trio.current_time)
        self.failures = 0
        self._started_at: float | None = None

    @property
    def ongoing(self) -> bool:
        return self._started_at is not None

    async def failed(self, exc: BaseException, what: str) -> None:
        """Record a failure of ``what`` and sleep the next backoff delay."""
        now = trio.current_time()
        self.failures += 1
        if self._started_at is None:
            self._started_at = now
        if self._log.due() is not None:
            self.events.emit(
                Error(
                    service=self.service,
                    message=f"{what} unavailable: {type(exc).__name__}: {exc}",
                    context={"failures": self.failures},
                )
            )
        await trio.sleep(self.backoff.next_delay(0.0))

    def ok(self) -> None:
        """The dependency answered: if an outage was under way, log its end."""
        if self._started_at is None:
            return
        down_s = trio.current_time() - self._started_at
        self.events.emit(
            Recovered(service=self.service, down_s=round(down_s, 3), failures=self.failures)
        )
        self._started_at = None
        self._log.reset()
        self.failures = 0
        self.backoff.reset()
