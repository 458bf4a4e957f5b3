"""An external GPU worker driven by hand: docs/workers.md over a Redis client of its own.

Jobs are pulled with the package's ``pull.lua`` and results pushed with ``push_result.lua``,
exactly as a worker in another process (or language) would, through a plain redis-py client in a
worker thread — never the daemon's own loop or pool. The caller decides when a job is pulled and
when it finishes (run the daemon with ``workers.simulated = 0``), and can look at the queue in
between.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import trio

from daemon.contracts import Job, Keys, Result
from daemon.stores.redis import SCRIPTS
from daemon.testing.client import WsClient
from daemon.testing.stores import pg_val, redis_call
from daemon.testing.waiting import wait_until

__all__ = [
    "EchoAdapter",
    "ManualWorker",
    "audio_bytes",
    "job_ids",
    "pull",
    "pull_n",
    "push",
    "push_raw",
    "queue_ids",
    "r",
    "result_json",
    "settle",
    "stage_job",
]


# One raw command on a fresh client (in a thread), under the short name worker tests use.
r = redis_call


async def pull(url: str, model: str = "kokoro") -> Job | None:
    """The worker's atomic pull (``pull.lua``)."""
    raw = await r(url, "EVAL", SCRIPTS["pull"], 6, *Keys.pull_keys(model), *Keys.pull_args())
    return None if raw is None else Job.from_json(raw)


async def pull_n(url: str, n: int, model: str = "kokoro", timeout_s: float = 20) -> list[Job]:
    """Pull ``n`` jobs, waiting for them to be queued."""
    jobs: list[Job] = []
    with trio.fail_after(timeout_s):
        while len(jobs) < n:
            job = await pull(url, model)
            if job is None:
                await trio.sleep(0.02)
            else:
                jobs.append(job)
    return jobs


def audio_bytes(job: Job, size: int = 3000) -> bytes:
    """Distinct, incompressible-looking audio per job (so a mix-up would show)."""
    seed = job.job_id.encode()
    out = bytearray()
    i = 0
    while len(out) < size:
        out += bytes((b * 31 + i * 7 + 11) % 256 for b in seed)
        i += 1
    return bytes(out[:size])


def result_json(job: Job, audio: bytes | None = None, **overrides: Any) -> str:
    """A worker's result for ``job`` (audio by default); ``overrides`` replace fields."""
    if "error" in overrides and overrides["error"] is not None:
        res = Result.for_job(
            job, worker_id="test-worker", queue_wait_ms=3.0, processing_time_ms=7.0, error=""
        )
        data = json.loads(res.to_json())
    else:
        audio = audio_bytes(job) if audio is None else audio
        res = Result.for_job(
            job,
            worker_id="test-worker",
            queue_wait_ms=3.0,
            processing_time_ms=7.0,
            audio_base64=base64.b64encode(audio).decode(),
            duration_ms=1500,
            content_type="audio/ogg",
        )
        data = json.loads(res.to_json())
    data.update(overrides)
    return json.dumps(data)


async def push(url: str, job: Job, payload: str | bytes) -> None:
    """The worker's hand-back (``push_result.lua``): LPUSH the result, drop the processing entry."""
    await r(
        url,
        "EVAL",
        SCRIPTS["push_result"],
        2,
        Keys.RESULTS,
        Keys.processing(job.model),
        payload,
        job.job_id,
    )


async def push_raw(url: str, payload: str | bytes) -> None:
    """A result straight onto ``tts:results`` (for payloads that name no job)."""
    await r(url, "LPUSH", Keys.RESULTS, payload)


async def stage_job(
    url: str,
    text: str,
    *,
    score: float | None = None,
    model: str = "kokoro",
    voice: str = "af_heart",
    block_idx: int = 0,
) -> Job:
    """A job queued the way docs/workers.md describes (job JSON in ``tts:jobs``, id in the queue),
    for worker tests that need no daemon."""
    import time
    import uuid

    enqueued = time.time() if score is None else score
    job = Job(
        job_id=uuid.uuid4().hex,
        variant_hash=uuid.uuid4().hex,
        model=model,
        voice=voice,
        text=text,
        user_id=1,
        document_id="doc",
        block_idx=block_idx,
        usage_multiplier=1.0,
        enqueued_at=enqueued,
    )
    await r(url, "HSET", Keys.JOBS, job.job_id, job.to_json())
    await r(url, "ZADD", Keys.queue(model), enqueued, job.job_id)
    return job


class ManualWorker:
    """Pull and finish jobs when the caller says so (the daemon runs ``workers.simulated=0``)."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url

    async def pull(self, model: str = "kokoro") -> Job | None:
        return await pull(self.redis_url, model)

    async def pull_wait(self, model: str = "kokoro") -> Job:
        return await wait_until(lambda: self.pull(model), what=f"a {model} job to pull")

    async def finish(self, job: Job, *, error: str | None = None) -> None:
        """Push the job's result as a worker does; the daemon's hot path takes it from there."""
        from daemon.workers.audio import wav_bytes

        if error is None:
            payload = result_json(job, wav_bytes(200), duration_ms=200, content_type="audio/wav")
        else:
            payload = result_json(job, error=error)
        await push(self.redis_url, job, payload)


async def queue_ids(redis_url: str, model: str = "kokoro") -> list[str]:
    """The job ids waiting in ``model``'s queue, in order."""
    return [m.decode() for m in await redis_call(redis_url, "ZRANGE", Keys.queue(model), 0, -1)]


async def job_ids(redis_url: str) -> list[str]:
    """The ids of every job the daemon holds (``tts:jobs``)."""
    return [k.decode() for k in await redis_call(redis_url, "HKEYS", Keys.JOBS)]


class EchoAdapter:
    """A trivial adapter for ``tts-worker --adapter daemon.testing.worker:EchoAdapter``: the
    audio is the text's bytes, so a test can check what came back."""

    async def synthesize(self, job: Job) -> Any:
        from daemon.workers.worker import Synthesized

        return Synthesized(job.text.encode(), 100 * len(job.text), "audio/x-echo")


async def settle(client: WsClient, redis_url: str, pg_url: str) -> str:
    """Run one sentinel block of ``client``'s user through the whole pipeline and wait for its
    ``cached`` status and its usage row. Everything published before it has then reached the
    client (one pub/sub connection delivers in order) and everything queued for billing before it
    is billed (the stream is billed in order; one user's events never overtake each other). So a
    test can assert that nothing more arrived, without sleeping. Returns the sentinel's job id."""
    await client.synthesize("settle", ["Sentinel: everything before me has arrived."])
    (job,) = await pull_n(redis_url, 1)
    await push(redis_url, job, result_json(job))
    await client.until(lambda _: 0 in client.terminal("settle"))
    await wait_until(
        lambda: pg_val(pg_url, "SELECT count(*) FROM usage_log WHERE event_id = $1", job.job_id),
        what="the sentinel billed",
    )
    return job.job_id
