"""The persister: finalized audio from Redis into the durable store, off the hot path.

``finalize.lua`` stores each result's audio in Redis *without* a TTL and appends its hash to the
``tts:persist`` stream (a few bytes; the audio is not copied). This service reads that stream with
a consumer group, in batches (drain-on-wake, up to ``audio.persist_batch``):

1. skip what the store already has (a redelivery, another daemon: idempotent by hash);
2. read the rest's audio from Redis (pipelined, in slices) and decode it in a worker thread;
3. write the batch to the store (worker threads: temp file, fsync, rename; each directory fsynced
   once) — only then
4. give each audio key the cache's TTL and acknowledge + delete the entries (one pipeline).

So the audio stays in Redis until the store has it on disk, and an entry is acknowledged only after
that (at-least-once). A crash anywhere leaves the entries pending: this daemon re-reads its own at
start, another takes them over after ``audio.claim_idle_s``. A full disk or an I/O error makes the
service back off and retry the batch (``tts_audio_store_write_errors_total``, an ``error`` event at
most once a minute, ``/healthz`` says ``disk_full``) while the hot path goes on; Redis holds the
audio meanwhile (the backlog shows in ``tts_audio_persist_backlog``).

Audio whose Redis key is gone before it was persisted (a purge, an operator's DEL) cannot be
persisted: that is logged as an ``error`` event and counted (``missing``), never skipped silently.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import attrs
import trio

from daemon.audio.store import AudioObject, FileAudioStore, StoreFull, valid_hash
from daemon.config import AudioConfig
from daemon.contracts.events import AudioEvicted, AudioPersistClaimed, AudioPersisted, Error
from daemon.ops.events import EventLog, Throttle
from daemon.ops.metrics import Metrics
from daemon.runtime.faults import FaultPoint, no_fault
from daemon.runtime.outage import Outage
from daemon.runtime.priority import RequestFirst
from daemon.stores.redis import (
    PersistEntry,
    RedisStore,
    audio_from_item,
    audio_meta,
    billing_block_ms,
    is_redis_unavailable,
)

__all__ = ["Persister"]

T = TypeVar("T")

# Audio lists fetched from Redis per pipeline: each is ~80 KB through the daemon's event loop,
# so a batch is fetched in slices with a checkpoint between them.
FETCH_SLICE = 16


class _StoreFailed(Exception):
    """The store refused (its OSError is ``cause``): kept apart from Redis' errors, which
    :func:`is_redis_unavailable` would also take an OSError for."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def _on_disk(call: Awaitable[T]) -> T:
    try:
        return await call
    except OSError as exc:
        raise _StoreFailed(exc) from exc


@attrs.define
class _Item:
    entry_id: bytes
    variant_hash: str | None


