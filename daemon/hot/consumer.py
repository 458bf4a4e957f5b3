"""The hot path: worker results → audio cache → listeners → billing queue. No Postgres at all.

A reader claims results from ``tts:results`` in batches (``claim.lua``: the audio stays in Redis),
handlers finalize each group in one atomic ``finalize.lua`` call (audio stored, billing event
appended, waiters notified), at most ``hot.concurrency`` at once. A result is never only in this
process's memory: a crash leaves it claimed, given back on restart or by another consumer once
this one's heartbeat expires. docs/tts-flow.md has the steps and the crash analysis.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from daemon.config import HotConfig
from daemon.contracts import BillingEvent, ContractError, Keys, Result
from daemon.contracts.events import (
    Error,
    GenericEvent,
    ResultDuplicate,
    ResultGone,
    ResultsRecovered,
    SynthesisComplete,
)
from daemon.ops.events import EventLog
from daemon.ops.metrics import Metrics
from daemon.runtime.faults import FaultPoint, no_fault
from daemon.runtime.outage import Outage
from daemon.runtime.priority import RequestFirst
from daemon.stores.redis import (
    ClaimedResult,
    DeadLetter,
    FinalizeArgs,
    RedisStore,
    is_redis_unavailable,
)

__all__ = ["GroupHandler", "HotConsumer", "run_hot_consumer"]

# finalize.lua's outcomes other than "finalized" and "dead", as events
_NOT_FINALIZED: dict[str, type[ResultDuplicate] | type[ResultGone]] = {
    "duplicate": ResultDuplicate,
    "gone": ResultGone,
}


@attrs.define(eq=False)  # hashable by identity: it is its own limiter token
class _Claimed:
    item: ClaimedResult
    claimed_at: float  # perf_counter when the claim's reply arrived


@attrs.define
class _Prepared:
    claimed: _Claimed
    op: FinalizeArgs | DeadLetter
    result: Result | None  # None when dead-lettered


# How a group of claimed results is finalized: the consumer's own :meth:`HotConsumer.handle`
# unless another is given (tools/inline.py passes the pre-split shape, billing in the handler).
GroupHandler = Callable[["HotConsumer", Sequence["_Claimed"]], Awaitable[None]]


@attrs.define(eq=False)
class HotConsumer:
    """State of one hot consumer; :meth:`run` is the service, and the handle it reports."""

    store: RedisStore
    cfg: HotConfig
    events: EventLog
    metrics: Metrics
    consumer_id: str
    block_s: float = 1.0
    # Tests and the chaos tool stop the consumer at its fault points: "claimed" (results
    # claimed, not yet handed over) and "finalize" (a group about to be finalized).
    fault: FaultPoint = no_fault
    priority: RequestFirst = attrs.Factory(RequestFirst)
    # Stored audio waits in Redis (no TTL) for the persister (daemon/audio/persister.py).
    persist: bool = False
    handle_group: GroupHandler | None = None
    in_flight: int = 0  # results being finalized now
    handled: int = 0  # results done with (finalized, duplicate, gone or dead-lettered)

    async def run(
        self,
        *,
        stopping: trio.Event,
        task_status: trio.TaskStatus[HotConsumer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume results until ``stopping`` is set, then finish the results in hand.

        ``started(self)`` once registered and reading. Redis outages are waited out with backoff;
        any other error ends the service (the supervisor restarts it; claimed results survive).
        """
        await self._start_up()
        send, receive = trio.open_memory_channel[_Claimed](self.cfg.concurrency)
        limiter = trio.CapacityLimiter(self.cfg.concurrency)
        async with trio.open_nursery() as outer:
            outer.start_soon(self._heartbeat_loop)
            async with trio.open_nursery() as handlers:
                handlers.start_soon(self._dispatch, receive, limiter, handlers)
                task_status.started(self)
                async with self.store.dedicated() as reader:
                    await self._read_loop(reader, send, stopping)
            outer.cancel_scope.cancel()
        with trio.move_on_after(5, shield=True):
            # Anything still claimed (a handler gave up on Redis) goes back for the next consumer.
            await self.store.recover_results(self.consumer_id, include_own=True)
            await self.store.unregister_consumer(self.consumer_id)

    async def _start_up(self) -> None:
        # Our own claimed results are from this consumer's previous run: take them again.
        await self._beat(include_own=True)

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._beat(include_own=False)
            await trio.sleep(self.cfg.heartbeat_s)

    async def _beat(self, *, include_own: bool) -> None:
        """Mark this consumer alive and give back the results of consumers that are gone (with
        ``include_own``, ours too); log what was recovered. Waits out a Redis outage."""
        outage = Outage("hot", self.events)
        while True:
            try:
                await self.store.heartbeat(self.consumer_id, ttl_s=self.cfg.consumer_ttl_s)
                recovered = await self.store.recover_results(
                    self.consumer_id, include_own=include_own
                )
                break
            except Exception as exc:
                if not is_redis_unavailable(exc):
                    raise
                await outage.failed(exc, "Redis")
        outage.ok()
        if recovered:
            self.events.emit(
                ResultsRecovered(service="hot", count=recovered, consumer=self.consumer_id)
            )

    async def _read_loop(
        self, reader: RedisStore, send: trio.MemorySendChannel[_Claimed], stopping: trio.Event
    ) -> None:
        outage = Outage("hot", self.events)
        take_back_own = False
        async with send:
            while not stopping.is_set():
                try:
                    if take_back_own:
                        # A claim that Redis executed but whose reply was lost with the
                        # connection left results in our claimed list and not in our hands; our
                        # heartbeat keeps anyone else from giving them back. Give them back
                        # ourselves (one still in a handler's hands is finalized once anyway:
                        # its handler finds it gone, the copy given back is finalized).
                        await self._beat(include_own=True)
                        take_back_own = False
                    items = await reader.claim_results(
                        self.consumer_id, n=self.cfg.read_batch, block_s=self.block_s
                    )
                except Exception as exc:
                    if not is_redis_unavailable(exc):
                        raise
                    take_back_own = True
                    await outage.failed(exc, "Redis")
                    continue
                outage.ok()
                if not items:
                    continue
                now = time.perf_counter()
                await self.fault("claimed")
                # Hand over everything that fits without a checkpoint in between, so the
                # dispatcher sees the whole claim at once and can group it.
                for item in items:
                    claimed = _Claimed(item, now)
                    try:
                        send.send_nowait(claimed)
                    except trio.WouldBlock:
                        await send.send(claimed)

    async def _dispatch(
        self,
        receive: trio.MemoryReceiveChannel[_Claimed],
        limiter: trio.CapacityLimiter,
        nursery: trio.Nursery,
    ) -> None:
        async with receive:
            async for first in receive:
                await limiter.acquire_on_behalf_of(first)
                group = [first]
                # Group what is already waiting, as far as the limiter allows right now: a lone
                # result goes alone at once; a burst goes in pipelines of finalize_batch.
                while len(group) < self.cfg.finalize_batch and limiter.available_tokens > 0:
                    try:
                        item = receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    limiter.acquire_on_behalf_of_nowait(item)
                    group.append(item)
                await self.priority.bulk_turn()
                nursery.start_soon(self._handle_and_release, group, limiter)

    async def _handle_and_release(
        self, group: list[_Claimed], limiter: trio.CapacityLimiter
    ) -> None:
        self.in_flight += len(group)
        try:
            if self.handle_group is not None:
                await self.handle_group(self, group)
            else:
                await self.handle(group)
        finally:
            self.in_flight -= len(group)
            for item in group:
                limiter.release_on_behalf_of(item)

    async def handle(self, group: Sequence[_Claimed]) -> None:
        """Finalize (or dead-letter) a group of claimed results in one round trip."""
        prepared = [self._prepare(c) for c in group]
        await self.fault("finalize")
        await self._finalize(prepared)

    async def _finalize(self, prepared: Sequence[_Prepared]) -> list[tuple[str, int]]:
        """Run the group's finalize call (retrying Redis outages), report each result, and
        return the outcomes."""
        pending = list(range(len(prepared)))
        outcomes: list[tuple[str, int]] = [("gone", 0)] * len(prepared)
        outage = Outage("hot", self.events)
        t_store = time.perf_counter()
        while pending:
            ops = [prepared[i].op for i in pending]
            try:
                # Shielded (and bounded by the store's command deadline): once the script may
                # have run, its outcome is reported even if a sibling's crash cancels us.
                with trio.CancelScope(shield=True):
                    replies = await self.store.finalize_many(
                        self.consumer_id, ops, ttl_s=self.cfg.audio_ttl_s, persist=self.persist
                    )
            except Exception as exc:
                if not is_redis_unavailable(exc):
                    raise
                await outage.failed(exc, "Redis")
                continue
            failed = []
            for i, reply in zip(pending, replies, strict=True):
                if reply[0].startswith("error"):
                    failed.append((i, reply[0]))
                else:
                    outcomes[i] = reply
            pending = [i for i, _ in failed]
            if failed:
                # Redis refused a write (out of memory, read-only replica…): the result stays
                # claimed and is retried with backoff, never dropped or dead-lettered for it.
                await outage.failed(RuntimeError(failed[0][1]), "Redis (finalize)")
        outage.ok()
        done = time.perf_counter()
        store_ms = (done - t_store) * 1000
        for p, (outcome, notified) in zip(prepared, outcomes, strict=True):
            self._report(p, outcome, notified, done, store_ms, len(prepared))
        return outcomes

    def _prepare(self, c: _Claimed) -> _Prepared:
        item = c.item
        try:
            if item.problem:
                raise ContractError(item.problem)
            r = Result.from_json(item.meta)
        except ContractError as exc:
            return _Prepared(c, DeadLetter(item.seq, str(exc)), None)
        common = {
            "seq": item.seq,
            "job_id": r.job_id,
            "variant_hash": r.variant_hash,
            "model": r.model,
            "voice": r.voice,
        }
        if r.error is not None:
            return _Prepared(c, FinalizeArgs(kind="error", error=r.error[:500], **common), r)
        if item.audio_len <= 0:
            return _Prepared(c, FinalizeArgs(kind="skipped", **common), r)
        event = BillingEvent.for_result(r, finalized_at=time.time())
        args = FinalizeArgs(
            kind="audio",
            content_type=r.content_type or "application/octet-stream",
            duration_ms=r.duration_ms or 0,
            loc=item.loc,
            billing_event=event.to_json(),
            **common,
        )
        return _Prepared(c, args, r)

    def _report(
        self, p: _Prepared, outcome: str, notified: int, done: float, store_ms: float, group: int
    ) -> None:
        self.handled += 1
        r, op = p.result, p.op
        if isinstance(op, DeadLetter):
            self.metrics.hot_results.labels("dead_letter").inc()
            if outcome == "dead":
                self.events.emit(
                    Error(
                        service="hot",
                        message=f"undecodable result dead-lettered: {op.reason}",
                        context={"reason": op.reason, "dead_letter_key": Keys.RESULTS_DEAD},
                    )
                )
            return
        assert r is not None
        if outcome != "finalized":
            self.metrics.hot_results.labels(outcome).inc()
            fields = {
                "service": "hot",
                "job_id": r.job_id,
                "variant_hash": r.variant_hash,
                "worker_id": r.worker_id,
            }
            not_finalized = _NOT_FINALIZED.get(outcome)
            self.events.emit(
                not_finalized(**fields)
                if not_finalized is not None
                else GenericEvent(kind=f"result_{outcome}", data=fields)
            )
            return
        self.metrics.hot_results.labels(op.kind).inc()
        finalize_ms = (done - p.claimed.claimed_at) * 1000
        self.metrics.hot_finalize_seconds.observe(finalize_ms / 1000)
        if op.kind == "error":
            self.events.emit(
                Error(
                    service="hot",
                    message=f"worker reported an error: {r.error}",
                    context={
                        "job_id": r.job_id,
                        "variant_hash": r.variant_hash,
                        "worker_id": r.worker_id,
                        "notified": notified,
                    },
                )
            )
            return
        self.events.emit(
            SynthesisComplete(
                job_id=r.job_id,
                variant_hash=r.variant_hash,
                user_id=r.user_id,
                model=r.model,
                voice=r.voice,
                text_length=r.text_length,
                queue_wait_ms=round(r.queue_wait_ms, 3),
                worker_ms=round(r.processing_time_ms, 3),
                # Claimed → finalized. Store, billing hand-off and notifications are one atomic
                # script, so cache_store_ms is the round trip of the pipeline that ran it, and
                # notify_ms (claimed → notifications published) equals finalize_ms.
                finalize_ms=round(finalize_ms, 3),
                cache_store_ms=round(store_ms, 3),
                notify_ms=round(finalize_ms, 3),
                status=op.kind,
                notified=notified,
                billed=op.kind == "audio",
                group=group,
            )
        )


async def run_hot_consumer(
    consumer: HotConsumer,
    *,
    stopping: trio.Event,
    task_status: trio.TaskStatus[HotConsumer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Service entry point: see :meth:`HotConsumer.run`."""
    await consumer.run(stopping=stopping, task_status=task_status)
