"""The one asyncio loop of a long-running process, opened with an exception handler of its own.

trio-asyncio's default handler re-raises every error asyncio reports as "unhandled" — a callback
that raised, a future whose exception nobody retrieved — into the loop's nursery, which ends the
whole ``open_loop()`` block. In a daemon that is every service at once: an asyncpg protocol
callback complaining about a connection the server dropped (seen: ``ConnectionError: unexpected
connection_lost() call`` while Postgres was stopped) would take the gateway and the hot path down
with the billing consumer that owned the connection. The errors themselves are already handled
where it matters (the unit of work that used the connection failed and its service recovers), so
here they are reported — once, then at most once a minute per kind, with a count — and the loop
goes on.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio_asyncio

__all__ = ["open_bridge"]

Report = Callable[[str, dict[str, Any]], None]


class _Handler:
    def __init__(self, report: Report, every_s: float) -> None:
        self.report = report
        self.every_s = every_s
        self._seen: dict[str, tuple[float, int]] = {}

    def __call__(self, loop: Any, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = context.get("message") or "unhandled error in the asyncio loop"
        kind = f"{message}: {type(exc).__name__}" if exc is not None else message
        now = time.monotonic()
        last, count = self._seen.get(kind, (float("-inf"), 0))
        count += 1
        if now - last < self.every_s:
            self._seen[kind] = (last, count)
            return
        self._seen[kind] = (now, 0)
        detail = {"occurrences": count}
        if exc is not None:
            detail["exception"] = f"{type(exc).__name__}: {exc}"
        try:
            self.report(message, detail)
        except Exception as report_error:  # reporting must never raise into the loop
            print(f"tts-daemon: asyncio error {kind} ({report_error!r})", file=sys.stderr)


@contextlib.asynccontextmanager
async def open_bridge(report: Report, *, every_s: float = 60.0) -> AsyncIterator[None]:
    """``trio_asyncio.open_loop()`` whose unhandled asyncio errors go to ``report(message,
    detail)`` instead of ending the loop."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_Handler(report, every_s))
        yield