@attrs.define(eq=False)
class Persister:
    """State of the persister; :meth:`run` is the service."""

    redis: RedisStore
    store: FileAudioStore
    cfg: AudioConfig
    ttl_s: int
    revisions: dict[str, str]
    events: EventLog
    metrics: Metrics
    consumer: str
    block_s: float = 1.0
    # Tests and the chaos tool stop the persister at "persist.read" (a batch read, nothing
    # written) and "persist.written" (written to the store, not yet acknowledged).
    fault: FaultPoint = no_fault
    priority: RequestFirst = attrs.Factory(RequestFirst)
    state: str = "starting"  # running | disk_full | store_failing | redis_down | stopped
    last_error: str | None = None
    written: int = 0
    existing: int = 0
    missing: int = 0
    damaged: int = 0
    write_errors: int = 0
    backlog: int = 0
    lag_s: float = 0.0
    _missing_log: Throttle = attrs.Factory(Throttle)

    async def run(
        self,
        *,
        stopping: trio.Event,
        task_status: trio.TaskStatus[Persister] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Persist until ``stopping``, then finish (or leave pending) the batch in hand.
        ``started(self)`` (its handle: /healthz reads it) once the store's directory is ready."""
        await self.store.open()
        await self.store.stats()
        self._measure_store()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._maintenance_loop)
            self.state = "running"
            task_status.started(self)
            async with self.redis.dedicated() as reader:
                await self._loop(reader, stopping)
            nursery.cancel_scope.cancel()
        self.state = "stopped"

    async def _loop(self, reader: RedisStore, stopping: trio.Event) -> None:
        outage = Outage("persister", self.events)
        block_ms = billing_block_ms(self.block_s)
        pending = True  # first our own entries from a previous run, then new ones
        next_claim = trio.current_time()
        while not stopping.is_set():
            try:
                if pending:
                    entries = await reader.read_persist(
                        self.consumer, count=self.cfg.persist_batch, block_ms=0, pending=True
                    )
                    if not entries:
                        pending = False
                        continue
                elif trio.current_time() >= next_claim:
                    next_claim = trio.current_time() + self.cfg.claim_idle_s / 2
                    entries = await reader.claim_stale_persist(
                        self.consumer,
                        min_idle_ms=int(self.cfg.claim_idle_s * 1000),
                        count=self.cfg.persist_batch,
                    )
                    if entries:
                        self.events.emit(
                            AudioPersistClaimed(service="persister", count=len(entries))
                        )
                    else:
                        continue
                else:
                    entries = await reader.read_persist(
                        self.consumer, count=self.cfg.persist_batch, block_ms=block_ms
                    )
            except Exception as exc:
                if not is_redis_unavailable(exc):
                    raise
                self.state = "redis_down"
                await outage.failed(exc, "Redis")
                pending = True  # what was delivered before the outage is still ours
                continue
            outage.ok()
            if not entries:
                continue
            await self.fault("persist.read")
            await self.persist(entries, stopping)

    async def persist(self, entries: Sequence[PersistEntry], stopping: trio.Event) -> None:
        """Persist one batch; retried (with backoff) until the store and Redis have taken it,
        or the daemon stops (then it stays pending for the next start)."""
        store_outage = Outage("persister", self.events, min_s=0.5, max_s=10.0)
        redis_outage = Outage("persister", self.events)
        while True:
            await self.priority.bulk_turn()
            try:
                done = await self._persist_once(entries)
            except _StoreFailed as failed:
                exc = failed.cause
                self.write_errors += 1
                self.metrics.audio_store_write_errors.inc()
                self.state = "disk_full" if isinstance(exc, StoreFull) else "store_failing"
                self.last_error = f"{type(exc).__name__}: {exc}"
                if stopping.is_set():
                    return
                await store_outage.failed(exc, "audio store")
                continue
            except Exception as exc:
                if not is_redis_unavailable(exc):
                    raise
                self.state = "redis_down"
                if stopping.is_set():
                    return
                await redis_outage.failed(exc, "Redis")
                continue
            break
        store_outage.ok()
        redis_outage.ok()
        self.state = "running"
        self.last_error = None
        if done and self.store.over_cap():
            try:
                result = await self.store.evict()
            except OSError as exc:
                self._error(f"evicting from the audio store failed: {exc}")
                return
            if result.evicted:
                self.metrics.audio_store_evictions.inc(result.evicted)
                self.events.emit(
                    AudioEvicted(
                        service="persister",
                        count=result.evicted,
                        freed_bytes=result.freed_bytes,
                        remaining_bytes=result.remaining_bytes,
                        pinned=result.skipped_pinned,
                    )
                )
        self._measure_store()

    async def _persist_once(self, entries: Sequence[PersistEntry]) -> int:
        items = [_Item(e.entry_id, e.variant_hash) for e in entries]
        for i in items:
            if i.variant_hash is not None and not valid_hash(i.variant_hash):
                i.variant_hash = None
        wanted = sorted({i.variant_hash for i in items if i.variant_hash is not None})
        unreadable = sum(1 for i in items if i.variant_hash is None)
        if unreadable:
            self._error(f"{unreadable} unreadable persist entries dropped", count=unreadable)
        present = dict(zip(wanted, await _on_disk(self.store.contains_many(wanted)), strict=True))
        to_fetch = [h for h in wanted if not present[h]]
        raw: dict[str, list[bytes]] = {}
        for start in range(0, len(to_fetch), FETCH_SLICE):
            chunk = to_fetch[start : start + FETCH_SLICE]
            raw.update(zip(chunk, await self.redis.audio_items(chunk), strict=True))
            await trio.lowlevel.checkpoint()
        objects, missing, damaged = await trio.to_thread.run_sync(self._decode, raw)
        written = await _on_disk(self.store.put_many(objects)) if objects else []
        n_written = sum(written)
        n_existing = len(wanted) - len(to_fetch) + len(written) - n_written
        self.written += n_written
        self.existing += n_existing
        self.missing += len(missing)
        self.damaged += len(damaged)
        self.metrics.audio_persisted.labels("written").inc(n_written)
        self.metrics.audio_persisted.labels("existing").inc(n_existing)
        if missing:
            self.metrics.audio_persisted.labels("missing").inc(len(missing))
            # Not silent: audio that was never persisted must be visible (docs/operations.md).
            self._error(
                f"{len(missing)} finalized audio gone from Redis before it was persisted"
                " (deleted or purged): not in the durable store",
                count=len(missing),
                variant_hashes=missing[:20],
            )
        if damaged:
            self.metrics.audio_persisted.labels("damaged").inc(len(damaged))
            self._error(
                f"{len(damaged)} cached audio could not be decoded: not persisted",
                count=len(damaged),
                variant_hashes=damaged[:20],
            )
        await self.fault("persist.written")
        await self.redis.ack_persisted(
            [(i.entry_id, i.variant_hash) for i in items], ttl_s=self.ttl_s
        )
        self.events.emit(
            AudioPersisted(
                service="persister",
                entries=len(items),
                written=n_written,
                existing=n_existing,
                missing=len(missing),
                damaged=len(damaged),
            )
        )
        return n_written

    def _decode(
        self, raw: dict[str, list[bytes]]
    ) -> tuple[list[AudioObject], list[str], list[str]]:
        """(worker thread) Cached audio lists → store objects; the hashes whose key was gone,
        and those whose audio does not decode."""
        objects, missing, damaged = [], [], []
        for h, items in raw.items():
            if not items:
                missing.append(h)
                continue
            try:
                data, content_type = audio_from_item(h, items)
            except ValueError:
                damaged.append(h)
                continue
            meta = audio_meta(items)
            model = str(meta.get("model") or "")
            objects.append(
                AudioObject(
                    variant_hash=h,
                    data=data,
                    content_type=content_type,
                    duration_ms=int(meta.get("duration_ms") or 0),
                    model=model,
                    revision=self.revisions.get(model, ""),
                    created=float(meta.get("at") or time.time()),
                )
            )
        return objects, missing, damaged

    async def _maintenance_loop(self) -> None:
        """Re-measure the store (every daemon's writes), evict when over the cap, and read the
        backlog for the metrics and /healthz."""
        next_scan = trio.current_time() + self.cfg.scan_interval_s
        while True:
            await self.refresh_backlog()
            try:
                await self.store.flush_reads()
            except OSError as exc:
                self._error(f"marking audio read failed: {exc}")
            if trio.current_time() >= next_scan:
                next_scan = trio.current_time() + self.cfg.scan_interval_s
                try:
                    await self.store.stats()
                    self._measure_store()
                    if self.store.over_cap():
                        result = await self.store.evict()
                        self.metrics.audio_store_evictions.inc(result.evicted)
                except OSError as exc:
                    self._error(f"measuring the audio store failed: {exc}")
            await trio.sleep(1.0)

    async def refresh_backlog(self) -> None:
        try:
            with trio.fail_after(2.0):
                self.backlog, self.lag_s = await self.redis.persist_backlog()
        except Exception as exc:
            if not (is_redis_unavailable(exc) or isinstance(exc, trio.TooSlowError)):
                raise
            return
        self.metrics.audio_persist_backlog.set(self.backlog)
        self.metrics.audio_persist_lag_seconds.set(self.lag_s)

    def _measure_store(self) -> None:
        self.metrics.audio_store_bytes.set(self.store.known_bytes)
        self.metrics.audio_store_objects.set(self.store.known_objects)

    def _error(self, message: str, **context: object) -> None:
        self.events.emit(Error(service="persister", message=message, context=context))

    def as_dict(self) -> dict[str, object]:
        return {
            "state": self.state,
            "last_error": self.last_error,
            "store_dir": str(self.store.root),
            "store_bytes": self.store.known_bytes,
            "store_objects": self.store.known_objects,
            "max_bytes": self.store.max_bytes,
            "evictions": self.store.evictions,
            "persist_backlog": self.backlog,
            "persist_lag_s": round(self.lag_s, 3),
            "written": self.written,
            "existing": self.existing,
            "missing": self.missing,
            "damaged": self.damaged,
            "write_errors": self.write_errors,
        }
