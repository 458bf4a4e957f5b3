"""The daemon: wiring and staged stop. One Trio process, one trio-asyncio loop, and a supervised
nursery per service.

The daemon opens what services share — the events log, the Redis store, the request pool (schema
migrated, catalog read) — then runs the services a plain function builds
(:func:`daemon.runtime.services.build_services`, or another list a tool passes) in three nested
nurseries, one per stage, so that shutdown runs in reverse on its own and in stages
(docs/tts-flow.md):

1. the gateway stops accepting, lets each connection send what is queued, closes it (1001);
2. simulated workers finish the job in hand and stop;
3. the hot consumer finishes the results it has claimed, the billing consumer the batch in hand;
4. pools and clients close (shielded, bounded), the events log drains.

The whole of it is bounded by ``supervisor.shutdown_timeout_s``; anything cut short is left in
Redis (claimed results, pending billing events) for the next start, never dropped.
"""

from __future__ import annotations

import contextlib
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
from daemon.billing.mirror import MirrorService
from daemon.config import Config
from daemon.contracts.events import DaemonStarted, DaemonStopped, Error
from daemon.gateway.hashing import VariantHasher
from daemon.gateway.service import Gateway, GatewayAddresses
from daemon.ops.dashboard import Dashboard
from daemon.ops.events import EventLog, describe
from daemon.ops.health import Health
from daemon.ops.metrics import Metrics
from daemon.ops.stats import OpsStats
from daemon.runtime.faults import FaultPoint, no_fault
from daemon.runtime.priority import RequestFirst
from daemon.runtime.services import BuildServices, Deps, Stopping, build_services
from daemon.runtime.supervisor import STAGES, ServiceSpec, Supervisor
from daemon.stores.bridge import open_bridge
from daemon.stores.pg import open_pg_pool
from daemon.stores.redis import open_redis

__all__ = ["Daemon", "open_daemon"]

WORKER_STOP_S = 2.0


