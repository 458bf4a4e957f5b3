"""The daemon: one Trio process, one trio-asyncio loop, a supervised nursery per service.

Services open in dependency order — events log, stores, consumers, workers, gateway — so that
shutdown runs in reverse on its own and in stages (docs/tts-flow.md):

1. the gateway stops accepting, lets each connection send what is queued, closes it (1001);
2. simulated workers finish the job in hand and stop;
3. the hot consumer finishes the results it has claimed, the billing consumer the batch in hand;
4. pools and clients close (shielded, bounded), the events log drains.

The whole of it is bounded by ``supervisor.shutdown_timeout_s``; anything cut short is left in
Redis (claimed results, pending billing events) for the next start, never dropped.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import trio

from daemon.audio.persister import Persister
from daemon.audio.store import FileAudioStore
from daemon.audio.tiers import AudioTiers
from daemon.billing.consumer import BillingConsumer
from daemon.config import Config
from daemon.gateway.hashing import VariantHasher
from daemon.gateway.service import Gateway, GatewayAddresses
from daemon.hot.consumer import HotConsumer
from daemon.ops.dashboard import Dashboard
from daemon.ops.events import EventLog, Throttle, describe
from daemon.ops.metrics import Metrics
from daemon.ops.monitor import Monitor
from daemon.ops.stats import OpsStats
from daemon.runtime.faults import FaultPoint, no_fault
from daemon.runtime.priority import RequestFirst
from daemon.runtime.supervisor import ServiceSpec, Supervisor
from daemon.stores.bridge import open_bridge
from daemon.stores.pg import PgPool, open_pg_pool
from daemon.stores.redis import RedisStore, open_redis
from daemon.workers.scanner import run_visibility_scanner
from daemon.workers.simulated import SimulatedAdapter
from daemon.workers.worker import run_worker

__all__ = ["Daemon", "open_daemon"]

WORKER_STOP_S = 2.0


def make_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@attrs.define(eq=False)
class Daemon:
    """The daemon's wiring. ``redis_url``/``pg_url`` are resolved URLs (embedded or configured).

    Subclasses may replace :meth:`hot_service` / :meth:`billing_service` — that is how
    ``tools/inline.py`` builds the pre-split architecture for comparison without it ever being
    part of ``tts-daemon run``.
    """

    cfg: Config
    redis_url: str
    pg_url: str
    instance_id: str = attrs.Factory(make_instance_id)
    billing_fault: FaultPoint = no_fault
    hot_fault: FaultPoint = no_fault
    persist_fault: FaultPoint = no_fault
    events: EventLog = attrs.field(init=False)
    metrics: Metrics = attrs.Factory(Metrics)
    supervisor: Supervisor = attrs.field(init=False)
    store: RedisStore | None = None
    request_db: PgPool | None = None
    gateway: Gateway | None = None
    hot: HotConsumer | None = None
    billing: BillingConsumer | None = None
    # The durable audio store and its persister (None when audio.enabled is false).
    audio_store: FileAudioStore | None = None
    persister: Persister | None = None
    addresses: GatewayAddresses | None = None
    gateway_stopping: trio.Event = attrs.Factory(trio.Event)
    workers_stopping: trio.Event = attrs.Factory(trio.Event)
    consumers_stopping: trio.Event = attrs.Factory(trio.Event)
    stopped: trio.Event = attrs.Factory(trio.Event)
    # The request path goes first (runtime/priority.py): shared by the gateway and the hot path.
    priority: RequestFirst = attrs.Factory(RequestFirst)
    _stop_requested: trio.Event = attrs.Factory(trio.Event)
    _cancel_scope: trio.CancelScope | None = None
    # Operations: the dashboard's statistics (fed by the events log) and the monitor service.
    stats: OpsStats = attrs.field(init=False)
    monitor: Monitor | None = None
    _dashboard: Dashboard = attrs.field(init=False)
    _failure_log: Throttle = attrs.Factory(Throttle)

    def __attrs_post_init__(self) -> None:
        log = self.cfg.log
        self.events = EventLog(
            self.cfg.events_path, max_bytes=log.max_bytes, backups=log.backups, buffer=log.buffer
        )
        self.supervisor = Supervisor(self.cfg.supervisor, self.events, self.metrics)
        self.stats = OpsStats(self.cfg.monitor, self.metrics)
        self.events.add_listener(self.stats.on_event)
        self._dashboard = Dashboard(self.dashboard_data)

    # -- control ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin the graceful shutdown (what SIGTERM/SIGINT do)."""
        self._stop_requested.set()

    def abort(self) -> None:
        """Stop now, without draining (a second Ctrl-C)."""
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    # -- services ---------------------------------------------------------------------------

    def hot_service(self) -> ServiceSpec:
        assert self.store is not None
        self.hot = HotConsumer(
            store=self.store,
            cfg=self.cfg.hot,
            events=self.events,
            metrics=self.metrics,
            consumer_id=self.instance_id,
            block_s=self.cfg.redis.block_s,
            fault=self.hot_fault,
            priority=self.priority,
            persist=self.cfg.audio.enabled,
        )
        return ServiceSpec("hot", functools.partial(self.hot.run, stopping=self.consumers_stopping))

    def billing_service(self) -> ServiceSpec | None:
        assert self.store is not None
        self.billing = BillingConsumer(
            store=self.store,
            pg_url=self.pg_url,
            pg_cfg=self.cfg.postgres,
            cfg=self.cfg.billing,
            events=self.events,
            metrics=self.metrics,
            consumer_name=self.instance_id,
            block_s=self.cfg.redis.block_s,
            fault=self.billing_fault,
        )
        return ServiceSpec(
            "billing",
            functools.partial(self.billing.run, stopping=self.consumers_stopping),
            critical=False,
            fail_start_up=False,
        )

    def persister_service(self) -> ServiceSpec | None:
        """Finalized audio from Redis into the durable store (``audio.enabled``). Not critical:
        restarted with backoff while everything else serves; Redis keeps the audio meanwhile."""
        if self.audio_store is None:
            return None
        assert self.store is not None
        self.persister = Persister(
            redis=self.store,
            store=self.audio_store,
            cfg=self.cfg.audio,
            ttl_s=self.cfg.hot.audio_ttl_s,
            revisions=dict(self.cfg.models.revision),
            events=self.events,
            metrics=self.metrics,
            consumer=self.instance_id,
            block_s=self.cfg.redis.block_s,
            fault=self.persist_fault,
            priority=self.priority,
        )
        return ServiceSpec(
            "persister",
            functools.partial(self.persister.run, stopping=self.consumers_stopping),
            critical=False,
            fail_start_up=False,
        )

    def worker_services(self) -> list[ServiceSpec]:
        assert self.store is not None
        specs = []
        for i in range(self.cfg.workers.simulated):
            run = functools.partial(
                run_worker,
                self.store,
                SimulatedAdapter(self.cfg.workers),
                models=self.cfg.workers.models,
                worker_id=f"{self.instance_id}-sim-{i}",
                stopping=self.workers_stopping,
            )
            specs.append(ServiceSpec(f"worker-{i}", run, critical=False))
        return specs

    def monitor_service(self) -> ServiceSpec | None:
        """The dashboard's sampler and the live reconciliation (``monitor.enabled``)."""
        if not self.cfg.monitor.enabled:
            return None
        assert self.store is not None
        self.monitor = Monitor(
            store=self.store,
            pg_url=self.pg_url,
            pg_cfg=self.cfg.postgres,
            cfg=self.cfg.monitor,
            stats=self.stats,
            events=self.events,
            metrics=self.metrics,
            models=self.cfg.workers.models,
            connections=lambda: self.gateway.connection_count if self.gateway else 0,
        )
        # Observation only: it stops with the gateway, at the first stage of a shutdown.
        return ServiceSpec(
            "monitor",
            functools.partial(self.monitor.run, stopping=self.gateway_stopping),
            critical=False,
            fail_start_up=False,
        )

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`request_stop`; ``started(self)`` once every service is up and the
        gateway accepts connections. Raises if a critical service cannot start."""
        with trio.CancelScope() as self._cancel_scope:
            bridge = open_bridge(
                lambda message, detail: self.events.error("asyncio", message, **detail)
            )
            async with bridge, trio.open_nursery() as infra:
                await infra.start(self.events.run)
                try:
                    await self._run_services(task_status)
                except Exception as exc:
                    # Start-up failed or a critical service escalated: whoever tails the log
                    # must see why the daemon is gone, not only its stderr.
                    self.events.error(
                        "daemon", f"daemon stopped by a failure: {describe(exc)}", fatal=True
                    )
                    raise
                finally:
                    self.events.close()
                    await self.events.drain()
        self.stopped.set()

    async def _run_services(self, task_status: trio.TaskStatus[Daemon]) -> None:
        cfg = self.cfg
        sup = self.supervisor
        async with (
            open_redis(
                self.redis_url,
                max_connections=cfg.redis.max_connections,
                pool_timeout_s=cfg.redis.pool_timeout_s,
                command_timeout_s=cfg.redis.command_timeout_s,
            ) as store,
            open_pg_pool(
                self.pg_url,
                size=cfg.postgres.request_pool_size,
                # Open every connection at start: a connection made under load pays its
                # authentication (SCRAM) on the request path, right in the middle of a burst.
                min_size=cfg.postgres.request_pool_size,
                # Its queries leave no session state (the migration lock is transaction-scoped):
                # no reset round trip on every release, on every synthesize.
                reset_session=False,
                acquire_timeout_s=cfg.postgres.acquire_timeout_s,
                command_timeout_s=cfg.postgres.command_timeout_s,
            ) as db,
        ):
            self.store, self.request_db = store, db
            with trio.fail_after(60):
                applied = await db.migrate()
                catalog = await db.catalog()
            hasher = VariantHasher.from_file(self._variant_secret_path(), dict(cfg.models.revision))
            if cfg.audio.enabled:
                self.audio_store = FileAudioStore(
                    cfg.audio_dir,
                    max_bytes=cfg.audio.max_bytes,
                    pin_days=cfg.audio.pin_days,
                    threads=cfg.audio.io_threads,
                )
                with trio.fail_after(60):
                    await self.audio_store.open()
            with trio.CancelScope() as services_scope:
                async with trio.open_nursery() as consumers:
                    scanner = functools.partial(
                        run_visibility_scanner,
                        store,
                        cfg.workers,
                        self.events,
                        self.metrics,
                        stopping=self.consumers_stopping,
                    )
                    await consumers.start(
                        sup.supervise, ServiceSpec("scanner", scanner, critical=False)
                    )
                    await consumers.start(sup.supervise, self.hot_service())
                    billing = self.billing_service()
                    if billing is not None:
                        await consumers.start(sup.supervise, billing)
                    persister = self.persister_service()
                    if persister is not None:
                        await consumers.start(sup.supervise, persister)
                    monitor = self.monitor_service()
                    if monitor is not None:
                        await consumers.start(sup.supervise, monitor)
                    async with trio.open_nursery() as workers:
                        for spec in self.worker_services():
                            await workers.start(sup.supervise, spec)
                        async with trio.open_nursery() as front:
                            self.gateway = Gateway(
                                cfg=cfg.gateway,
                                store=store,
                                db=db,
                                catalog=catalog,
                                hasher=hasher,
                                events=self.events,
                                metrics=self.metrics,
                                health=self.health,
                                refresh_metrics=self.refresh_metrics,
                                dashboard=self.dashboard,
                                priority=self.priority,
                                audio=AudioTiers(
                                    store,
                                    self.audio_store,
                                    cfg.hot.audio_ttl_s,
                                    self.metrics,
                                    self.events,
                                ),
                            )
                            run_gateway = functools.partial(
                                self.gateway.run, stopping=self.gateway_stopping
                            )
                            self.addresses = await front.start(
                                sup.supervise, ServiceSpec("gateway", run_gateway)
                            )
                            self.events.emit(
                                "daemon_started",
                                instance=self.instance_id,
                                ws_url=self.addresses.ws_url,
                                http_url=self.addresses.http_url,
                                migrations_applied=applied,
                            )
                            task_status.started(self)
                            await self._stop_requested.wait()
                            # Stage 1: the gateway. No service is restarted from here on.
                            services_scope.deadline = (
                                trio.current_time() + cfg.supervisor.shutdown_timeout_s
                            )
                            sup.stopping.set()
                            self.gateway_stopping.set()
                        # Stage 2: simulated workers finish the job in hand.
                        self.workers_stopping.set()
                        workers.cancel_scope.deadline = trio.current_time() + WORKER_STOP_S
                    # Stage 3: the hot path drains what it claimed; billing finishes its batch.
                    self.consumers_stopping.set()
            self.events.emit("daemon_stopped", instance=self.instance_id)

    def _variant_secret_path(self) -> Path:
        if self.cfg.gateway.variant_secret_path:
            return Path(self.cfg.gateway.variant_secret_path)
        return self.cfg.data.dir / "secrets" / "variant_hmac.key"

    # -- observability ----------------------------------------------------------------------

    def pools(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.request_db is not None:
            out["request"] = {"size": self.request_db.size, "in_use": self.request_db.in_use()}
        billing_pool = self.billing.pool if self.billing is not None else None
        out["billing"] = {
            "size": self.cfg.postgres.billing_pool_size,
            "in_use": billing_pool.in_use() if billing_pool is not None else None,
        }
        if self.monitor is not None:
            pool = self.monitor.pool
            out["monitor"] = {"size": 1, "in_use": pool.in_use() if pool is not None else None}
        return out

    async def billing_depth(self) -> int | None:
        if self.store is None:
            return None
        try:
            with trio.fail_after(1.0):
                return await self.store.billing_depth()
        except Exception as exc:
            self._log_failure("billing queue depth unavailable", exc)
            return None

    def _log_failure(self, what: str, exc: BaseException) -> None:
        """An ``error`` event for a failure of an observability call, at most once a minute per
        kind: a scraper polling every second must not flood the log (lesson 4)."""
        if self._failure_log.due(what) is not None:
            self.events.error("http", f"{what}: {describe(exc)}")

    async def health(self) -> tuple[dict[str, Any], bool]:
        """``GET /healthz``: each service's state, ``billing_queue_depth`` and pool use; healthy
        (200) when the gateway and the hot path run, else 503."""
        services = {name: st.as_dict() for name, st in self.supervisor.states.items()}
        healthy = (
            all(self.supervisor.state(name) == "running" for name in ("gateway", "hot"))
            and not self.gateway_stopping.is_set()
        )
        rec = self.stats.reconciliation
        if self.persister is not None:
            await self.persister.refresh_backlog()
        report = {
            "status": "ok" if healthy else "unavailable",
            "instance": self.instance_id,
            "services": services,
            "billing_queue_depth": await self.billing_depth(),
            "pools": self.pools(),
            "connections": self.gateway.connection_count if self.gateway else 0,
            "reconciliation_delta": rec.delta,
            "audio": self.persister.as_dict() if self.persister is not None else None,
            "events": {
                "written": self.events.written,
                "dropped": self.events.dropped,
                "write_errors": self.events.write_errors,
                "path": str(self.cfg.events_path),
            },
        }
        return report, healthy

    async def refresh_metrics(self) -> None:
        depth = await self.billing_depth()
        if depth is not None:
            self.metrics.billing_queue_depth.set(depth)
        if self.persister is not None:
            await self.persister.refresh_backlog()
        pools = self.pools()
        if "request" in pools:
            self.metrics.request_pool_in_use.set(pools["request"]["in_use"])
        if pools["billing"]["in_use"] is not None:
            self.metrics.billing_pool_in_use.set(pools["billing"]["in_use"])
        # Every supervised service has its restart counter from the start (0), so that a scrape
        # shows tts_service_restarts_total{service=...} before the first restart.
        for name in self.supervisor.states:
            self.metrics.service_restarts.labels(name)

    async def dashboard(self, path: str) -> tuple[bytes, str] | None:
        """The dashboard pages; ``None`` for paths that are not the dashboard's."""
        try:
            return await self._dashboard(path)
        except Exception as exc:
            self._log_failure("dashboard failed", exc)
            raise

    async def dashboard_data(self) -> dict[str, Any]:
        """The JSON ``/dashboard`` polls: the statistics, plus the services and pools now."""
        data = self.stats.snapshot()
        data["instance"] = self.instance_id
        data["services"] = {name: st.as_dict() for name, st in self.supervisor.states.items()}
        data["pools"] = self.pools()
        data["connections"] = self.gateway.connection_count if self.gateway else 0
        data["events"] = {"written": self.events.written, "dropped": self.events.dropped}
        data["audio"] = self.persister.as_dict() if self.persister is not None else None
        return data


@contextlib.asynccontextmanager
async def open_daemon(
    cfg: Config, redis_url: str, pg_url: str, *, daemon_class: type[Daemon] = Daemon, **kwargs: Any
) -> AsyncIterator[Daemon]:
    """Run a daemon in the background of the caller (tests, tools); stop it gracefully on exit."""
    daemon = daemon_class(cfg, redis_url, pg_url, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.request_stop()
