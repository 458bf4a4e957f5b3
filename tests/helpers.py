"""Helpers of these tests only: billing events as the hot path writes them, the events a daemon
emits, and ``usage_log`` readers. What tools and other suites reuse (the protocol client, the
configuration builder, the stores, the manual worker, waiting) is in :mod:`daemon.testing`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg

from daemon.contracts import MODELS, BillingEvent
from daemon.contracts.events import Event
from daemon.testing.stores import pg_fetch

__all__ = ["Events", "billing_event", "usage_rows", "usage_rows_at_least"]


def billing_event(
    user_id: int, model: str = "kokoro", text_length: int = 40, event_id: str | None = None
) -> BillingEvent:
    """A billing event as the hot path writes it, for ``model``'s default voice."""
    info = MODELS[model]
    return BillingEvent(
        event_id=event_id or uuid.uuid4().hex,
        user_id=user_id,
        model=model,
        voice=info.default_voice,
        variant_hash=uuid.uuid4().hex * 2,
        text_length=text_length,
        usage_multiplier=info.usage_multiplier,
        duration_ms=text_length * 60,
        document_id="doc",
        block_idx=0,
        finalized_at=time.time(),
    )


class Events:
    """Every event a daemon emits, as it emits it (typed: ``daemon.contracts.events``)."""

    def __init__(self, daemon: Any) -> None:
        self.all: list[Event] = []
        daemon.events.add_listener(self.all.append)

    def named(self, kind: str, **match: Any) -> list[Any]:
        """The events of ``kind`` whose fields (an error's context too) equal ``match``."""
        return [
            e for e in self.all if e.kind == kind and all(e.get(k) == v for k, v in match.items())
        ]


async def usage_rows(pg_url: str, *, user_id: int | None = None) -> list[dict[str, Any]]:
    """``usage_log`` rows in insertion order (of one user, if given)."""
    if user_id is None:
        return await pg_fetch(pg_url, "SELECT * FROM usage_log ORDER BY id")
    return await pg_fetch(pg_url, "SELECT * FROM usage_log WHERE user_id = $1 ORDER BY id", user_id)


async def usage_rows_at_least(
    pg_url: str, n: int, *, user_id: int | None = None
) -> list[dict[str, Any]] | None:
    """The rows once there are ``n`` or more, else None (also while Postgres is down): a check
    for :func:`wait_until`."""
    try:
        rows = await usage_rows(pg_url, user_id=user_id)
    except (OSError, asyncpg.PostgresError):
        return None
    return rows if len(rows) >= n else None