def make_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@attrs.define(eq=False)
class Daemon:
    """The daemon's wiring. ``redis_url``/``pg_url`` are resolved URLs (embedded or configured).

    ``services`` builds the list of services to run (default :func:`build_services`); what a
    running service reported at start is :meth:`handle` (``addresses`` and ``gateway`` read the
    gateway's).
    """

    cfg: Config
    redis_url: str
    pg_url: str
    instance_id: str = attrs.Factory(make_instance_id)
    billing_fault: FaultPoint = no_fault
    hot_fault: FaultPoint = no_fault
    persist_fault: FaultPoint = no_fault
    services: BuildServices = build_services
    events: EventLog = attrs.field(init=False)
    metrics: Metrics = attrs.Factory(Metrics)
    supervisor: Supervisor = attrs.field(init=False)
    # Operations: the dashboard's statistics, fed by the events log.
    stats: OpsStats = attrs.field(init=False)
    # The request path goes first (runtime/priority.py): shared by the gateway and the hot path.
    priority: RequestFirst = attrs.Factory(RequestFirst)
    stopping: Stopping = attrs.Factory(Stopping)
    stopped: trio.Event = attrs.Factory(trio.Event)
    # The durable audio store (None when audio.enabled is false), open while the daemon runs.
    audio_store: FileAudioStore | None = None
    _stop_requested: trio.Event = attrs.Factory(trio.Event)
    _abort_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)

    def __attrs_post_init__(self) -> None:
        log = self.cfg.log
        self.events = EventLog(
            self.cfg.events_path, max_bytes=log.max_bytes, backups=log.backups, buffer=log.buffer
        )
        self.supervisor = Supervisor(self.cfg.supervisor, self.events, self.metrics)
        self.stats = OpsStats(self.cfg.monitor, self.metrics)
        self.events.add_listener(self.stats.on_event)

    # -- control ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin the graceful shutdown (what SIGTERM/SIGINT do)."""
        self._stop_requested.set()

    def abort(self) -> None:
        """Stop now, without draining (a second Ctrl-C)."""
        self._abort_scope.cancel()

    # -- what the running services reported --------------------------------------------------

    def handle(self, name: str) -> Any:
        """The handle service ``name`` reported at its current start (None while it is not
        running): see daemon/runtime/services.py for each service's."""
        return self.supervisor.handle(name)

    @property
    def gateway(self) -> Gateway:
        """The running gateway (RuntimeError while it is not running)."""
        handle = self.handle("gateway")
        if handle is None:
            raise RuntimeError(f"the gateway is {self.supervisor.state('gateway')}")
        return handle.gateway

    @property
    def persister(self) -> Persister | None:
        """The persister (None while it is not running, or with audio.enabled false)."""
        return self.handle("persister")

    @property
    def addresses(self) -> GatewayAddresses:
        """The running gateway's bound ports, and the operations listener's (RuntimeError while
        the gateway is not running)."""
        handle = self.handle("gateway")
        if handle is None:
            raise RuntimeError(f"the gateway is {self.supervisor.state('gateway')}")
        ops_port = self.handle("ops")
        if ops_port is None:
            return handle.addresses
        return attrs.evolve(handle.addresses, ops_host=self.cfg.ops.host, ops_port=ops_port)

    @property
    def mirror(self) -> MirrorService | None:
        """The running mirror service (docs/billing.md), or None."""
        return self.handle("mirror")

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`request_stop`; ``started(self)`` once every service is up and the
        gateway accepts connections. Raises if a critical service cannot start."""
        with self._abort_scope:
            bridge = open_bridge(
                lambda message, detail: self.events.emit(
                    Error(service="asyncio", message=message, context=detail)
                )
            )
            async with bridge, trio.open_nursery() as infra:
                await infra.start(self.events.run)
                try:
                    await self._run_services(task_status)
                except Exception as exc:
                    # Start-up failed or a critical service escalated: whoever tails the log
                    # must see why the daemon is gone, not only its stderr.
                    self.events.emit(
                        Error(
                            service="daemon",
                            message=f"daemon stopped by a failure: {describe(exc)}",
                            context={"fatal": True},
                        )
                    )
                    raise
                finally:
                    self.events.close()
                    await self.events.drain()
        self.stopped.set()

    async def _run_services(self, task_status: trio.TaskStatus[Daemon]) -> None:
        cfg = self.cfg
        async with (
            open_redis(
                self.redis_url,
                max_connections=cfg.redis.max_connections,
                pool_timeout_s=cfg.redis.pool_timeout_s,
                command_timeout_s=cfg.redis.command_timeout_s,
            ) as store,
            # The admin pool: migrations, the catalog, the mirror's copies, health checks. The
            # request path reads no Postgres (docs/billing.md, "Holds and the entitlements
            # mirror"); the benchmark's baseline gateway (tools/baseline_gateway.py) uses it as
            # the old request pool. Its queries leave no session state: no reset round trip.
            open_pg_pool(
                self.pg_url,
                size=cfg.postgres.request_pool_size,
                min_size=1,
                reset_session=False,
                acquire_timeout_s=cfg.postgres.acquire_timeout_s,
                command_timeout_s=cfg.postgres.command_timeout_s,
            ) as db,
        ):
            with trio.fail_after(60):
                applied = await db.migrate()
                catalog = await db.catalog()
            if cfg.audio.enabled:
                self.audio_store = FileAudioStore(
                    cfg.audio_dir,
                    max_bytes=cfg.audio.max_bytes,
                    pin_days=cfg.audio.pin_days,
                    threads=cfg.audio.io_threads,
                )
                with trio.fail_after(60):
                    await self.audio_store.open()
            health = Health(
                cfg=cfg,
                instance_id=self.instance_id,
                supervisor=self.supervisor,
                events=self.events,
                stats=self.stats,
                store=store,
                request_db=db,
                gateway_stopping=self.stopping.gateway,
                audio_enabled=self.audio_store is not None,
                models=tuple(sorted(catalog.models)),
            )
            deps = Deps(
                mirror=MirrorService(store, db, cfg.holds, self.events, self.metrics),
                instance_id=self.instance_id,
                pg_url=self.pg_url,
                store=store,
                request_db=db,
                catalog=catalog,
                hasher=VariantHasher.from_file(
                    self._variant_secret_path(), dict(cfg.models.revision)
                ),
                events=self.events,
                metrics=self.metrics,
                stats=self.stats,
                priority=self.priority,
                stopping=self.stopping,
                health=health,
                dashboard=Dashboard(health),
                hot_fault=self.hot_fault,
                billing_fault=self.billing_fault,
                audio_store=self.audio_store,
                persist_fault=self.persist_fault,
            )
            specs = self.services(cfg, deps)
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"service names must be unique: {names}")
            await self._run_stages(specs, task_status, applied)
            self.events.emit(DaemonStopped(instance=self.instance_id))

    async def _run_stages(
        self, specs: list[ServiceSpec], task_status: trio.TaskStatus[Daemon], applied: list[str]
    ) -> None:
        """Start ``specs`` stage by stage (consumers, workers, gateway); on :meth:`request_stop`,
        stop them in reverse, each stage after the one inside it is done."""
        cfg, sup = self.cfg, self.supervisor
        staged = {stage: [s for s in specs if s.stage == stage] for stage in STAGES}
        with trio.CancelScope() as services_scope:
            async with trio.open_nursery() as consumers:
                for spec in staged["consumers"]:
                    await consumers.start(sup.supervise, spec)
                async with trio.open_nursery() as workers:
                    for spec in staged["workers"]:
                        await workers.start(sup.supervise, spec)
                    async with trio.open_nursery() as front:
                        for spec in staged["gateway"]:
                            await front.start(sup.supervise, spec)
                        self.events.emit(
                            DaemonStarted(
                                instance=self.instance_id,
                                ws_url=self.addresses.ws_url,
                                http_url=self.addresses.http_url,
                                ops_url=self.addresses.ops_url,
                                migrations_applied=applied,
                            )
                        )
                        task_status.started(self)
                        await self._stop_requested.wait()
                        # Stage 1: the gateway. No service is restarted from here on.
                        services_scope.deadline = (
                            trio.current_time() + cfg.supervisor.shutdown_timeout_s
                        )
                        sup.stopping.set()
                        self.stopping.gateway.set()
                    # Stage 2: simulated workers finish the job in hand.
                    self.stopping.workers.set()
                    workers.cancel_scope.deadline = trio.current_time() + WORKER_STOP_S
                # Stage 3: the hot path drains what it claimed; billing finishes its batch.
                self.stopping.consumers.set()

    def _variant_secret_path(self) -> Path:
        if self.cfg.gateway.variant_secret_path:
            return Path(self.cfg.gateway.variant_secret_path)
        return self.cfg.data.dir / "secrets" / "variant_hmac.key"


@contextlib.asynccontextmanager
async def open_daemon(
    cfg: Config, redis_url: str, pg_url: str, **kwargs: Any
) -> AsyncIterator[Daemon]:
    """Run a daemon in the background of the caller (tests, tools); stop it gracefully on exit.
    ``kwargs`` go to :class:`Daemon` (``services=``, fault points…)."""
    daemon = Daemon(cfg, redis_url, pg_url, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.request_stop()
