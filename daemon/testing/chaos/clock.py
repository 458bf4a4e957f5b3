"""The write clock: a steady stream of acknowledged Redis writes, to measure what a Redis crash
loses."""

from __future__ import annotations

import threading
import time
from typing import Any

import trio

from daemon.testing.chaos.params import CLOCK_KEY


class WriteClock:
    """A steady stream of acknowledged Redis writes (INCR) from a thread of its own.

    After a Redis crash and restart, the counter that survived against the last value Redis
    acknowledged says how many acknowledged writes were lost, and their ack times how many seconds
    of writes: the loss window, measured rather than assumed.
    """

    def __init__(self, url: str, interval_s: float = 0.005) -> None:
        self.url = url
        self.interval_s = interval_s
        self.history: dict[int, float] = {}  # value → monotonic time its INCR was acknowledged
        self.last: tuple[int, float] = (0, 0.0)
        self.writes = 0
        self._pause = threading.Event()
        self._paused = threading.Event()
        self._stop = threading.Event()

    def run(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while not self._stop.is_set():
                if self._pause.is_set():
                    self._paused.set()
                    time.sleep(0.01)
                    continue
                try:
                    n = int(client.incr(CLOCK_KEY))
                except (redis.RedisError, OSError):
                    time.sleep(0.02)
                    continue
                t = time.monotonic()
                self.history[n] = t
                self.last = (n, t)
                self.writes += 1
                time.sleep(self.interval_s)
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()

    async def pause(self) -> None:
        self._paused.clear()
        self._pause.set()
        while not self._paused.is_set() and not self._stop.is_set():  # noqa: ASYNC110 - a thread
            await trio.sleep(0.01)

    def measure(self, survived: int) -> dict[str, Any]:
        """After a restart (paused): acknowledged writes lost, and the seconds they span."""
        last_n, last_t = self.last
        lost = max(0, last_n - survived)
        seconds = 0.0
        if lost:
            kept_t = self.history.get(survived)
            first_lost_t = self.history.get(survived + 1, last_t)
            seconds = last_t - (kept_t if kept_t is not None else first_lost_t)
        return {"acked": last_n, "survived": survived, "lost": lost, "seconds": round(seconds, 3)}

    def resume(self, start_from: int) -> None:
        self.history = {start_from: time.monotonic()}
        self.last = (start_from, time.monotonic())
        self._pause.clear()
