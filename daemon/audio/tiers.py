"""The read side of the two audio tiers: Redis (the cache) first, then the durable store.

A variant found only in the store is promoted back into Redis (with the cache's TTL) so that the
gateway's ``enqueue.lua`` answers it ``cached`` like any cached block: no job, no hold, no bill.
Only a miss in both creates a job. ``GET /v1/audio/HASH`` reads through the same two tiers.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from daemon.audio.store import AudioObject, AudioStore
from daemon.contracts.events import Error
from daemon.ops.events import EventLog, Throttle
from daemon.ops.metrics import Metrics
from daemon.stores.redis import RedisStore

__all__ = ["AudioTiers"]

# The request path waits this long for the store at most (a lookup is a stat per block).
STORE_DEADLINE_S = 1.0


@attrs.define(eq=False)
class AudioTiers:
    redis: RedisStore
    store: AudioStore | None
    ttl_s: int
    metrics: Metrics
    events: EventLog | None = None
    _failures: Throttle = attrs.Factory(Throttle)

    async def fetch(self, variant_hash: str) -> tuple[bytes, str] | None:
        """(bytes, content type) from Redis, else from the store (then promoted), else None."""
        audio = await self.redis.get_audio(variant_hash)
        if self.store is None:
            return audio
        if audio is not None:
            self.store.note_read(variant_hash)  # pinning counts reads the cache served
            return audio
        obj = await self.store.get(variant_hash)
        if obj is None:
            return None
        self.metrics.audio_store_hits.labels("http").inc()
        await self._promote(obj)
        return obj.data, obj.content_type

    async def promote_stored(self, hashes: Sequence[str]) -> int:
        """:meth:`_promote_stored` within ``STORE_DEADLINE_S``; a store that fails or is too slow
        (a full or hung disk) makes this a miss — the blocks are synthesized — never a failed
        request. Logged at most once a minute."""
        try:
            with trio.fail_after(STORE_DEADLINE_S):
                return await self._promote_stored(hashes)
        except (OSError, ValueError, trio.TooSlowError) as exc:
            if self.events is not None and self._failures.due() is not None:
                self.events.emit(
                    Error(
                        service="gateway",
                        message=f"audio store lookup failed, synthesizing instead: {exc!r}",
                    )
                )
            return 0

    async def _promote_stored(self, hashes: Sequence[str]) -> int:
        """Before a synthesize's ``enqueue.lua``: put the blocks that are in the store but not in
        Redis back into Redis, so that the script answers them ``cached``. Returns how many.

        Costs one stat per block (in a worker thread) when nothing is stored; a Redis round trip
        and a file read only for blocks the store has. A block evicted between the two checks is
        simply synthesized."""
        if self.store is None or not hashes:
            return 0
        unique = list(dict.fromkeys(hashes))
        hits = await self.store.contains_many(unique)
        stored = [h for h, hit in zip(unique, hits, strict=True) if hit]
        if not stored:
            return 0
        cached = await self.redis.audio_cached(stored)
        promoted = 0
        for h, in_redis in zip(stored, cached, strict=True):
            if in_redis:
                continue
            obj = await self.store.get(h)
            if obj is not None and await self._promote(obj):
                promoted += 1
        if promoted:
            self.metrics.audio_store_hits.labels("synthesize").inc(promoted)
        return promoted

    async def _promote(self, obj: AudioObject) -> bool:
        return await self.redis.promote_audio(
            obj.variant_hash,
            obj.data,
            content_type=obj.content_type,
            duration_ms=obj.duration_ms,
            model=obj.model,
            created=obj.created,
            ttl_s=self.ttl_s,
        )
