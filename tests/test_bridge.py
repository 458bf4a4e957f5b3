"""The daemon's asyncio loop survives errors asyncio calls unhandled (trio-asyncio would otherwise
end the whole loop, every service with it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import trio
import trio_asyncio

from daemon.runtime.daemon import open_daemon
from daemon.testing.client import WsClient
from daemon.testing.config import make_config
from daemon.testing.stores import add_user, pg_val
from daemon.testing.waiting import wait_until


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
        daemon.events.add_listener(lambda e: errors.append(e) if e.kind == "error" else None)
        assert daemon.addresses is not None
        async with WsClient.connect(daemon.addresses.ws_url, token) as client:
            await client.synthesize("doc", ["First block, which wakes billing."])
            await client.until(lambda _: len(client.terminal("doc")) == 1)
            with trio.fail_after(20):
                await raised.wait()
            await wait_until(
                lambda: [e for e in errors if e.service == "asyncio"], what="the error event"
            )
            # Still serving, and still billing, after the error.
            await client.synthesize("doc", {1: "Second block, after the error."})
            await client.until(lambda _: len(client.terminal("doc")) == 2)
        await wait_until(
            lambda: _billed(pg_url, user_id, 2), what="both blocks billed", timeout_s=30
        )
        (event,) = [e for e in errors if e.service == "asyncio"]
        assert "ConnectionError: unexpected connection_lost() call" in event.context["exception"]
        assert daemon.supervisor.state("gateway") == "running"
        assert daemon.supervisor.state("hot") == "running"


async def _billed(pg_url: str, user_id: int, n: int) -> bool:
    count = await pg_val(pg_url, "SELECT count(*) FROM usage_log WHERE user_id = $1", user_id)
    return count >= n


async def test_the_draining_step_is_installed_and_keeps_asyncio_order() -> None:
    """The loop's step runs ready callbacks back to back (daemon/stores/bridge.py). It relies on
    trio-asyncio internals, so check it is really installed on the version we run, and that
    asyncio still sees what it expects: callbacks in FIFO order (also those scheduled by
    callbacks), timers in deadline order after the ready work, Trio code called from asyncio."""
    from daemon.stores.bridge import install_drain

    order: list[str] = []

    async def asyncio_side() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        # Timers far enough out that no preemption of this process makes them due mid-chain.
        loop.call_later(1.0, order.append, "timer 1 s")
        loop.call_later(0.5, order.append, "timer 0.5 s")

        def chain(i: int) -> None:
            order.append(f"soon {i}")
            if i < 5:
                loop.call_soon(chain, i + 2)  # scheduled after "soon i+1", already queued

        loop.call_soon(chain, 0)
        loop.call_soon(chain, 1)
        loop.call_later(1.5, done.set_result, None)
        await done

        async def trio_side() -> str:
            await trio.sleep(0)
            return "trio"

        order.append(await trio_asyncio.trio_as_aio(trio_side)())

    async with trio_asyncio.open_loop() as loop:
        assert install_drain(loop, 0.001), "trio-asyncio internals moved: the step is not drained"
        with trio.fail_after(10):
            await trio_asyncio.aio_as_trio(asyncio_side)()
    assert order == [
        "soon 0",
        "soon 1",
        "soon 2",
        "soon 3",
        "soon 4",
        "soon 5",
        "soon 6",
        "timer 0.5 s",
        "timer 1 s",
        "trio",
    ]
