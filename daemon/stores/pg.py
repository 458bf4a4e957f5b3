"""Postgres access for the request path and the admin commands, through trio-asyncio.

Same pattern as ``stores/redis.py``: each unit of work (acquire → queries → release) is one asyncio
coroutine here, called from Trio with one crossing, so asyncpg's context managers run entirely
inside asyncio and a Trio cancel cannot leak a connection (docs/bridge.md). Every acquire has a
timeout, and the time spent waiting for a connection is measured and returned to the caller.

The hot path never imports this module (a test checks it).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import asyncpg
import attrs
import trio
import trio_asyncio

from daemon.contracts import token_hash

__all__ = [
    "FUNCTION_FILES",
    "Budget",
    "Catalog",
    "PgPool",
    "UnknownUser",
    "fetch_budget",
    "hash_token",
    "is_pg_unavailable",
    "open_pg_pool",
]

CLOSE_TIMEOUT_S = 10.0


class UnknownUser(LookupError):
    """No user with that id or name."""


def is_pg_unavailable(exc: BaseException) -> bool:
    """True for the errors that mean "Postgres is down, restarting or unreachable" (worth a
    retry), not a bug: refused connections, lost connections, and the server's own "starting
    up" / "shutting down" / "too many connections" answers. A group made only of such errors counts
    too."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_pg_unavailable(e) for e in exc.exceptions)
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        return False  # a statement timeout: the server is there
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # A pooled connection the server terminated (a restart) before asyncpg saw it close: the
        # next query on it fails this way (MagicStack/asyncpg#1069). Seen only during outages;
        # the connection is replaced and a retry succeeds.
        return "cannot switch to state" in str(exc)
    return isinstance(
        exc,
        OSError
        | asyncpg.exceptions.PostgresConnectionError
        | asyncpg.exceptions.OperatorInterventionError
        | asyncpg.exceptions.TooManyConnectionsError,
    )


def hash_token(token: str) -> bytes:
    return token_hash(token)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A pool ``reset`` that sends nothing (see ``open_pg_pool(reset_session=False)``)."""


@attrs.frozen
class Catalog:
    """Models and their voices, as seeded by the migrations."""

    models: dict[str, dict[str, Any]]  # name → {usage_type, usage_multiplier, default_voice}
    voices: dict[str, frozenset[str]]


@attrs.frozen
class Budget:
    """What a user may still synthesize this period, per usage type; ``None`` = unlimited."""

    server_kokoro: int | None
    premium_voice: int | None
    plan: str | None = None

    def for_type(self, usage_type: str) -> int | None:
        return self.server_kokoro if usage_type == "server_kokoro" else self.premium_voice


# -- asyncio side: units of work -----------------------------------------------------------


async def _acquire_timed(pool: asyncpg.Pool, timeout_s: float) -> tuple[asyncpg.Connection, float]:
    t0 = time.perf_counter()
    conn = await pool.acquire(timeout=timeout_s)
    return conn, time.perf_counter() - t0


_BUDGET_SQL = """
SELECT s.plan, p.server_kokoro_chars, p.premium_voice_chars,
       s.rollover_voice_chars, s.purchased_voice_chars,
       COALESCE(u.server_kokoro_characters, 0) AS kokoro_used,
       COALESCE(u.premium_voice_characters, 0) AS premium_used
  FROM subscriptions s
  JOIN plans p ON p.name = s.plan
  LEFT JOIN usage_periods u ON u.user_id = s.user_id AND u.period_start = tts_period_start()
 WHERE s.user_id = $1
"""


def budget_from_row(row: asyncpg.Record | None) -> Budget:
    if row is None:
        return Budget(0, 0)
    kokoro = None
    if row["server_kokoro_chars"] is not None:
        kokoro = max(row["server_kokoro_chars"] - row["kokoro_used"], 0)
    premium = None
    if row["premium_voice_chars"] is not None:
        premium = (
            max(row["premium_voice_chars"] - row["premium_used"], 0)
            + max(row["rollover_voice_chars"], 0)
            + row["purchased_voice_chars"]
        )
    return Budget(kokoro, premium, row["plan"])


async def fetch_budget(conn: asyncpg.Connection, user_id: int) -> Budget:
    """(asyncio side) The user's remaining allowance, on a connection in hand."""
    return budget_from_row(await conn.fetchrow(_BUDGET_SQL, user_id))


