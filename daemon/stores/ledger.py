"""The billing ledger in Postgres: ``record_usage`` and the billing consumer's transactions.

These are asyncio coroutines; the billing consumer calls each transaction with one crossing. The
rules themselves live in SQL — ``tts_bill_events`` (migration 0002), of which ``tts_record_usage``
is a one-event call — so the batched path, the single-event path and any other writer share one
implementation of the waterfall.
"""

from __future__ import annotations

import asyncio
import json
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
    "bill_one",
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


# One statement, so one transaction unless the caller holds one: every event through the rules
# (tts_bill_events: usage_log first, subscription rows locked in user-id order, the waterfall),
# then user_voice_stats for the events that were not duplicates.
_BILL_SQL = """
WITH r AS (
    SELECT event_ord, event_details FROM tts_bill_events($1, $2, $3, $4, $5)
), stats AS (
    INSERT INTO user_voice_stats AS s
           (user_id, model, voice, month, total_characters, total_duration_ms, synth_count)
    SELECT x.u, x.m, x.v, x.mo, sum(x.c), sum(x.d), count(*)
      FROM unnest($1::bigint[], $6::text[], $7::text[], $8::date[], $9::bigint[], $10::bigint[])
           WITH ORDINALITY AS x(u, m, v, mo, c, d, o)
      JOIN r ON r.event_ord = x.o
     WHERE r.event_details IS NOT NULL
     GROUP BY x.u, x.m, x.v, x.mo
    ON CONFLICT (user_id, model, voice, month) DO UPDATE
       SET total_characters = s.total_characters + EXCLUDED.total_characters,
           total_duration_ms = s.total_duration_ms + EXCLUDED.total_duration_ms,
           synth_count = s.synth_count + EXCLUDED.synth_count
)
SELECT event_ord, event_details IS NULL AS duplicate FROM r ORDER BY event_ord
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


def _details_dict(e: BillingEvent) -> dict[str, Any]:
    return {
        "model": e.model,
        "voice": e.voice,
        "variant_hash": e.variant_hash,
        "text_length": e.text_length,
        "usage_multiplier": e.usage_multiplier,
        "document_id": e.document_id,
        "block_idx": e.block_idx,
    }


def _details(e: BillingEvent) -> str:
    return json.dumps(_details_dict(e), separators=(",", ":"))


async def bill_group(
    pool: asyncpg.Pool,
    events: Sequence[PreparedEvent],
    *,
    acquire_timeout_s: float,
    txn_delay_s: float = 0.0,
) -> GroupOutcome:
    """Bill the events of some users in one transaction (one statement).

    Every event goes through ``tts_bill_events`` — the rules of ``record_usage``, set-based: the
    ``usage_log`` rows first (duplicates stop there), then the users' subscription rows locked
    ``FOR UPDATE`` in user-id order (the order every writer uses, so billing transactions cannot
    deadlock with each other or with payment writers), then the waterfall in arrival order; and
    ``user_voice_stats`` gets the non-duplicates, summed. ``txn_delay_s`` holds the transaction
    open that much longer (the slow storage of a small VM, for stress tests and benchmarks).
    """
    t0 = time.perf_counter()
    conn = await pool.acquire(timeout=acquire_timeout_s)
    waited = time.perf_counter() - t0
    args = (
        [p.event.user_id for p in events],
        [p.usage_type for p in events],
        [p.amount for p in events],
        [p.event.event_id for p in events],
        [_details(p.event) for p in events],
        [p.event.model for p in events],
        [p.event.voice for p in events],
        [_month(p.event.finalized_at) for p in events],
        [p.event.text_length for p in events],
        [p.event.duration_ms for p in events],
    )
    try:
        if txn_delay_s > 0:
            async with conn.transaction():
                rows = await conn.fetch(_BILL_SQL, *args)
                await asyncio.sleep(txn_delay_s)
        else:
            # One statement is one transaction: no BEGIN/COMMIT round trips.
            rows = await conn.fetch(_BILL_SQL, *args)
    finally:
        await pool.release(conn)
    billed = [p for p, row in zip(events, rows, strict=True) if not row["duplicate"]]
    return GroupOutcome(
        billed=tuple(p.event.event_id for p in billed),
        duplicates=tuple(
            p.event.event_id for p, row in zip(events, rows, strict=True) if row["duplicate"]
        ),
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


async def bill_one(pool: asyncpg.Pool, p: PreparedEvent, *, acquire_timeout_s: float) -> bool:
    """Bill one event in a transaction of its own: its variant, ``record_usage``, its stats.

    The unbatched shape (one transaction per event) that the batched consumer replaced; kept as
    the baseline of ``tools/bench_billing.py`` and for one-off writers. Returns True for a
    duplicate.
    """
    e = p.event
    conn = await pool.acquire(timeout=acquire_timeout_s)
    try:
        async with conn.transaction():
            await conn.execute(
                _VARIANTS_SQL,
                [e.variant_hash],
                [e.model],
                [e.voice],
                [e.text_length],
                [e.duration_ms],
            )
            record = await record_usage(
                e.user_id, p.usage_type, p.amount, e.event_id, conn, details=_details_dict(e)
            )
            if not record.duplicate:
                await conn.execute(
                    _STATS_SQL,
                    [e.user_id],
                    [e.model],
                    [e.voice],
                    [_month(e.finalized_at)],
                    [e.text_length],
                    [e.duration_ms],
                )
    finally:
        await pool.release(conn)
    return record.duplicate
