"""Usage holds and the entitlements mirror (docs/billing.md, "Holds and the entitlements mirror").

Limits that hold under a backlog: every accepted block holds its characters until billing settles
it, so concurrent requests of one user — several connections, several daemons — never get more
than the allowance together. The request path reads only Redis: tokens and entitlements are
mirrored from Postgres, and rebuilt when Redis loses them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from daemon.config import Config
from daemon.contracts import Keys
from daemon.runtime.daemon import Daemon, open_daemon
from daemon.testing.client import WsClient, handshake_status
from daemon.testing.config import make_config
from daemon.testing.stores import add_user, in_thread, redis_call
from daemon.testing.stores import credit as credit_sync
from daemon.testing.waiting import wait_until
from daemon.testing.worker import ManualWorker
from tests.helpers import usage_rows


async def credit(pg_url: str, redis_url: str, user_id: int, voice_chars: int) -> None:
    """``tts-daemon credit``'s own code, in a thread."""
    await in_thread(credit_sync, pg_url, redis_url, user_id, voice_chars)


FREE_KOKORO = 20_000


@pytest.fixture
def manual_cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path, workers={"simulated": 0})


@pytest.fixture
async def manual(manual_cfg: Config, redis_url: str, pg_url: str) -> AsyncIterator[Daemon]:
    async with open_daemon(manual_cfg, redis_url, pg_url) as d:
        yield d


def _texts(tag: str, n: int, size: int = 2000) -> list[str]:
    return [f"{tag}-{i:03d} ".ljust(size, "x") for i in range(n)]


async def _held(redis_url: str, user_id: int, usage_type: str = "server_kokoro") -> int:
    value = await redis_call(redis_url, "HGET", Keys.holds(user_id), f"sum:{usage_type}")
    return int(value or 0)


async def _no_holds(redis_url: str, user_id: int) -> bool:
    return not await redis_call(redis_url, "EXISTS", Keys.holds(user_id))


async def _ask(url: str, token: str, doc: str, texts: list[str]) -> list[str]:
    """One connection asks for ``texts``; the first status of each block."""
    async with WsClient.connect(url, token) as client:
        await client.synthesize(doc, texts)
        await client.until(lambda _: len(client.statuses(doc)) == len(texts))
    return [client.statuses(doc)[i][0] for i in range(len(texts))]


