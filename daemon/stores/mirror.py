"""The entitlements and token mirror: Postgres (the ledger) copied into Redis (docs/billing.md,
"Holds and the entitlements mirror").

The request path reads only Redis: a handshake looks its token's hash up in ``tts:token:*``, a
``synthesize`` places holds against ``tts:ent:{user}`` in ``enqueue.lua``. What is here writes
those copies from Postgres: for some users (``user add``, ``credit``, a user whose copy is
missing) or for all of them (at start, and whenever Redis lost the mirror). Each copy carries the
ledger version it was read at; ``mirror.lua`` never lets an older copy replace a newer one.

Asyncio-side units of work (like ``stores/pg.py``): the daemon calls them with one crossing, the
CLI and tools from plain asyncio.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from daemon.contracts import Keys
from daemon.stores.redis import RedisStore, mirror_call

__all__ = ["aio_mirror_all", "aio_mirror_users", "aio_revoke", "entitlement_rows"]

_ENT_SQL = "SELECT * FROM tts_entitlements($1::bigint[])"
_TOKENS_SQL = (
    "SELECT t.token_hash, t.user_id, s.plan FROM api_tokens t"
    " JOIN subscriptions s ON s.user_id = t.user_id"
    " WHERE t.revoked_at IS NULL AND ($1::bigint[] IS NULL OR t.user_id = ANY ($1))"
)
PAGE = 1000


async def entitlement_rows(
    conn: asyncpg.Connection, user_ids: Sequence[int] | None
) -> list[dict[str, Any]]:
    """``tts_entitlements`` rows as dicts (None: every user)."""
    rows = await conn.fetch(_ENT_SQL, None if user_ids is None else list(user_ids))
    return [dict(r) for r in rows]


async def _write(
    store: RedisStore, ents: Sequence[dict[str, Any]], tokens: Sequence[asyncpg.Record]
) -> None:
    for i in range(0, len(ents), PAGE):
        await store.aio_write_mirror(
            [mirror_call(int(e["user_id"]), e) for e in ents[i : i + PAGE]]
        )
    client = store._client
    for i in range(0, len(tokens), PAGE):
        async with client.pipeline(transaction=False) as pipe:
            for t in tokens[i : i + PAGE]:
                pipe.set(Keys.token(bytes(t["token_hash"])), f"{int(t['user_id'])}|{t['plan']}")
            await pipe.execute()


async def aio_mirror_users(pool: asyncpg.Pool, store: RedisStore, user_ids: Sequence[int]) -> int:
    """(asyncio side) Copy these users' entitlements and tokens to Redis. Returns how many
    users were found."""
    async with pool.acquire() as conn:
        ents = await entitlement_rows(conn, user_ids)
        tokens = await conn.fetch(_TOKENS_SQL, list(user_ids))
    await _write(store, ents, tokens)
    return len(ents)


async def aio_mirror_all(pool: asyncpg.Pool, store: RedisStore) -> int:
    """(asyncio side) Copy every user's entitlements and tokens to Redis, then mark the mirror
    complete (``tts:mirror:ready``). Returns the number of users."""
    async with pool.acquire() as conn:
        ents = await entitlement_rows(conn, None)
        tokens = await conn.fetch(_TOKENS_SQL, None)
    await _write(store, ents, tokens)
    await store._client.set(Keys.MIRROR_READY, repr(time.time()))
    return len(ents)


async def aio_revoke(pool: asyncpg.Pool, store: RedisStore, user: str | int) -> tuple[int, int]:
    """(asyncio side) Revoke every token of a user: in Postgres, then their mirror entries, then
    tell every gateway to close the user's connections. Returns (user id, tokens revoked)."""
    from daemon.stores.pg import _resolve_user

    async with pool.acquire() as conn, conn.transaction():
        user_id = await _resolve_user(conn, user)
        rows = await conn.fetch(
            "UPDATE api_tokens SET revoked_at = now()"
            " WHERE user_id = $1 AND revoked_at IS NULL RETURNING token_hash",
            user_id,
        )
        # Tokens revoked before (a revoke whose Redis step failed): removed from Redis again.
        old = await conn.fetch(
            "SELECT token_hash FROM api_tokens WHERE user_id = $1 AND revoked_at IS NOT NULL",
            user_id,
        )
    hashes = {bytes(r["token_hash"]) for r in [*rows, *old]}
    if hashes:
        await store._client.delete(*(Keys.token(h) for h in hashes))
    import json

    await store._client.publish(Keys.CONTROL, json.dumps({"revoke": user_id}))
    return user_id, len(rows)
