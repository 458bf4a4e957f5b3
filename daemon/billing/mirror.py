"""The mirror service: keeps Redis's copy of entitlements and tokens whole, and expires holds
whose job vanished (docs/billing.md, "Holds and the entitlements mirror").

- At start, and whenever ``tts:mirror:ready`` is missing (Redis lost its data: a restart without
  persistence, ``FLUSHALL``), every user's entitlements and tokens are copied from Postgres.
- A user the gateway found without a copy is copied at once (the gateway never waits for it).
- Every ``holds.reap_interval_s`` the holds are scanned: a hold whose job is gone and which is
  older than ``holds.ttl_s`` (``holds.billing_ttl_s`` for one waiting for billing) is released and
  counted (``tts_holds_expired_total``, one ``holds_expired`` event per round).

It reads Postgres, so it is the cold side: a Postgres outage pauses the copies (retried with
backoff), never the request path.
"""

from __future__ import annotations

import trio

from daemon.config import HoldsConfig
from daemon.contracts import Keys
from daemon.contracts.events import HoldsExpired, MirrorRebuilt
from daemon.ops.events import EventLog
from daemon.ops.metrics import Metrics
from daemon.runtime.outage import Outage
from daemon.stores.mirror import aio_mirror_all, aio_mirror_users
from daemon.stores.pg import PgPool, is_pg_unavailable
from daemon.stores.redis import RedisStore, is_redis_unavailable

__all__ = ["MirrorService"]


class MirrorService:
    def __init__(
        self,
        store: RedisStore,
        db: PgPool,
        cfg: HoldsConfig,
        events: EventLog,
        metrics: Metrics,
    ) -> None:
        self.store = store
        self.db = db
        self.cfg = cfg
        self.events = events
        self.metrics = metrics
        self._wanted: set[int] = set()
        self._wake = trio.Event()
        self.rebuilds = 0
        self.expired = 0
        self.open_holds = 0
        self.oldest_hold_s = 0.0

    def want(self, user_id: int) -> None:
        """Copy this user's entitlements soon (called by the gateway: never blocks)."""
        if len(self._wanted) < 10_000:
            self._wanted.add(user_id)
        self._wake.set()

    async def rebuild(self) -> int:
        """Copy every user's entitlements and tokens now; the number of users."""
        with trio.fail_after(max(60.0, self.db.acquire_timeout_s + 30)):
            n = await self.db.run(aio_mirror_all, self.store)
        self.rebuilds += 1
        self.metrics.mirror_rebuilds.inc()
        self.events.emit(MirrorRebuilt(service="mirror", users=n))
        return n

    async def run(
        self,
        *,
        stopping: trio.Event,
        task_status: trio.TaskStatus[MirrorService] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """``started(self)`` after the first full copy (so a daemon that accepts connections has
        its users' tokens in Redis); then keep it whole and reap holds until ``stopping``."""
        await self.rebuild()
        task_status.started(self)
        outage = Outage("mirror", self.events, max_s=self.cfg.check_s * 5)
        next_reap = trio.current_time()
        while not stopping.is_set():
            try:
                await self._round(next_reap <= trio.current_time())
                outage.ok()
            except Exception as exc:
                if not (is_pg_unavailable(exc) or is_redis_unavailable(exc)):
                    raise
                await outage.failed(exc, "Postgres or Redis (mirror)")
                continue
            if next_reap <= trio.current_time():
                next_reap = trio.current_time() + self.cfg.reap_interval_s
            with trio.move_on_after(self.cfg.check_s):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _round(self, reap: bool) -> None:
        ready = await self.store.execute("EXISTS", Keys.MIRROR_READY)
        if not int(ready):
            self._wanted.clear()
            await self.rebuild()
        elif self._wanted:
            users = sorted(self._wanted)
            with trio.fail_after(self.db.acquire_timeout_s + 30):
                await self.db.run(aio_mirror_users, self.store, users)
            self._wanted.difference_update(users)
        if reap:
            await self.reap()

    async def reap(self) -> int:
        """One pass over every user's holds: expire what vanished. Returns holds expired."""
        reaped = chars = left = 0
        oldest = 0.0
        users: dict[int, int] = {}
        for user_id in await self.store.holders():
            r, c, n, age = await self.store.reap_holds(
                user_id, ttl_s=self.cfg.ttl_s, billing_ttl_s=self.cfg.billing_ttl_s
            )
            reaped, chars, left = reaped + r, chars + c, left + n
            oldest = max(oldest, age)
            if r:
                users[user_id] = r
        self.open_holds, self.oldest_hold_s = left, oldest
        self.metrics.holds_open.set(left)
        if reaped:
            self.expired += reaped
            self.metrics.holds_expired.inc(reaped)
            self.events.emit(
                HoldsExpired(
                    service="mirror",
                    holds=reaped,
                    characters=chars,
                    users={str(u): n for u, n in users.items()},
                )
            )
        return reaped
