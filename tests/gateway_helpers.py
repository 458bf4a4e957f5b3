"""Helpers of the gateway tests: a GPU worker the test drives by hand, and small readers.

The worker speaks the worker contract (docs/workers.md) with the very Lua scripts the package ships
to workers, through its own Redis client — so a test decides exactly when a job is pulled and when
it finishes, and can look at the queue in between.
"""

from __future__ import annotations

from typing import Any

from daemon.contracts import Job, Keys
from daemon.workers.audio import wav_bytes
from tests import worker_side
from tests.helpers import WsClient, redis_call, wait_until

__all__ = ["ManualWorker", "job_ids", "queue_ids", "status_frames"]


class ManualWorker:
    """Pull and finish jobs when the test says so (run the daemon with ``workers.simulated=0``)."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url

    async def pull(self, model: str = "kokoro") -> Job | None:
        return await worker_side.pull(self.redis_url, model)

    async def pull_wait(self, model: str = "kokoro") -> Job:
        return await wait_until(lambda: self.pull(model), what=f"a {model} job to pull")

    async def finish(self, job: Job, *, error: str | None = None) -> None:
        """Push the job's result as a worker does; the daemon's hot path takes it from there."""
        if error is None:
            payload = worker_side.result_json(
                job, wav_bytes(200), duration_ms=200, content_type="audio/wav"
            )
        else:
            payload = worker_side.result_json(job, error=error)
        await worker_side.push(self.redis_url, job, payload)


async def queue_ids(redis_url: str, model: str = "kokoro") -> list[str]:
    return [m.decode() for m in await redis_call(redis_url, "ZRANGE", Keys.queue(model), 0, -1)]


async def job_ids(redis_url: str) -> list[str]:
    return [k.decode() for k in await redis_call(redis_url, "HKEYS", Keys.JOBS)]


def status_frames(client: WsClient, document_id: str, block_idx: int) -> list[dict[str, Any]]:
    return [
        f
        for f in client.frames
        if f.get("type") == "status"
        and f["document_id"] == document_id
        and f["block_idx"] == block_idx
    ]
