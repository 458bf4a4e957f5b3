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
    "DEFAULT_REDIS_URL",
    "add_user",
    "credit",
    "in_thread",
    "mirror_unlimited",
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


# Where setup_database mirrors the users it creates when no redis_url is given (the tests set it
# to their Redis, so every user they create can connect at once, as after `tts-daemon user add`).
DEFAULT_REDIS_URL: str | None = None


def setup_database(
    url: str,
    names: Sequence[str],
    plan: str = "plus",
    *,
    migrate: bool = True,
    redis_url: str | None = None,
) -> list[tuple[int, str]]:
    """Apply the migrations (unless ``migrate`` is False) and create one user per name on
    ``plan``, mirrored to Redis as ``tts-daemon user add`` does (to ``redis_url``, else
    :data:`DEFAULT_REDIS_URL`, else not: a daemon copies them at its start); returns (id, token)
    per user. Synchronous (a ``trio.run`` of its own): call it from a script, or from a thread
    (:func:`add_user`, ``in_thread``)."""
    import trio_asyncio

    from daemon.stores.mirror import aio_mirror_users
    from daemon.stores.pg import open_pg_pool
    from daemon.stores.redis import open_redis

    redis_url = redis_url or DEFAULT_REDIS_URL

    async def go() -> list[tuple[int, str]]:
        async with trio_asyncio.open_loop(), open_pg_pool(url, size=1, min_size=1) as db:
            if migrate:
                await db.migrate()
            users = [await db.add_user(name, plan) for name in names]
            if users and redis_url:
                async with open_redis(redis_url, max_connections=2) as store:
                    await db.run(aio_mirror_users, store, [u for u, _ in users])
            return users

    return trio.run(go)


async def add_user(
    url: str, name: str, plan: str = "plus", *, redis_url: str | None = None
) -> tuple[int, str]:
    """Create a user on a migrated database, mirrored to Redis (see :func:`setup_database`);
    returns (id, token)."""
    add = functools.partial(setup_database, url, [name], plan, migrate=False, redis_url=redis_url)
    ((user_id, token),) = await in_thread(add, abandon=True)
    return user_id, token


def credit(pg_url: str, redis_url: str, user_id: int, voice_chars: int) -> None:
    """``tts-daemon credit``'s own code: purchased characters in Postgres, then the mirror."""
    import trio_asyncio

    from daemon.stores.mirror import aio_mirror_users
    from daemon.stores.pg import open_pg_pool
    from daemon.stores.redis import open_redis

    async def go() -> None:
        async with (
            trio_asyncio.open_loop(),
            open_pg_pool(pg_url, size=1, min_size=1) as db,
            open_redis(redis_url, max_connections=2) as store,
        ):
            await db.credit(user_id, voice_chars)
            await db.run(aio_mirror_users, store, [user_id])

    trio.run(go)


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


# A user with no limits, as the Redis entitlements mirror holds it (docs/billing.md, "Holds"):
# negative allowances are unlimited.
UNLIMITED = {
    "version": 1,
    "kokoro_allow": -1,
    "kokoro_used": 0,
    "premium_allow": -1,
    "premium_used": 0,
    "rollover": 0,
    "purchased": 0,
    "period_end": 4_000_000_000,
}


def mirror_unlimited(client: Any, user_id: int) -> None:
    """Give ``user_id`` unlimited entitlements in the mirror, through ``mirror.lua`` as the
    billing consumer writes them, on a synchronous redis-py ``client`` (or pipeline): for tools
    and tests that drive the scripts without Postgres."""
    from daemon.stores.redis import SCRIPTS, mirror_call

    name, keys, args = mirror_call(user_id, UNLIMITED)
    client.eval(SCRIPTS[name], len(keys), *keys, *args)
