"""Billing one event in a transaction of its own: the unbatched shape the batched billing
consumer replaced (docs/billing.md), kept as a reference beside it.

Tests bill some events this way and some through the consumer's batches and check the two agree;
``tools/inline.py`` (the pre-split architecture) and ``tools/bench_billing.py`` (the unbatched
baseline) run it. It reuses the project's own ``record_usage``.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from daemon.contracts import BillingEvent
from daemon.stores.ledger import record_usage

__all__ = ["bill_one"]

_VARIANT_SQL = """
INSERT INTO block_variants AS b (hash, model, voice, text_length, duration_ms)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (hash) DO UPDATE SET duration_ms = EXCLUDED.duration_ms, updated_at = now()
"""
# The month of the event's finalization, as tts_bill_batch counts it.
_STATS_SQL = """
INSERT INTO user_voice_stats AS s
       (user_id, model, voice, month, total_characters, total_duration_ms, synth_count)
VALUES ($1, $2, $3, date_trunc('month', to_timestamp($4) AT TIME ZONE 'UTC')::date, $5, $6, 1)
ON CONFLICT (user_id, model, voice, month) DO UPDATE
   SET total_characters = s.total_characters + EXCLUDED.total_characters,
       total_duration_ms = s.total_duration_ms + EXCLUDED.total_duration_ms,
       synth_count = s.synth_count + 1
"""


async def bill_one(
    pool: asyncpg.Pool,
    event: BillingEvent,
    usage_type: str,
    *,
    acquire_timeout_s: float,
    txn_delay_s: float = 0.0,
) -> tuple[bool, float]:
    """One event in a transaction of its own — its variant, ``record_usage``, its stats — the
    shape the batched consumer replaced: the old result handler's Postgres phase, and the
    unbatched baseline of ``tools/bench_billing.py``. Returns (duplicate, seconds waited for a
    connection)."""
    t0 = time.perf_counter()
    conn = await pool.acquire(timeout=acquire_timeout_s)
    waited = time.perf_counter() - t0
    try:
        async with conn.transaction():
            await conn.execute(
                _VARIANT_SQL,
                event.variant_hash,
                event.model,
                event.voice,
                event.text_length,
                event.duration_ms,
            )
            record = await record_usage(
                event.user_id,
                usage_type,
                event.amount,
                event.event_id,
                conn,
                details={
                    "model": event.model,
                    "voice": event.voice,
                    "variant_hash": event.variant_hash,
                    "text_length": event.text_length,
                    "usage_multiplier": event.usage_multiplier,
                    "document_id": event.document_id,
                    "block_idx": event.block_idx,
                },
            )
            if not record.duplicate:
                await conn.execute(
                    _STATS_SQL,
                    event.user_id,
                    event.model,
                    event.voice,
                    event.finalized_at,
                    event.text_length,
                    event.duration_ms,
                )
            if txn_delay_s > 0:
                await asyncio.sleep(txn_delay_s)
    finally:
        await pool.release(conn)
    return record.duplicate, waited
