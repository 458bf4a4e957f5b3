"""The billing ledger in Postgres: ``record_usage`` and the billing consumer's transactions.

These are asyncio coroutines; the billing consumer calls each transaction with one crossing. The
rules themselves live in SQL, in ``daemon/billing/ledger.sql`` — ``tts_bill_events``, of which
``tts_record_usage`` is a one-event call and ``tts_bill_batch`` the consumer's whole transaction —
so the batched path, the single-event path and any other writer share one implementation of the
waterfall (docs/billing.md).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import asyncpg
import attrs

__all__ = [
    "BILLING_DATA_ERRORS",
    "ChunkResult",
    "UsageRecord",
    "bill_chunks",
    "events_array",
    "record_usage",
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
    """Bill ``amount`` of ``usage_type`` to ``user`` once per ``event_id`` (docs/billing.md).

    Locks the subscription row ``FOR UPDATE``; a duplicate ``event_id`` (already in ``usage_log``)
    changes nothing else and comes back as ``duplicate``; otherwise the ``usage_log`` row, the
    period counter and, for premium voice, the waterfall plan → rollover → purchased → debt
    (``tts_bill_events``, docs/billing.md). With
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


# tts_bill_batch_mirror (0004) is tts_bill_batch plus the billed users' entitlements, read under
# the same row locks with their ledger version bumped: what the consumer writes to Redis's mirror.
_BATCH_SQL = "SELECT dup_ords, billed_chars, entitlements FROM tts_bill_batch_mirror($1::text)"


@attrs.frozen
class ChunkResult:
    """One committed billing transaction: the positions (0-based) of its duplicates, the
    characters billed now, and its users' entitlements after it (``tts_entitlements`` rows as
    dicts, for the Redis mirror)."""

    duplicates: tuple[int, ...]
    text_length: int
    entitlements: tuple[dict[str, Any], ...] = ()


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
    ents = row["entitlements"]
    if isinstance(ents, str):  # a connection without the json codec
        ents = json.loads(ents)
    return ChunkResult(
        tuple(o - 1 for o in row["dup_ords"] or ()), int(row["billed_chars"]), tuple(ents or ())
    )


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
