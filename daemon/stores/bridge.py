"""The one asyncio loop of a long-running process: an exception handler of its own, and a main loop
that runs the callbacks that are ready back to back instead of one per Trio scheduling round.

**Errors.** trio-asyncio's default handler re-raises every error asyncio reports as "unhandled"
into the loop's nursery, which in a daemon ends every service at once — the gateway and the hot
path with, say, the billing consumer whose connection the server dropped. Those errors are already
handled where it matters (the unit of work failed and its service recovers), so here they are
reported — once, then at most once a minute per kind, with a count — and the loop goes on.

**Scheduling.** trio-asyncio's loop takes *one* asyncio callback per Trio scheduling round, so
under a burst every asyncio continuation waits a whole round of every other runnable Trio task.
After the callback the original step ran, this loop keeps running ready callbacks until none is
ready or ``drain_s`` has passed, as asyncio's own loop does; the budget bounds how long other Trio
tasks wait. docs/bridge.md has the reasoning and docs/benchmarks.md the measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio
import trio_asyncio
from sniffio import thread_local as sniffio_library

from daemon.ops.events import Throttle

try:  # a Trio function asyncio code asked to run (trio_as_aio); none of ours does
    from trio_asyncio._handles import AsyncHandle as _AsyncHandle
except ImportError:  # pragma: no cover - a trio-asyncio that moved it: keep its own step
    _AsyncHandle = None

__all__ = ["DRAIN_S", "open_bridge"]

Report = Callable[[str, dict[str, Any]], None]

# How long one step of the asyncio loop may keep running ready callbacks (module docstring).
DRAIN_S = 0.001


class _Handler:
    def __init__(self, report: Report, every_s: float) -> None:
        self.report = report
        self._throttle = Throttle(every_s)

    def __call__(self, loop: Any, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = context.get("message") or "unhandled error in the asyncio loop"
        kind = f"{message}: {type(exc).__name__}" if exc is not None else message
        held = self._throttle.due(kind)
        if held is None:
            return
        detail: dict[str, Any] = {"occurrences": held + 1}
        if exc is not None:
            detail["exception"] = f"{type(exc).__name__}: {exc}"
        try:
            self.report(message, detail)
        except Exception as report_error:  # reporting must never raise into the loop
            print(f"tts-daemon: asyncio error {kind} ({report_error!r})", file=sys.stderr)


# trio-asyncio internals the draining step relies on (checked, never assumed: without them the
# loop keeps trio-asyncio's own one-callback step, slower but correct).
_LOOP_INTERNALS = ("_main_loop_one", "_q_recv", "_timers", "_stopped", "_nursery", "time")


def install_drain(loop: Any, drain_s: float) -> bool:
    """Make ``loop``'s main-loop step run ready callbacks for up to ``drain_s`` (module
    docstring). Returns False, changing nothing, if ``loop`` lacks the internals this needs."""
    if (
        drain_s <= 0
        or _AsyncHandle is None
        or not all(hasattr(loop, name) for name in _LOOP_INTERNALS)
    ):
        return False
    one = loop._main_loop_one  # trio-asyncio's step: waits for one callback and runs it

    async def main_loop_one(no_wait: bool = False) -> None:
        await one(no_wait)
        if not no_wait:  # no_wait: the loop is shutting down and drains on its own
            await _run_ready(loop, time.perf_counter() + drain_s)

    loop._main_loop_one = main_loop_one
    return True


async def _run_ready(loop: Any, deadline: float) -> None:
    """Run the callbacks ready now, and those they schedule, until none is or ``deadline``.

    Does what trio-asyncio's ``_main_loop_one`` does with each callback: a due timer runs, a
    newly queued timer joins the heap, a Trio-flavoured handle is started as a task (then the step
    ends: starting it waits), a plain handle runs unless cancelled."""
    queue: trio.MemoryReceiveChannel[Any] = loop._q_recv
    timers: list[asyncio.TimerHandle] = loop._timers
    previous, sniffio_library.name = sniffio_library.name, "asyncio"
    try:
        while not loop._stopped.is_set() and time.perf_counter() < deadline:
            if timers and timers[0]._when <= loop.time():
                handle = heapq.heappop(timers)
            else:
                try:
                    handle = queue.receive_nowait()
                except trio.WouldBlock:
                    return
                if isinstance(handle, asyncio.TimerHandle):
                    heapq.heappush(timers, handle)
                    continue
                if isinstance(handle, _AsyncHandle):
                    sniffio_library.name = previous
                    start = loop._nursery.start_soon
                    handle._context.run(start, handle._run, name=handle._callback)
                    await handle._started.wait()
                    return
            if not handle._cancelled:
                handle._run()
    finally:
        sniffio_library.name = previous


@contextlib.asynccontextmanager
async def open_bridge(
    report: Report, *, every_s: float = 60.0, drain_s: float = DRAIN_S
) -> AsyncIterator[None]:
    """``trio_asyncio.open_loop()`` whose unhandled asyncio errors go to ``report(message,
    detail)`` instead of ending the loop, and whose steps run ready callbacks for up to
    ``drain_s`` (0: trio-asyncio's one callback a step)."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_Handler(report, every_s))
        install_drain(loop, drain_s)
        yield
