"""The worker loop: pull a job atomically, synthesize it with an adapter, push the result.

A real GPU model plugs in by writing one adapter::

    class MyModel:
        async def synthesize(self, job: Job) -> Synthesized: ...

and running ``tts-worker --adapter mypackage.module:MyModel --redis-url redis://...``. Workers need
only Redis. A worker that dies holding a job loses nothing: the job stays in
``tts:processing:{model}`` and the daemon's visibility scanner puts it back in the queue.

An adapter may also synthesize batches (a GPU is faster on a batch): give it ``batch_size > 1`` and
``async def synthesize_batch(jobs) -> list[Synthesized | Exception]``. The worker then pulls up to
``batch_size`` jobs and pushes their results together, in one round trip.

While it holds jobs a worker renews a lease on them every ``lease_s / 3`` (``renew.lua``): the
scanner requeues a job only once its lease lapsed, so a long job of a live worker is never run
twice, and a dead worker's jobs come back within a lease or so. The same renewal announces the
worker in the registry (``tts:workers``: id, version, models, last renewal), idle or not.
"""

from __future__ import annotations

import base64
import importlib.metadata
import itertools
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import trio

from daemon.contracts import ContractError, Job, Result
from daemon.runtime.backoff import Backoff
from daemon.stores.redis import RedisStore, is_redis_unavailable

__all__ = ["DEFAULT_LEASE_S", "Adapter", "BatchAdapter", "Synthesized", "run_worker"]

# How long a lease lasts unless renewed (workers.lease_s, tts-worker --lease-s).
DEFAULT_LEASE_S = 10.0

# How long a worker keeps trying to hand back finished results while Redis is unreachable, once
# it has been asked to stop. (While running it keeps trying: the audio cost GPU time.)
PUSH_GIVE_UP_S = 30.0


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
    job: Job, out: Synthesized | BaseException, worker_id: str, pulled_at: float, t0: float
) -> Result:
    common = {
        "worker_id": worker_id,
        "queue_wait_ms": max(0.0, (pulled_at - job.enqueued_at) * 1000.0),
        "processing_time_ms": (time.perf_counter() - t0) * 1000.0,
    }
    if isinstance(out, BaseException):
        return Result.for_job(job, error=f"synthesis failed: {out}", **common)
    return Result.for_job(
        job,
        audio_base64=base64.b64encode(out.audio).decode(),
        duration_ms=out.duration_ms,
        content_type=out.content_type,
        **common,
    )


def _checked(out: Any) -> Synthesized | Exception:
    """An adapter's answer for one job, or the error it amounts to."""
    if isinstance(out, Exception):
        return out
    if (
        not isinstance(out, Synthesized)
        or not isinstance(out.audio, bytes | bytearray | memoryview)
        or not isinstance(out.duration_ms, int)
        or out.duration_ms < 0
        or not isinstance(out.content_type, str)
    ):
        return TypeError(f"adapter returned {type(out).__name__}, not a valid Synthesized")
    return out


async def _synthesize(adapter: Any, jobs: list[Job], batch: bool) -> list[Synthesized | Exception]:
    if batch:
        try:
            outs = list(await adapter.synthesize_batch(jobs))
        except Exception as exc:  # the whole batch failed: each job hears of it
            return [exc] * len(jobs)
        if len(outs) != len(jobs):
            err = ValueError(f"adapter returned {len(outs)} results for {len(jobs)} jobs")
            return [err] * len(jobs)
        return [_checked(o) for o in outs]
    results: list[Synthesized | Exception] = []
    for job in jobs:
        try:
            results.append(_checked(await adapter.synthesize(job)))
        except Exception as exc:
            results.append(exc)
    return results


async def _push(
    store: RedisStore, items: list[tuple[str, str, str]], stopping: trio.Event | None
) -> bool:
    """Hand results back, waiting out a Redis outage with backoff. Once stopping, gives up after
    ``PUSH_GIVE_UP_S`` (the jobs stay held and the scanner requeues them). True if pushed."""
    backoff = Backoff(min_s=0.05, max_s=2.0, healthy_after_s=float("inf"))
    give_up_at: float | None = None
    while True:
        try:
            # Shielded: a worker asked to stop finishes handing back what it synthesized.
            with trio.CancelScope(shield=stopping is not None and stopping.is_set()):
                await store.push_results(items)
            return True
        except Exception as exc:
            if not is_redis_unavailable(exc):
                raise
        if stopping is not None and stopping.is_set():
            now = trio.current_time()
            give_up_at = give_up_at if give_up_at is not None else now + PUSH_GIVE_UP_S
            if now >= give_up_at:
                return False
        await trio.sleep(backoff.next_delay(0.0))


