"""The cold path: the billing consumer. Its own Postgres pool; nothing of the request path.

Drains the ``tts:billing`` stream (a consumer group: an event stays pending until the transaction
that bills it commits, so a crash redelivers and ``usage_log.event_id`` makes that a no-op) in
batches: malformed events dead-lettered, the rest billed in transactions of whole users, one
``tts_bill_batch`` call each (daemon/billing/ledger.sql), then acknowledged. Reading ahead, billing
and acknowledging overlap by one batch. docs/billing.md says why each choice.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from daemon.config import BillingConfig, PostgresConfig
from daemon.contracts import ContractError, billing_event_fields
from daemon.contracts.events import BillingClaimed, BillingProcessed, Error
from daemon.ops.events import EventLog
from daemon.ops.metrics import Metrics
from daemon.runtime.faults import FaultPoint, no_fault
from daemon.stores.ledger import ChunkResult, bill_chunks, events_array
from daemon.stores.pg import PgPool, open_pg_pool
from daemon.stores.redis import (
    DEAD_LETTER_CAP,
    BillingEntry,
    RedisStore,
    billing_block_ms,
    mirror_call,
)

__all__ = [
    "BatchOutcome",
    "BillUsers",
    "BillingConsumer",
    "BillingSetup",
    "CommittedBatch",
    "PreparedBatch",
    "run_billing_consumer",
]


@attrs.frozen
class BatchOutcome:
    events_count: int
    users_count: int
    billed: int
    duplicates: int
    dead_lettered: int
    text_length: int
    duration_ms: float


@attrs.frozen
class PreparedBatch:
    """A batch read and checked, not yet billed: its size, the valid events by user (each user's
    as (entry, JSON text) in arrival order), how many were dead-lettered, the seconds it took."""

    events_count: int
    by_user: dict[int, list[tuple[BillingEntry, str]]]
    dead_lettered: int
    check_s: float
    # each user's event ids (= job ids), whose holds are settled once the batch committed
    event_ids: dict[int, list[str]] = attrs.Factory(dict)


@attrs.frozen
class CommittedBatch:
    """A batch whose transactions committed, not yet acknowledged: the users that could not be
    billed ({user_id: reason}), the events billed and duplicates, the characters billed, the
    seconds billing took."""

    batch: PreparedBatch
    failed: dict[int, str]
    billed: int
    duplicates: int
    text_length: int
    commit_s: float
    # the billed users' entitlements after the commit (``tts_entitlements`` rows), for Redis
    entitlements: dict[int, dict[str, Any]] = attrs.Factory(dict)


# How a checked batch's users are billed: (consumer, events by user, failed users to fill) →
# (billed, duplicates, characters billed). The consumer's own is lanes of batched transactions;
# tools/bench_billing.py passes one transaction per event, its baseline.
BillUsers = Callable[
    ["BillingConsumer", dict[int, list[tuple[BillingEntry, str]]], dict[int, str]],
    Awaitable[tuple[int, int, int]],
]


@attrs.frozen
class BillingSetup:
    """What a billing consumer is made of; :func:`run_billing_consumer` opens its connections
    afresh on every start (a crash cannot leave a half-broken pool behind)."""

    store: RedisStore
    pg_url: str
    pg_cfg: PostgresConfig
    cfg: BillingConfig
    events: EventLog
    metrics: Metrics
    consumer_name: str
    block_s: float = 1.0
    fault: FaultPoint = no_fault
    dead_letter_cap: int = DEAD_LETTER_CAP  # dead_letters.max_entries
    bill_users: BillUsers | None = None  # None: the consumer's own (batched lanes)


async def run_billing_consumer(
    setup: BillingSetup,
    *,
    stopping: trio.Event,
    task_status: trio.TaskStatus[BillingConsumer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The (restartable) billing service: bill until ``stopping``; the batches in hand (read
    ahead, being billed, waiting for their acknowledgement) are finished (committed and
    acknowledged, or left pending).

    ``started(consumer)`` once its pool is connected: the :class:`BillingConsumer` of this start,
    with its pool and Redis connections. Errors end the service (the supervisor restarts it with
    backoff); nothing is acknowledged that was not committed.
    """
    async with (
        open_pg_pool(
            setup.pg_url,
            size=setup.pg_cfg.billing_pool_size,
            min_size=setup.pg_cfg.billing_pool_size,
            acquire_timeout_s=setup.pg_cfg.acquire_timeout_s,
            command_timeout_s=setup.pg_cfg.command_timeout_s,
        ) as pool,
        setup.store.dedicated() as reader,
        setup.store.dedicated() as writer,
    ):
        catalog = await pool.catalog()
        consumer = BillingConsumer(
            pool=pool,
            reader=reader,
            redis=writer,
            usage_types={m: info["usage_type"] for m, info in catalog.models.items()},
            pg_cfg=setup.pg_cfg,
            cfg=setup.cfg,
            events=setup.events,
            metrics=setup.metrics,
            consumer_name=setup.consumer_name,
            block_s=setup.block_s,
            fault=setup.fault,
            bill_users=setup.bill_users,
            dead_letter_cap=setup.dead_letter_cap,
        )
        task_status.started(consumer)
        await consumer._loop(reader, stopping)


