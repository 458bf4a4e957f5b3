"""``tts-daemon audio purge``: retire a model's audio from both tiers (docs/operations.md).

Used after bumping a model's revision (``[models] revision``): new requests already get new
hashes and fresh audio; this removes the old audio, optionally only what was made before a date.
The order is Redis, the store, Redis again: a request that promoted an old object from the store
back into Redis while the store was being purged is caught by the second pass.
"""

from __future__ import annotations

from datetime import UTC, datetime

import attrs

from daemon.audio.store import AudioStore
from daemon.stores.redis import RedisStore

__all__ = ["PurgeResult", "parse_before", "purge_audio"]


@attrs.frozen
class PurgeResult:
    redis: int
    store: int

    def as_dict(self) -> dict[str, int]:
        return {"redis": self.redis, "store": self.store}


def parse_before(text: str) -> float:
    """``--before``: an ISO date or date-time (UTC unless it names an offset) → Unix time."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--before: expected an ISO date or date-time (2026-12-01, 2026-12-01T12:00Z), "
            f"got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


async def purge_audio(
    redis: RedisStore, store: AudioStore | None, *, model: str, before: float | None
) -> PurgeResult:
    """Delete ``model``'s audio finalized before ``before`` (all of it: None) from Redis and the
    durable store."""
    in_redis = set(await redis.purge_audio(model=model, before=before))
    stored = await store.purge(model=model, before=before) if store is not None else []
    in_redis |= set(await redis.purge_audio(model=model, before=before))
    return PurgeResult(len(in_redis), len(stored))
