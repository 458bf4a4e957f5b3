"""Redis restarts under a running daemon and a running worker: they ride it out, nothing restarts.

Each test has a Redis of its own (AOF, ``appendfsync always``) so that it can kill and restart it
without touching the session's servers. Found by tools/chaos: a Redis restart crashed the
gateway service — a critical one: every client connection dropped, and a handful of restarts within
a minute would have stopped the daemon — and killed ``tts-worker`` processes outright.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio_asyncio

from daemon.contracts import Job, Keys, Result
from daemon.embedded import EmbeddedRedis
from daemon.runtime.daemon import open_daemon
from daemon.stores.redis import RedisStore, is_redis_unavailable, open_redis
from daemon.testing.client import WsClient
from daemon.testing.config import make_config
from daemon.testing.stores import add_user, pg_fetch, redis_call
from daemon.testing.waiting import wait_until
from daemon.workers.worker import Synthesized, run_worker

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", tmp_path / "secrets", appendfsync="always")
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)


async def _restart(server: EmbeddedRedis, *, kill: bool) -> None:
    await trio.to_thread.run_sync(lambda: server.stop(kill=kill))
    await trio.sleep(0.3)  # down for a moment: clients see refused connections, not a blip
    await trio.to_thread.run_sync(server.start)


async def test_gateway_rides_out_redis_restarts(
    tmp_path: Path, own_redis: EmbeddedRedis, pg_url: str
) -> None:
    cfg = make_config(tmp_path, supervisor={"intensity": 2, "intensity_window_s": 60.0})
    user_id, token = await add_user(pg_url, "rider", "plus")
    async with open_daemon(cfg, own_redis.url, pg_url) as daemon:
        assert daemon.addresses is not None
        async with WsClient.connect(daemon.addresses.ws_url, token) as client:
            await client.synthesize("doc-0", ["Before the restarts."])
            await client.until(lambda _: 0 in client.terminal("doc-0"))
            # More restarts than the supervisor's intensity allows a critical service.
            for n in range(3):
                await _restart(own_redis, kill=n % 2 == 1)
                # The same connection, after each restart: a fresh block comes back cached.
                doc = f"doc-{n + 1}"
                with trio.fail_after(30):
                    while doc not in {f.get("document_id") for f in client.frames}:
                        await client.synthesize(doc, [f"After restart number {n + 1}."])
                        frame = await client.receive()
                        if frame.get("type") == "error":  # still reconnecting: try again
                            await trio.sleep(0.2)
                await client.until(lambda _, doc=doc: 0 in client.terminal(doc))
                assert client.terminal(doc)[0]["status"] == "cached"
        assert daemon.supervisor.states["gateway"].restarts == 0
        assert daemon.supervisor.state("gateway") == "running"
        # Billed while the daemon runs (a stopping daemon finishes its batch, not the backlog).
        rows = await wait_until(
            lambda: _rows_at_least(pg_url, user_id, 4), what="four usage_log rows", timeout_s=30
        )
    assert len(rows) == 4


async def test_a_block_finished_while_the_gateway_was_resubscribing_reaches_its_client(
    tmp_path: Path, own_redis: EmbeddedRedis, pg_url: str
) -> None:
    """Statuses published while the gateway's listener is away are lost: once it is back it tells
    each client what became of the blocks it waits for, or the client would wait forever. (Here
    the jobs finish within milliseconds of Redis coming back; the listener takes about a second
    to find its way back.)"""
    cfg = make_config(tmp_path, workers={"simulated": 0})
    _, token = await add_user(pg_url, "waiter", "plus")
    async with (
        trio_asyncio.open_loop(),
        open_redis(own_redis.url, command_timeout_s=2.0) as store,
        open_daemon(cfg, own_redis.url, pg_url) as daemon,
    ):
        assert daemon.addresses is not None
        async with WsClient.connect(daemon.addresses.ws_url, token) as client:
            await client.synthesize("doc", ["Finished during the outage.", "Failed meanwhile."])
            await client.until(lambda _: len(client.statuses("doc")) == 2)
            assert {s[0] for s in client.statuses("doc").values()} == {"queued"}
            await _restart(own_redis, kill=True)
            # At once, while the gateway is still finding its way back: a worker takes both jobs;
            # one succeeds, the other fails.
            adapter = _Outcomes()
            with trio.fail_after(10):
                while True:
                    try:
                        await run_worker_once(store, adapter)
                        break
                    except Exception as exc:
                        if not is_redis_unavailable(exc):  # a bug, not Redis coming back
                            raise
                        await trio.sleep(0.02)
            await client.until(lambda _: len(client.terminal("doc")) == 2)
    terminal = client.terminal("doc")
    assert terminal[0]["status"] == "cached"
    assert terminal[1]["status"] == "error" and terminal[1]["recoverable"] is True
    # one terminal status per block, not two
    assert [s for s in client.statuses("doc")[0] if s == "cached"] == ["cached"]


async def test_a_claim_whose_reply_redis_never_sent_is_finalized_after_the_outage(
    tmp_path: Path, own_redis: EmbeddedRedis, pg_url: str
) -> None:
    """Redis can execute the hot consumer's BLMOVE (and write it to the AOF) and die before its
    reply leaves: the result is then in the consumer's claimed list but not in its hands, and its
    heartbeat says it is alive, so nobody else gives it back. Seen by tools/chaos: the block
    was never delivered nor billed while that daemon lived."""
    cfg = make_config(tmp_path, workers={"simulated": 0})
    user_id, token = await add_user(pg_url, "orphan", "plus")
    async with (
        trio_asyncio.open_loop(),
        open_redis(own_redis.url, command_timeout_s=2.0) as store,
        open_daemon(cfg, own_redis.url, pg_url) as daemon,
    ):
        assert daemon.addresses is not None
        async with WsClient.connect(daemon.addresses.ws_url, token) as client:
            await client.synthesize("doc", ["Claimed, but the reply never came."])
            await client.until(lambda _: 0 in client.statuses("doc"))
            # A worker does the job; its result lands in the daemon's claimed list as a BLMOVE
            # would have put it there — without the daemon hearing of it.
            raw = await store.pull_job("kokoro")
            assert raw is not None
            job = Job.from_json(raw)
            result = Result.for_job(
                job, worker_id="w", queue_wait_ms=1.0, processing_time_ms=1.0,
                audio_base64=base64.b64encode(b"RIFF....WAVE").decode(), duration_ms=100,
                content_type="audio/wav",
            )  # fmt: skip
            await store.execute("LPUSH", Keys.hot_claimed(daemon.instance_id), result.to_json())
            await store.execute("ZREM", Keys.processing("kokoro"), job.job_id)
            # …and then Redis goes down (as it did, before the reply could leave).
            await _restart(own_redis, kill=True)
            await client.until(lambda _: 0 in client.terminal("doc"), timeout_s=20)
        assert client.terminal("doc")[0]["status"] == "cached"
        # Billed while the daemon runs (a stopping daemon finishes its batch, not the backlog).
        rows = await wait_until(
            lambda: _rows_at_least(pg_url, user_id, 1), what="its usage_log row", timeout_s=30
        )
    assert [r["event_id"] for r in rows] == [job.job_id]


class _Outcomes:
    """The first block's job succeeds, the second's fails."""

    async def synthesize(self, job: Job) -> Synthesized:
        if job.block_idx == 1:
            raise RuntimeError("GPU fell over")
        return Synthesized(b"RIFF....WAVE", 100, "audio/wav")


async def run_worker_once(store: RedisStore, adapter: object) -> None:
    """Pull both queued jobs and push their results, as one worker would."""
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_worker(store, adapter, models=["kokoro"], worker_id="w", stopping=stopping)
        )
        await wait_until(lambda: _no_job_left(store), what="both jobs done", timeout_s=10)
        stopping.set()


async def _no_job_left(store: RedisStore) -> bool:
    queued = int(await store.execute("ZCARD", Keys.queue("kokoro")))
    held = int(await store.execute("ZCARD", Keys.processing("kokoro")))
    return queued == 0 and held == 0


async def _rows_at_least(pg_url: str, user_id: int, n: int) -> list[dict] | None:
    rows = await pg_fetch(pg_url, "SELECT * FROM usage_log WHERE user_id = $1", user_id)
    return rows if len(rows) >= n else None


class _HeldAdapter:
    """Synthesizes only when told to: the test decides when the worker has a job in hand."""

    def __init__(self) -> None:
        self.pulled = trio.Event()
        self.release = trio.Event()

    async def synthesize(self, job: Job) -> Synthesized:
        self.pulled.set()
        await self.release.wait()
        return Synthesized(b"RIFF....WAVE", 100, "audio/wav")


def _job(job_id: str) -> Job:
    return Job(
        job_id=job_id,
        variant_hash="v" * 40,
        model="kokoro",
        voice="af_heart",
        text="A job in hand.",
        user_id=1,
        document_id="doc",
        block_idx=0,
        usage_multiplier=1.0,
        enqueued_at=0.0,
    )


@pytest.mark.parametrize("kill", [False, True], ids=["restart", "kill"])
async def test_worker_rides_out_a_redis_restart_with_a_job_in_hand(
    own_redis: EmbeddedRedis, kill: bool
) -> None:
    url = own_redis.url
    job = _job("job-1")
    await redis_call(url, "HSET", Keys.JOBS, job.job_id, job.to_json())
    await redis_call(url, "ZADD", Keys.queue("kokoro"), 0, job.job_id)
    adapter = _HeldAdapter()
    stopping = trio.Event()
    async with (
        trio_asyncio.open_loop(),
        open_redis(url, command_timeout_s=2.0) as store,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(
            lambda task_status: run_worker(
                store, adapter, models=["kokoro"], worker_id="w", stopping=stopping,
                task_status=task_status,
            )
        )  # fmt: skip
        with trio.fail_after(10):
            await adapter.pulled.wait()
        await trio.to_thread.run_sync(lambda: own_redis.stop(kill=kill))
        adapter.release.set()  # the push meets a Redis that is down…
        await trio.sleep(0.5)  # …for half a second (the outage, not a wait for a condition)
        await trio.to_thread.run_sync(own_redis.start)
        raw = await wait_until(
            lambda: redis_call(url, "LRANGE", Keys.RESULTS, 0, -1),
            what="the result pushed once Redis is back",
        )
        assert [json.loads(r)["job_id"] for r in raw] == ["job-1"]
        assert await redis_call(url, "ZCARD", Keys.processing("kokoro")) == 0
        # …and the worker is still pulling: a second job gets done too.
        adapter.pulled, adapter.release = trio.Event(), trio.Event()
        adapter.release.set()
        job2 = _job("job-2")
        await redis_call(url, "HSET", Keys.JOBS, job2.job_id, job2.to_json())
        await redis_call(url, "ZADD", Keys.queue("kokoro"), 0, job2.job_id)
        await wait_until(
            lambda: _llen_at_least(url, Keys.RESULTS, 2), what="the second job's result"
        )
        stopping.set()


async def _llen_at_least(url: str, key: str, n: int) -> bool:
    return int(await redis_call(url, "LLEN", key)) >= n