@attrs.define(eq=False)
class BillingConsumer:
    """One start of the billing consumer, with the connections it opened
    (:func:`run_billing_consumer` builds it)."""

    pool: PgPool
    # The consumer's own Redis connections: one for reads (and dead letters of malformed
    # events), one for acknowledgements (and dead letters of users that cannot be billed), so an
    # acknowledgement never waits behind a blocking read. Billing shares no pool with the request
    # path, Postgres or Redis.
    reader: RedisStore
    redis: RedisStore
    usage_types: dict[str, str]
    pg_cfg: PostgresConfig
    cfg: BillingConfig
    events: EventLog
    metrics: Metrics
    consumer_name: str
    block_s: float = 1.0
    fault: FaultPoint = no_fault
    bill_users: BillUsers | None = None
    dead_letter_cap: int = DEAD_LETTER_CAP
    batches: int = 0

    async def _loop(self, reader: RedisStore, stopping: trio.Event) -> None:
        block_ms = billing_block_ms(self.block_s)
        # Our own pending events first: those a previous run of this consumer read and did not
        # acknowledge (it crashed mid-batch, or the process was killed). One batch at a time: a
        # pending read starts at the oldest unacknowledged entry, so it cannot read ahead.
        while not stopping.is_set():
            entries = await reader.read_billing(
                self.consumer_name, count=self.cfg.max_batch, block_ms=block_ms, pending=True
            )
            if not entries:
                break
            await self.bill_entries(entries)
        # Then new events, in three stages: this task reads and checks the next batch while the
        # biller bills the current one and the finisher acknowledges the previous one (channels
        # without a buffer: one batch ahead at most, one behind).
        send, recv = trio.open_memory_channel[PreparedBatch](0)
        done_send, done_recv = trio.open_memory_channel[CommittedBatch](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._biller, recv, done_send)
            nursery.start_soon(self._finisher, done_recv)
            async with send:
                await self._reader(reader, stopping, send, block_ms)

    async def _reader(
        self,
        reader: RedisStore,
        stopping: trio.Event,
        send: trio.MemorySendChannel[PreparedBatch],
        block_ms: int,
    ) -> None:
        claim_every_s = max(1.0, self.cfg.claim_idle_s / 2)
        next_claim = trio.current_time()
        while not stopping.is_set():
            if trio.current_time() >= next_claim:
                next_claim = trio.current_time() + claim_every_s
                stale = await reader.claim_stale_billing(
                    self.consumer_name,
                    min_idle_ms=int(self.cfg.claim_idle_s * 1000),
                    count=self.cfg.max_batch,
                )
                if stale:
                    self.events.emit(BillingClaimed(service="billing", count=len(stale)))
                    await send.send(await self.prepare_batch(stale))
                    continue
            entries = await reader.read_billing(
                self.consumer_name, count=self.cfg.max_batch, block_ms=block_ms
            )
            if entries:
                await send.send(await self.prepare_batch(entries))

    async def _biller(
        self,
        recv: trio.MemoryReceiveChannel[PreparedBatch],
        done: trio.MemorySendChannel[CommittedBatch],
    ) -> None:
        async with recv, done:
            async for batch in recv:
                await done.send(await self.commit_batch(batch))

    async def _finisher(self, recv: trio.MemoryReceiveChannel[CommittedBatch]) -> None:
        async with recv:
            async for committed in recv:
                await self.finish_batch(committed)

    async def bill_entries(self, entries: Sequence[BillingEntry]) -> BatchOutcome:
        """Bill one batch of stream entries and acknowledge them (:meth:`prepare_batch`, then
        :meth:`bill_batch`)."""
        return await self.bill_batch(await self.prepare_batch(entries))

    async def prepare_batch(self, entries: Sequence[BillingEntry]) -> PreparedBatch:
        """Check a batch: malformed entries are dead-lettered (on the reading connection), the
        others grouped by user, each user's in arrival order."""
        t0 = time.perf_counter()
        await self.fault("billing.before_batch")
        by_user: dict[int, list[tuple[BillingEntry, str]]] = {}
        event_ids: dict[int, list[str]] = {}
        dead = 0
        for entry in entries:
            try:
                user_id, text, event_id = self._check(entry)
            except ContractError as exc:
                await self._dead_letter(self.reader, entry, str(exc))
                dead += 1
                continue
            mine = by_user.get(user_id)
            if mine is None:
                by_user[user_id] = [(entry, text)]
                event_ids[user_id] = [event_id]
            else:
                mine.append((entry, text))
                event_ids[user_id].append(event_id)
        return PreparedBatch(len(entries), by_user, dead, time.perf_counter() - t0, event_ids)

    async def bill_batch(self, batch: PreparedBatch) -> BatchOutcome:
        """Bill a checked batch and acknowledge it (:meth:`commit_batch`, then
        :meth:`finish_batch`)."""
        return await self.finish_batch(await self.commit_batch(batch))

    async def commit_batch(self, batch: PreparedBatch) -> CommittedBatch:
        """Bill a checked batch: :meth:`_bill_users` — each connection of the pool bills its own
        users, in transactions of whole users, all in one crossing. Nothing is acknowledged."""
        t0 = time.perf_counter()
        failed: dict[int, str] = {}
        ents: dict[int, dict[str, Any]] = {}
        billed = dups = text_length = 0
        if batch.by_user:
            if self.bill_users is not None:
                # (a baseline's billing: the mirror is then written with settle-only calls)
                billed, dups, text_length = await self.bill_users(self, batch.by_user, failed)
            else:
                billed, dups, text_length = await self._bill_users(batch.by_user, failed, ents)
        return CommittedBatch(
            batch, failed, billed, dups, text_length, time.perf_counter() - t0, ents
        )

    async def finish_batch(self, committed: CommittedBatch) -> BatchOutcome:
        """After the batch's transactions committed: dead-letter the events of users that could
        not be billed, acknowledge the others, log ``billing_processed``."""
        t0 = time.perf_counter()
        batch = committed.batch
        by_user = batch.by_user
        failed = committed.failed
        dead = batch.dead_lettered
        for user_id, reason in failed.items():
            for entry, _ in by_user[user_id]:
                await self._dead_letter(self.redis, entry, reason)
                dead += 1
        await self._settle(committed)
        await self.fault("billing.after_commit")
        ok_ids = [
            entry.entry_id
            for user_id, mine in by_user.items()
            if user_id not in failed
            for entry, _ in mine
        ]
        await self.redis.ack_billing(ok_ids)
        # the batch's own work: checking, billing, acknowledging (not its waits between stages)
        duration_ms = (batch.check_s + committed.commit_s + time.perf_counter() - t0) * 1000
        users = len(by_user)
        billed, dups, text_length = committed.billed, committed.duplicates, committed.text_length
        self.batches += 1
        self.metrics.billing_events.inc(billed)
        self.metrics.billing_duplicates.inc(dups)
        self.metrics.billing_batch_seconds.observe(duration_ms / 1000)
        self.events.emit(
            BillingProcessed(
                events_count=batch.events_count,
                users_count=users,
                duration_ms=round(duration_ms, 3),
                text_length=text_length,
                billed=billed,
                duplicates=dups,
                dead_lettered=dead,
            )
        )
        return BatchOutcome(batch.events_count, users, billed, dups, dead, text_length, duration_ms)

    async def _settle(self, committed: CommittedBatch) -> None:
        """After the commit, before the acknowledgement: each billed user's entitlements (as
        the transaction left them) go to the Redis mirror, and the holds of their events are
        settled, one ``mirror.lua`` per user in one pipeline. The holds of users whose events
        were dead-lettered are released (they will not be billed). By event id, so a redelivered
        batch settles nothing twice; a crash before this leaves the batch pending (redelivered,
        billed as duplicates, settled then)."""
        assert self.redis is not None
        batch = committed.batch
        calls = []
        for user_id, ids in batch.event_ids.items():
            ent = committed.entitlements.get(user_id)
            calls.append(mirror_call(user_id, ent, ids))
        if not calls:
            return
        settled = sum(n for _, n in await self.redis.write_mirror(calls))
        self.metrics.holds_settled.inc(settled)

    def _check(self, entry: BillingEntry) -> tuple[int, str, str]:
        """The entry's user, its event as JSON text and its event id, validated
        (ContractError if not)."""
        if entry.raw is None:
            raise ContractError("billing event: stream entry has no 'event' field")
        try:
            text = entry.raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ContractError(f"billing event: not UTF-8: {exc}") from None
        fields = billing_event_fields(text)
        if fields["model"] not in self.usage_types:
            raise ContractError(f"billing event: unknown model {fields['model']!r}")
        return fields["user_id"], text, fields["event_id"]

    def lanes(self, counts: dict[int, int]) -> list[list[list[int]]]:
        """The batch's transactions, given each user's number of events: one lane per
        connection of the pool (fewer with fewer users), each a list of transactions, each a
        list of user ids. A user is in exactly one transaction (a user's events are never split),
        so the lanes never wait for each other's row locks; the lanes get about equal numbers of
        events (the largest users first, each to the least loaded lane); a transaction has at
        most ``billing.users_per_txn`` users, a lane's transactions about equal numbers."""
        n = min(self.pg_cfg.billing_pool_size, len(counts))
        if n == 0:
            return []
        loads = [0] * n
        members: list[list[int]] = [[] for _ in range(n)]
        for user_id, count in sorted(counts.items(), key=lambda uc: (-uc[1], uc[0])):
            i = loads.index(min(loads))
            loads[i] += count
            members[i].append(user_id)
        out = []
        for users in members:
            users.sort()
            txns = math.ceil(len(users) / self.cfg.users_per_txn)
            size = math.ceil(len(users) / txns)
            out.append([users[j : j + size] for j in range(0, len(users), size)])
        return out

    async def _bill_users(
        self,
        by_user: dict[int, list[tuple[BillingEntry, str]]],
        failed: dict[int, str],
        ents: dict[int, dict[str, Any]] | None = None,
    ) -> tuple[int, int, int]:
        """Bill every user's events (:meth:`lanes`, :func:`bill_chunks`); (billed, duplicates,
        characters billed). Fills ``failed`` with {user_id: reason} for users that cannot be
        billed (data errors: their events are dead-lettered, the others' are not held up; a
        failing multi-user transaction is split in two and each half retried, until the user is
        found). Any other error propagates: the batch stays pending."""
        billed = dups = chars = 0
        lanes = self.lanes({u: len(mine) for u, mine in by_user.items()})
        while lanes:
            results = await self._bill_lanes(lanes, by_user)
            retry: list[list[int]] = []
            for lane, lane_results in zip(lanes, results, strict=True):
                for users, result in zip(lane, lane_results, strict=True):
                    if isinstance(result, ChunkResult):
                        if ents is not None:
                            for ent in result.entitlements:
                                ents[int(ent["user_id"])] = ent
                        n = sum(len(by_user[u]) for u in users)
                        dups += len(result.duplicates)
                        billed += n - len(result.duplicates)
                        chars += result.text_length
                    elif len(users) == 1:
                        failed[users[0]] = f"{type(result).__name__}: {result}"
                    else:
                        half = len(users) // 2
                        retry += [users[:half], users[half:]]
            k = self.pg_cfg.billing_pool_size
            lanes = [retry[i::k] for i in range(k) if retry[i::k]]
        return billed, dups, chars

    async def _bill_lanes(
        self,
        lanes: list[list[list[int]]],
        by_user: dict[int, list[tuple[BillingEntry, str]]],
    ) -> list[list[ChunkResult | Exception]]:
        payload = [
            [events_array([text for u in users for _, text in by_user[u]]) for users in lane]
            for lane in lanes
        ]
        longest = max(len(lane) for lane in lanes)
        with trio.fail_after(
            self.pg_cfg.acquire_timeout_s + self.pg_cfg.command_timeout_s * 2 * longest
        ):
            results = await self.pool.run(
                bill_chunks,
                payload,
                acquire_timeout_s=self.pg_cfg.acquire_timeout_s,
                txn_delay_s=self.cfg.txn_delay_ms / 1000.0,
            )
        return results

    async def _dead_letter(self, redis: RedisStore, entry: BillingEntry, reason: str) -> None:
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
        await redis.dead_letter_billing(entry.entry_id, record, cap=self.dead_letter_cap)
        self.metrics.billing_dead_letters.inc()
        self.events.emit(
            Error(
                service="billing",
                message=f"billing event dead-lettered: {reason}",
                context={"entry_id": entry.entry_id.decode(), "reason": reason},
            )
        )