def _version() -> str:
    try:
        return importlib.metadata.version("tts-daemon")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Leases:
    """The jobs a worker holds, renewed together with its registry entry (``renew.lua``)."""

    def __init__(
        self, store: RedisStore, worker_id: str, models: Sequence[str], lease_s: float, adapter: Any
    ) -> None:
        self.store, self.worker_id, self.models, self.lease_s = store, worker_id, models, lease_s
        self.held: dict[str, str] = {}  # job id → model
        self.entry = {
            "version": _version(),
            "models": list(models),
            "adapter": f"{type(adapter).__module__}.{type(adapter).__qualname__}",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": time.time(),
        }

    async def renew(self) -> None:
        """Renew now; a Redis outage is left to the next renewal."""
        jobs = [(model, job_id) for job_id, model in self.held.items()]
        try:
            await self.store.renew(
                self.worker_id,
                {**self.entry, "jobs": len(jobs)},
                lease_s=self.lease_s,
                models=self.models,
                jobs=jobs,
            )
        except Exception as exc:
            if not is_redis_unavailable(exc):
                raise

    async def run(self) -> None:
        while True:
            await self.renew()
            await trio.sleep(self.lease_s / 3)


async def run_worker(
    store: RedisStore,
    adapter: Adapter,
    *,
    models: Sequence[str],
    worker_id: str,
    stopping: trio.Event | None = None,
    idle_min_s: float = 0.002,
    idle_max_s: float = 0.05,
    lease_s: float | None = DEFAULT_LEASE_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Pull and synthesize until cancelled or ``stopping`` is set (the job in hand is finished).

    Started as soon as it is about to pull. Polls an empty queue with a backoff from ``idle_min_s``
    to ``idle_max_s``. An adapter exception, or an answer that is not a :class:`Synthesized`,
    becomes an ``error`` result (clients hear of it). A Redis outage is waited out with backoff,
    and results already synthesized are held until they can be pushed. Held jobs are leased for
    ``lease_s`` and renewed every third of it; ``None``: no leases and no registry entry (a
    worker that predates them: the scanner's visibility timeout applies).
    """
    if lease_s is None:
        await _work(
            store, adapter, models, worker_id, stopping, idle_min_s, idle_max_s, None, task_status
        )
        return
    leases = _Leases(store, worker_id, models, lease_s, adapter)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(leases.run)
        await _work(
            store, adapter, models, worker_id, stopping, idle_min_s, idle_max_s, leases, task_status
        )
        nursery.cancel_scope.cancel()


async def _work(
    store: RedisStore,
    adapter: Adapter,
    models: Sequence[str],
    worker_id: str,
    stopping: trio.Event | None,
    idle_min_s: float,
    idle_max_s: float,
    leases: _Leases | None,
    task_status: trio.TaskStatus[None],
) -> None:
    batch_size = max(1, int(getattr(adapter, "batch_size", 1)))
    batch = batch_size > 1 and hasattr(adapter, "synthesize_batch")
    idle = idle_min_s
    outage = Backoff(min_s=0.1, max_s=5.0, healthy_after_s=float("inf"))
    turn = itertools.count()
    task_status.started()
    while stopping is None or not stopping.is_set():
        try:
            jobs = await _pull_some(store, models, next(turn), batch_size if batch else 1)
        except Exception as exc:
            if not is_redis_unavailable(exc):
                raise
            await trio.sleep(outage.next_delay(0.0))
            continue
        outage.reset()
        if not jobs:
            await trio.sleep(idle)
            idle = min(idle * 2, idle_max_s)
            continue
        idle = idle_min_s
        pulled_at = time.time()
        t0 = time.perf_counter()
        if leases is not None:
            leases.held.update((job.job_id, job.model) for job in jobs)
            await leases.renew()  # leased from the start, not from the next renewal
        outs = await _synthesize(adapter, jobs, batch)
        items = [
            (job.model, job.job_id, _result(job, out, worker_id, pulled_at, t0).to_json())
            for job, out in zip(jobs, outs, strict=True)
        ]
        # A push that fails for good leaves the jobs in processing: the scanner requeues them
        # once their lease lapses (it is no longer renewed).
        await _push(store, items, stopping)
        if leases is not None:
            for job in jobs:
                leases.held.pop(job.job_id, None)
