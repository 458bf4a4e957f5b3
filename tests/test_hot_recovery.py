"""The hot path when things go wrong: a consumer that crashes or dies between claim and finalize,
Postgres stopped under it, bursts — and what each result costs in Redis round trips.

Kill-safety is shown in-process: a fault hook stops the consumer between claiming results and
finalizing them (a crash the supervisor restarts, or a daemon cancelled outright, like a process
that died), then everything must be finalized once and billed once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from daemon.embedded import EmbeddedServers
from daemon.runtime.daemon import Daemon, open_daemon
from daemon.stores.redis import RedisStore
from daemon.testing.client import WsClient
from daemon.testing.config import make_config
from daemon.testing.stores import add_user, setup_database
from daemon.testing.waiting import wait_until
from daemon.testing.worker import pull_n, push, r, result_json, settle
from tests.helpers import Events, usage_rows, usage_rows_at_least
from tests.test_hot import NOTHING_LEFT, leftovers

pytestmark = pytest.mark.timeout(120)


def texts(n: int, prefix: str = "Block") -> list[str]:
    return [f"{prefix} number {i}, a sentence to read aloud." for i in range(n)]


async def burst(redis_url: str, payloads: list[tuple[Any, str]]) -> None:
    """Push results the way a batch worker does (``push_result.lua`` each, one pipeline), all
    landing at once (MULTI/EXEC): what the daemon's claims and finalizes cost for a burst then
    does not depend on how a busy machine happens to interleave the pushes with its claims."""
    import redis

    from daemon.contracts import Keys
    from daemon.stores.redis import SCRIPTS

    def go() -> None:
        c = redis.Redis.from_url(redis_url)
        try:
            script = c.register_script(SCRIPTS["push_result"])
            pipe = c.pipeline(transaction=True)
            for job, payload in payloads:
                script(
                    keys=[Keys.RESULTS, Keys.processing(job.model)],
                    args=[payload, job.job_id],
                    client=pipe,
                )
            pipe.execute()
        finally:
            c.close()

    await trio.to_thread.run_sync(go)


def once_each(client: WsClient, doc: str, n: int) -> bool:
    statuses = client.statuses(doc)
    return all(statuses.get(i, []).count("cached") == 1 for i in range(n))


async def test_consumer_crashing_between_claim_and_finalize_loses_nothing_bills_once(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    calls = {"claimed": 0, "finalize": 0}

    async def crash(point: str) -> None:
        calls[point] += 1
        # The 2nd claim and the 3rd finalize crash the consumer: results are claimed, in hand.
        if (point, calls[point]) in (("claimed", 2), ("finalize", 3)):
            raise RuntimeError(f"injected crash at {point}")

    cfg = make_config(tmp_path, workers={"simulated": 0}, hot={"finalize_batch": 4})
    n = 24
    async with open_daemon(cfg, redis_url, pg_url, hot_fault=crash) as daemon:
        events = Events(daemon)
        _, token = await add_user(pg_url, "ivy", "plus")
        assert daemon.addresses is not None
        async with WsClient.connect(daemon.addresses.ws_url, token) as client:
            await client.synthesize("doc", texts(n))
            jobs = await pull_n(redis_url, n)
            for wave in range(3):
                part = jobs[wave * 8 : wave * 8 + 8]
                # each wave also carries a duplicate of its first result
                await burst(
                    redis_url,
                    [(j, result_json(j)) for j in part] + [(part[0], result_json(part[0]))],
                )
                await trio.sleep(0.2)
            await client.until(lambda _: len(client.terminal("doc")) == n, timeout_s=60)
            rows = await wait_until(
                lambda: usage_rows_at_least(pg_url, n), what="every job billed", timeout_s=60
            )
            sentinel = await settle(client, redis_url, pg_url)  # a late duplicate is here now
            assert once_each(client, "doc", n)
        restarts = events.named("service_restarted", service="hot")
    assert len(restarts) == 2, "both injected crashes restarted the consumer"
    assert sorted(row["event_id"] for row in rows) == sorted(j.job_id for j in jobs)
    assert len([r for r in await usage_rows(pg_url) if r["event_id"] != sentinel]) == n
    completes = [e for e in events.named("synthesis_complete") if e.job_id != sentinel]
    assert sorted(e.job_id for e in completes) == sorted(j.job_id for j in jobs)
    assert await leftovers(redis_url) == NOTHING_LEFT


async def test_results_held_by_a_consumer_that_died_are_finalized_by_another(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    """A daemon dies (cancelled at once, no drain) holding claimed results; another daemon on the
    same Redis takes them over when the dead one's heartbeat expires."""
    hang = trio.Event()

    async def hang_forever(point: str) -> None:
        if point == "finalize":
            hang.set()
            await trio.sleep_forever()

    cfg = make_config(tmp_path, workers={"simulated": 0}, hot={"consumer_ttl_s": 1.0})
    n = 12
    _, token = await add_user(pg_url, "jay", "plus")
    async with trio.open_nursery() as nursery:
        first = Daemon(cfg, redis_url, pg_url, hot_fault=hang_forever)
        await nursery.start(first.run)
        assert first.addresses is not None
        async with WsClient.connect(first.addresses.ws_url, token) as client:
            await client.synthesize("doc", texts(n))
            jobs = await pull_n(redis_url, n)
            await burst(redis_url, [(j, result_json(j)) for j in jobs])
            with trio.fail_after(20):
                await hang.wait()
            await wait_until(lambda: _claimed_count(redis_url, n), what="all claimed, none done")
        first.abort()  # dies holding them: no drain, no hand-back
    # Its heartbeat expires before the second daemon starts: the recovery then happens at the
    # second one's start-up, and must be logged there too (it once was not).
    await trio.sleep(cfg.hot.consumer_ttl_s * 1.5)
    assert await usage_rows(pg_url) == []

    second = Daemon(cfg, redis_url, pg_url)
    # Listen from the start: the dead consumer's heartbeat has expired by now, so the second
    # daemon's very first sweep — before it reports started — may be the one that recovers.
    events = Events(second)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        assert second.addresses is not None
        rows = await wait_until(
            lambda: usage_rows_at_least(pg_url, n), what="all billed", timeout_s=30
        )
        async with WsClient.connect(second.addresses.ws_url, token) as client:
            # The listener comes back and asks again: everything is in the cache now.
            await client.synthesize("doc", texts(n))
            await client.until(lambda _: len(client.terminal("doc")) == n)
        assert {f["status"] for f in client.terminal("doc").values()} == {"cached"}
        recovered = events.named("results_recovered")
        second.request_stop()
    assert sum(e.count for e in recovered) == n
    assert sorted(row["event_id"] for row in rows) == sorted(j.job_id for j in jobs)
    assert await leftovers(redis_url) == NOTHING_LEFT


