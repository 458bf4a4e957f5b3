"""The request path's unit of work: the usage check and the enqueue script, one crossing.

A ``synthesize`` needs the user's remaining allowance from Postgres (the request pool: the only
Postgres the request path touches) and then ``enqueue.lua`` in Redis. As two crossings, each was a
trip through the Trio scheduler and the asyncio loop's queue, and under a burst every such hop
waits behind whatever else is runnable. Here both are one asyncio coroutine, called once
(docs/bridge.md, "one unit of work, one crossing"):

    acquire (timed) → the usage query → release → enqueue.lua

The release sends nothing (the request pool skips asyncpg's session reset), so the connection is
back in the pool before the script runs.

The hot path never imports this module (it names Postgres).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import attrs
import trio
import trio_asyncio

from daemon.stores.pg import PgPool, fetch_budget
from daemon.stores.redis import (
    RedisStore,
    enqueue_call,
    enqueue_reply,
)

__all__ = ["PoolWait", "check_and_enqueue"]


@attrs.define
class PoolWait:
    """How long the unit waited for a request-pool connection: ``waited`` (seconds) once the
    acquire returned, ``None`` while it has not — then ``elapsed()`` is the wait so far (a unit
    cut short by its deadline while still waiting starved, and that must show)."""

    started: float | None = None
    waited: float | None = None

    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.perf_counter() - self.started


async def _check_and_enqueue(
    pool: asyncpg.Pool,
    acquire_timeout_s: float,
    store: RedisStore,
    user_id: int,
    usage_type: str,
    enqueue: dict[str, Any],
    wait: PoolWait,
    plan_weights: Mapping[str, float],
) -> Any:
    wait.started = time.perf_counter()
    conn = await pool.acquire(timeout=acquire_timeout_s)
    wait.waited = time.perf_counter() - wait.started
    try:
        allowance = await fetch_budget(conn, user_id)
    finally:
        # No round trip: the request pool keeps sessions as they are (open_pg_pool).
        await pool.release(conn)
    keys, args = enqueue_call(
        user_id=user_id,
        budget=allowance.for_type(usage_type),
        weight=plan_weights.get(allowance.plan or "", 1.0),
        **enqueue,
    )
    return await store.aio_enqueue(keys, args)


async def check_and_enqueue(
    db: PgPool,
    store: RedisStore,
    *,
    user_id: int,
    usage_type: str,
    conn_id: str,
    document_id: str,
    model: str,
    now: float,
    rate_limit: int,
    blocks: Sequence[tuple[int, str, str, int, str]],
    wait: PoolWait,
    plan_weights: Mapping[str, float] | None = None,
) -> tuple[str, list[str] | int]:
    """Read the user's allowance of ``usage_type`` on the request pool, then run ``enqueue.lua``
    with it (see :func:`enqueue_call` for ``blocks``, :func:`enqueue_reply` for the reply), in one
    crossing.

    ``wait`` records the pool wait as it happens. Deadline: the pool's acquire timeout plus 5 s
    for the query, plus Redis's command timeout for the script (``trio.TooSlowError``); the
    acquire itself gives up after ``db.acquire_timeout_s`` (``TimeoutError``). Errors of either
    store are raised as they are; the script may have run if the error came after it was sent.
    """
    enqueue = {
        "conn_id": conn_id,
        "document_id": document_id,
        "model": model,
        "now": now,
        "rate_limit": rate_limit,
        "blocks": blocks,
    }
    with trio.fail_after(db.acquire_timeout_s + 5 + store.command_timeout_s):
        reply = await trio_asyncio.aio_as_trio(_check_and_enqueue)(
            db.pool,
            db.acquire_timeout_s,
            store,
            user_id,
            usage_type,
            enqueue,
            wait,
            plan_weights or {},
        )
    return enqueue_reply(reply)
