"""Reaching the real Redis and Postgres from outside the daemon, and preparing a database.

``setup_database`` migrates and creates users through the store's public API
(``daemon.stores.pg.open_pg_pool``: ``migrate``, ``add_user``), the code ``tts-daemon migrate``
and ``tts-daemon user add`` run. The one-shot queries use clients of their own, each in a worker
thread with its own event loop, so a caller never shares the daemon's trio-asyncio loop or pools.
The synchronous forms (``pg_query``, ``redis_cmd``, ``setup_database``) are for threads and
scripts; the ``async`` forms run them in a thread.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Any

import trio

__all__ = [
    "add_user",
    "in_thread",
    "pg_fetch",
    "pg_query",
    "pg_val",
    "redis_call",
    "redis_cmd",
    "setup_database",
]


async def in_thread(fn: Callable[..., Any], *args: Any, abandon: bool = False) -> Any:
    """``fn(*args)`` in a worker thread; with ``abandon``, a cancelled caller does not wait for
    it (for queries whose answer nobody needs any more)."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon)


def setup_database(
    url: str, names: Sequence[str], plan: str = "plus", *, migrate: bool = True
) -> list[tuple[int, str]]:
    """Apply the migrations (unless ``migrate`` is False) and create one user per name on
    ``plan``; returns (id, token) per user. Synchronous (a ``trio.run`` of its own): call it from
    a script, or from a thread (:func:`add_user`, ``in_thread``)."""
    import trio_asyncio

    from daemon.stores.pg import open_pg_pool

    async def go() -> list[tuple[int, str]]:
        async with trio_asyncio.open_loop(), open_pg_pool(url, size=1, min_size=1) as db:
            if migrate:
                await db.migrate()
            return [await db.add_user(name, plan) for name in names]

    return trio.run(go)


async def add_user(url: str, name: str, plan: str = "plus") -> tuple[int, str]:
    """Create a user on a migrated database; returns (id, token)."""
    add = functools.partial(setup_database, url, [name], plan, migrate=False)
    ((user_id, token),) = await in_thread(add, abandon=True)
    return user_id, token


def pg_query(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Rows of one statement, as dicts, on a connection of its own."""
    import asyncpg

    async def q() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(q())


def redis_cmd(url: str, *args: Any) -> Any:
    """One raw Redis command on a client of its own."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


async def pg_fetch(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    return await in_thread(pg_query, url, sql, *args, abandon=True)


async def pg_val(url: str, sql: str, *args: Any) -> Any:
    """The first column of the first row, or None when there is no row."""
    rows = await pg_fetch(url, sql, *args)
    return next(iter(rows[0].values())) if rows else None


async def redis_call(url: str, *args: Any) -> Any:
    return await in_thread(redis_cmd, url, *args, abandon=True)
