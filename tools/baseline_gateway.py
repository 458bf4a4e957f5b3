"""The request path as it was before holds, kept runnable for ``tools/bench_gateway.py`` only.

The daemon's gateway reads only Redis (docs/billing.md, "Holds and the entitlements mirror"). The
benchmark compares it with the Postgres-checked path it replaced, in the same run: a handshake
looks the token up in Postgres (remembered for 60 s, as the old gateway's token cache did), and a
``synthesize`` first reads the user's remaining allowance on the request pool, then runs
``enqueue.lua`` — both in one asyncio unit of work, one crossing, as before. The request-pool wait
is observed into ``tts_request_pool_wait_seconds``, as before.

Never part of ``tts-daemon run``: :func:`baseline_services` is the daemon's service list with
:class:`PostgresCheckedGateway` as its gateway (``open_daemon(..., services=baseline_services)``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import asyncpg
import attrs
import trio
import trio_asyncio

from daemon.config import Config
from daemon.gateway.service import Gateway
from daemon.runtime.services import Deps, build_services, gateway_args, gateway_service
from daemon.runtime.supervisor import ServiceSpec
from daemon.stores.pg import PgPool, fetch_budget
from daemon.stores.redis import RedisStore, enqueue_call, enqueue_reply

__all__ = ["PostgresCheckedGateway", "baseline_services"]


async def _check_and_enqueue(
    pool: asyncpg.Pool,
    acquire_timeout_s: float,
    store: RedisStore,
    kwargs: dict[str, Any],
    waited: list[float],
) -> Any:
    """(asyncio side) acquire (timed) → the usage query → release → enqueue.lua."""
    t0 = time.perf_counter()
    conn = await pool.acquire(timeout=acquire_timeout_s)
    waited.append(time.perf_counter() - t0)
    try:
        budget = (await fetch_budget(conn, kwargs["user_id"])).for_type(kwargs["usage_type"])
    finally:
        await pool.release(conn)
    # The old script took the budget as an argument; today's checks holds against the mirror.
    # The user is on an unlimited plan in the benchmark, so the two agree on every answer.
    del budget
    keys, args = enqueue_call(**kwargs)
    return await store.aio_enqueue(keys, args)


@attrs.define(eq=False)
class PostgresCheckedGateway(Gateway):
    """The gateway with the old request path: Postgres at every handshake (token cache misses)
    and every ``synthesize`` (the usage check on the request pool)."""

    db: PgPool | None = None
    _tokens: OrderedDict[str, tuple[float, int]] = attrs.Factory(OrderedDict)
    _auth_limiter: trio.CapacityLimiter | None = None

    async def _lookup_user(self, token: str) -> tuple[int | None, bool]:
        assert self.db is not None
        now = trio.current_time()
        hit = self._tokens.get(token)
        if hit is not None and hit[0] > now:
            return hit[1], True
        if self._auth_limiter is None:
            # Handshakes used at most half of the request pool.
            self._auth_limiter = trio.CapacityLimiter(max(1, self.db.size // 2))
        with trio.fail_after(self.db.acquire_timeout_s + 5):
            async with self._auth_limiter:
                user, waited = await self.db.lookup_token(token)
        self.metrics.request_pool_wait_seconds.observe(waited)
        if user is None:
            return None, True
        self._tokens[token] = (now + 60.0, user[0])
        while len(self._tokens) > 10_000:
            self._tokens.popitem(last=False)
        return user[0], True

    async def _enqueue(self, **kwargs: Any) -> tuple[str, list[str] | int]:
        assert self.db is not None
        waited: list[float] = []
        try:
            with trio.fail_after(self.db.acquire_timeout_s + 5 + self.store.command_timeout_s):
                reply = await trio_asyncio.aio_as_trio(_check_and_enqueue)(
                    self.db.pool, self.db.acquire_timeout_s, self.store, kwargs, waited
                )
        finally:
            for w in waited:
                self.metrics.request_pool_wait_seconds.observe(w)
        return enqueue_reply(reply)


def baseline_services(cfg: Config, deps: Deps) -> list[ServiceSpec]:
    """The daemon's services with the Postgres-checked gateway in place of the gateway (the
    benchmark's baseline; the request pool is the daemon's admin pool, opened on first use and
    warmed up by the benchmark's first round)."""
    gateway = PostgresCheckedGateway(**gateway_args(cfg, deps), db=deps.request_db)
    baseline = gateway_service(cfg, deps, gateway)
    return [baseline if s.name == "gateway" else s for s in build_services(cfg, deps)]
