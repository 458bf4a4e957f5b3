"""Fixtures: real embedded Redis and Postgres per test session, a clean slate per test.

Each pytest(-xdist) worker starts its own servers in a temporary directory, so the suite can run
beside a running daemon. Every test gets a fresh Postgres database (cloned from a migrated
template: fast) and an empty Redis.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from daemon.config import Config
from daemon.embedded import EmbeddedServers
from daemon.runtime.daemon import Daemon, open_daemon
from daemon.testing import stores as testing_stores
from daemon.testing.config import make_config
from daemon.testing.stores import setup_database

TEMPLATE_DB = "tts_template"


_OWN_BASETEMP = pytest.StashKey[Path]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Without ``--basetemp``, each session gets a base directory of its own, outside pytest's
    shared ``/tmp/pytest-of-USER``: as root, the embedded Postgres runs as an unprivileged user that
    must traverse the path to its data, and every other pytest session that starts resets that
    shared directory to mode 0700 — failing this session's initdb with "Permission denied"."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        root = Path(tempfile.gettempdir()) / "tts-daemon-tests"
        root.mkdir(mode=0o755, exist_ok=True)
        config.option.basetemp = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root)
        config.stash[_OWN_BASETEMP] = Path(config.option.basetemp)


def pytest_unconfigure(config: pytest.Config) -> None:
    own = config.stash.get(_OWN_BASETEMP, None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)


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
    mirrored to it, as ``tts-daemon user add`` does (docs/billing.md)."""
    client = redis.Redis.from_url(servers.redis.url)
    try:
        client.flushall()
    finally:
        client.close()
    testing_stores.DEFAULT_REDIS_URL = servers.redis.url
    return servers.redis.url


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
async def daemon(cfg: Config, redis_url: str, pg_url: str) -> AsyncIterator[Daemon]:
    async with open_daemon(cfg, redis_url, pg_url) as d:
        yield d
