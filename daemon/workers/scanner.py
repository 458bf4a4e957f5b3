"""The visibility scanner: jobs whose lease lapsed (or, for workers that do not renew one, held
longer than ``workers.visibility_timeout_s``) go back to the queue, or to the DLQ. It also keeps
the dead-letter lists within ``dead_letters.*`` and the worker registry free of long-gone workers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import trio

from daemon.config import DeadLettersConfig, WorkersConfig
from daemon.contracts import Keys
from daemon.contracts.events import Error
from daemon.ops.events import EventLog
from daemon.ops.metrics import Metrics
from daemon.runtime.outage import Outage
from daemon.stores.redis import RedisStore, is_redis_unavailable

__all__ = ["run_visibility_scanner", "scan_once"]


# Dead letters and the registry are tidied this often (seconds), not at every scan.
TIDY_EVERY_S = 5.0
# A registry entry not renewed for this long is dropped (the worker is gone).
FORGET_WORKER_AFTER_S = 3600.0


def dead_letter_keys(models: Sequence[str]) -> dict[str, list[str]]:
    """The dead-letter lists by kind (``tts-daemon dead-letters --kind``)."""
    return {
        "results": [Keys.RESULTS_DEAD],
        "billing": [Keys.BILLING_DEAD],
        "jobs": [Keys.dlq(m) for m in models],
    }


async def tidy(
    store: RedisStore, models: Sequence[str], dead_letters: DeadLettersConfig, now: float
) -> None:
    """Bound every dead-letter list; forget workers not renewed for an hour."""
    for keys in dead_letter_keys(models).values():
        for key in keys:
            await store.trim_dead_letters(
                key, max_entries=dead_letters.max_entries, max_age_s=dead_letters.max_age_s
            )
    gone = [
        worker_id
        for worker_id, entry in (await store.workers()).items()
        if not isinstance(entry.get("last_renewal"), int | float)
        or entry["last_renewal"] < now - FORGET_WORKER_AFTER_S
    ]
    await store.forget_workers(gone)


async def scan_once(
    store: RedisStore,
    models: Sequence[str],
    cfg: WorkersConfig,
    events: EventLog,
    metrics: Metrics,
    dead_letters: DeadLettersConfig = DeadLettersConfig(),
) -> tuple[int, int]:
    total_requeued = total_dead = 0
    for model in models:
        requeued, dead = await store.requeue_stale(
            model,
            visibility_timeout_s=cfg.visibility_timeout_s,
            max_retries=cfg.max_retries,
            dlq_cap=dead_letters.max_entries,
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
    dead_letters: DeadLettersConfig = DeadLettersConfig(),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Scan every ``scan_interval_s`` until ``stopping``. Started at once; Redis outages are
    logged and waited out (the scan is idempotent)."""
    outage = Outage("scanner", events)
    task_status.started()
    tidied = -TIDY_EVERY_S
    while not stopping.is_set():
        try:
            await scan_once(store, cfg.models, cfg, events, metrics, dead_letters)
            if trio.current_time() - tidied >= TIDY_EVERY_S:
                await tidy(store, cfg.models, dead_letters, time.time())
                tidied = trio.current_time()
        except Exception as exc:
            if not is_redis_unavailable(exc):
                raise
            await outage.failed(exc, "Redis")
            continue
        outage.ok()
        with trio.move_on_after(cfg.scan_interval_s):
            await stopping.wait()
