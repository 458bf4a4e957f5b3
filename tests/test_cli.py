"""The commands as an operator runs them: separate processes, embedded servers under data.dir."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from daemon.contracts import token_hash
from daemon.testing.config import write_config

pytestmark = pytest.mark.xdist_group("cli")


def _cmd(*args: str, cfg: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args, "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cfg.parent,
    )


def _server_processes(data_dir: Path) -> list[psutil.Process]:
    """Embedded server processes of this data dir (postgres by its -D, redis by its pid file)."""
    found = []
    redis_pid_file = data_dir / "redis" / "redis.pid"
    redis_pid = int(redis_pid_file.read_text()) if redis_pid_file.exists() else None
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] == redis_pid or (
            proc.info["name"] == "postgres" and str(data_dir) in cmdline
        ):
            found.append(proc)
    return found


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "daemon.toml",
        tmp_path,
        quick=False,
        data={"dir": str(tmp_path / "var")},
        workers={"simulated": 1},
    )


def test_run_serves_health_shares_servers_and_stops_cleanly_on_ctrl_c(config_file: Path) -> None:
    data_dir = config_file.parent / "var"
    with subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--config", str(config_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=config_file.parent,
    ) as proc:
        _run_and_stop(proc, config_file, data_dir)


def _run_and_stop(proc: subprocess.Popen[str], config_file: Path, data_dir: Path) -> None:
    try:
        http_url = None
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "serving" in line:
                # the operations listener: /healthz (docs/operations.md)
                http_url = line.split("(operations: ")[1].split(";")[0]
                break
        assert http_url, f"daemon did not start: {proc.stderr.read() if proc.stderr else ''}"
        assert httpx.get(http_url + "/healthz", timeout=10).status_code == 200
        servers = _server_processes(data_dir)
        assert len(servers) >= 2, "embedded Redis and Postgres should be running"

        # A second command beside the running daemon uses the same servers and leaves them up.
        added = _cmd("user", "add", "--name", "erin", "--plan", "plus", cfg=config_file)
        assert added.returncode == 0, added.stderr
        user_id, token = added.stdout.strip().splitlines()
        assert user_id.isdigit() and token.startswith("tts_")
        credited = _cmd("credit", "--user", "erin", "--voice-chars", "500", cfg=config_file)
        assert credited.returncode == 0, credited.stderr
        assert json.loads(credited.stdout)["purchased_voice_chars"] == 500
        revoked = _cmd("user", "revoke", "--user", "erin", cfg=config_file)
        assert revoked.returncode == 0, revoked.stderr
        assert json.loads(revoked.stdout) == {"user_id": int(user_id), "tokens_revoked": 1}
        assert all(p.is_running() for p in servers)
        assert httpx.get(http_url + "/healthz", timeout=10).status_code == 200

        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 10
        for p in servers:
            p.wait(timeout=10)
        assert _server_processes(data_dir) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_admin_commands_alone_start_and_stop_their_servers(config_file: Path) -> None:
    data_dir = config_file.parent / "var"
    first = _cmd("migrate", cfg=config_file)
    assert first.returncode == 0, first.stderr
    assert "0001_init" in first.stdout
    again = _cmd("migrate", cfg=config_file)
    assert again.returncode == 0 and "up to date" in again.stdout

    bad_plan = _cmd("user", "add", "--name", "x", "--plan", "platinum", cfg=config_file)
    assert bad_plan.returncode == 2 and "unknown plan" in bad_plan.stderr
    ok = _cmd("user", "add", "--name", "frank", "--plan", "free", cfg=config_file)
    assert ok.returncode == 0, ok.stderr
    dup = _cmd("user", "add", "--name", "frank", "--plan", "free", cfg=config_file)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    missing = _cmd("credit", "--user", "nobody", "--voice-chars", "5", cfg=config_file)
    assert missing.returncode == 1 and "no such user" in missing.stderr
    assert _server_processes(data_dir) == []


def test_urls_configured_means_nothing_embedded_is_started(
    tmp_path: Path, servers: Any, pg_url: str, redis_url: str
) -> None:
    path = tmp_path / "urls.toml"
    path.write_text(
        f'[data]\ndir = "{tmp_path / "var"}"\n[postgres]\nurl = "{pg_url}"\n'
        f'[redis]\nurl = "{redis_url}"\n'
    )
    out = _cmd("user", "add", "--name", "gina", "--plan", "basic", cfg=path)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "var" / "postgres").exists()
    assert not (tmp_path / "var" / "redis").exists()
    # `user add` wrote the user's entitlements and token to Redis's mirror (docs/billing.md)
    user_id = int(out.stdout.split()[0])
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.hget(f"tts:ent:{user_id}", "kokoro_allow") == b"1000000"
        assert (
            client.get("tts:token:" + token_hash(out.stdout.split()[1]).hex())
            == f"{user_id}|basic".encode()
        )
    finally:
        client.close()


def test_hot_path_modules_do_not_import_the_postgres_driver() -> None:
    code = (
        "import sys, daemon.hot.consumer, daemon.stores.redis, daemon.contracts;"
        "bad = sorted(m for m in sys.modules if m.startswith(('asyncpg', 'daemon.stores.pg',"
        " 'daemon.stores.ledger', 'daemon.billing')));"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hot path pulls in: {proc.stdout}"
    # Nor does their source name the Postgres side (no driver, pool, settings or billing code).
    forbidden = (
        "asyncpg",
        "stores.pg",
        "stores.ledger",
        "daemon.billing",
        "PostgresConfig",
        "PgPool",
        "pg_url",
    )
    for path in (Path(__file__).parent.parent / "daemon" / "hot").rglob("*.py"):
        text = path.read_text()
        assert not [w for w in forbidden if w in text], f"{path} reaches the Postgres side"