async def _lookup_token(
    pool: asyncpg.Pool, token_hash: bytes, acquire_timeout_s: float
) -> tuple[tuple[int, str] | None, float]:
    conn, waited = await _acquire_timed(pool, acquire_timeout_s)
    try:
        row = await conn.fetchrow(
            "SELECT u.id, u.name FROM api_tokens t JOIN users u ON u.id = t.user_id "
            "WHERE t.token_hash = $1 AND t.revoked_at IS NULL",
            token_hash,
        )
    finally:
        await pool.release(conn)
    return (None if row is None else (row["id"], row["name"])), waited


async def _catalog(pool: asyncpg.Pool) -> Catalog:
    async with pool.acquire() as conn:
        models = await conn.fetch(
            "SELECT name, usage_type, usage_multiplier, default_voice FROM models"
        )
        voices = await conn.fetch("SELECT model, name FROM voices")
    by_model: dict[str, set[str]] = {}
    for v in voices:
        by_model.setdefault(v["model"], set()).add(v["name"])
    return Catalog(
        models={
            m["name"]: {
                "usage_type": m["usage_type"],
                "usage_multiplier": float(m["usage_multiplier"]),
                "default_voice": m["default_voice"],
            }
            for m in models
        },
        voices={k: frozenset(v) for k, v in by_model.items()},
    )


_MIGRATION_LOCK = 0x7475_7364  # pg_advisory_xact_lock key: "tusd"

# The SQL functions: their one current definition, re-applied (CREATE OR REPLACE) after the
# versioned migrations on every migrate (docs/billing.md).
FUNCTION_FILES: tuple[tuple[str, str], ...] = (("daemon.billing", "ledger.sql"),)


