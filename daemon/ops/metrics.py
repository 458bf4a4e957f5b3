"""Prometheus metrics (docs/protocol.md), on a registry of the daemon's own.

One registry per daemon instance (not the process-global one), so several daemons can run in one
test process without colliding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from daemon.ops.health import Health

__all__ = ["Metrics", "refresh_metrics"]

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.billing_queue_depth = Gauge(
            "tts_billing_queue_depth", "Billing events produced and not yet billed", registry=r
        )
        # The synthesis queue per model (what an autoscaler of workers reads).
        self.queue_depth = Gauge(
            "tts_queue_depth", "Jobs waiting for a worker", ["model"], registry=r
        )
        self.queue_oldest_age_seconds = Gauge(
            "tts_queue_oldest_age_seconds",
            "Age of the oldest job waiting for a worker (0 when none waits)",
            ["model"],
            registry=r,
        )
        self.queue_users_waiting = Gauge(
            "tts_queue_users_waiting",
            "Users with jobs waiting (fair scheduling shares the workers among them)",
            ["model"],
            registry=r,
        )
        self.billing_events = Counter(
            "tts_billing_events", "Billing events billed (duplicates excluded)", registry=r
        )
        self.billing_duplicates = Counter(
            "tts_billing_duplicates", "Billing events that were already billed", registry=r
        )
        self.billing_dead_letters = Counter(
            "tts_billing_dead_letters", "Malformed billing events dead-lettered", registry=r
        )
        self.billing_batch_seconds = Histogram(
            "tts_billing_batch_seconds", "Time to bill one batch", buckets=_SLOW, registry=r
        )
        self.request_pool_wait_seconds = Histogram(
            "tts_request_pool_wait_seconds",
            "Time the request path waited for a Postgres connection",
            buckets=_FAST,
            registry=r,
        )
        self.ack_seconds = Histogram(
            "tts_ack_seconds", "synthesize received → statuses sent", buckets=_FAST, registry=r
        )
        self.hot_finalize_seconds = Histogram(
            "tts_hot_finalize_seconds",
            "Hot path: result claimed → finalized (stored, notified, billing queued)",
            buckets=_FAST,
            registry=r,
        )
        self.hot_results = Counter(
            "tts_hot_results", "Results handled by the hot path", ["outcome"], registry=r
        )
        self.ws_connections = Gauge("tts_ws_connections", "Open WebSocket connections", registry=r)
        self.service_restarts = Counter(
            "tts_service_restarts", "Services restarted by the supervisor", ["service"], registry=r
        )
        self.requests = Counter(
            "tts_synthesize_requests", "synthesize requests", ["outcome"], registry=r
        )
        self.blocks = Counter(
            "tts_blocks", "Blocks requested, by first status", ["status"], registry=r
        )
        self.jobs_requeued = Counter(
            "tts_jobs_requeued", "Jobs requeued by the visibility scanner", registry=r
        )
        self.workers_live = Gauge(
            "tts_workers_live",
            "Live workers (renewed within three leases) per model; version 'all' or one build",
            ["model", "version"],
            registry=r,
        )
        self.jobs_dead_lettered = Counter(
            "tts_jobs_dead_lettered", "Jobs moved to the DLQ after max_retries", registry=r
        )
        self.request_pool_in_use = Gauge(
            "tts_request_pool_in_use", "Request pool connections in use", registry=r
        )
        self.billing_pool_in_use = Gauge(
            "tts_billing_pool_in_use", "Billing pool connections in use", registry=r
        )
        # -- operations (the live reconciliation, the events log, dead letters) ---------------
        self.reconciliation_delta = Gauge(
            "tts_billing_reconciliation_delta",
            "Synthesized events of the live window neither billed nor waiting in the billing queue",
            registry=r,
        )
        self.billing_oldest_age_seconds = Gauge(
            "tts_billing_oldest_event_age_seconds",
            "Age of the oldest billing event still waiting (0 when the queue is empty)",
            registry=r,
        )
        self.dead_letters = Gauge(
            "tts_dead_letter_depth",
            "Entries in a dead-letter list (tts:dlq:{model}, tts:results:dead, tts:billing:dead)",
            ["queue"],
            registry=r,
        )
        self.errors = Counter(
            "tts_errors",
            "error events logged, by the service that reported them",
            ["service"],
            registry=r,
        )
        self.events_dropped = Counter(
            "tts_events_dropped",
            "Events the log dropped because its writer fell behind",
            registry=r,
        )
        self.monitor_seconds = Histogram(
            "tts_monitor_reconcile_seconds",
            "Time one live reconciliation round took",
            buckets=_SLOW,
            registry=r,
        )
        self.notifications_dropped = Counter(
            "tts_notifications_dropped",
            "Statuses from Redis dropped by a full gateway.notify_buffer (then resynced)",
            registry=r,
        )
        # -- durable audio (docs/tts-flow.md, "The third path: persist") ----------------------
        self.audio_store_bytes = Gauge(
            "tts_audio_store_bytes", "Bytes in the durable audio store (last measure)", registry=r
        )
        self.audio_store_objects = Gauge(
            "tts_audio_store_objects",
            "Audio objects in the durable store (last measure)",
            registry=r,
        )
        self.audio_store_evictions = Counter(
            "tts_audio_store_evictions",
            "Audio objects evicted from the store by its size cap (this daemon's evictions)",
            registry=r,
        )
        self.audio_store_write_errors = Counter(
            "tts_audio_store_write_errors",
            "Persister batches the store refused (disk full, I/O error); retried with backoff",
            registry=r,
        )
        self.audio_persisted = Counter(
            "tts_audio_persisted",
            "Persist entries handled, by outcome (written, existing, missing, damaged)",
            ["outcome"],
            registry=r,
        )
        self.audio_persist_backlog = Gauge(
            "tts_audio_persist_backlog",
            "Finalized audio not yet in the durable store (tts:persist entries)",
            registry=r,
        )
        self.audio_persist_lag_seconds = Gauge(
            "tts_audio_persist_lag_seconds",
            "Age of the oldest audio waiting to be persisted (0 when none)",
            registry=r,
        )
        self.audio_store_hits = Counter(
            "tts_audio_store_hits",
            "Audio found in the durable store and not in Redis, by path (synthesize, http)",
            ["path"],
            registry=r,
        )
        self.holds_open = Gauge(
            "tts_holds_open", "Usage holds open (jobs accepted, not yet billed)", registry=r
        )
        self.holds_settled = Counter(
            "tts_holds_settled_total", "Usage holds settled by billing", registry=r
        )
        self.holds_released = Counter(
            "tts_holds_released_total",
            "Usage holds released without a bill (error, skipped, evicted)",
            registry=r,
        )
        self.holds_expired = Counter(
            "tts_holds_expired_total", "Usage holds expired because their job vanished", registry=r
        )
        self.mirror_rebuilds = Counter(
            "tts_mirror_rebuilds_total",
            "Full rebuilds of the Redis entitlements and token mirror from Postgres",
            registry=r,
        )


async def refresh_metrics(metrics: Metrics, health: Health) -> None:
    """Before a ``/metrics`` scrape: the gauges read from the running daemon (queue depth, pool
    use), and a restart counter for every supervised service."""
    depth = await health.billing_depth()
    if depth is not None:
        metrics.billing_queue_depth.set(depth)
    pools = health.pools()
    metrics.request_pool_in_use.set(pools["request"]["in_use"])
    if pools["billing"]["in_use"] is not None:
        metrics.billing_pool_in_use.set(pools["billing"]["in_use"])
    # Every supervised service has its restart counter from the start (0), so that a scrape
    # shows tts_service_restarts_total{service=...} before the first restart.
    for name in health.supervisor.states:
        metrics.service_restarts.labels(name)
    await health.audio()  # the persist backlog and lag gauges, read fresh
    workers = await health.workers()
    if workers is not None:
        metrics.workers_live.clear()
        for model, seen in workers.items():
            metrics.workers_live.labels(model, "all").set(seen["live"])
            for version, n in seen["versions"].items():
                metrics.workers_live.labels(model, version).set(n)
    for model, q in (await health.queue_stats()).items():
        metrics.queue_depth.labels(model).set(q["depth"])
        metrics.queue_oldest_age_seconds.labels(model).set(q["oldest_age_s"])
        metrics.queue_users_waiting.labels(model).set(q["users"])