async def _claimed_count(redis_url: str, n: int) -> bool:
    total = 0
    for key in await r(redis_url, "KEYS", "tts:hot:claimed:*"):
        total += int(await r(redis_url, "SCARD", key))
    return total == n


async def test_finalizing_is_bounded_by_concurrency_and_grouped(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    peak = {"in_flight": 0}
    daemon_ref: list[Daemon] = []

    async def observe(point: str) -> None:
        hot = daemon_ref[0].handle("hot") if daemon_ref else None
        if point == "finalize" and hot is not None:
            peak["in_flight"] = max(peak["in_flight"], hot.in_flight)
            await trio.sleep(0.02)  # a slow Redis: groups overlap

    cfg = make_config(
        tmp_path, workers={"simulated": 0}, hot={"concurrency": 5, "finalize_batch": 2}
    )
    n = 40
    async with open_daemon(cfg, redis_url, pg_url, hot_fault=observe) as daemon:
        daemon_ref.append(daemon)
        events = Events(daemon)
        _, token = await add_user(pg_url, "kim", "plus")
        assert daemon.addresses is not None
        async with WsClient.connect(daemon.addresses.ws_url, token) as client:
            await client.synthesize("doc", texts(n))
            jobs = await pull_n(redis_url, n)
            await burst(redis_url, [(j, result_json(j)) for j in jobs])
            await client.until(lambda _: len(client.terminal("doc")) == n)
    groups = [e.group for e in events.named("synthesis_complete")]
    assert len(groups) == n
    assert max(groups) == 2, "a burst is finalized in groups of finalize_batch"
    assert cfg.hot.finalize_batch < peak["in_flight"] <= cfg.hot.concurrency, (
        "several groups at once, never more than concurrency"
    )


async def test_a_result_costs_a_couple_of_round_trips_and_a_burst_far_fewer(
    quiet_counting: tuple[Daemon, dict[str, int]], pg_url: str, redis_url: str
) -> None:
    daemon, crossings = quiet_counting
    _, token = await add_user(pg_url, "lee", "plus")
    assert daemon.addresses is not None
    async with WsClient.connect(daemon.addresses.ws_url, token) as client:
        n = 64
        await client.synthesize("doc", texts(n))
        await client.synthesize("lone", ["A lone block."])
        jobs = await pull_n(redis_url, n + 1)
        lone = next(j for j in jobs if j.document_id == "lone")
        jobs.remove(lone)

        # One result on its own: the claim that brings it, and one finalize.
        before = dict(crossings)
        await push(redis_url, lone, result_json(lone))
        await client.until(lambda _: 0 in client.terminal("lone"))
        lone_cost = {k: crossings[k] - before[k] for k in crossings}

        # A burst of 64: a few claims and a few pipelined finalizes for all of them.
        before = dict(crossings)
        await burst(redis_url, [(j, result_json(j)) for j in jobs])
        await client.until(lambda _: len(client.terminal("doc")) == n)
        burst_cost = {k: crossings[k] - before[k] for k in crossings}
    assert lone_cost["claim_with_results"] == 1 and lone_cost["finalize"] == 1
    round_trips = burst_cost["claim_with_results"] + burst_cost["finalize"]
    assert round_trips <= n / 4, f"{round_trips} round trips for {n} results: {burst_cost}"


@pytest.fixture
async def quiet_counting(
    tmp_path: Path, redis_url: str, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """A daemon whose hot consumer's Redis crossings are counted: claims that brought results,
    and finalize calls. (Each crossing is one round trip.)"""
    counts = {"claim_with_results": 0, "finalize": 0}
    original_claim = RedisStore.claim_results
    original_finalize = RedisStore.finalize_many

    async def claim(self: RedisStore, *a: Any, **kw: Any) -> Any:
        items = await original_claim(self, *a, **kw)
        if items:
            counts["claim_with_results"] += 1
        return items

    async def finalize(self: RedisStore, *a: Any, **kw: Any) -> Any:
        counts["finalize"] += 1
        return await original_finalize(self, *a, **kw)

    monkeypatch.setattr(RedisStore, "claim_results", claim)
    monkeypatch.setattr(RedisStore, "finalize_many", finalize)
    cfg = make_config(tmp_path, workers={"simulated": 0})
    async with open_daemon(cfg, redis_url, pg_url) as d:
        yield d, counts


# -- Postgres stopped ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_hot_path_delivers_while_postgres_is_stopped_and_billing_catches_up(
    tmp_path: Path,
) -> None:
    """Postgres stopped: open connections and a new one (handshake, synthesize) get their audio,
    /healthz says degraded; once it is back, every block is billed exactly once and every hold
    is settled (the request path reads only Redis: docs/billing.md)."""
    servers = EmbeddedServers(tmp_path / "servers")
    await trio.to_thread.run_sync(servers.__enter__)
    try:
        assert servers.redis is not None and servers.postgres is not None
        redis_url, pg_url = servers.redis.url, servers.postgres.url
        await trio.to_thread.run_sync(setup_database, pg_url, [])  # the schema only
        cfg = make_config(
            tmp_path,
            workers={"simulated": 0},
            supervisor={"backoff_min_s": 0.1, "backoff_max_s": 0.5, "intensity": 1000},
            postgres={"acquire_timeout_s": 1.0, "command_timeout_s": 5.0},
        )
        n = 10
        async with open_daemon(cfg, redis_url, pg_url) as daemon:
            events = Events(daemon)
            user_id, token = await add_user(pg_url, "mia", "plus", redis_url=redis_url)
            assert daemon.addresses is not None
            async with WsClient.connect(daemon.addresses.ws_url, token) as client:
                await client.synthesize("doc", texts(n))
                await client.until(lambda _: len(client.statuses("doc")) == n)
                await trio.to_thread.run_sync(servers.postgres.stop)

                # Postgres is down: results still reach the listener as "cached".
                jobs = await pull_n(redis_url, n)
                for job in jobs:
                    await push(redis_url, job, result_json(job))
                await client.until(lambda _: len(client.terminal("doc")) == n, timeout_s=30)
                assert {f["status"] for f in client.terminal("doc").values()} == {"cached"}
                async with httpx.AsyncClient(base_url=daemon.addresses.http_url) as http:
                    audio = await http.get(client.terminal("doc")[0]["audio_url"])
                async with httpx.AsyncClient(base_url=daemon.addresses.ops_url) as http:
                    health = await http.get("/healthz")
                assert audio.status_code == 200
                assert health.status_code == 200, "gateway and hot path are up"
                assert health.json()["status"] == "degraded"
                assert health.json()["postgres"] == "down"
                assert health.json()["billing_queue_depth"] == n, "billing waits in Redis"

                # A new connection during the outage: the handshake and the synthesize read
                # only Redis, so the reader is served.
                async with WsClient.connect(daemon.addresses.ws_url, token) as late:
                    await late.synthesize("late", ["Arrived during the outage."])
                    assert (await late.receive())["status"] == "queued"
                    (late_job,) = await pull_n(redis_url, 1)
                    await push(redis_url, late_job, result_json(late_job))
                    await late.until(lambda _: 0 in late.terminal("late"), timeout_s=30)
                assert late.terminal("late")[0]["status"] == "cached"
                jobs.append(late_job)
                n += 1
                await wait_until(
                    lambda: events.named("service_restarted", service="billing"),
                    what="billing failing while Postgres is down",
                )

                await trio.to_thread.run_sync(servers.postgres.start)
                rows = await wait_until(
                    lambda: usage_rows_at_least(pg_url, n), what="billing caught up", timeout_s=60
                )
        assert sorted(row["event_id"] for row in rows) == sorted(j.job_id for j in jobs)
        assert int(await r(redis_url, "XLEN", "tts:billing")) == 0
        # each hold settled once billing was back: nothing held, nothing billed twice
        await wait_until(
            lambda: _no_key(redis_url, f"tts:holds:{user_id}"), what="every hold settled"
        )
        assert len(await usage_rows(pg_url)) == n
    finally:
        await trio.to_thread.run_sync(servers.close)


async def _no_key(redis_url: str, key: str) -> bool:
    return not await r(redis_url, "EXISTS", key)
