"""Worker leases and the worker registry (docs/workers.md, "Leases" and "The registry").

A worker renews a lease on the jobs it holds: the scanner requeues a job only once its lease
lapsed, so a live worker's long job is never run twice, while a killed worker's jobs come back
within a few lease periods even under a long ``workers.visibility_timeout_s``.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_asyncio

from daemon.config import WorkersConfig
from daemon.contracts import Keys
from daemon.runtime.daemon import open_daemon
from daemon.stores.redis import RedisStore, open_redis
from daemon.testing.client import WsClient
from daemon.testing.config import make_config
from daemon.testing.stores import add_user
from daemon.testing.waiting import wait_until
from daemon.testing.worker import r
from daemon.workers.simulated import SimulatedAdapter
from daemon.workers.worker import run_worker
from tests.helpers import usage_rows_at_least
from tests.test_workers import Stalling, _tts_worker, _worker_env

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    async with trio_asyncio.open_loop(), open_redis(redis_url) as s:
        yield s


def _requeued(daemon: Any) -> float:
    return daemon.metrics.registry.get_sample_value("tts_jobs_requeued_total") or 0


async def test_a_live_workers_long_job_is_never_requeued(
    tmp_path: Path, store: RedisStore, redis_url: str, pg_url: str
) -> None:
    """A 3 s job under a 1 s visibility timeout: the worker's lease keeps it (before leases it
    was requeued while its worker was still busy on it, and synthesized twice)."""
    cfg = make_config(
        tmp_path, workers={"simulated": 0, "visibility_timeout_s": 1.0, "scan_interval_s": 0.1}
    )
    async with open_daemon(cfg, redis_url, pg_url) as daemon:
        _, token = await add_user(pg_url, "lea", "plus")
        assert daemon.addresses is not None
        async with WsClient.connect(daemon.addresses.ws_url, token) as client:
            await client.synthesize("doc", ["A long, long block."])
            slow = Stalling(3.0, b"the only take")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: run_worker(store, slow, models=["kokoro"], worker_id="w", lease_s=0.6)
                )
                await client.until(lambda _: 0 in client.terminal("doc"), timeout_s=30)
                nursery.cancel_scope.cancel()
            await wait_until(lambda: usage_rows_at_least(pg_url, 1), what="billed")
        assert _requeued(daemon) == 0
        assert client.statuses("doc")[0].count("queued") == 1  # never requeued
        assert client.terminal("doc")[0]["status"] == "cached"
        assert await r(redis_url, "HGET", Keys.RETRIES, "x") is None
        assert await r(redis_url, "HLEN", Keys.RETRIES) == 0


async def test_a_killed_workers_jobs_return_within_a_few_leases(
    tmp_path: Path, store: RedisStore, redis_url: str, pg_url: str
) -> None:
    """Under a 300 s visibility timeout, a SIGKILLed worker's jobs still come back at once: its
    lease (0.5 s) lapses. Another worker finishes them; one bill each."""
    cfg = make_config(
        tmp_path, workers={"simulated": 0, "visibility_timeout_s": 300.0, "scan_interval_s": 0.1}
    )
    async with open_daemon(cfg, redis_url, pg_url) as daemon:
        _, token = await add_user(pg_url, "kim", "plus")
        assert daemon.addresses is not None
        async with WsClient.connect(daemon.addresses.ws_url, token) as client:
            await client.synthesize("doc", ["Held by the doomed.", "Also held."])
            stuck = subprocess.Popen(
                _tts_worker(
                    "--redis-url", redis_url, "--simulated", "--latency-ms", "600000",
                    "--batch", "2", "--models", "kokoro", "--lease-s", "0.5",
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=_worker_env(),
            )  # fmt: skip
            try:
                await wait_until(
                    lambda: _leased(redis_url, 2), what="both jobs held and leased", timeout_s=30
                )
                stuck.send_signal(signal.SIGKILL)
                assert await trio.to_thread.run_sync(stuck.wait) == -signal.SIGKILL
            finally:
                if stuck.poll() is None:
                    stuck.kill()
                    stuck.wait()
            killed_at = trio.current_time()
            await wait_until(lambda: _requeued(daemon) >= 2, what="both requeued", timeout_s=10)
            assert trio.current_time() - killed_at < 10  # not the 300 s visibility timeout
            async with trio.open_nursery() as nursery:
                adapter = SimulatedAdapter(WorkersConfig(latency_ms=1.0, jitter_ms=0.0))
                nursery.start_soon(
                    lambda: run_worker(store, adapter, models=["kokoro"], worker_id="healthy")
                )
                await client.until(lambda _: len(client.terminal("doc")) == 2, timeout_s=30)
                nursery.cancel_scope.cancel()
        rows = await wait_until(lambda: usage_rows_at_least(pg_url, 2), what="both billed")
    assert len({row["event_id"] for row in rows}) == 2 == len(rows)


async def _leased(redis_url: str, n: int) -> bool:
    return int(await r(redis_url, "ZCARD", Keys.leases("kokoro"))) == n


async def test_the_registry_shows_live_workers_per_model_and_version(
    tmp_path: Path, store: RedisStore, redis_url: str, pg_url: str
) -> None:
    cfg = make_config(tmp_path, workers={"simulated": 0})
    async with open_daemon(cfg, redis_url, pg_url) as daemon:
        assert daemon.addresses is not None
        adapter = SimulatedAdapter(WorkersConfig())
        async with (
            trio.open_nursery() as nursery,
            httpx.AsyncClient(base_url=daemon.addresses.ops_url) as http,
        ):
            for i, models in enumerate((["kokoro"], ["kokoro", "premium"])):
                nursery.start_soon(
                    lambda models=models, i=i: run_worker(
                        store, adapter, models=models, worker_id=f"gpu-{i}", lease_s=0.3
                    )
                )

            async def live() -> dict[str, Any] | None:
                workers = (await http.get("/healthz")).json()["workers"]
                return workers if workers["kokoro"]["live"] == 2 else None

            workers = await wait_until(live, what="both workers live")
            assert workers["premium"]["live"] == 1
            assert sum(workers["kokoro"]["versions"].values()) == 2
            metrics = (await http.get("/metrics")).text
            assert 'tts_workers_live{model="kokoro",version="all"} 2.0' in metrics
            dashboard = (await http.get("/dashboard/data")).json()
            assert dashboard["workers"]["premium"]["live"] == 1
            nursery.cancel_scope.cancel()

        async def gone() -> bool:
            async with httpx.AsyncClient(base_url=daemon.addresses.ops_url) as http:
                health = (await http.get("/healthz")).json()
            return health["workers"]["kokoro"]["live"] == 0

        await wait_until(gone, what="stopped workers no longer live")
