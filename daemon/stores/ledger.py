"""The billing ledger in Postgres: ``record_usage`` and the billing consumer's transactions.

These are asyncio coroutines; the billing consumer calls each transaction with one crossing. The
rules themselves live in SQL — ``tts_bill_events`` (migrations 0002, 0003), of which
``tts_record_usage`` is a one-event call and ``tts_bill_batch`` (0003) the consumer's whole
transaction — so the batched path, the single-event path and any other writer share one
implementation of the waterfall.
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
    "ChunkResult",
    "GroupOutcome",
    "UsageRecord",
    "bill_chunks",
    "bill_group",
    "bill_one",
    "events_array",
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


_BATCH_SQL = "SELECT dup_ords, billed_chars FROM tts_bill_batch($1::text)"


@attrs.frozen
class ChunkResult:
    """One committed billing transaction: the positions (0-based) of its duplicates, and the
    characters billed now."""

    duplicates: tuple[int, ...]
    text_length: int


def events_array(raw_events: Sequence[str]) -> str:
    """The JSON array ``tts_bill_batch`` takes, from events already serialized as JSON objects."""
    return "[" + ",".join(raw_events) + "]"


async def _bill_json(conn: asyncpg.Connection, events_json: str, txn_delay_s: float) -> ChunkResult:
    if txn_delay_s > 0:
        async with conn.transaction():
            row = await conn.fetchrow(_BATCH_SQL, events_json)
            await asyncio.sleep(txn_delay_s)
    else:
        # One statement is one transaction: no BEGIN/COMMIT round trips.
        row = await conn.fetchrow(_BATCH_SQL, events_json)
    assert row is not None
    return ChunkResult(tuple(o - 1 for o in row["dup_ords"] or ()), int(row["billed_chars"]))


async def bill_chunks(
    pool: asyncpg.Pool,
    lanes: Sequence[Sequence[str]],
    *,
    acquire_timeout_s: float,
    txn_delay_s: float = 0.0,
) -> list[list[ChunkResult | Exception]]:
    """Bill several transactions at once, one lane per connection: each lane is a list of JSON
    arrays of events (:func:`events_array`), each billed by ``tts_bill_batch`` in a transaction
    of its own, one after the other on the lane's connection, while the other lanes run on theirs.

    The lanes must not share a user (the caller splits the batch by user): they never wait for
    each other's row locks. For each transaction, returns its :class:`ChunkResult`, or the error
    when it failed with one of :data:`BILLING_DATA_ERRORS` (it will fail the same way again; the
    lane goes on with its next transaction). Any other error is raised once every lane has
    stopped, so no connection is left working behind the caller.
    """

    async def lane(chunks: Sequence[str]) -> list[ChunkResult | Exception]:
        out: list[ChunkResult | Exception] = []
        conn = await pool.acquire(timeout=acquire_timeout_s)
        try:
            for events_json in chunks:
                try:
                    out.append(await _bill_json(conn, events_json, txn_delay_s))
                except BILLING_DATA_ERRORS as exc:
                    out.append(exc)
        finally:
            await pool.release(conn)
        return out

    results = await asyncio.gather(*(lane(c) for c in lanes if c), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    done = iter(results)
    return [next(done) if c else [] for c in lanes]  # type: ignore[misc]


async def bill_group(
    pool: asyncpg.Pool,
    events: Sequence[PreparedEvent],
    *,
    acquire_timeout_s: float,
    txn_delay_s: float = 0.0,
) -> GroupOutcome:
    """Bill the events of some users in one transaction — the billing consumer's transaction,
    ``tts_bill_batch``, for events at hand as objects (tests, tools).

    Every event goes through ``tts_bill_events`` — the rules of ``record_usage``, set-based: the
    users' subscription rows locked ``FOR UPDATE`` in user-id order (the order every writer uses,
    so billing transactions cannot deadlock with each other or with payment writers), duplicates
    (already in ``usage_log``) change nothing, then the waterfall in arrival order;
    ``user_voice_stats`` gets the non-duplicates, summed, and ``block_variants`` each variant's
    duration. The amount and usage type are the database's, from the event's ``text_length``,
    ``usage_multiplier`` and ``model`` (``PreparedEvent.amount`` and ``usage_type`` agree with
    them). ``txn_delay_s`` holds the transaction open that much longer (the slow storage of a
    small VM, for stress tests and benchmarks).
    """
    t0 = time.perf_counter()
    conn = await pool.acquire(timeout=acquire_timeout_s)
    waited = time.perf_counter() - t0
    try:
        result = await _bill_json(
            conn, events_array([p.event.to_json() for p in events]), txn_delay_s
        )
    finally:
        await pool.release(conn)
    dups = set(result.duplicates)
    return GroupOutcome(
        billed=tuple(p.event.event_id for i, p in enumerate(events) if i not in dups),
        duplicates=tuple(p.event.event_id for i, p in enumerate(events) if i in dups),
        text_length=result.text_length,
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
