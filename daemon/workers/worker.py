"""The worker loop: pull a job atomically, synthesize it with an adapter, push the result.

A real GPU model plugs in by writing one adapter::

    class MyModel:
        async def synthesize(self, job: Job) -> Synthesized: ...

and running ``tts-worker --adapter mypackage.module:MyModel --redis-url redis://...``. Workers need
only Redis. A worker that dies holding a job loses nothing: the job stays in
``tts:processing:{model}`` and the daemon's visibility scanner puts it back in the queue.
"""

from __future__ import annotations

import base64
import itertools
import time
from collections.abc import Sequence
from typing import Protocol

import attrs
import trio

from daemon.contracts import ContractError, Job, Result
from daemon.stores.redis import RedisStore, is_redis_unavailable

__all__ = ["Adapter", "Synthesized", "run_worker"]


@attrs.frozen
class Synthesized:
    audio: bytes  # empty: nothing to say (the block is "skipped")
    duration_ms: int
    content_type: str = "audio/wav"


class Adapter(Protocol):
    async def synthesize(self, job: Job) -> Synthesized: ...


class BatchAdapter(Protocol):
    """Optional: an adapter that synthesizes several jobs at once (a GPU batch)."""

    batch_size: int

    async def synthesize_batch(self, jobs: Sequence[Job]) -> list[Synthesized | Exception]: ...


async def _pull_some(store: RedisStore, models: Sequence[str], start: int, n: int) -> list[Job]:
    jobs: list[Job] = []
    for i in range(len(models)):
        model = models[(start + i) % len(models)]
        while len(jobs) < n:
            raw = await store.pull_job(model)
            if raw is None:
                break
            try:
                jobs.append(Job.from_json(raw))
            except ContractError:
                # Left in tts:processing: the scanner retries it and, in the end, dead-letters it.
                continue
        if len(jobs) >= n:
            break
    return jobs


def _result(
    job: Job, out: Synthesized | Exception, worker_id: str, pulled_at: float, t0: float
) -> Result:
    common = {
        "worker_id": worker_id,
        "queue_wait_ms": max(0.0, (pulled_at - job.enqueued_at) * 1000.0),
        "processing_time_ms": (time.perf_counter() - t0) * 1000.0,
    }
    if isinstance(out, Exception):
        return Result.for_job(job, error=f"synthesis failed: {out}", **common)
    return Result.for_job(
        job,
        audio_base64=base64.b64encode(out.audio).decode(),
        duration_ms=out.duration_ms,
        content_type=out.content_type,
        **common,
    )


async def run_worker(
    store: RedisStore,
    adapter: Adapter,
    *,
    models: Sequence[str],
    worker_id: str,
    stopping: trio.Event | None = None,
    idle_min_s: float = 0.002,
    idle_max_s: float = 0.05,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Pull and synthesize until cancelled or ``stopping`` is set (the job in hand is finished).

    Started as soon as it is about to pull. Polls an empty queue with a backoff from ``idle_min_s``
    to ``idle_max_s``. An adapter exception becomes an ``error`` result (clients hear of it); a
    Redis outage is waited out with backoff.
    """
    batch_size = getattr(adapter, "batch_size", 1)
    idle = idle_min_s
    turn = itertools.count()
    task_status.started()
    while stopping is None or not stopping.is_set():
        try:
            jobs = await _pull_some(store, models, next(turn), batch_size)
        except Exception as exc:
            if not is_redis_unavailable(exc):
                raise
            await trio.sleep(idle_max_s * 20)
            continue
        if not jobs:
            await trio.sleep(idle)
            idle = min(idle * 2, idle_max_s)
            continue
        idle = idle_min_s
        pulled_at = time.time()
        t0 = time.perf_counter()
        outs: list[Synthesized | Exception]
        if batch_size > 1 and hasattr(adapter, "synthesize_batch"):
            outs = await adapter.synthesize_batch(jobs)
        else:
            outs = []
            for job in jobs:
                try:
                    outs.append(await adapter.synthesize(job))
                except Exception as exc:
                    outs.append(exc)
        for job, out in zip(jobs, outs, strict=True):
            result = _result(job, out, worker_id, pulled_at, t0)
            await _push(store, job, result.to_json(), stopping)


# A push that meets a Redis outage is retried this often at most; while stopping, for this long.
PUSH_RETRY_MAX_S = 1.0
STOPPING_PUSH_S = 5.0


async def _push(store: RedisStore, job: Job, result_json: str, stopping: trio.Event | None) -> None:
    """Push a result, waiting out a Redis outage: it is GPU time already spent, and a worker that
    died here would take its other jobs with it. Pushing twice is harmless (the hot path finalizes
    a job once). While stopping, give up after ``STOPPING_PUSH_S``: the job stays in processing
    and the visibility scanner gives it another go."""
    delay = 0.05
    stopping_now = stopping is not None and stopping.is_set()
    with trio.CancelScope(shield=stopping_now) as scope:
        if stopping_now:
            scope.deadline = trio.current_time() + STOPPING_PUSH_S
        while True:
            try:
                await store.push_result(job.model, job.job_id, result_json)
                return
            except Exception as exc:
                if not is_redis_unavailable(exc):
                    raise
            await trio.sleep(delay)
            delay = min(delay * 2, PUSH_RETRY_MAX_S)
