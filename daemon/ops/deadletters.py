"""``tts-daemon dead-letters list|replay|drop``: inspect and operate the dead-letter lists.

Three kinds (docs/operations.md, "Dead letters"): ``results`` (worker results refused at the hot
path's boundary, ``tts:results:dead``), ``billing`` (billing events the billing consumer could
not bill, ``tts:billing:dead``) and ``jobs`` (jobs that timed out ``workers.max_retries`` times,
``tts:dlq:{model}``). Only billing dead letters are replayed: once their cause is fixed (a user
created, a migration applied) their events go back on the billing stream, where billing is
idempotent by ``event_id`` — a replay, or two, never bills twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from daemon.contracts import MODELS, ContractError, Keys, billing_event_fields
from daemon.stores.redis import RedisStore
from daemon.workers.scanner import dead_letter_keys

__all__ = ["KINDS", "drop", "list_entries", "replay_billing"]

KINDS = ("results", "billing", "jobs")


def _keys(kind: str | None) -> list[tuple[str, str]]:
    by_kind = dead_letter_keys(list(MODELS))
    return [(k, key) for k in KINDS if kind in (None, k) for key in by_kind[k]]


def _decode(entry: bytes) -> dict[str, Any]:
    try:
        data = json.loads(entry.decode(errors="replace"))
    except ValueError:
        return {"raw": entry.decode(errors="replace")}
    return data if isinstance(data, dict) else {"raw": data}


def _summary(kind: str, key: str, entry: bytes, full: bool) -> dict[str, Any]:
    data = _decode(entry)
    out: dict[str, Any] = {"kind": kind, "key": key}
    if kind == "jobs":  # the job JSON itself
        for name in ("job_id", "user_id", "model", "enqueued_at"):
            out[name] = data.get(name)
        out["text_length"] = len(data["text"]) if isinstance(data.get("text"), str) else None
        return out
    for name in ("at", "reason", "worker_id", "job_id", "entry_id", "consumer", "raw_bytes"):
        if name in data:
            out[name] = data[name]
    raw = data.get("raw")
    if isinstance(raw, str):
        out["raw"] = raw if full or len(raw) <= 200 else raw[:200] + "…"
    return out


async def list_entries(
    store: RedisStore, kind: str | None, *, limit: int, full: bool = False
) -> list[dict[str, Any]]:
    """Up to ``limit`` newest entries per list, summarized (``full``: with the whole raw)."""
    out = []
    for k, key in _keys(kind):
        for entry in await store.dead_letters(key, start=0, stop=limit - 1):
            out.append(_summary(k, key, entry, full))
    return out


async def count(store: RedisStore, kind: str | None) -> dict[str, int]:
    return {key: int(await store.execute("LLEN", key)) for _, key in _keys(kind)}


async def replay_billing(
    store: RedisStore, *, limit: int, say: Callable[[str], None] = print
) -> tuple[int, int]:
    """Replay up to ``limit`` billing dead letters, oldest first. Returns (replayed, skipped):
    an entry whose event is not a valid billing event stays where it is (its reason printed)."""
    replayed = skipped = 0
    entries = await store.dead_letters(Keys.BILLING_DEAD, start=-limit, stop=-1)
    for entry in reversed(entries):  # the tail is the oldest
        raw = _decode(entry).get("raw")
        try:
            if not isinstance(raw, str):
                raise ContractError("the dead letter holds no event")
            billing_event_fields(raw)
        except ContractError as exc:
            skipped += 1
            say(f"skipped (not replayable: {exc}): {entry[:120]!r}")
            continue
        if await store.replay_billing_dead_letter(entry, raw):
            replayed += 1
    return replayed, skipped


async def drop(store: RedisStore, kind: str | None, *, older_than_s: float | None) -> int:
    """Drop every entry of ``kind`` (all kinds: ``None``), or only those older than
    ``older_than_s`` seconds. Returns how many were dropped."""
    dropped = 0
    for _, key in _keys(kind):
        if older_than_s is None:
            dropped += await store.drop_dead_letters(key)
            continue
        while True:  # trim_dead.lua drops at most 1,000 by age per call
            before = int(await store.execute("LLEN", key))
            after = await store.trim_dead_letters(key, max_entries=2**31, max_age_s=older_than_s)
            dropped += before - after
            if before - after < 1000:
                break
    return dropped