async def _burst(urls: list[str], token: str, per_connection: int) -> list[str]:
    """Each url gets one connection asking for ``per_connection`` characters at once; every
    connection stays open until all have their first statuses (a connection that closes gives its
    queued jobs' holds back: docs/billing.md)."""
    out: list[list[str]] = [[] for _ in urls]
    answered = 0
    all_answered = trio.Event()

    async def one(i: int, url: str) -> None:
        nonlocal answered
        doc, texts = f"doc-{i}", _texts(f"c{i}", per_connection // 2000)
        async with WsClient.connect(url, token) as client:
            await client.synthesize(doc, texts)
            await client.until(lambda _: len(client.statuses(doc)) == len(texts))
            out[i] = [client.statuses(doc)[k][0] for k in range(len(texts))]
            answered += 1
            if answered == len(urls):
                all_answered.set()
            await all_answered.wait()

    async with trio.open_nursery() as nursery:
        for i, url in enumerate(urls):
            nursery.start_soon(one, i, url)
    return [s for statuses in out for s in statuses]


# -- one budget ---------------------------------------------------------------------------------


async def test_four_connections_of_a_free_user_get_exactly_its_allowance(
    manual: Daemon, pg_url: str, redis_url: str
) -> None:
    """The issue's case: 10,000 characters on each of four connections at once, nothing billed
    yet (the queue has no workers): 20,000 are accepted, not 40,000."""
    user_id, token = await add_user(pg_url, "frugal", "free")
    assert manual.addresses is not None
    statuses = await _burst([manual.addresses.ws_url] * 4, token, 10_000)
    assert statuses.count("queued") == FREE_KOKORO // 2000
    assert statuses.count("error") == len(statuses) - FREE_KOKORO // 2000
    # the connections closed with their jobs still queued: the jobs left, the holds with them
    await wait_until(lambda: _no_holds(redis_url, user_id), what="holds released")


async def test_two_daemons_share_one_budget(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    user_id, token = await add_user(pg_url, "twice", "free")
    cfg_a = make_config(tmp_path / "a", workers={"simulated": 0})
    cfg_b = make_config(tmp_path / "b", workers={"simulated": 0})
    async with (
        open_daemon(cfg_a, redis_url, pg_url) as a,
        open_daemon(cfg_b, redis_url, pg_url) as b,
    ):
        assert a.addresses is not None and b.addresses is not None
        urls = [a.addresses.ws_url, b.addresses.ws_url] * 2
        statuses = await _burst(urls, token, 10_000)
    assert statuses.count("queued") == FREE_KOKORO // 2000
    assert await _held(redis_url, user_id) <= FREE_KOKORO


# -- holds end ----------------------------------------------------------------------------------


async def test_holds_are_settled_by_billing_and_drop_to_zero(
    daemon: Daemon, pg_url: str, redis_url: str
) -> None:
    user_id, token = await add_user(pg_url, "settled", "free")
    assert daemon.addresses is not None
    async with WsClient.connect(daemon.addresses.ws_url, token) as client:
        await client.synthesize("doc", ["One.", "Two two.", "Three three three."])
        await client.until(lambda _: len(client.terminal("doc")) == 3)
    await wait_until(lambda: _billed(pg_url, user_id, 3), what="three blocks billed")
    await wait_until(lambda: _no_holds(redis_url, user_id), what="holds settled")
    # the mirror now has what billing committed: the next request sees it, not the holds
    ent = await redis_call(redis_url, "HGET", Keys.ent(user_id), "kokoro_used")
    assert int(ent) == len("One.") + len("Two two.") + len("Three three three.")


async def _billed(pg_url: str, user_id: int, n: int) -> bool:
    return len(await usage_rows(pg_url, user_id=user_id)) >= n


async def test_eviction_and_errors_release_holds(
    manual: Daemon, pg_url: str, redis_url: str
) -> None:
    user_id, token = await add_user(pg_url, "mover", "free")
    worker = ManualWorker(redis_url)
    assert manual.addresses is not None
    async with WsClient.connect(manual.addresses.ws_url, token) as client:
        await client.synthesize("doc", _texts("evict", 3, 1000))
        await client.until(lambda _: len(client.statuses("doc")) == 3)
        assert await _held(redis_url, user_id) == 3000
        # one job fails at the worker: never billed, its hold goes
        job = await worker.pull_wait()
        await worker.finish(job, error="GPU on fire")
        await client.until(lambda _: len(client.terminal("doc")) == 1)
        await wait_until(lambda: _held_is(redis_url, user_id, 2000), what="error released")
        # the reader moves on: the two queued jobs leave the queue, their holds with them
        await client.send({"type": "cursor_moved", "document_id": "doc", "block_idx": 0})
        await client.until(lambda fs: any(f.get("type") == "evicted" for f in fs))
    assert await _no_holds(redis_url, user_id)
    # and the allowance is whole again
    statuses = await _ask(manual.addresses.ws_url, token, "again", _texts("again", 10))
    assert statuses == ["queued"] * 10


async def _held_is(redis_url: str, user_id: int, n: int) -> bool:
    return await _held(redis_url, user_id) == n


async def test_a_hold_whose_job_vanished_expires_and_is_counted(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    cfg = make_config(
        tmp_path, workers={"simulated": 0}, holds={"ttl_s": 0.5, "reap_interval_s": 0.2}
    )
    user_id, token = await add_user(pg_url, "ghost", "free")
    async with open_daemon(cfg, redis_url, pg_url) as d:
        assert d.addresses is not None
        async with WsClient.connect(d.addresses.ws_url, token) as client:
            await client.synthesize("doc", _texts("ghost", 2))
            await client.until(lambda _: len(client.statuses("doc")) == 2)
            assert await _held(redis_url, user_id) == 4000
            # the jobs vanish (say, a Redis failover lost them) without any result
            await redis_call(redis_url, "DEL", Keys.JOBS)
            await wait_until(lambda: _no_holds(redis_url, user_id), what="vanished holds expired")
        assert d.metrics.registry.get_sample_value("tts_holds_expired_total") == 2


# -- the mirror ---------------------------------------------------------------------------------


async def test_credit_while_holds_are_open(manual: Daemon, pg_url: str, redis_url: str) -> None:
    """Premium on a free plan: purchased characters only. Holds taken before a credit still
    count after it; the credit adds exactly its characters."""
    user_id, token = await add_user(pg_url, "buyer", "free")
    assert manual.addresses is not None
    url = manual.addresses.ws_url
    premium = "premium"

    async def ask(doc: str, n_chars: int) -> str:
        async with WsClient.connect(url, token) as client:
            await client.synthesize(doc, [doc.ljust(n_chars, "p")], model=premium)
            await client.until(lambda _: 0 in client.statuses(doc))
            return client.statuses(doc)[0][0]

    assert await ask("before", 10) == "error"  # free: no premium characters at all
    await credit(pg_url, redis_url, user_id, 1000)
    async with WsClient.connect(url, token) as holder:
        # 400 characters × 2.0 = 800 held of 1000; the connection stays open, the job queued
        await holder.synthesize("held", ["held".ljust(400, "h")], model=premium)
        await holder.until(lambda _: 0 in holder.statuses("held"))
        assert holder.statuses("held")[0] == ["queued"]
        assert await _held(redis_url, user_id, "premium_voice") == 800
        assert await ask("too-much", 150) == "error"  # 300 > 200 left
        await credit(pg_url, redis_url, user_id, 1000)  # 2000 bought, 800 held: 1200 left
        assert await _held(redis_url, user_id, "premium_voice") == 800
        await holder.synthesize("fits", ["fits".ljust(600, "f")], model=premium)  # 1200
        await holder.until(lambda _: 0 in holder.statuses("fits"))
        assert holder.statuses("fits")[0] == ["queued"]
        assert await ask("no-more", 1) == "error"
        assert await _held(redis_url, user_id, "premium_voice") == 2000


async def test_flushall_rebuilds_the_mirror_and_limits_still_hold(
    manual: Daemon, pg_url: str, redis_url: str
) -> None:
    user_id, token = await add_user(pg_url, "flushed", "free")
    assert manual.addresses is not None
    url = manual.addresses.ws_url
    assert await _ask(url, token, "before", _texts("before", 2)) == ["queued"] * 2

    await redis_call(redis_url, "FLUSHALL")
    # the daemon notices the mirror is gone and copies it back from Postgres
    await wait_until(
        lambda: redis_call(redis_url, "EXISTS", Keys.MIRROR_READY), what="mirror rebuilt"
    )
    assert await redis_call(redis_url, "HGET", Keys.ent(user_id), "kokoro_allow") == b"20000"
    statuses = await _burst([url] * 4, token, 10_000)
    assert statuses.count("queued") == FREE_KOKORO // 2000
    assert manual.metrics.registry.get_sample_value("tts_mirror_rebuilds_total") >= 2


# -- tokens -------------------------------------------------------------------------------------


async def test_revocation_closes_a_live_connection(
    daemon: Daemon, pg_url: str, redis_url: str
) -> None:
    from daemon.stores.mirror import aio_revoke
    from daemon.stores.pg import _init_connection

    user_id, token = await add_user(pg_url, "leaver", "plus")
    assert daemon.addresses is not None
    url = daemon.addresses.ws_url

    def revoke() -> None:
        import asyncio

        import asyncpg
        import redis.asyncio as aioredis

        from daemon.stores.redis import RedisStore

        async def go() -> None:
            pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1, init=_init_connection)
            client = aioredis.Redis.from_url(redis_url)
            try:
                store = RedisStore(client, url=redis_url, command_timeout_s=10.0)
                assert await aio_revoke(pool, store, user_id) == (user_id, 1)
            finally:
                await client.aclose()
                await pool.close()

        asyncio.run(go())

    async with WsClient.connect(url, token) as client:
        await client.synthesize("doc", ["Still here."])
        await client.until(lambda _: 0 in client.terminal("doc"))
        await trio.to_thread.run_sync(revoke)
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as closed:
            while True:
                await client.receive()
    assert closed.value.reason.code == 1008
    status, _ = await handshake_status(url, {"Authorization": f"Bearer {token}"})
    assert status == 401


async def _open_handshake(url: str, token: str, streams: list[trio.SocketStream]) -> int:
    """Send a WebSocket upgrade by hand and keep the connection open; the HTTP status."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    streams.append(stream)
    request = (
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    )
    await stream.send_all(request.encode())
    data = b""
    with trio.fail_after(10):
        while b"\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


async def test_concurrent_handshakes_cannot_pass_the_per_user_cap(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    cfg = make_config(tmp_path, gateway={"max_connections_per_user": 2})
    _, token = await add_user(pg_url, "crowd", "plus")
    async with open_daemon(cfg, redis_url, pg_url) as d:
        assert d.addresses is not None
        statuses: list[int] = []
        streams: list[trio.SocketStream] = []

        async def knock() -> None:
            statuses.append(await _open_handshake(d.addresses.ws_url, token, streams))

        try:
            # every connection stays open until all eight have their answer
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(knock)
        finally:
            for stream in streams:
                await stream.aclose()
    assert sorted(statuses) == [101, 101] + [429] * 6


async def test_failed_token_lookups_are_throttled_per_client_address(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    cfg = make_config(tmp_path, gateway={"auth_failures_per_min": 3})
    _, token = await add_user(pg_url, "honest", "plus")
    async with open_daemon(cfg, redis_url, pg_url) as d:
        assert d.addresses is not None
        url = d.addresses.ws_url
        bad = [
            (await handshake_status(url, {"Authorization": "Bearer tts_guess_" + str(i)}))[0]
            for i in range(5)
        ]
        good, _ = await handshake_status(url, {"Authorization": f"Bearer {token}"})
    assert bad == [401, 401, 401, 429, 429]
    assert good == 429  # the address is throttled: no look-up at all, right or wrong


async def test_a_connection_sending_too_many_frames_is_closed(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    cfg = make_config(tmp_path, gateway={"max_frames_per_s": 5})
    _, token = await add_user(pg_url, "chatty", "plus")
    async with open_daemon(cfg, redis_url, pg_url) as d:
        assert d.addresses is not None
        async with WsClient.connect(d.addresses.ws_url, token) as client:
            frame = json.dumps({"type": "cursor_moved", "document_id": "d", "block_idx": 0})
            with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                for _ in range(50):
                    await client.send(frame)
                while True:
                    await client.receive()
    assert closed.value.reason.code == 1008


# -- no Postgres on the request path ------------------------------------------------------------


def test_request_path_modules_do_not_name_postgres() -> None:
    """The gateway reaches only Redis: no driver, no pool, no ledger code in its source (the
    runtime proof is tests/test_hot_recovery.py, a handshake and audio with Postgres stopped)."""
    forbidden = ("asyncpg", "PgPool", "stores.ledger", "fetch_budget", "lookup_token(token)")
    root = Path(__file__).parent.parent / "daemon" / "gateway"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert not [w for w in forbidden if w in text], f"{path} reaches Postgres"


# -- reconciliation -----------------------------------------------------------------------------


async def test_dashboard_shows_open_holds_and_turns_amber_past_their_ttl(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    import httpx

    from daemon.ops.report import _servers_part

    cfg = make_config(
        tmp_path, workers={"simulated": 0}, holds={"ttl_s": 0.3, "reap_interval_s": 0.1}
    )
    user_id, token = await add_user(pg_url, "waiting", "free")
    async with open_daemon(cfg, redis_url, pg_url) as d:
        assert d.addresses is not None
        async with WsClient.connect(d.addresses.ws_url, token) as client:
            await client.synthesize("doc", _texts("wait", 3, 100))
            await client.until(lambda _: len(client.statuses("doc")) == 3)

            async def holds() -> dict[str, Any]:
                async with httpx.AsyncClient(base_url=d.addresses.ops_url) as http:
                    return (await http.get("/dashboard/data")).json()["holds"]

            # queued longer than the TTL: not expired (its job is there), but amber
            amber = await wait_until(
                lambda: _graded(holds, "amber"), what="the holds tile to turn amber"
            )
            assert amber["open"] == 3
            # tools/report.sh's part of it, beside the running daemon
            servers = await trio.to_thread.run_sync(
                trio.run, _servers_part, cfg, redis_url, pg_url, []
            )
    part = servers["holds"]
    assert part["open"] == 3
    assert part["users"][str(user_id)]["held"] == {"server_kokoro": 300}
    assert part["mismatched"] == []


async def _graded(holds: Any, grade: str) -> Any:
    h = await holds()
    return h if h["grade"] == grade else None
