"""The pre-split architecture, for comparison only: billing inside each result handler.

This is the design the split replaced (docs/tts-flow.md): one task per result, at most
``hot.concurrency`` at once, each storing the audio, notifying the listener and then billing —
block variant metadata, ``record_usage`` with its ``FOR UPDATE`` on the subscription row, the
engagement stats — in one transaction on the **request path's shared pool**, holding a connection
while it waits for the row lock. Under a burst the pool runs dry and ``synthesize`` (whose usage
check needs a connection of the same pool) waits.

It lives under ``tools/`` and is never part of ``tts-daemon run``: :func:`inline_services` is the
service list a daemon is given to run it (docs/tts-flow.md, "Services"). It reuses the project's own
``record_usage`` and stores; the same ``billing.txn_delay_ms`` is applied inside each billing
transaction, so both architectures pay the same per-commit cost. Unlike the system it models, a
billing that times out waiting for a connection is retried, so that a run's reconciliation can still
close at 0 and the comparison is about latency, not lost money.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import attrs
import trio

from daemon.config import BillingConfig, Config, PostgresConfig
from daemon.contracts import BillingEvent
from daemon.hot.consumer import HotConsumer
from daemon.runtime.services import Deps, build_services, hot_consumer, hot_service
from daemon.runtime.supervisor import ServiceSpec
from daemon.stores.ledger import record_usage
from daemon.stores.pg import PgPool
from daemon.stores.redis import FinalizeArgs

__all__ = ["InlineBilling", "bill_one", "inline_services"]

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


@attrs.define(eq=False)
class InlineBilling:
    """The pre-split result handler's billing, given to the hot consumer as its group handler:
    each result is stored and its listeners notified, then billed in the handler, which keeps
    its concurrency slot — and a request-pool connection — until the bill commits."""

    db: PgPool
    pg_cfg: PostgresConfig
    billing_cfg: BillingConfig
    usage_types: dict[str, str] = attrs.Factory(dict)
    billing_retries: int = 0

    async def handle(self, consumer: HotConsumer, group: Sequence[Any]) -> None:
        prepared = [consumer._prepare(c) for c in group]
        bills: list[BillingEvent | None] = []
        for p in prepared:
            op = p.op
            if isinstance(op, FinalizeArgs) and op.billing_event:
                bills.append(BillingEvent.from_json(op.billing_event))
                # Store and notify with no billing event queued: billing happens right here.
                p.op = attrs.evolve(op, billing_event="")
            else:
                bills.append(None)
        outcomes = await consumer._finalize(prepared)
        for event, (outcome, _) in zip(bills, outcomes, strict=True):
            if event is not None and outcome == "finalized":
                await self._bill(consumer, event)

    async def _bill(self, consumer: HotConsumer, event: BillingEvent) -> None:
        usage_type = self.usage_types[event.model]
        while True:
            try:
                await self.db.run(
                    bill_one,
                    event,
                    usage_type,
                    acquire_timeout_s=self.pg_cfg.acquire_timeout_s,
                    txn_delay_s=self.billing_cfg.txn_delay_ms / 1000.0,
                )
                return
            except (TimeoutError, asyncpg.PostgresConnectionError, OSError) as exc:
                self.billing_retries += 1
                consumer.events.error("hot", f"inline billing failed, retrying: {exc!r}")
                await trio.sleep(0.1)


def inline_services(cfg: Config, deps: Deps) -> list[ServiceSpec]:
    """The daemon with the pre-split result handler: no billing consumer, billing inline in a
    hot consumer that runs one task per result (as the handler of the pre-split design did)."""
    billing = InlineBilling(
        db=deps.request_db,
        pg_cfg=cfg.postgres,
        billing_cfg=cfg.billing,
        usage_types={m: i["usage_type"] for m, i in deps.catalog.models.items()},
    )
    consumer = hot_consumer(
        cfg, deps, hot_cfg=attrs.evolve(cfg.hot, finalize_batch=1), handle_group=billing.handle
    )
    inline_hot = hot_service(cfg, deps, consumer)
    return [
        inline_hot if s.name == "hot" else s
        for s in build_services(cfg, deps)
        if s.name != "billing"
    ]
