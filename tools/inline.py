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

from collections.abc import Sequence
from typing import Any

import asyncpg
import attrs
import trio

from daemon.config import BillingConfig, Config, PostgresConfig
from daemon.contracts import BillingEvent
from daemon.contracts.events import Error
from daemon.hot.consumer import HotConsumer
from daemon.runtime.services import Deps, build_services, hot_consumer, hot_service
from daemon.runtime.supervisor import ServiceSpec
from daemon.stores.pg import PgPool
from daemon.stores.redis import FinalizeArgs, mirror_call
from daemon.testing.unbatched import bill_one

__all__ = ["InlineBilling", "bill_one", "inline_services"]


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
        await consumer._update_holds(prepared, outcomes)
        for event, (outcome, _) in zip(bills, outcomes, strict=True):
            if event is not None and outcome == "finalized":
                await self._bill(consumer, event)
                # the hold this job placed is settled by its bill, as the billing consumer does
                # (the mirror's usage is copied again only by a rebuild: plans used here are
                # unlimited for kokoro)
                await consumer.store.write_mirror(
                    [mirror_call(event.user_id, None, [event.event_id])]
                )

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
                consumer.events.emit(
                    Error(service="hot", message=f"inline billing failed, retrying: {exc!r}")
                )
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
