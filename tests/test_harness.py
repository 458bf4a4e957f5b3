"""The test harness itself (daemon/testing/): its protocol client leaves nothing behind, its
configuration builder and ``setup_database`` give what the daemon expects, and importing the
daemon never imports it (nor pytest).

The leak checks count this process's own TCP sockets connected to the gateway's port: a socket
the client failed to close stays in the process (CLOSE_WAIT once the server has closed), one it
closed is gone at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from daemon.config import load_config
from daemon.runtime.daemon import Daemon, open_daemon
from daemon.testing.client import WsClient, connect
from daemon.testing.config import make_config, write_config
from daemon.testing.figures import pct
from daemon.testing.stores import add_user, pg_val, setup_database

pytestmark = pytest.mark.timeout(60)


def client_sockets(d: Daemon) -> list[psutil._common.pconn]:
    """This process's TCP sockets whose far end is the gateway's WebSocket port."""
    assert d.addresses is not None
    port = int(d.addresses.ws_url.rsplit(":", 1)[1].split("/")[0])
    return [
        c for c in psutil.Process().net_connections(kind="tcp") if c.raddr and c.raddr.port == port
    ]


def client_reader_tasks() -> list[trio.lowlevel.Task]:
    """Running trio-websocket reader tasks of client-side connections (the gateway's own
    connections run the same task, server-side)."""
    out, todo = [], [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        assert task is not None
        frame = getattr(task.coro, "cr_frame", None)
        conn = frame.f_locals.get("self") if frame is not None else None
        if task.name.endswith("_reader_task") and getattr(conn, "is_client", False):
            out.append(task)
        todo.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return out


async def test_rejected_handshakes_leave_no_socket_open(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    cfg = make_config(tmp_path, gateway={"max_connections": 1}, workers={"simulated": 0})
    _, token = await add_user(pg_url, "leaky")
    async with open_daemon(cfg, redis_url, pg_url) as d:
        assert d.addresses is not None
        url = d.addresses.ws_url
        for bad in (None, "tts_not-a-token"):
            with pytest.raises(ConnectionRejected) as rejected:
                async with connect(url, bad):
                    pytest.fail("the handshake should have been rejected")
            assert rejected.value.status_code == 401
            assert client_sockets(d) == []
        async with connect(url, token) as first:  # the one connection the gateway takes
            await first.synthesize("doc", ["One block, to prove the connection is open."])
            assert (await first.receive())["type"] == "status"
            for _ in range(3):
                with pytest.raises(ConnectionRejected) as rejected:
                    async with connect(url, token):
                        pytest.fail("the handshake should have been rejected")
                assert rejected.value.status_code == 503
            assert len(client_sockets(d)) == 1  # the first connection's, nothing else
            assert len(client_reader_tasks()) == 1
        assert client_sockets(d) == []
        assert client_reader_tasks() == []


async def test_a_connection_the_server_closes_first_leaves_no_socket_open(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    cfg = make_config(tmp_path, gateway={"max_message_bytes": 1024}, workers={"simulated": 0})
    _, token = await add_user(pg_url, "big", "unlimited")
    async with open_daemon(cfg, redis_url, pg_url) as d:
        assert d.addresses is not None
        async with WsClient.connect(d.addresses.ws_url, token) as client:
            await client.synthesize("doc", ["a" * 2000])
            with pytest.raises(ConnectionClosed) as closed:
                await client.receive()
            assert closed.value.reason.code == 1009
        assert client_sockets(d) == []


async def test_an_error_in_the_body_propagates_as_itself(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    cfg = make_config(tmp_path, workers={"simulated": 0})
    _, token = await add_user(pg_url, "oops")
    async with open_daemon(cfg, redis_url, pg_url) as d:
        assert d.addresses is not None
        with pytest.raises(KeyError):  # not an ExceptionGroup around it
            async with connect(d.addresses.ws_url, token):
                raise KeyError("the test's own error")
        assert client_sockets(d) == []


def test_config_builder_quick_loops_and_overrides(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, gateway={"max_connections": 7})
    assert cfg.gateway.max_connections == 7
    assert cfg.gateway.ws_port == 0 and cfg.gateway.http_port == 0
    assert cfg.redis.block_s == 0.2  # quick
    assert cfg.data.dir == tmp_path / "data"
    production = make_config(tmp_path, quick=False)
    assert production.redis.block_s == load_config(None).redis.block_s
    # the TOML file says the same as the object
    path = write_config(tmp_path / "d.toml", tmp_path, hot={"concurrency": 3})
    assert load_config(path) == make_config(tmp_path, hot={"concurrency": 3})


def test_write_config_names_a_bad_key(tmp_path: Path) -> None:
    from daemon.config import ConfigError

    with pytest.raises(ConfigError, match="concurrency"):
        write_config(tmp_path / "d.toml", tmp_path, hot={"concurrency": -1})
    assert not (tmp_path / "d.toml").exists()


async def test_setup_database_migrates_and_adds_users(servers: object, pg_url: str) -> None:
    users = await trio.to_thread.run_sync(setup_database, pg_url, ["ann", "bob"], "basic")
    assert [u for u, _ in users] == sorted(u for u, _ in users)
    assert all(t.startswith("tts_") for _, t in users)
    plan = await pg_val(pg_url, "SELECT plan FROM subscriptions WHERE user_id = $1", users[1][0])
    assert plan == "basic"
    # migrating again is a no-op: the users are still there
    await trio.to_thread.run_sync(setup_database, pg_url, [])
    assert await pg_val(pg_url, "SELECT count(*) FROM users") == 2


def test_pct_is_nearest_rank() -> None:
    assert pct([], 99) == 0.0
    assert pct([3.0, 1.0, 2.0], 50) == 2.0
    assert pct(list(range(1, 101)), 99) == 99
    assert pct(list(range(1, 101)), 100) == 100


def test_daemon_imports_without_the_harness_or_pytest() -> None:
    code = (
        "import sys, json, daemon.cli, daemon.runtime.daemon, daemon.workers.cli;"
        "print(json.dumps(sorted(m for m in sys.modules"
        " if m.startswith(('daemon.testing', 'pytest', '_pytest')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == []
