"""The request path goes first: bulk work steps aside while a ``synthesize`` is in progress.

One Trio thread runs every service, and Trio schedules runnable tasks round-robin. During a burst
of GPU results the runnable set is mostly bulk work — result handlers, audio downloads, the status
fan-out — and a ``synthesize``, which needs several scheduling rounds (frame read, usage check,
enqueue script, ack), waits a whole round of that work at each of them. So bulk work asks
:meth:`RequestFirst.bulk_turn` before each unit it starts: while a request is in progress, it
waits until none is, for at most ``max_defer_s`` (bulk work is deferred, never stalled). A unit
already started runs on; only new ones wait, so the cost to bulk work is bounded by the requests'
own duration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import attrs
import trio

__all__ = ["RequestFirst"]


@attrs.define(eq=False)
class RequestFirst:
    max_defer_s: float = 0.02
    deferred: int = 0  # units of bulk work that waited for a request
    _active: int = 0
    _quiet: trio.Event = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._quiet = trio.Event()
        self._quiet.set()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Mark a request in progress for the ``with`` block."""
        if self._active == 0:
            self._quiet = trio.Event()
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._quiet.set()

    async def bulk_turn(self) -> None:
        """Before a unit of bulk work: wait while a request is in progress (at most
        ``max_defer_s``). Returns at once, without a checkpoint, when none is."""
        if self._active and self.max_defer_s > 0:
            self.deferred += 1
            with trio.move_on_after(self.max_defer_s):
                await self._quiet.wait()
