"""The pre-split architecture, for comparison only: billing inside each result handler.

This is the design the split replaced (docs/tts-flow.md): one task per result, at most
``hot.concurrency`` at once, each storing the audio, notifying the listener and then billing —
block variant metadata, ``record_usage`` with its ``FOR UPDATE`` on the subscription row, the
engagement stats — in one transaction on the **request path's shared pool**, holding a connection
while it waits for the row lock. Under a burst the pool runs dry and ``synthesize`` (whose usage
check needs a connection of the same pool) waits.

It lives under ``tools/`` and is never part of ``tts-daemon run``. It reuses the project's own
``record_usage`` and stores; the same ``billing.txn_delay_ms`` is applied inside each billing
transaction, so both architectures pay the same per-commit cost. Unlike the system it models, a
billing that times out waiting for a connection is retried, so that a run's reconciliation can
still close at 0 and the comparison is about latency, not lost money.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import attrs
import trio

from daemon.config import BillingConfig, PostgresConfig
from daemon.contracts import BillingEvent
from daemon.hot.consumer import HotConsumer
from daemon.runtime.daemon import Daemon
from daemon.runtime.supervisor import ServiceSpec
from daemon.stores.pg import PgPool
from daemon.stores.redis import FinalizeArgs
from daemon.testing.unbatched import bill_one

__all__ = ["InlineDaemon", "InlineHotConsumer", "bill_one"]


@attrs.define
class InlineHotConsumer(HotConsumer):
    """A result consumer that bills inline, on the request pool (the pre-split design): each
    result is stored and its listeners notified, then billed in the handler, which keeps its
    concurrency slot — and a request-pool connection — until the bill commits."""

    db: PgPool | None = None
    pg_cfg: PostgresConfig = attrs.Factory(PostgresConfig)
    billing_cfg: BillingConfig = attrs.Factory(BillingConfig)
    usage_types: dict[str, str] = attrs.Factory(dict)
    billing_retries: int = 0

    async def handle(self, group: Sequence[Any]) -> None:
        prepared = [self._prepare(c) for c in group]
        bills: list[BillingEvent | None] = []
        for p in prepared:
            op = p.op
            if isinstance(op, FinalizeArgs) and op.billing_event:
                bills.append(BillingEvent.from_json(op.billing_event))
                # Store and notify with no billing event queued: billing happens right here.
                p.op = attrs.evolve(op, billing_event="")
            else:
                bills.append(None)
        outcomes = await self._finalize(prepared)
        for event, (outcome, _) in zip(bills, outcomes, strict=True):
            if event is not None and outcome == "finalized":
                await self._bill(event)

    async def _bill(self, event: BillingEvent) -> None:
        assert self.db is not None
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
                self.events.error("hot", f"inline billing failed, retrying: {exc!r}")
                await trio.sleep(0.1)


class InlineDaemon(Daemon):
    """The daemon with the pre-split result handler: no billing consumer, billing inline."""

    def hot_service(self) -> ServiceSpec:
        assert self.store is not None and self.request_db is not None
        consumer = InlineHotConsumer(
            store=self.store,
            # one task per result, as the handler of the pre-split design worked
            cfg=attrs.evolve(self.cfg.hot, finalize_batch=1),
            events=self.events,
            metrics=self.metrics,
            consumer_id=self.instance_id,
            block_s=self.cfg.redis.block_s,
            db=self.request_db,
            pg_cfg=self.cfg.postgres,
            billing_cfg=self.cfg.billing,
        )
        self.hot = consumer

        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            catalog = await self.request_db.catalog()  # type: ignore[union-attr]
            consumer.usage_types = {m: i["usage_type"] for m, i in catalog.models.items()}
            await consumer.run(stopping=self.consumers_stopping, task_status=task_status)

        return ServiceSpec("hot", run)

    def billing_service(self) -> ServiceSpec | None:
        return None
