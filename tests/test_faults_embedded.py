"""Restarting an embedded server in place: everyone configured with its URL must reach it again.

Found by tools/chaos: Redis killed with clients connected came back on another port, because
the server-side ends of those connections sit in TIME_WAIT and the "is the old port free?" probe
bound without SO_REUSEADDR (which both servers set on their own listeners). Every daemon holding
the old URL then retried forever against a port nobody listened on.
"""

from __future__ import annotations

import concurrent.futures
import os
import pwd
import secrets
import socket
import subprocess
from pathlib import Path

import pytest
import redis

from daemon.embedded import EmbeddedPostgres, EmbeddedRedis
from daemon.embedded.process import _port_free


def _time_wait_port() -> int:
    """A port whose only trace is a server-side connection in TIME_WAIT (the server closed
    first, as a killed server's kernel does)."""
    listener = socket.socket()
    # as Redis and Postgres do on their listeners (accepted connections inherit it)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    listener.close()
    conn.close()  # server side closes first → it goes to TIME_WAIT once the client closes
    client.recv(1)
    client.close()
    return port


def test_a_port_held_only_by_time_wait_is_free_for_a_server() -> None:
    port = _time_wait_port()
    assert _port_free(port)


def test_a_port_with_a_listener_is_not_free() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not _port_free(s.getsockname()[1])


def test_redis_killed_with_clients_connected_restarts_on_its_port(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", tmp_path / "secrets", appendfsync="always")
    server.start()
    try:
        url, port = server.url, server.port
        clients = [redis.Redis.from_url(url) for _ in range(4)]
        for i, c in enumerate(clients):
            c.set(f"k{i}", i)
        server.stop(kill=True)
        server.start()
        assert server.port == port
        # The old URL works again, and the acknowledged writes survived (AOF, fsync always).
        again = redis.Redis.from_url(url)
        assert [int(again.get(f"k{i}")) for i in range(4)] == [0, 1, 2, 3]
        for c in (*clients, again):
            c.close()
    finally:
        server.stop()


@pytest.mark.skipif(
    os.geteuid() != 0, reason="only root creates the embedded Postgres' system user"
)
def test_two_embedded_postgres_start_at_once_where_their_system_user_is_absent(
    tmp_path: Path,
) -> None:
    """A fresh root machine: two processes (pytest-xdist workers) start an embedded Postgres at
    the same moment and both find the system user missing. Exactly one creates it; both clusters
    come up and answer as that user."""
    name = f"ttsd{secrets.token_hex(4)}"
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    servers = [
        EmbeddedPostgres(tmp_path / f"pg{i}" / "data", tmp_path / "secrets", system_user=name)
        for i in range(2)
    ]
    try:
        with concurrent.futures.ProcessPoolExecutor(2) as pool:
            # Separate processes, so each one's useradd really races the other's.
            list(pool.map(EmbeddedPostgres.start, servers))
        uid = pwd.getpwnam(name).pw_uid
        for server in servers:
            assert server.ping()
            assert (server.root / "PG_VERSION").stat().st_uid == uid
    finally:
        for server in servers:
            server.stop()
        subprocess.run(["userdel", name], check=False, capture_output=True)
