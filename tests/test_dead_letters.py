"""Dead letters are bounded and operable: a cap and an age limit per list, and
``tts-daemon dead-letters list|replay|drop`` (docs/operations.md, "Dead letters")."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import trio

from daemon import cli
from daemon.contracts import Keys
from daemon.runtime.daemon import open_daemon
from daemon.testing.config import make_config
from daemon.testing.stores import pg_fetch
from daemon.testing.waiting import wait_until
from daemon.testing.worker import r
from tests.helpers import billing_event, usage_rows

pytestmark = pytest.mark.timeout(120)


async def test_dead_letter_lists_keep_their_cap_and_age_limit(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    cfg = make_config(
        tmp_path,
        workers={"simulated": 0},
        dead_letters={"max_entries": 3, "max_age_s": 3600, "max_raw_bytes": 300},
    )
    old = json.dumps({"reason": "old", "at": time.time() - 7200, "raw": "{}"})
    await r(redis_url, "RPUSH", Keys.BILLING_DEAD, old)  # at the tail: the oldest
    await r(redis_url, "LPUSH", Keys.BILLING_DEAD, json.dumps({"reason": "new", "at": time.time()}))
    async with open_daemon(cfg, redis_url, pg_url):
        big = "x" * 5000
        for i in range(6):
            await r(redis_url, "LPUSH", Keys.RESULTS, f"not json {i} {big}")
        await wait_until(
            lambda: _reasons(redis_url, Keys.RESULTS_DEAD, "not json 5"), what="all six handled"
        )

        async def aged_out() -> bool:
            return await _reasons(redis_url, Keys.BILLING_DEAD, None) == ["new"]

        await wait_until(aged_out, what="the old billing dead letter aged out")
    dead = [json.loads(e) for e in await r(redis_url, "LRANGE", Keys.RESULTS_DEAD, 0, -1)]
    assert len(dead) == 3  # the newest three
    assert [d["raw"][:10] for d in dead] == ["not json 5", "not json 4", "not json 3"]
    assert all(len(d["raw"]) == 300 and d["truncated"] and d["raw_bytes"] > 5000 for d in dead)


async def _reasons(redis_url: str, key: str, newest_raw: str | None) -> list[str] | None:
    entries = [json.loads(e) for e in await r(redis_url, "LRANGE", key, 0, -1)]
    if newest_raw is not None:
        return entries and entries[0].get("raw", "").startswith(newest_raw)  # type: ignore[return-value]
    return [e["reason"] for e in entries]


def _config_file(tmp_path: Path, redis_url: str, pg_url: str) -> str:
    path = tmp_path / "cli.toml"
    path.write_text(
        f'[data]\ndir = "{tmp_path / "cli-data"}"\n'
        f'[redis]\nurl = "{redis_url}"\n[postgres]\nurl = "{pg_url}"\n'
    )
    return str(path)


async def _cli(*argv: str) -> int:
    return await trio.to_thread.run_sync(cli.main, list(argv))


async def test_billing_dead_letters_replay_once_the_cause_is_fixed_and_never_bill_twice(
    tmp_path: Path, redis_url: str, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config(tmp_path, workers={"simulated": 0})
    conf = _config_file(tmp_path, redis_url, pg_url)
    late_user = 424_242
    event = billing_event(late_user, "kokoro", 17)
    async with open_daemon(cfg, redis_url, pg_url):
        await r(redis_url, "XADD", Keys.BILLING, "*", "event", event.to_json())
        await wait_until(
            lambda: r(redis_url, "LLEN", Keys.BILLING_DEAD), what="the event dead-lettered"
        )
        assert await _cli("dead-letters", "list", "--kind", "billing", "--config", conf) == 0
        listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [e["kind"] for e in listed] == ["billing"]
        assert event.event_id in listed[0]["raw"]
        # The cause is fixed: the user exists now.
        await pg_fetch(pg_url, "INSERT INTO users (id, name) VALUES ($1, 'late')", late_user)
        await pg_fetch(
            pg_url, "INSERT INTO subscriptions (user_id, plan) VALUES ($1, 'plus')", late_user
        )
        # Two operators replay at once, then once more: billed exactly once.
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(_cli, "dead-letters", "replay", "--config", conf)
        assert await _cli("dead-letters", "replay", "--kind", "billing", "--config", conf) == 0
        rows = await wait_until(
            lambda: usage_rows(pg_url, user_id=late_user), what="the replayed event billed"
        )
        assert await r(redis_url, "LLEN", Keys.BILLING_DEAD) == 0
        await r(redis_url, "XADD", Keys.BILLING, "*", "event", event.to_json())  # a stray copy
        await wait_until(lambda: _drained(redis_url), what="the copy handled")
    assert [row["event_id"] for row in await usage_rows(pg_url, user_id=late_user)] == [
        event.event_id
    ]
    assert len(rows) == 1
    assert "replayed" in capsys.readouterr().out
    assert await _cli("dead-letters", "replay", "--kind", "results", "--config", conf) == 2


async def _drained(redis_url: str) -> bool:
    return int(await r(redis_url, "XLEN", Keys.BILLING)) == 0


async def test_dead_letters_drop_by_kind_and_age(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    conf = _config_file(tmp_path, redis_url, pg_url)
    now = time.time()
    await r(redis_url, "LPUSH", Keys.RESULTS_DEAD, json.dumps({"reason": "a", "at": now - 500}))
    await r(redis_url, "LPUSH", Keys.RESULTS_DEAD, json.dumps({"reason": "b", "at": now}))
    await r(redis_url, "LPUSH", Keys.BILLING_DEAD, json.dumps({"reason": "c", "at": now - 500}))
    argv = ["dead-letters", "drop", "--kind", "results", "--older-than-s", "100", "--config", conf]
    assert await _cli(*argv) == 0
    assert await _reasons(redis_url, Keys.RESULTS_DEAD, None) == ["b"]
    assert await _reasons(redis_url, Keys.BILLING_DEAD, None) == ["c"]
    assert await _cli("dead-letters", "drop", "--config", conf) == 0
    for key in (Keys.RESULTS_DEAD, Keys.BILLING_DEAD):
        assert await r(redis_url, "LLEN", key) == 0
