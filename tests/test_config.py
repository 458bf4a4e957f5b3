"""Configuration: defaults, validation, one-line errors naming the key, exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parent.parent


def test_empty_file_gives_the_documented_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    cfg = load_config(path)
    assert cfg.data.dir == Path("var")
    assert (cfg.gateway.host, cfg.gateway.ws_port, cfg.gateway.http_port) == (
        "127.0.0.1",
        8765,
        8080,
    )
    assert cfg.gateway.max_message_bytes == 65536
    assert (cfg.redis.url, cfg.postgres.url) == ("", "")
    assert (cfg.postgres.request_pool_size, cfg.postgres.billing_pool_size) == (30, 2)
    assert (cfg.hot.concurrency, cfg.hot.audio_ttl_s) == (40, 300)
    assert (cfg.billing.max_batch, cfg.billing.users_per_txn) == (200, 250)  # docs/configuration.md
    assert cfg.workers.simulated == 0
    assert cfg.workers.engine == "simulated"
    assert cfg.events_path == Path("var/log/events.jsonl")


def test_shipped_config_loads() -> None:
    cfg = load_config(REPO / "conf" / "daemon.toml")
    assert cfg.events_path == Path("var/log/events.jsonl")
    assert cfg.workers.engine == "espeak" and cfg.workers.simulated >= 1  # make run speaks


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"gateway": {"ws_port": 70000}}, "gateway.ws_port"),
        ({"gateway": {"http_port": -1}}, "gateway.http_port"),
        ({"gateway": {"ws_port": "8765"}}, "gateway.ws_port"),
        ({"gateway": {"nonsense": 1}}, "gateway.nonsense"),
        ({"postgres": {"request_pool_size": 0}}, "postgres.request_pool_size"),
        ({"postgres": {"billing_pool_size": 0}}, "postgres.billing_pool_size"),
        ({"postgres": {"billing_pool_size": 1.5}}, "postgres.billing_pool_size"),
        ({"hot": {"concurrency": True}}, "hot.concurrency"),
        ({"billing": {"max_batch": 0}}, "billing.max_batch"),
        ({"redis": {"url": "http://nope"}}, "redis.url"),
        ({"postgres": {"url": "mysql://x"}}, "postgres.url"),
        ({"gateway": {"tls_cert": "/nonexistent.pem"}}, "gateway.tls_key"),
        ({"workers": {"models": ["kokoro", "whisper"]}}, "workers.models"),
        ({"workers": {"engine": "festival"}}, "workers.engine"),
        ({"nosection": {}}, "nosection"),
        ({"data": {"dir": ""}}, "data.dir"),
    ],
)
def test_bad_values_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    message = str(info.value)
    assert message.startswith(f"{key}:"), message
    assert "\n" not in message


def test_integer_accepted_where_a_number_is_expected() -> None:
    cfg = config_from_dict({"supervisor": {"backoff_min_s": 2}})
    assert cfg.supervisor.backoff_min_s == 2.0


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[postgres]\nrequest_pool_size = 0\n", "postgres.request_pool_size: must be >= 1, got 0"),
        ("[gateway]\nws_port = 99999\n", "gateway.ws_port: must be a port number 0..65535"),
        ("[gateway\n", "invalid TOML"),
    ],
)
def test_cli_prints_one_line_and_exits_2(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert proc.stdout == ""


def test_a_secret_is_generated_once_and_racing_readers_never_see_it_half_written(
    tmp_path: Path,
) -> None:
    import concurrent.futures

    from daemon.embedded import read_secret

    path = tmp_path / "secrets" / "key"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        values = list(pool.map(lambda _: read_secret(path), range(64)))
    assert len(set(values)) == 1 and len(values[0]) >= 32
    assert read_secret(path) == values[0]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir()] == ["key"]
