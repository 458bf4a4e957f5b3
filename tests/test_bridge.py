"""The daemon's asyncio loop survives errors asyncio calls unhandled (trio-asyncio would otherwise
end the whole loop, every service with it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import trio
import trio_asyncio

from daemon.app import open_daemon
from tests.conftest import make_config
from tests.helpers import WsClient, add_user, pg_val, wait_until


async def test_an_unhandled_asyncio_error_is_logged_and_the_daemon_keeps_serving(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    raised = trio.Event()

    async def schedule_a_failing_callback() -> None:
        def boom() -> None:
            raise ConnectionError("unexpected connection_lost() call")

        asyncio.get_running_loop().call_soon(boom)
        await asyncio.sleep(0.05)

    async def fault(point: str) -> None:
        # Runs inside the billing service, i.e. inside the daemon's loop: the same place an
        # asyncpg protocol callback would raise when Postgres drops a connection.
        if point == "billing.before_batch" and not raised.is_set():
            await trio_asyncio.aio_as_trio(schedule_a_failing_callback)()
            raised.set()

    cfg = make_config(tmp_path)
    user_id, token = await add_user(pg_url, "nina", "plus")
    async with open_daemon(cfg, redis_url, pg_url, billing_fault=fault) as daemon:
        errors: list[dict] = []
        daemon.events.add_listener(lambda e: errors.append(e) if e["event"] == "error" else None)
        assert daemon.addresses is not None
        async with WsClient.connect(daemon.addresses.ws_url, token) as client:
            await client.synthesize("doc", ["First block, which wakes billing."])
            await client.until(lambda _: len(client.terminal("doc")) == 1)
            with trio.fail_after(20):
                await raised.wait()
            await wait_until(
                lambda: [e for e in errors if e["service"] == "asyncio"], what="the error event"
            )
            # Still serving, and still billing, after the error.
            await client.synthesize("doc", {1: "Second block, after the error."})
            await client.until(lambda _: len(client.terminal("doc")) == 2)
        await wait_until(
            lambda: _billed(pg_url, user_id, 2), what="both blocks billed", timeout_s=30
        )
        (event,) = [e for e in errors if e["service"] == "asyncio"]
        assert "ConnectionError: unexpected connection_lost() call" in event["exception"]
        assert daemon.supervisor.state("gateway") == "running"
        assert daemon.supervisor.state("hot") == "running"


async def _billed(pg_url: str, user_id: int, n: int) -> bool:
    count = await pg_val(pg_url, "SELECT count(*) FROM usage_log WHERE user_id = $1", user_id)
    return count >= n