async def _migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply the versioned migrations not yet recorded in ``schema_migrations`` (schema only,
    each once, in file-name order), then every file of :data:`FUNCTION_FILES` (the functions,
    every time). Each step is one transaction under an advisory lock, so two daemons starting at
    once do not race. Returns the versions applied now.

    Versions are the file names, so a database migrated by an older layout keeps its rows (for
    instance ``0002_bill_events`` and ``0003_bill_batch``, whose functions moved to
    ``daemon/billing/ledger.sql``): a recorded version without a file is history, not an error.
    """
    files = sorted(
        (f for f in resources.files("daemon.migrations").iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    applied: list[str] = []
    async with pool.acquire() as conn:
        async with conn.transaction():
            # Under the lock too: CREATE TABLE IF NOT EXISTS run by two sessions at once can fail
            # with a unique violation on the catalog.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        for f in files:
            version = f.name.removesuffix(".sql")
            async with conn.transaction():
                # Two daemons starting at once: the second waits, then sees the version applied.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                done = await conn.fetchval(
                    "SELECT 1 FROM schema_migrations WHERE version = $1", version
                )
                if done:
                    continue
                await conn.execute(f.read_text())
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied.append(version)
        for package, name in FUNCTION_FILES:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute(resources.files(package).joinpath(name).read_text())
    return applied


async def _add_user(pool: asyncpg.Pool, name: str, plan: str) -> tuple[int, str]:
    token = "tts_" + secrets.token_urlsafe(32)
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT 1 FROM plans WHERE name = $1", plan):
            raise ValueError(f"unknown plan {plan!r}")
        user_id = await conn.fetchval("INSERT INTO users (name) VALUES ($1) RETURNING id", name)
        await conn.execute(
            "INSERT INTO subscriptions (user_id, plan) VALUES ($1, $2)", user_id, plan
        )
        await conn.execute(
            "INSERT INTO api_tokens (token_hash, user_id) VALUES ($1, $2)",
            hash_token(token),
            user_id,
        )
    return user_id, token


async def _resolve_user(conn: asyncpg.Connection, user: str | int) -> int:
    if isinstance(user, int) or (isinstance(user, str) and user.isdigit()):
        row = await conn.fetchval("SELECT id FROM users WHERE id = $1", int(user))
    else:
        row = await conn.fetchval("SELECT id FROM users WHERE name = $1", user)
    if row is None:
        raise UnknownUser(f"no such user: {user}")
    return row


async def _credit(pool: asyncpg.Pool, user: str | int, voice_chars: int) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        user_id = await _resolve_user(conn, user)
        # The same lock billing takes: payment writes and billing serialize on this row.
        row = await conn.fetchrow(
            "SELECT purchased_voice_chars FROM subscriptions WHERE user_id = $1 FOR UPDATE",
            user_id,
        )
        if row is None:
            raise UnknownUser(f"user {user} has no subscription")
        await conn.execute(
            "UPDATE subscriptions SET purchased_voice_chars = purchased_voice_chars + $2,"
            " ledger_version = ledger_version + 1,"
            " updated_at = now() WHERE user_id = $1",
            user_id,
            voice_chars,
        )
        await conn.execute(
            "INSERT INTO credits (user_id, voice_chars) VALUES ($1, $2)", user_id, voice_chars
        )
        out = await conn.fetchrow(
            "SELECT user_id, plan, rollover_voice_chars, purchased_voice_chars"
            " FROM subscriptions WHERE user_id = $1",
            user_id,
        )
    return dict(out)


# -- Trio side ---------------------------------------------------------------------------------


class PgPool:
    """A Trio-facing asyncpg pool. Methods are units of work, one crossing each."""

    def __init__(self, pool: asyncpg.Pool, *, size: int, acquire_timeout_s: float) -> None:
        self.pool = pool
        self.size = size
        self.acquire_timeout_s = acquire_timeout_s

    def in_use(self) -> int:
        return self.pool.get_size() - self.pool.get_idle_size()

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run an asyncio coroutine function ``fn(pool, *args, **kwargs)``: one unit of work."""
        return await trio_asyncio.aio_as_trio(fn)(self.pool, *args, **kwargs)

    async def lookup_token(self, token: str) -> tuple[tuple[int, str] | None, float]:
        return await self.run(_lookup_token, hash_token(token), self.acquire_timeout_s)

    async def catalog(self) -> Catalog:
        return await self.run(_catalog)

    async def migrate(self) -> list[str]:
        return await self.run(_migrate)

    async def add_user(self, name: str, plan: str) -> tuple[int, str]:
        return await self.run(_add_user, name, plan)

    async def credit(self, user: str | int, voice_chars: int) -> dict[str, Any]:
        return await self.run(_credit, user, voice_chars)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def q(pool: asyncpg.Pool) -> list[asyncpg.Record]:
            async with pool.acquire() as conn:
                return await conn.fetch(sql, *args)

        return await self.run(q)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async def q(pool: asyncpg.Pool) -> Any:
            async with pool.acquire() as conn:
                return await conn.fetchval(sql, *args)

        return await self.run(q)


@contextlib.asynccontextmanager
async def open_pg_pool(
    url: str,
    *,
    size: int,
    acquire_timeout_s: float = 5.0,
    command_timeout_s: float = 30.0,
    connect_timeout_s: float = 10.0,
    min_size: int | None = None,
    reset_session: bool = True,
) -> AsyncIterator[PgPool]:
    """An asyncpg pool of ``size`` connections, closed (shielded, bounded) on exit.

    ``reset_session=False`` skips asyncpg's session reset on release (``RESET ALL``, ``UNLISTEN
    *``, … : a round trip per release) for a pool whose users leave no session state: plain
    queries and transactions only. An open transaction is still rolled back on release.

    Must run inside ``trio_asyncio.open_loop()``. Raises ``OSError``/``asyncpg`` errors if the
    server cannot be reached within ``connect_timeout_s``.
    """
    with trio.fail_after(connect_timeout_s + 5):
        pool = await trio_asyncio.aio_as_trio(asyncpg.create_pool)(
            url,
            min_size=min(size, 2) if min_size is None else min_size,
            max_size=size,
            command_timeout=command_timeout_s,
            timeout=connect_timeout_s,
            init=_init_connection,
            reset=None if reset_session else _keep_session,
            max_inactive_connection_lifetime=300.0,
        )
    try:
        yield PgPool(pool, size=size, acquire_timeout_s=acquire_timeout_s)
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True) as scope:
            await trio_asyncio.aio_as_trio(pool.close)()
        if scope.cancelled_caught:
            pool.terminate()
