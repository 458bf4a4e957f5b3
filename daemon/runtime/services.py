"""The daemon's services, as data: :func:`build_services` returns the list the daemon runs.

Each service is a :class:`~daemon.runtime.supervisor.ServiceSpec`: its name, its run function
(which calls ``task_status.started(handle)`` once its resources are up), its restart policy and
the stage it stops in. :func:`build_services` is a plain function of the configuration and the
daemon's shared resources (:class:`Deps`); a tool that runs another architecture (the pre-split
inline billing of ``tools/inline.py``, the one-task-per-result baseline of
``tools/bench_hot.py``) passes the daemon a function returning a different list.

The list, in start order (docs/tts-flow.md, "Services"):

============  ==========  ========  =========================================================
name          stage       critical  handle (``started(...)``)
============  ==========  ========  =========================================================
scanner       consumers   no        None
hot           consumers   yes       :class:`~daemon.hot.consumer.HotConsumer`
billing       consumers   no        :class:`~daemon.billing.consumer.BillingConsumer` (pool)
persister     consumers   no        :class:`~daemon.audio.persister.Persister` (``audio.enabled``)
monitor       consumers   no        :class:`~daemon.ops.monitor.Monitor` (``monitor.enabled``)
mirror        consumers   no        :class:`~daemon.billing.mirror.MirrorService`
worker-N      workers     no        None (``workers.simulated`` of them, ``workers.engine``)
gateway       gateway     yes       :class:`GatewayHandle` (gateway, bound addresses)
ops           gateway     no        the operations listener's port (/healthz, /metrics, …)
============  ==========  ========  =========================================================
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import attrs
import trio

from daemon.audio.persister import Persister
from daemon.audio.store import FileAudioStore
from daemon.audio.tiers import AudioTiers
from daemon.billing.consumer import BillingSetup, run_billing_consumer
from daemon.billing.mirror import MirrorService
from daemon.config import Config, HotConfig
from daemon.gateway.hashing import VariantHasher
from daemon.gateway.http import HttpApp, serve_ops
from daemon.gateway.service import Gateway, GatewayAddresses
from daemon.hot.consumer import GroupHandler, HotConsumer
from daemon.ops.dashboard import Dashboard
from daemon.ops.events import EventLog
from daemon.ops.health import Health
from daemon.ops.metrics import Metrics, refresh_metrics
from daemon.ops.monitor import Monitor
from daemon.ops.stats import OpsStats
from daemon.runtime.faults import FaultPoint, no_fault
from daemon.runtime.priority import RequestFirst
from daemon.runtime.supervisor import ServiceSpec
from daemon.stores.pg import Catalog, PgPool
from daemon.stores.redis import RedisStore
from daemon.workers.engines import make_adapters
from daemon.workers.scanner import run_visibility_scanner
from daemon.workers.worker import run_worker

__all__ = [
    "BuildServices",
    "Deps",
    "GatewayHandle",
    "Stopping",
    "billing_service",
    "build_services",
    "gateway_service",
    "hot_consumer",
    "hot_service",
    "mirror_service",
    "monitor_service",
    "ops_service",
    "persister_service",
    "scanner_service",
    "worker_services",
]


@attrs.frozen
class Stopping:
    """The staged stop, one event per stage, set in this order (docs/tts-flow.md)."""

    gateway: trio.Event = attrs.Factory(trio.Event)  # stop accepting, close connections
    workers: trio.Event = attrs.Factory(trio.Event)  # finish the job in hand
    consumers: trio.Event = attrs.Factory(trio.Event)  # drain what is claimed, finish the batch


@attrs.frozen
class Deps:
    """What services are built from: the daemon's shared resources, all open and ready before
    :func:`build_services` is called (stores connected, schema migrated, catalog read)."""

    # The entitlements mirror and hold reaper (docs/billing.md): its service keeps Redis's copy
    # whole; the gateway asks it for a user it finds without one.
    mirror: MirrorService

    instance_id: str
    pg_url: str
    store: RedisStore
    request_db: PgPool
    catalog: Catalog
    hasher: VariantHasher
    events: EventLog
    metrics: Metrics
    stats: OpsStats
    priority: RequestFirst
    stopping: Stopping
    health: Health
    dashboard: Dashboard
    # Fault points (tests, the chaos tool): see daemon/runtime/faults.py.
    hot_fault: FaultPoint = no_fault
    billing_fault: FaultPoint = no_fault
    # The durable audio store (None: audio.enabled is false) and the persister's fault point.
    audio_store: FileAudioStore | None = None
    persist_fault: FaultPoint = no_fault


BuildServices = Callable[[Config, Deps], list[ServiceSpec]]


@attrs.frozen
class GatewayHandle:
    """What the gateway service reports: the gateway (its connections) and its bound ports."""

    gateway: Gateway
    addresses: GatewayAddresses


def build_services(cfg: Config, deps: Deps) -> list[ServiceSpec]:
    """The services of ``tts-daemon run``, in start order."""
    return [
        scanner_service(cfg, deps),
        hot_service(cfg, deps),
        billing_service(cfg, deps),
        *persister_service(cfg, deps),
        *monitor_service(cfg, deps),
        mirror_service(cfg, deps),
        *worker_services(cfg, deps),
        gateway_service(cfg, deps),
        ops_service(cfg, deps),
    ]


def mirror_service(cfg: Config, deps: Deps) -> ServiceSpec:
    """The mirror (entitlements and tokens copied from Postgres into Redis, at start and
    whenever Redis lost them) and the reaper of vanished holds. Its first full copy is done
    before the gateway starts: a handshake finds every token."""
    run = functools.partial(deps.mirror.run, stopping=deps.stopping.consumers)
    return ServiceSpec("mirror", run, critical=False)


def ops_service(cfg: Config, deps: Deps) -> ServiceSpec:
    """The operations listener, ``[ops] host``/``port``: /healthz, /metrics, /dashboard apart
    from the gateway (docs/operations.md). Stops with the gateway."""
    app = HttpApp(
        health=deps.health.healthz,
        refresh_metrics=functools.partial(refresh_metrics, deps.metrics, deps.health),
        registry=deps.metrics.registry,
        dashboard=deps.dashboard,
    )
    run = functools.partial(
        serve_ops, app, cfg.ops.host, cfg.ops.port, stopping=deps.stopping.gateway
    )
    return ServiceSpec("ops", run, critical=False, stage="gateway")


def scanner_service(cfg: Config, deps: Deps) -> ServiceSpec:
    """The visibility scanner: requeues jobs whose lease lapsed (or, without a lease, whose
    worker went silent), and bounds the dead-letter lists (docs/workers.md)."""
    run = functools.partial(
        run_visibility_scanner,
        deps.store,
        cfg.workers,
        deps.events,
        deps.metrics,
        stopping=deps.stopping.consumers,
        dead_letters=cfg.dead_letters,
    )
    return ServiceSpec("scanner", run, critical=False)


def hot_consumer(
    cfg: Config,
    deps: Deps,
    *,
    hot_cfg: HotConfig | None = None,
    handle_group: GroupHandler | None = None,
) -> HotConsumer:
    """The hot consumer's state: ``cfg.hot`` unless ``hot_cfg`` is given, and its own group
    handler unless ``handle_group`` is (tools/inline.py gives the pre-split one)."""
    return HotConsumer(
        store=deps.store,
        cfg=hot_cfg if hot_cfg is not None else cfg.hot,
        events=deps.events,
        metrics=deps.metrics,
        consumer_id=deps.instance_id,
        block_s=cfg.redis.block_s,
        max_audio_bytes=cfg.workers.max_audio_bytes,
        dead_letter_cap=cfg.dead_letters.max_entries,
        dead_letter_raw_bytes=cfg.dead_letters.max_raw_bytes,
        fault=deps.hot_fault,
        priority=deps.priority,
        handle_group=handle_group,
        # Stored audio keeps no TTL until the persister has it on disk: only when one runs.
        persist=deps.audio_store is not None,
    )


def hot_service(cfg: Config, deps: Deps, consumer: HotConsumer | None = None) -> ServiceSpec:
    """The hot path (critical). One consumer state across restarts: its counters carry on."""
    consumer = consumer if consumer is not None else hot_consumer(cfg, deps)
    return ServiceSpec("hot", functools.partial(consumer.run, stopping=deps.stopping.consumers))


def billing_service(cfg: Config, deps: Deps) -> ServiceSpec:
    """The billing consumer: restartable, never critical, and the daemon starts without it when
    Postgres is down (it catches up later)."""
    setup = BillingSetup(
        store=deps.store,
        pg_url=deps.pg_url,
        pg_cfg=cfg.postgres,
        cfg=cfg.billing,
        events=deps.events,
        metrics=deps.metrics,
        consumer_name=deps.instance_id,
        block_s=cfg.redis.block_s,
        fault=deps.billing_fault,
        dead_letter_cap=cfg.dead_letters.max_entries,
    )
    run = functools.partial(run_billing_consumer, setup, stopping=deps.stopping.consumers)
    return ServiceSpec("billing", run, critical=False, fail_start_up=False)


def persister_service(cfg: Config, deps: Deps) -> list[ServiceSpec]:
    """Finalized audio from Redis into the durable store (none when ``audio.enabled`` is off).
    Restartable, never critical, like billing: Redis keeps the audio while it is down. One
    persister state across restarts (its counters carry on)."""
    if deps.audio_store is None:
        return []
    persister = Persister(
        redis=deps.store,
        store=deps.audio_store,
        cfg=cfg.audio,
        ttl_s=cfg.hot.audio_ttl_s,
        revisions=dict(cfg.models.revision),
        events=deps.events,
        metrics=deps.metrics,
        consumer=deps.instance_id,
        block_s=cfg.redis.block_s,
        fault=deps.persist_fault,
        priority=deps.priority,
    )
    run = functools.partial(persister.run, stopping=deps.stopping.consumers)
    return [ServiceSpec("persister", run, critical=False, fail_start_up=False)]


def monitor_service(cfg: Config, deps: Deps) -> list[ServiceSpec]:
    """The dashboard's sampler and the live reconciliation (none when ``monitor.enabled`` is
    off). Observation only: it stops with the gateway, at the first stage of a shutdown."""
    if not cfg.monitor.enabled:
        return []
    monitor = Monitor(
        store=deps.store,
        pg_url=deps.pg_url,
        pg_cfg=cfg.postgres,
        cfg=cfg.monitor,
        stats=deps.stats,
        events=deps.events,
        metrics=deps.metrics,
        models=cfg.workers.models,
        connections=deps.health.connections,
    )
    run = functools.partial(monitor.run, stopping=deps.stopping.gateway)
    return [ServiceSpec("monitor", run, critical=False, fail_start_up=False)]


def worker_services(cfg: Config, deps: Deps) -> list[ServiceSpec]:
    """``workers.simulated`` in-process workers with the ``workers.engine`` engine, each its own
    non-critical service."""
    specs = []
    adapters = make_adapters(cfg.workers.engine, cfg.workers, cfg.workers.simulated)
    for i, adapter in enumerate(adapters):
        run = functools.partial(
            run_worker,
            deps.store,
            adapter,
            models=cfg.workers.models,
            worker_id=f"{deps.instance_id}-{cfg.workers.engine}-{i}",
            stopping=deps.stopping.workers,
            lease_s=cfg.workers.lease_s,
        )
        specs.append(ServiceSpec(f"worker-{i}", run, critical=False, stage="workers"))
    return specs


def gateway_args(cfg: Config, deps: Deps) -> dict[str, Any]:
    """What a gateway is built with: for the daemon's own, and for a tool's variant of it (the
    benchmark's Postgres-checked baseline, tools/baseline_gateway.py) so both serve alike."""
    return {
        "cfg": cfg.gateway,
        "store": deps.store,
        "catalog": deps.catalog,
        "hasher": deps.hasher,
        "events": deps.events,
        "metrics": deps.metrics,
        "missing_mirror": deps.mirror.want,
        "priority": deps.priority,
        "audio": AudioTiers(
            deps.store, deps.audio_store, cfg.hot.audio_ttl_s, deps.metrics, deps.events
        ),
        "plan_weights": cfg.plans.weights,
    }


def gateway_service(cfg: Config, deps: Deps, gateway: Gateway | None = None) -> ServiceSpec:
    """The gateway (critical), innermost: the first to stop. One gateway across restarts (its
    rate limits carry on). ``gateway``: another one, built with :func:`gateway_args`."""
    if gateway is None:
        gateway = Gateway(**gateway_args(cfg, deps))

    async def run(
        *, task_status: trio.TaskStatus[GatewayHandle] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(
                functools.partial(gateway.run, stopping=deps.stopping.gateway)
            )
            task_status.started(GatewayHandle(gateway, addresses))

    return ServiceSpec("gateway", run, stage="gateway")
