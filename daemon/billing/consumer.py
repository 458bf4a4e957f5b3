"""The cold path: the billing consumer. Its own Postgres pool; nothing of the request path.

The billing queue is a Redis stream with a consumer group (docs/tts-flow.md says why): an event
is read with XREADGROUP, stays pending while it is billed, and is acknowledged (XACK + XDEL) only
after the transaction that bills it has committed. A consumer that dies leaves its events pending;
on restart it re-reads its own pending events first, and events of a consumer that never comes back
are claimed (XAUTOCLAIM) by another after ``billing.claim_idle_s``. Redelivery is harmless:
``usage_log.event_id`` makes a second billing a no-op.

Per batch (drain-on-wake, up to ``billing.max_batch``): malformed events are dead-lettered; the
variants' metadata is upserted in one transaction and, beside it, the users' events are billed in
transactions of whole users, at most ``billing.users_per_txn`` each (rows locked in user-id order),
as many at once as the pool has connections; then the batch is acknowledged (on the consumer's own
Redis connection) and ``billing_processed`` logged. docs/billing.md says why each choice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from itertools import groupby

import attrs
import trio

from daemon.config import BillingConfig, PostgresConfig
from daemon.contracts import BillingEvent, ContractError, usage_amount
from daemon.events import EventLog
from daemon.metrics import Metrics
from daemon.stores.ledger import (
    BILLING_DATA_ERRORS,
    GroupOutcome,
    PreparedEvent,
    bill_group,
    upsert_variants,
)
from daemon.stores.pg import PgPool, open_pg_pool
from daemon.stores.redis import BillingEntry, RedisStore, billing_block_ms

__all__ = ["BatchOutcome", "BillingConsumer", "FaultPoint"]

# Tests and the chaos tool inject failures at these points: a callable that may raise.
FaultPoint = Callable[[str], Awaitable[None]]


async def _no_fault(point: str) -> None:
    return None


@attrs.frozen
class BatchOutcome:
    events_count: int
    users_count: int
    billed: int
    duplicates: int
    dead_lettered: int
    text_length: int
    duration_ms: float


@attrs.define
class BillingConsumer:
    """One billing consumer; :meth:`run` is the (restartable) service."""

    store: RedisStore
    pg_url: str
    pg_cfg: PostgresConfig
    cfg: BillingConfig
    events: EventLog
    metrics: Metrics
    consumer_name: str
    block_s: float = 1.0
    fault: FaultPoint = _no_fault
    pool: PgPool | None = None
    # The consumer's own Redis connection (reads, acknowledgements, dead letters): billing shares
    # no pool with the request path, Postgres or Redis.
    redis: RedisStore | None = None
    usage_types: dict[str, str] = attrs.Factory(dict)
    batches: int = 0

    async def run(
        self, *, stopping: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bill until ``stopping``; the batch in hand is finished (committed and acknowledged, or
        left pending). ``started()`` once its pool is connected. Errors end the service (the
        supervisor restarts it with backoff); nothing is acknowledged that was not committed.
        """
        async with (
            open_pg_pool(
                self.pg_url,
                size=self.pg_cfg.billing_pool_size,
                min_size=self.pg_cfg.billing_pool_size,
                acquire_timeout_s=self.pg_cfg.acquire_timeout_s,
                command_timeout_s=self.pg_cfg.command_timeout_s,
            ) as pool,
            self.store.dedicated() as reader,
        ):
            self.pool, self.redis = pool, reader
            try:
                catalog = await pool.catalog()
                self.usage_types = {m: info["usage_type"] for m, info in catalog.models.items()}
                task_status.started()
                await self._loop(reader, stopping)
            finally:
                self.pool = self.redis = None

    async def _loop(self, reader: RedisStore, stopping: trio.Event) -> None:
        block_ms = billing_block_ms(self.block_s)
        claim_every_s = max(1.0, self.cfg.claim_idle_s / 2)
        next_claim = trio.current_time()
        # Our own pending events first: those a previous run of this consumer read and did not
        # acknowledge (it crashed mid-batch, or the process was killed).
        while not stopping.is_set():
            entries = await reader.read_billing(
                self.consumer_name, count=self.cfg.max_batch, block_ms=block_ms, pending=True
            )
            if not entries:
                break
            await self.bill_entries(entries)
        while not stopping.is_set():
            if trio.current_time() >= next_claim:
                next_claim = trio.current_time() + claim_every_s
                stale = await reader.claim_stale_billing(
                    self.consumer_name,
                    min_idle_ms=int(self.cfg.claim_idle_s * 1000),
                    count=self.cfg.max_batch,
                )
                if stale:
                    self.events.emit("billing_claimed", service="billing", count=len(stale))
                    await self.bill_entries(stale)
                    continue
            entries = await reader.read_billing(
                self.consumer_name, count=self.cfg.max_batch, block_ms=block_ms
            )
            if entries:
                await self.bill_entries(entries)

    async def bill_entries(self, entries: Sequence[BillingEntry]) -> BatchOutcome:
        """Bill one batch of stream entries and acknowledge them.

        Malformed entries are dead-lettered; the variants' metadata is upserted in one
        transaction; the users' events are billed in transactions of whole users (see
        :meth:`_bill_users`). The variants and the billing transactions touch different tables and
        are idempotent, so they run side by side on the pool's connections. Only then are the
        entries acknowledged: a failure anywhere before leaves the whole batch pending.
        """
        assert self.pool is not None and self.redis is not None
        t0 = time.perf_counter()
        await self.fault("billing.before_batch")
        prepared: list[tuple[bytes, PreparedEvent]] = []
        dead = 0
        for entry in entries:
            try:
                prepared.append((entry.entry_id, self._prepare(entry)))
            except ContractError as exc:
                await self._dead_letter(entry, str(exc))
                dead += 1
        events = [p for _, p in prepared]
        limiter = trio.CapacityLimiter(self.pg_cfg.billing_pool_size)
        outcomes: list[GroupOutcome] = []
        failed: dict[int, str] = {}
        if events:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._upsert_variants, events, limiter)
                nursery.start_soon(self._bill_users, events, limiter, outcomes, failed)
        for user_id, reason in failed.items():
            for entry_id, p in prepared:
                if p.event.user_id == user_id:
                    await self._dead_letter(
                        BillingEntry(entry_id, p.event.to_json().encode()), reason
                    )
                    dead += 1
        await self.fault("billing.after_commit")
        ok_ids = [eid for eid, p in prepared if p.event.user_id not in failed]
        await self.redis.ack_billing(ok_ids)
        billed = sum(len(o.billed) for o in outcomes)
        dups = sum(len(o.duplicates) for o in outcomes)
        text_length = sum(o.text_length for o in outcomes)
        duration_ms = (time.perf_counter() - t0) * 1000
        users = len({p.event.user_id for p in events})
        self.batches += 1
        self.metrics.billing_events.inc(billed)
        self.metrics.billing_duplicates.inc(dups)
        self.metrics.billing_batch_seconds.observe(duration_ms / 1000)
        self.events.emit(
            "billing_processed",
            events_count=len(entries),
            users_count=users,
            duration_ms=round(duration_ms, 3),
            text_length=text_length,
            billed=billed,
            duplicates=dups,
            dead_lettered=dead,
        )
        return BatchOutcome(len(entries), users, billed, dups, dead, text_length, duration_ms)

    def _prepare(self, entry: BillingEntry) -> PreparedEvent:
        if entry.raw is None:
            raise ContractError("billing event: stream entry has no 'event' field")
        event = BillingEvent.from_json(entry.raw)
        usage_type = self.usage_types.get(event.model)
        if usage_type is None:
            raise ContractError(f"billing event: unknown model {event.model!r}")
        return PreparedEvent(
            event, usage_type, usage_amount(event.text_length, event.usage_multiplier)
        )

    async def _upsert_variants(
        self, events: Sequence[PreparedEvent], limiter: trio.CapacityLimiter
    ) -> None:
        assert self.pool is not None
        async with limiter:
            with trio.fail_after(self.pg_cfg.command_timeout_s * 2):
                await self.pool.run(
                    upsert_variants,
                    [p.event for p in events],
                    acquire_timeout_s=self.pg_cfg.acquire_timeout_s,
                )

    def chunks(self, events: Sequence[PreparedEvent]) -> list[list[PreparedEvent]]:
        """The batch's transactions: whole users (a user's events are never split, nor
        reordered), at most ``billing.users_per_txn`` users each, of about equal numbers of
        events, and — when there are enough users — at least twice as many as the pool has
        connections, so that the connections (and the variants' transaction beside them) share
        the work evenly instead of one waiting for the largest transaction."""
        by_user = [
            list(group)
            for _, group in groupby(
                sorted(events, key=lambda p: p.event.user_id), key=lambda p: p.event.user_id
            )
        ]
        if not by_user:
            return []
        per_txn = self.cfg.users_per_txn
        n = max(-(-len(by_user) // per_txn), min(2 * self.pg_cfg.billing_pool_size, len(by_user)))
        target = len(events) / n
        out: list[list[PreparedEvent]] = []
        chunk: list[PreparedEvent] = []
        users = 0
        for group in by_user:
            if chunk and (users >= per_txn or len(chunk) + len(group) / 2 > target):
                out.append(chunk)
                chunk, users = [], 0
            chunk.extend(group)
            users += 1
        out.append(chunk)
        return out

    async def _bill_users(
        self,
        events: Sequence[PreparedEvent],
        limiter: trio.CapacityLimiter,
        outcomes: list[GroupOutcome],
        failed: dict[int, str],
    ) -> None:
        """Bill all events, one transaction per chunk (:meth:`chunks`), as many at once as
        ``limiter`` allows. Appends to ``outcomes``; fills ``failed`` with {user_id: reason} for
        users that cannot be billed (data errors: their events are dead-lettered, the others' are
        not held up). Any other error propagates: the batch stays pending."""

        async def bill(chunk: list[PreparedEvent]) -> None:
            async with limiter:
                try:
                    outcomes.append(await self._bill_chunk(chunk))
                    await self.fault("billing.after_chunk")
                    return
                except BILLING_DATA_ERRORS as exc:
                    users = sorted({p.event.user_id for p in chunk})
                    if len(users) == 1:
                        failed[users[0]] = f"{type(exc).__name__}: {exc}"
                        return
            # A data error in a multi-user transaction: find the user, bill the others.
            for user in sorted({p.event.user_id for p in chunk}):
                await bill([p for p in chunk if p.event.user_id == user])

        async with trio.open_nursery() as nursery:
            for chunk in self.chunks(events):
                nursery.start_soon(bill, chunk)

    async def _bill_chunk(self, chunk: list[PreparedEvent]) -> GroupOutcome:
        assert self.pool is not None
        with trio.fail_after(self.pg_cfg.command_timeout_s * 2):
            outcome = await self.pool.run(
                bill_group,
                chunk,
                acquire_timeout_s=self.pg_cfg.acquire_timeout_s,
                txn_delay_s=self.cfg.txn_delay_ms / 1000.0,
            )
        self.metrics.billing_pool_in_use.set(self.pool.in_use())
        return outcome

    async def _dead_letter(self, entry: BillingEntry, reason: str) -> None:
        raw = (entry.raw or b"").decode("utf-8", errors="replace")
        record = json.dumps(
            {
                "reason": reason,
                "entry_id": entry.entry_id.decode(),
                "consumer": self.consumer_name,
                "at": time.time(),
                "raw": raw[:10_000],
            }
        )
        assert self.redis is not None
        await self.redis.dead_letter_billing(entry.entry_id, record)
        self.metrics.billing_dead_letters.inc()
        self.events.error(
            "billing",
            f"billing event dead-lettered: {reason}",
            entry_id=entry.entry_id.decode(),
            reason=reason,
        )
