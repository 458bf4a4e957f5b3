"""The hot path: worker results → audio cache → listeners → billing queue. No Postgres at all.

Order of operations for one result (docs/tts-flow.md has the crash analysis):

1. The reader moves results from ``tts:results`` into this consumer's claimed list (drain-on-wake:
   block until one arrives, then take what else is waiting, up to ``hot.read_batch``). BLMOVE, not
   BRPOP: a result is never only in this process's memory.
2. Each result goes over a bounded memory channel to a handler; at most ``hot.concurrency``
   handlers run at once (a ``CapacityLimiter``).
3. The handler decodes it and runs ``finalize.lua``: one atomic step that claims the job (a second
   result for it is a duplicate), stores the audio with a TTL, appends the billing event, publishes
   the status to every waiter and removes the result from the claimed list.

A crash before step 3 leaves the result claimed; it is given back to ``tts:results`` when this
consumer restarts, or by another consumer once this one's heartbeat expires.
"""

from __future__ import annotations

import base64
import binascii
import json
import time

import attrs
import trio

from daemon.config import HotConfig
from daemon.contracts import BillingEvent, ContractError, Result
from daemon.events import EventLog
from daemon.metrics import Metrics
from daemon.outage import Outage
from daemon.stores.redis import FinalizeArgs, RedisStore, is_redis_unavailable

__all__ = ["HotConsumer", "run_hot_consumer"]


@attrs.define
class _Claimed:
    raw: bytes
    claimed_at: float  # perf_counter


