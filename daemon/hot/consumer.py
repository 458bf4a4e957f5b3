"""The hot path: worker results → audio cache → listeners → billing queue. No Postgres at all.

Order of operations (docs/tts-flow.md has the crash analysis, docs/workers.md the figures):

1. **Claim.** The reader takes results from ``tts:results`` into this consumer's claimed set,
   drain-on-wake: one round trip pipelines a ``BLMOVE`` (blocks server side only when nothing is
   waiting) with ``claim.lua``, which takes that result and up to ``hot.read_batch - 1`` more.
   ``claim.lua`` parses each result *in Redis* and hands back a small metadata document: the
   audio (~80 KB of base64 per five-second block) never travels to the daemon and back. A result
   is never only in this process's memory.
2. **Hand over.** Claimed results go over a bounded memory channel to a dispatcher that groups
   what is waiting (up to ``hot.finalize_batch``) and starts a handler task per group; at most
   ``hot.concurrency`` results are being finalized at once (a ``CapacityLimiter``).
3. **Finalize.** A handler checks each result at the boundary (``validate.py``: the result
   against the worker contract and against the job the daemon wrote, whose JSON the claim brought
   along) and finalizes the whole group in one ``finalize.lua`` call — one round trip, atomic —
   that for each result checks it is still the job's (a second result for it, or a result for a
   variant finalized since, is a duplicate), stores the audio with a TTL (renaming the claimed
   item: no copy), appends the billing event (built from the job: the creator pays for exactly
   its text), publishes the status to every waiter and drops the result from the claimed set. A
   refused result is moved to ``tts:results:dead`` instead, with its reason, in the same call, and
   its job fails with a recoverable error (the block can be asked for again).

So a result costs one share of a claim round trip and one share of a finalize round trip — about
two round trips for a lone result, far fewer per result under a burst. A crash before step 3
leaves the result claimed; it is given back to ``tts:results`` when this consumer restarts, or by
another consumer once this one's heartbeat expires.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from daemon.config import HotConfig
from daemon.contracts import BillingEvent, Job, Keys
from daemon.contracts.events import (
    Error,
    GenericEvent,
    ResultDuplicate,
    ResultGone,
    ResultsRecovered,
    SynthesisComplete,
)
from daemon.hot.validate import Checked, NoJob, Refused, check_result
from daemon.ops.events import EventLog
from daemon.ops.metrics import Metrics
from daemon.runtime.faults import FaultPoint, no_fault
from daemon.runtime.outage import Outage
from daemon.runtime.priority import RequestFirst
from daemon.stores.redis import (
    DEAD_LETTER_CAP,
    DEAD_LETTER_RAW_BYTES,
    ClaimedResult,
    DeadLetter,
    FinalizeArgs,
    RedisStore,
    is_redis_unavailable,
)

__all__ = ["GroupHandler", "HotConsumer", "ItemTokens", "run_hot_consumer"]


class ItemTokens:
    """Names for claimed results (``tts:hot:item:{token}``), unique to this consumer's run.

    A token is a random 20-bit prefix, fixed per run, times 2³² plus a counter: below 2⁵², so
    it stays exact in Redis's Lua. Tokens do not come from Redis, so a Redis that lost its last
    second (AOF ``everysec``) cannot hand out a name again while a handler still holds it; a name
    in use anyway (another run's, by chance) is skipped by ``claim.lua``.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.SystemRandom()
        self._new_prefix()

    def _new_prefix(self) -> None:
        self._base = self._rng.randrange(1, 2**20) << 32
        self._next = 0

    def offer(self, n: int) -> list[str]:
        """The next ``n`` names to offer a claim (not used up until :meth:`used` says so)."""
        if self._next + n >= 2**32:
            self._new_prefix()
        return [str(self._base + self._next + i) for i in range(n)]

    def used(self, tokens: Sequence[str]) -> None:
        """The claim used these (in offering order): never offer them again."""
        if tokens:
            self._next = int(tokens[-1]) - self._base + 1


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
    verdict: Checked | Refused | NoJob


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
    # workers.max_audio_bytes: a result with more audio is refused.
    max_audio_bytes: int = 16 * 1024 * 1024
    dead_letter_cap: int = DEAD_LETTER_CAP
    dead_letter_raw_bytes: int = DEAD_LETTER_RAW_BYTES
    # Tests and the chaos tool stop the consumer at its fault points: "claimed" (results
    # claimed, not yet handed over) and "finalize" (a group about to be finalized).
    fault: FaultPoint = no_fault
    priority: RequestFirst = attrs.Factory(RequestFirst)
    # Stored audio waits in Redis (no TTL) for the persister (daemon/audio/persister.py).
    persist: bool = False
    handle_group: GroupHandler | None = None
    in_flight: int = 0  # results being finalized now
    handled: int = 0  # results done with (finalized, duplicate, gone or dead-lettered)
    tokens: ItemTokens = attrs.Factory(ItemTokens)

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
                        self.consumer_id,
                        tokens=self.tokens.offer(self.cfg.read_batch),
                        block_s=self.block_s,
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
                self.tokens.used([item.token for item in items])
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
        outcomes = await self._finalize(prepared)
        await self._update_holds(prepared, outcomes)

    async def _update_holds(
        self, prepared: Sequence[_Prepared], outcomes: Sequence[tuple[str, int]]
    ) -> None:
        """The holds of the jobs just finalized (docs/billing.md, "Holds"): an error or empty
        audio is never billed, so its hold is released; audio's hold now waits for billing to
        settle it. A duplicate's hold is released if its job never produced audio (its in-flight
        key had moved on to a new job). One pipelined round trip; if it fails, the holds expire
        (``holds.ttl_s``) instead: never worth failing the hot path for."""
        modes: dict[str, dict[int, list[str]]] = {}
        for p, (outcome, _) in zip(prepared, outcomes, strict=True):
            # The hold is the job's (its creator's), whatever the result claims.
            op, job = p.op, getattr(p.verdict, "job", None)
            if job is None or isinstance(op, DeadLetter):
                continue
            if outcome == "finalized":
                # audio waits for billing; skipped, error and a refused result never bill
                mode = "billing" if op.kind == "audio" else "release"
            elif outcome == "duplicate":
                mode = "duplicate"
            else:
                continue
            modes.setdefault(mode, {}).setdefault(job.user_id, []).append(job.job_id)
        try:
            for mode, by_user in modes.items():
                with trio.CancelScope(shield=True):
                    n = await self.store.release_holds(by_user, mode=mode)
                if mode != "billing":
                    self.metrics.holds_released.inc(n)
        except Exception as exc:
            if not is_redis_unavailable(exc):
                raise
            self.events.emit(
                Error(service="hot", message=f"holds not updated (they will expire): {exc!r}")
            )

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
                        self.consumer_id,
                        ops,
                        ttl_s=self.cfg.audio_ttl_s,
                        persist=self.persist,
                        dead_letter_cap=self.dead_letter_cap,
                        dead_letter_raw_bytes=self.dead_letter_raw_bytes,
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
        """The finalize op for one claimed result: the boundary's verdict (``validate.py``),
        turned into what ``finalize.lua`` does. Never raises: a result is input."""
        item = c.item
        try:
            verdict = check_result(item, max_audio_bytes=self.max_audio_bytes)
        except Exception as exc:  # a bug in the checks must not become a poison message
            verdict = Refused(f"result could not be checked: {exc!r}"[:300], None, "", "")
        if isinstance(verdict, NoJob):
            return _Prepared(c, DeadLetter(item.token, "", discard=True), verdict)
        if isinstance(verdict, Refused):
            note = json.dumps(
                {"reason": verdict.reason, "worker_id": verdict.worker_id, "job_id": verdict.job_id}
            )
            job = verdict.job
            if job is None:
                return _Prepared(c, DeadLetter(item.token, note), verdict)
            op = FinalizeArgs(
                kind="reject",
                error=f"the worker's result was refused: {verdict.reason}"[:500],
                note=note,
                **self._job_args(item, job),
            )
            return _Prepared(c, op, verdict)
        job = verdict.job
        if verdict.kind == "error":
            op = FinalizeArgs(kind="error", error=verdict.error, **self._job_args(item, job))
        elif verdict.kind == "skipped":
            op = FinalizeArgs(kind="skipped", **self._job_args(item, job))
        else:
            # The bill is the job's: who asked, for exactly which text, at which model's rate.
            event = BillingEvent(
                event_id=job.job_id,
                user_id=job.user_id,
                model=job.model,
                voice=job.voice,
                variant_hash=job.variant_hash,
                text_length=len(job.text),
                usage_multiplier=job.usage_multiplier,
                duration_ms=verdict.duration_ms,
                document_id=job.document_id,
                block_idx=job.block_idx,
                finalized_at=time.time(),
            )
            op = FinalizeArgs(
                kind="audio",
                content_type=verdict.content_type,
                duration_ms=verdict.duration_ms,
                billing_event=event.to_json(),
                **self._job_args(item, job),
            )
        return _Prepared(c, op, verdict)

    @staticmethod
    def _job_args(item: ClaimedResult, job: Job) -> dict[str, Any]:
        return {
            "token": item.token,
            "job_id": job.job_id,
            "job_json": item.job,
            "variant_hash": job.variant_hash,
            "model": job.model,
            "voice": job.voice,
            "meta": item.meta,
            "loc": item.loc,
        }

    def _report(
        self, p: _Prepared, outcome: str, notified: int, done: float, store_ms: float, group: int
    ) -> None:
        self.handled += 1
        v, op = p.verdict, p.op
        if isinstance(v, Refused):
            self.metrics.hot_results.labels("dead_letter").inc()
            if outcome in ("dead", "finalized"):
                self.events.emit(
                    Error(
                        service="hot",
                        message=f"worker result refused and dead-lettered: {v.reason}",
                        context={
                            "reason": v.reason,
                            "worker_id": v.worker_id,
                            "job_id": v.job_id,
                            "job_failed": outcome == "finalized",
                            "notified": notified,
                            "dead_letter_key": Keys.RESULTS_DEAD,
                        },
                    )
                )
            return
        if isinstance(v, NoJob) or outcome != "finalized":
            self.metrics.hot_results.labels(outcome).inc()
            fields = {
                "service": "hot",
                "job_id": v.job_id if isinstance(v, NoJob) else v.job.job_id,
                "variant_hash": v.variant_hash if isinstance(v, NoJob) else v.job.variant_hash,
                "worker_id": v.worker_id,
            }
            not_finalized = _NOT_FINALIZED.get(outcome)
            self.events.emit(
                not_finalized(**fields)
                if not_finalized is not None
                else GenericEvent(kind=f"result_{outcome}", data=fields)
            )
            return
        assert isinstance(op, FinalizeArgs)
        job = v.job
        self.metrics.hot_results.labels(op.kind).inc()
        finalize_ms = (done - p.claimed.claimed_at) * 1000
        self.metrics.hot_finalize_seconds.observe(finalize_ms / 1000)
        if op.kind == "error":
            self.events.emit(
                Error(
                    service="hot",
                    message=f"worker reported an error: {v.error}",
                    context={
                        "job_id": job.job_id,
                        "variant_hash": job.variant_hash,
                        "worker_id": v.worker_id,
                        "notified": notified,
                    },
                )
            )
            return
        self.events.emit(
            SynthesisComplete(
                job_id=job.job_id,
                variant_hash=job.variant_hash,
                user_id=job.user_id,
                model=job.model,
                voice=job.voice,
                text_length=len(job.text),
                queue_wait_ms=round(v.queue_wait_ms, 3),
                worker_ms=round(v.processing_time_ms, 3),
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
