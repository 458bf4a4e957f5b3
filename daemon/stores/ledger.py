"""The billing ledger in Postgres: ``record_usage`` and the billing consumer's transactions.

These are asyncio coroutines; the billing consumer calls each transaction with one crossing. The
rules themselves live in SQL (``tts_record_usage`` in the migrations), so the batched path, the
single-event path and any other writer share one implementation of the waterfall.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import attrs

from daemon.contracts import BillingEvent

__all__ = [
    "BILLING_DATA_ERRORS",
    "GroupOutcome",
    "UsageRecord",
    "bill_group",
    "record_usage",
    "upsert_variants",
]

# A transaction failing with one of these will fail the same way every time: its events are
# dead-lettered rather than retried. Anything else (connection lost, server restarting) is retried.
BILLING_DATA_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.DataError,
    asyncpg.exceptions.NoDataFoundError,
    asyncpg.exceptions.InvalidParameterValueError,
)


@attrs.frozen
class UsageRecord:
    duplicate: bool
    details: dict[str, Any] | None


async def record_usage(
    user: int,
    usage_type: str,
    amount: int,
    event_id: str,
    conn: asyncpg.Connection,
    commit: bool = False,
    details: dict[str, Any] | None = None,
) -> UsageRecord:
    """Bill ``amount`` of ``usage_type`` to ``user`` once per ``event_id`` (SPEC section 6).

    Inserts the ``usage_log`` row first (a duplicate ``event_id`` changes nothing else and comes
    back as ``duplicate``), locks the subscription row ``FOR UPDATE``, then updates the period
    counter and, for premium voice, the waterfall plan → rollover → purchased → debt. With
    ``commit=False`` the caller owns the transaction; with ``commit=True`` it runs in its own.
    """
    sql = "SELECT tts_record_usage($1, $2, $3, $4, $5::jsonb)"
    args = (user, usage_type, amount, event_id, details or {})
    if commit:
        async with conn.transaction():
            result = await conn.fetchval(sql, *args)
    else:
        result = await conn.fetchval(sql, *args)
    return UsageRecord(duplicate=result is None, details=result)


@attrs.frozen
class GroupOutcome:
    billed: tuple[str, ...]  # event ids billed now
    duplicates: tuple[str, ...]  # event ids billed before
    text_length: int  # characters billed now
    waited_s: float  # waiting for a connection


@attrs.frozen
class PreparedEvent:
    """A billing event with what the database needs resolved (usage type, amount)."""

    event: BillingEvent
    usage_type: str
    amount: int


_LOCK_SQL = """
SELECT user_id FROM subscriptions WHERE user_id = ANY($1::bigint[]) ORDER BY user_id FOR UPDATE
"""
_RECORD_SQL = """
SELECT x.ord, tts_record_usage(x.u, x.t, x.a, x.e, x.d::jsonb) AS details
  FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::text[])
       WITH ORDINALITY AS x(u, t, a, e, d, ord)
 ORDER BY x.ord
"""
_STATS_SQL = """
INSERT INTO user_voice_stats AS s
       (user_id, model, voice, month, total_characters, total_duration_ms, synth_count)
SELECT u, m, v, mo, sum(c), sum(d), count(*)
  FROM unnest($1::bigint[], $2::text[], $3::text[], $4::date[], $5::bigint[], $6::bigint[])
       AS x(u, m, v, mo, c, d)
 GROUP BY u, m, v, mo
ON CONFLICT (user_id, model, voice, month) DO UPDATE
   SET total_characters = s.total_characters + EXCLUDED.total_characters,
       total_duration_ms = s.total_duration_ms + EXCLUDED.total_duration_ms,
       synth_count = s.synth_count + EXCLUDED.synth_count
"""
_VARIANTS_SQL = """
INSERT INTO block_variants AS b (hash, model, voice, text_length, duration_ms)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::int[])
ON CONFLICT (hash) DO UPDATE
   SET duration_ms = EXCLUDED.duration_ms, updated_at = now()
 WHERE b.duration_ms IS DISTINCT FROM EXCLUDED.duration_ms
"""


def _month(ts: float) -> Any:
    d = datetime.fromtimestamp(ts, UTC)
    return d.date().replace(day=1)


def _details(e: BillingEvent) -> str:
    import json

    return json.dumps(
        {
            "model": e.model,
            "voice": e.voice,
            "variant_hash": e.variant_hash,
            "text_length": e.text_length,
            "usage_multiplier": e.usage_multiplier,
            "document_id": e.document_id,
            "block_idx": e.block_idx,
        },
        separators=(",", ":"),
    )


async def bill_group(
    pool: asyncpg.Pool,
    events: Sequence[PreparedEvent],
    *,
    acquire_timeout_s: float,
    txn_delay_s: float = 0.0,
) -> GroupOutcome:
    """Bill the events of some users in one transaction.

    The users' subscription rows are locked first, in user-id order (the order every billing
    transaction uses, so two of them — or one and a payment writer — cannot deadlock); then every
    event goes through ``tts_record_usage`` in arrival order; then ``user_voice_stats`` gets the
    non-duplicates, summed. ``txn_delay_s`` holds the transaction open that much longer (the slow
    storage of a small VM, for stress tests and benchmarks).
    """
    t0 = time.perf_counter()
    conn = await pool.acquire(timeout=acquire_timeout_s)
    waited = time.perf_counter() - t0
    try:
        async with conn.transaction():
            await conn.execute(_LOCK_SQL, sorted({p.event.user_id for p in events}))
            rows = await conn.fetch(
                _RECORD_SQL,
                [p.event.user_id for p in events],
                [p.usage_type for p in events],
                [p.amount for p in events],
                [p.event.event_id for p in events],
                [_details(p.event) for p in events],
            )
            billed = [p for p, row in zip(events, rows, strict=True) if row["details"] is not None]
            if billed:
                await conn.execute(
                    _STATS_SQL,
                    [p.event.user_id for p in billed],
                    [p.event.model for p in billed],
                    [p.event.voice for p in billed],
                    [_month(p.event.finalized_at) for p in billed],
                    [p.event.text_length for p in billed],
                    [p.event.duration_ms for p in billed],
                )
            if txn_delay_s > 0:
                await asyncio.sleep(txn_delay_s)
    finally:
        await pool.release(conn)
    billed_ids = {p.event.event_id for p in billed}
    return GroupOutcome(
        billed=tuple(p.event.event_id for p in billed),
        duplicates=tuple(p.event.event_id for p in events if p.event.event_id not in billed_ids),
        text_length=sum(p.event.text_length for p in billed),
        waited_s=waited,
    )


async def upsert_variants(
    pool: asyncpg.Pool, events: Sequence[BillingEvent], *, acquire_timeout_s: float
) -> None:
    """Record each variant's metadata (duration) in one transaction; idempotent."""
    latest: dict[str, BillingEvent] = {}
    for e in events:
        latest[e.variant_hash] = e
    if not latest:
        return
    vs = list(latest.values())
    conn = await pool.acquire(timeout=acquire_timeout_s)
    try:
        async with conn.transaction():
            await conn.execute(
                _VARIANTS_SQL,
                [e.variant_hash for e in vs],
                [e.model for e in vs],
                [e.voice for e in vs],
                [e.text_length for e in vs],
                [e.duration_ms for e in vs],
            )
    finally:
        await pool.release(conn)