@attrs.define
class HotConsumer:
    """State of one hot consumer; :meth:`run` is the service."""

    store: RedisStore
    cfg: HotConfig
    events: EventLog
    metrics: Metrics
    consumer_id: str
    block_s: float = 1.0
    in_flight: int = 0
    handled: int = 0

    async def run(
        self, *, stopping: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume results until ``stopping`` is set, then finish the results in hand.

        ``started()`` once registered and reading. Redis outages are waited out with backoff; any
        other error ends the service (the supervisor restarts it; claimed results survive).
        """
        await self._start_up()
        send, receive = trio.open_memory_channel[_Claimed](self.cfg.concurrency)
        limiter = trio.CapacityLimiter(self.cfg.concurrency)
        async with trio.open_nursery() as outer:
            outer.start_soon(self._heartbeat_loop)
            async with trio.open_nursery() as handlers:
                handlers.start_soon(self._dispatch, receive, limiter, handlers)
                task_status.started()
                async with self.store.dedicated() as reader:
                    await self._read_loop(reader, send, stopping)
            outer.cancel_scope.cancel()
        with trio.move_on_after(5, shield=True):
            # Anything still claimed (a handler gave up on Redis) goes back for the next consumer.
            await self.store.recover_results(self.consumer_id, include_own=True)
            await self.store.unregister_consumer(self.consumer_id)

    async def _start_up(self) -> None:
        outage = Outage("hot", self.events)
        while True:
            try:
                await self.store.heartbeat(self.consumer_id, ttl_s=self.cfg.consumer_ttl_s)
                # Our own claimed results are from this consumer's previous run: take them again.
                await self.store.recover_results(self.consumer_id, include_own=True)
            except Exception as exc:
                if not is_redis_unavailable(exc):
                    raise
                await outage.failed(exc, "Redis")
                continue
            outage.ok()
            return

    async def _heartbeat_loop(self) -> None:
        outage = Outage("hot", self.events)
        while True:
            try:
                await self.store.heartbeat(self.consumer_id, ttl_s=self.cfg.consumer_ttl_s)
                recovered = await self.store.recover_results(self.consumer_id, include_own=False)
            except Exception as exc:
                if not is_redis_unavailable(exc):
                    raise
                await outage.failed(exc, "Redis")
                continue
            outage.ok()
            if recovered:
                self.events.emit(
                    "results_recovered", service="hot", count=recovered, consumer=self.consumer_id
                )
            await trio.sleep(self.cfg.heartbeat_s)

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
                        # ourselves (any still in a handler's hands is finalized once anyway:
                        # the second finalize finds it done and counts a duplicate).
                        recovered = await self.store.recover_results(
                            self.consumer_id, include_own=True
                        )
                        take_back_own = False
                        if recovered:
                            self.events.emit(
                                "results_recovered",
                                service="hot",
                                count=recovered,
                                consumer=self.consumer_id,
                                reason="claim replies lost in a Redis outage",
                            )
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
                now = time.perf_counter()
                for raw in items:
                    await send.send(_Claimed(raw, now))

    async def _dispatch(
        self,
        receive: trio.MemoryReceiveChannel[_Claimed],
        limiter: trio.CapacityLimiter,
        nursery: trio.Nursery,
    ) -> None:
        async with receive:
            async for item in receive:
                token = object()
                await limiter.acquire_on_behalf_of(token)
                nursery.start_soon(self._handle_and_release, item, limiter, token)

    async def _handle_and_release(
        self, item: _Claimed, limiter: trio.CapacityLimiter, token: object
    ) -> None:
        self.in_flight += 1
        try:
            await self.handle(item.raw, item.claimed_at)
        finally:
            self.in_flight -= 1
            limiter.release_on_behalf_of(token)

    async def handle(self, raw: bytes, claimed_at: float) -> None:
        """Finalize one claimed result (or dead-letter it if it cannot be read)."""
        try:
            result = Result.from_json(raw)
            args, event = self._finalize_args(raw, result)
        except ContractError as exc:
            await self._dead_letter(raw, str(exc))
            return
        t_store = time.perf_counter()
        outage = Outage("hot", self.events)
        while True:
            try:
                outcome, notified = await self.store.finalize(
                    self.consumer_id, args, ttl_s=self.cfg.audio_ttl_s
                )
                break
            except Exception as exc:
                if not is_redis_unavailable(exc):
                    raise
                await outage.failed(exc, "Redis")
        outage.ok()
        done = time.perf_counter()
        self.handled += 1
        self.metrics.hot_results.labels(outcome if outcome == "duplicate" else args.kind).inc()
        finalize_s = done - claimed_at
        self.metrics.hot_finalize_seconds.observe(finalize_s)
        if outcome == "duplicate":
            self.events.emit(
                "result_duplicate",
                service="hot",
                job_id=result.job_id,
                variant_hash=result.variant_hash,
                worker_id=result.worker_id,
            )
            return
        if args.kind == "error":
            self.events.error(
                "hot",
                f"worker reported an error: {result.error}",
                job_id=result.job_id,
                variant_hash=result.variant_hash,
                worker_id=result.worker_id,
                notified=notified,
            )
            return
        self.events.emit(
            "synthesis_complete",
            job_id=result.job_id,
            variant_hash=result.variant_hash,
            user_id=result.user_id,
            model=result.model,
            voice=result.voice,
            text_length=result.text_length,
            queue_wait_ms=round(result.queue_wait_ms, 3),
            worker_ms=round(result.processing_time_ms, 3),
            finalize_ms=round(finalize_s * 1000, 3),
            # The store, the billing hand-off and the notifications are one atomic script:
            # cache_store_ms is its round trip, notify_ms claim → notifications published.
            cache_store_ms=round((done - t_store) * 1000, 3),
            notify_ms=round(finalize_s * 1000, 3),
            status=args.kind,
            notified=notified,
            billed=event is not None,
        )

    def _finalize_args(self, raw: bytes, r: Result) -> tuple[FinalizeArgs, BillingEvent | None]:
        common = {
            "raw": raw,
            "job_id": r.job_id,
            "variant_hash": r.variant_hash,
            "model": r.model,
            "voice": r.voice,
        }
        if r.error is not None:
            return FinalizeArgs(kind="error", error=r.error[:500], **common), None
        try:
            audio = base64.b64decode(r.audio_base64 or "", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ContractError(f"result: audio_base64 is not base64: {exc}") from None
        if not audio:
            return FinalizeArgs(kind="skipped", **common), None
        event = BillingEvent(
            event_id=r.job_id,
            user_id=r.user_id,
            model=r.model,
            voice=r.voice,
            variant_hash=r.variant_hash,
            text_length=r.text_length,
            usage_multiplier=r.usage_multiplier,
            duration_ms=r.duration_ms or 0,
            document_id=r.document_id,
            block_idx=r.block_idx,
            finalized_at=time.time(),
        )
        args = FinalizeArgs(
            kind="audio",
            audio=audio,
            content_type=r.content_type or "application/octet-stream",
            duration_ms=r.duration_ms or 0,
            billing_event=event.to_json(),
            **common,
        )
        return args, event

    async def _dead_letter(self, raw: bytes, reason: str) -> None:
        self.metrics.hot_results.labels("dead_letter").inc()
        entry = json.dumps(
            {
                "reason": reason,
                "consumer": self.consumer_id,
                "at": time.time(),
                "raw": raw[:100_000].decode("utf-8", errors="replace"),
            }
        )
        await self.store.dead_letter_result(self.consumer_id, raw, entry)
        self.events.error("hot", f"undecodable result dead-lettered: {reason}", reason=reason)


async def run_hot_consumer(
    consumer: HotConsumer,
    *,
    stopping: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Service entry point: see :meth:`HotConsumer.run`."""
    await consumer.run(stopping=stopping, task_status=task_status)
