"""The visibility scanner: jobs a worker held too long go back to the queue, or to the DLQ."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from daemon.config import WorkersConfig
from daemon.contracts.events import Error
from daemon.ops.events import EventLog
from daemon.ops.metrics import Metrics
from daemon.runtime.outage import Outage
from daemon.stores.redis import RedisStore, is_redis_unavailable

__all__ = ["run_visibility_scanner", "scan_once"]


async def scan_once(
    store: RedisStore, models: Sequence[str], cfg: WorkersConfig, events: EventLog, metrics: Metrics
) -> tuple[int, int]:
    total_requeued = total_dead = 0
    for model in models:
        requeued, dead = await store.requeue_stale(
            model, visibility_timeout_s=cfg.visibility_timeout_s, max_retries=cfg.max_retries
        )
        total_requeued += requeued
        total_dead += dead
        if requeued:
            metrics.jobs_requeued.inc(requeued)
        if dead:
            metrics.jobs_dead_lettered.inc(dead)
            events.emit(
                Error(
                    service="scanner",
                    message=f"{dead} job(s) of model {model} failed {cfg.max_retries} times: "
                    "moved to the DLQ",
                    context={"model": model, "dead_lettered": dead},
                )
            )
    return total_requeued, total_dead


async def run_visibility_scanner(
    store: RedisStore,
    cfg: WorkersConfig,
    events: EventLog,
    metrics: Metrics,
    *,
    stopping: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Scan every ``scan_interval_s`` until ``stopping``. Started at once; Redis outages are
    logged and waited out (the scan is idempotent)."""
    outage = Outage("scanner", events)
    task_status.started()
    while not stopping.is_set():
        try:
            await scan_once(store, cfg.models, cfg, events, metrics)
        except Exception as exc:
            if not is_redis_unavailable(exc):
                raise
            await outage.failed(exc, "Redis")
            continue
        outage.ok()
        with trio.move_on_after(cfg.scan_interval_s):
            await stopping.wait()
