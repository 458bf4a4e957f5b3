"""Fixtures: real embedded Redis and Postgres per test session, a clean slate per test.

Each pytest(-xdist) worker starts its own servers in a temporary directory, so the suite can run
beside a running daemon. Every test gets a fresh Postgres database (cloned from a migrated
template: fast) and an empty Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

import tools.stress
from daemon.config import Config, config_from_dict
from daemon.embedded import EmbeddedServers
from daemon.runtime.daemon import Daemon, open_daemon
from tools.stress import setup_database

TEMPLATE_DB = "tts_template"


def _with_db(url: str, db: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{db}"


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServers]:
    root = tmp_path_factory.mktemp("servers")
    with EmbeddedServers(root) as s:

        async def make_template() -> None:
            conn = await asyncpg.connect(s.postgres.url)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"')
                await conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
            finally:
                await conn.close()

        asyncio.run(make_template())
        setup_database(_with_db(s.postgres.url, TEMPLATE_DB), [])  # the schema, no users
        yield s


@pytest.fixture
def pg_url(servers: EmbeddedServers) -> Iterator[str]:
    """A fresh, migrated database for this test."""
    name = f"t_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(servers.postgres.url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"'))
    yield _with_db(servers.postgres.url, name)
    asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def redis_url(servers: EmbeddedServers) -> str:
    """The session's Redis, emptied for this test. Users the test creates (``add_user``) are
    mirrored to it, as ``tts-daemon user add`` does."""
    client = redis.Redis.from_url(servers.redis.url)
    try:
        client.flushall()
    finally:
        client.close()
    tools.stress.DEFAULT_REDIS_URL = servers.redis.url
    return servers.redis.url


def make_config(tmp_path: Path, **sections: dict) -> Config:
    """A test configuration: ephemeral ports, data under tmp_path, quick loops."""
    base: dict[str, dict] = {
        "data": {"dir": str(tmp_path / "data")},
        "gateway": {"ws_port": 0, "http_port": 0, "close_grace_s": 1.0},
        "ops": {"port": 0},
        "holds": {"check_s": 0.2, "reap_interval_s": 0.5},
        "redis": {"block_s": 0.2},
        "workers": {"simulated": 2, "latency_ms": 5.0, "jitter_ms": 2.0, "scan_interval_s": 0.2},
        "hot": {"heartbeat_s": 0.5, "consumer_ttl_s": 3.0},
        "billing": {"claim_idle_s": 5.0},
        "supervisor": {"backoff_min_s": 0.05, "backoff_max_s": 0.5, "shutdown_timeout_s": 5.0},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return config_from_dict(base)


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
async def daemon(cfg: Config, redis_url: str, pg_url: str) -> AsyncIterator[Daemon]:
    async with open_daemon(cfg, redis_url, pg_url) as d:
        yield d
