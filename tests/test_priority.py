"""Bulk work steps aside while a request is in progress, for a bounded time (priority.py)."""

from __future__ import annotations

import trio

from daemon.runtime.priority import RequestFirst


async def test_bulk_work_goes_at_once_when_no_request_is_in_progress(
    autojump_clock: trio.abc.Clock,
) -> None:
    first = RequestFirst(max_defer_s=0.02)
    t0 = trio.current_time()
    await first.bulk_turn()
    assert trio.current_time() == t0
    assert first.deferred == 0


async def test_bulk_work_waits_for_the_request_to_end(autojump_clock: trio.abc.Clock) -> None:
    first = RequestFirst(max_defer_s=1.0)
    resumed_at: list[float] = []

    async def bulk() -> None:
        await first.bulk_turn()
        resumed_at.append(trio.current_time())

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        with first.request():
            nursery.start_soon(bulk)
            await trio.sleep(0.005)  # the request's own work
            assert resumed_at == []
    assert resumed_at == [t0 + 0.005]
    assert first.deferred == 1


async def test_bulk_work_is_deferred_never_stalled(autojump_clock: trio.abc.Clock) -> None:
    first = RequestFirst(max_defer_s=0.02)
    t0 = trio.current_time()
    with first.request(), first.request():
        await first.bulk_turn()  # requests that never end: bulk work still goes after 20 ms
        assert trio.current_time() == t0 + 0.02
    # the requests ended: the next unit goes at once, and a new request blocks again
    await first.bulk_turn()
    assert trio.current_time() == t0 + 0.02
    with first.request():
        await first.bulk_turn()
    assert trio.current_time() == t0 + 0.04
