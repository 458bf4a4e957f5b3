"""``GET /healthz`` and what ``/metrics`` and the dashboard read of the running daemon.

Everything here is read from the supervisor: each service's state, and the handle its current
start reported (``task_status.started(handle)``: the billing consumer with its pool, the monitor,
the gateway with its connections). A service that is not running has no handle and shows as such
(``in_use: null``); nothing here holds a service's resources or waits for one to exist.
docs/metrics.md describes the fields.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from daemon.config import Config
from daemon.contracts.events import Error
from daemon.ops.events import EventLog, Throttle, describe
from daemon.ops.stats import OpsStats
from daemon.runtime.supervisor import Supervisor
from daemon.stores.pg import PgPool
from daemon.stores.redis import RedisStore
from daemon.workers.registry import live_workers

__all__ = ["Health"]

# Services that must run for the daemon to be healthy (200), else /healthz answers 503.
REQUIRED = ("gateway", "hot")


@attrs.define(eq=False)
class Health:
    """The daemon's live view: /healthz, pool use, queue depth, connections."""

    cfg: Config
    instance_id: str
    supervisor: Supervisor
    events: EventLog
    stats: OpsStats
    store: RedisStore
    request_db: PgPool
    # Set at the first stage of a shutdown: unhealthy from then on (load balancers move away).
    gateway_stopping: trio.Event
    # The durable audio store is on: /healthz reports the persister's view of it.
    audio_enabled: bool = False
    # The catalog's models: the synthesis queues /metrics and the dashboard report on.
    models: tuple[str, ...] = ()
    _failure_log: Throttle = attrs.Factory(Throttle)

    def services(self) -> dict[str, dict[str, Any]]:
        return {name: st.as_dict() for name, st in self.supervisor.states.items()}

    def connections(self) -> int:
        """Open WebSocket connections (0 while the gateway is not running)."""
        gateway = self.supervisor.handle("gateway")
        return gateway.gateway.connection_count if gateway is not None else 0

    def pools(self) -> dict[str, Any]:
        """Each Postgres pool's size and connections in use (``None``: its service is down)."""
        out: dict[str, Any] = {
            "request": {"size": self.request_db.size, "in_use": self.request_db.in_use()}
        }
        billing = self.supervisor.handle("billing")
        out["billing"] = {
            "size": self.cfg.postgres.billing_pool_size,
            "in_use": billing.pool.in_use() if billing is not None else None,
        }
        if "monitor" in self.supervisor.states:
            monitor = self.supervisor.handle("monitor")
            pool = monitor.pool if monitor is not None else None
            out["monitor"] = {"size": 1, "in_use": pool.in_use() if pool is not None else None}
        return out

    async def audio(self) -> dict[str, Any] | None:
        """The durable audio store and its persister (None when ``audio.enabled`` is off); the
        backlog is read fresh. While the persister is not running: its supervisor state only."""
        if not self.audio_enabled:
            return None
        persister = self.supervisor.handle("persister")
        if persister is None:
            return {"state": self.supervisor.state("persister")}
        try:
            await persister.refresh_backlog()
        except Exception as exc:
            self.log_failure("persist backlog unavailable", exc)
        return persister.as_dict()

    async def billing_depth(self) -> int | None:
        try:
            with trio.fail_after(1.0):
                return await self.store.billing_depth()
        except Exception as exc:
            self.log_failure("billing queue depth unavailable", exc)
            return None

    async def workers(self) -> dict[str, dict[str, Any]] | None:
        """Live workers per model (and per version) from the worker registry
        (docs/workers.md, "The registry"); None if Redis cannot say within a second."""
        try:
            with trio.fail_after(1.0):
                entries = await self.store.workers()
                seconds, micros = await self.store.execute("TIME")
        except Exception as exc:
            self.log_failure("worker registry unavailable", exc)
            return None
        now = int(seconds) + int(micros) / 1e6
        return live_workers(entries, now, self.cfg.workers.models)

    async def queue_stats(self) -> dict[str, dict[str, float]]:
        """Per model: jobs waiting, the oldest one's age, users waiting (empty if Redis is away)."""
        if not self.models:
            return {}
        try:
            with trio.fail_after(1.0):
                return await self.store.queue_stats(self.models)
        except Exception as exc:
            self.log_failure("synthesis queue stats unavailable", exc)
            return {}

    def log_failure(self, what: str, exc: BaseException) -> None:
        """An ``error`` event for a failure of an observability call, at most once a minute per
        kind: a scraper polling every second must not flood the log."""
        if self._failure_log.due(what) is not None:
            self.events.emit(Error(service="http", message=f"{what}: {describe(exc)}"))

    async def postgres_ok(self) -> bool:
        """One ``SELECT 1`` on the admin pool, within a second."""
        try:
            with trio.fail_after(1.0):
                await self.request_db.fetchval("SELECT 1")
        except Exception:
            return False
        return True

    def holds(self) -> dict[str, Any]:
        """Open holds (as of the reaper's last pass), the oldest one's age against
        ``holds.ttl_s`` (older: amber), and holds settled, released and expired so far
        (docs/billing.md)."""
        mirror = self.supervisor.handle("mirror")
        registry = self.stats.metrics.registry
        oldest = mirror.oldest_hold_s if mirror is not None else 0.0
        return {
            "open": mirror.open_holds if mirror is not None else None,
            "oldest_s": round(oldest, 3),
            "ttl_s": self.cfg.holds.ttl_s,
            "grade": "amber" if oldest > self.cfg.holds.ttl_s else "green",
            "settled": registry.get_sample_value("tts_holds_settled_total") or 0,
            "released": registry.get_sample_value("tts_holds_released_total") or 0,
            "expired": mirror.expired if mirror is not None else 0,
        }

    async def healthz(self) -> tuple[dict[str, Any], bool]:
        """``GET /healthz``: each service's state, ``billing_queue_depth``, pool use, whether
        Postgres answers, open holds; healthy (200) when the gateway and the hot path run, else
        503. ``status``: ``ok``, ``degraded`` (Postgres down: audio is served, billing waits) or
        ``unavailable``."""
        healthy = (
            all(self.supervisor.state(name) == "running" for name in REQUIRED)
            and not self.gateway_stopping.is_set()
        )
        postgres = await self.postgres_ok()
        report = {
            "status": "unavailable" if not healthy else "ok" if postgres else "degraded",
            "postgres": "up" if postgres else "down",
            "holds": self.holds(),
            "instance": self.instance_id,
            "services": self.services(),
            "billing_queue_depth": await self.billing_depth(),
            "workers": await self.workers(),
            "pools": self.pools(),
            "connections": self.connections(),
            "reconciliation_delta": self.stats.reconciliation.delta,
            "audio": await self.audio(),
            "events": {
                "written": self.events.written,
                "dropped": self.events.dropped,
                "write_errors": self.events.write_errors,
                "path": str(self.cfg.events_path),
            },
        }
        return report, healthy
