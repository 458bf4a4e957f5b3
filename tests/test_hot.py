"""The hot path on real servers: what a listener sees and what gets billed, whatever happens.

The daemon runs without simulated workers; the test plays the GPU worker over docs/workers.md
(``pull.lua`` / ``push_result.lua`` on a client of its own), so it controls exactly which results
arrive: duplicates, empty audio, worker errors, garbage.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.config import Config
from daemon.contracts import Job, Keys
from daemon.runtime.daemon import Daemon, open_daemon
from daemon.testing.client import WsClient
from daemon.testing.config import make_config
from daemon.testing.stores import add_user
from daemon.testing.waiting import wait_until
from daemon.testing.worker import audio_bytes, pull_n, push, push_raw, r, result_json, settle
from tests.helpers import Events, usage_rows, usage_rows_at_least

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def quiet_cfg(tmp_path: Path) -> Config:
    """No simulated workers: the test is the worker."""
    return make_config(tmp_path, workers={"simulated": 0})


@pytest.fixture
async def quiet(quiet_cfg: Config, redis_url: str, pg_url: str) -> AsyncIterator[Daemon]:
    async with open_daemon(quiet_cfg, redis_url, pg_url) as d:
        yield d


async def leftovers(redis_url: str) -> dict[str, Any]:
    """What the hot path may not leave behind once it is done with its results."""
    items = await r(redis_url, "KEYS", "tts:hot:item:*")
    claimed = 0
    for key in await r(redis_url, "KEYS", "tts:hot:claimed:*"):
        claimed += int(await r(redis_url, "SCARD", key))
    landing = 0
    for key in await r(redis_url, "KEYS", "tts:hot:landing:*"):
        landing += int(await r(redis_url, "LLEN", key))
    return {
        "results": int(await r(redis_url, "LLEN", Keys.RESULTS)),
        "items": len(items),
        "claimed": claimed,
        "landing": landing,
    }


NOTHING_LEFT = {"results": 0, "items": 0, "claimed": 0, "landing": 0}


async def test_two_results_for_one_job_are_finalized_and_billed_once(
    quiet: Daemon, pg_url: str, redis_url: str
) -> None:
    events = Events(quiet)
    user_id, token = await add_user(pg_url, "ann", "plus")
    assert quiet.addresses is not None
    async with WsClient.connect(quiet.addresses.ws_url, token) as client:
        await client.synthesize("doc", ["Only once, please."])
        (job,) = await pull_n(redis_url, 1)
        first = result_json(job)
        # The same result twice (a retry), and a second worker's different take on the same job.
        await push(redis_url, job, first)
        await push(redis_url, job, first)
        await push(redis_url, job, result_json(job, audio=b"another take", worker_id="w2"))
        await client.until(lambda _: 0 in client.terminal())
        await wait_until(
            lambda: len(events.named("result_duplicate", job_id=job.job_id)) == 2,
            what="both extra results seen as duplicates",
        )
        rows = await wait_until(lambda: usage_rows_at_least(pg_url, 1), what="the usage row")
        sentinel = await settle(client, redis_url, pg_url)  # a second frame or row is here now
        statuses = client.statuses("doc")[0]
    assert statuses.count("cached") == 1
    assert len([r for r in await usage_rows(pg_url) if r["event_id"] != sentinel]) == 1
    assert rows[0]["event_id"] == job.job_id and rows[0]["user_id"] == user_id
    assert len(events.named("synthesis_complete", job_id=job.job_id)) == 1
    assert await leftovers(redis_url) == NOTHING_LEFT
    # The audio kept is the first result's, byte for byte.
    async with httpx.AsyncClient(base_url=quiet.addresses.http_url) as http:
        response = await http.get(client.terminal("doc")[0]["audio_url"])
    assert response.content == audio_bytes(job)


async def test_result_for_a_variant_already_finalized_is_not_finalized_again(
    quiet: Daemon, pg_url: str, redis_url: str
) -> None:
    events = Events(quiet)
    _, token = await add_user(pg_url, "bea", "plus")
    assert quiet.addresses is not None
    async with WsClient.connect(quiet.addresses.ws_url, token) as client:
        await client.synthesize("doc", ["Finalized already."])
        (job,) = await pull_n(redis_url, 1)
        await push(redis_url, job, result_json(job))
        await client.until(lambda _: 0 in client.terminal())
        # A stale job for the same variant (another job id) finishes late.
        stale = Job.from_json(job.to_json().replace(job.job_id, "0" * 32))
        await push(redis_url, stale, result_json(stale, audio=b"stale"))
        await wait_until(
            lambda: events.named("result_duplicate", job_id=stale.job_id), what="duplicate"
        )
        await wait_until(lambda: usage_rows_at_least(pg_url, 1), what="the usage row")
    assert [r["event_id"] for r in await usage_rows(pg_url)] == [job.job_id]
    assert client.statuses("doc")[0].count("cached") == 1


async def test_empty_audio_is_skipped_and_not_billed(
    quiet: Daemon, pg_url: str, redis_url: str
) -> None:
    events = Events(quiet)
    _, token = await add_user(pg_url, "cid", "plus")
    assert quiet.addresses is not None
    async with WsClient.connect(quiet.addresses.ws_url, token) as client:
        await client.synthesize("doc", ["...", "Words."])
        jobs = await pull_n(redis_url, 2)
        by_idx = {j.block_idx: j for j in jobs}
        await push(redis_url, by_idx[0], result_json(by_idx[0], audio=b""))
        await push(redis_url, by_idx[1], result_json(by_idx[1]))
        await client.until(lambda _: len(client.terminal()) == 2)
        await wait_until(lambda: usage_rows_at_least(pg_url, 1), what="the billed block")
        sentinel = await settle(client, redis_url, pg_url)  # a bill for the skip is here now
    assert client.terminal("doc")[0]["status"] == "skipped"
    assert "audio_url" not in client.terminal("doc")[0]
    assert client.terminal("doc")[1]["status"] == "cached"
    billed = [r["event_id"] for r in await usage_rows(pg_url) if r["event_id"] != sentinel]
    assert billed == [by_idx[1].job_id]
    skipped = events.named("synthesis_complete", job_id=by_idx[0].job_id)
    assert skipped and skipped[0].status == "skipped" and skipped[0].billed is False


async def test_worker_error_is_a_recoverable_error_status(
    quiet: Daemon, pg_url: str, redis_url: str
) -> None:
    events = Events(quiet)
    _, token = await add_user(pg_url, "dan", "plus")
    assert quiet.addresses is not None
    async with WsClient.connect(quiet.addresses.ws_url, token) as client:
        await client.synthesize("doc", ["The GPU fell over."])
        (job,) = await pull_n(redis_url, 1)
        await push(redis_url, job, result_json(job, error="CUDA out of memory"))
        await client.until(lambda _: 0 in client.terminal())
        frame = client.terminal()[0]
        assert frame["status"] == "error"
        assert frame["recoverable"] is True
        assert "CUDA out of memory" in frame["error"]
        # Recoverable means it: asking again makes a new job, which can succeed.
        await client.synthesize("doc", ["The GPU fell over."])
        (again,) = await pull_n(redis_url, 1)
        assert again.job_id != job.job_id
        await push(redis_url, again, result_json(again))
        await client.until(lambda f: f[-1].get("status") == "cached")
        await wait_until(lambda: usage_rows_at_least(pg_url, 1), what="the successful job billed")
    assert [r["event_id"] for r in await usage_rows(pg_url)] == [again.job_id]
    errors = [e for e in events.named("error", service="hot") if e.get("job_id") == job.job_id]
    assert errors and "CUDA out of memory" in errors[0].message


GARBAGE = [
    (b"not json at all", "not JSON"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b'{"job_id": "x"}', "'variant_hash' must be"),
]


async def test_undecodable_results_are_dead_lettered_and_the_consumer_carries_on(
    quiet: Daemon, pg_url: str, redis_url: str
) -> None:
    events = Events(quiet)
    _, token = await add_user(pg_url, "eve", "plus")
    assert quiet.addresses is not None
    async with WsClient.connect(quiet.addresses.ws_url, token) as client:
        await client.synthesize("doc", ["Garbage first.", "Then a good one."])
        jobs = sorted(await pull_n(redis_url, 2), key=lambda j: j.block_idx)
        bad = [raw for raw, _ in GARBAGE]
        bad.append(result_json(jobs[0], audio_base64="!!not base64!!!!").encode())
        bad.append(
            result_json(jobs[0], audio_base64="data:audio/ogg;base64," + "A" * 8002).encode()
        )
        for raw in bad:
            await push_raw(redis_url, raw)
        await push(redis_url, jobs[1], result_json(jobs[1]))
        await client.until(lambda _: len(client.terminal()) == 2)
        dead = await wait_until(
            lambda: _dead_letters(redis_url, len(bad)), what="every bad result dead-lettered"
        )
    assert client.terminal()[1]["status"] == "cached"
    # The job the bad results named fails, recoverably; nothing was finalized from garbage.
    assert client.terminal()[0]["status"] == "error" and client.terminal()[0]["recoverable"]
    assert sorted(d["raw"].encode() for d in dead) == sorted(bad)
    reasons = " | ".join(d["reason"] for d in dead)
    for _, why in GARBAGE:
        assert why in reasons
    assert "audio_base64: not base64" in reasons
    logged = events.named("error", service="hot")
    assert sum("dead-lettered" in e.message for e in logged) == len(bad)
    assert quiet.supervisor.state("hot") == "running"
    assert quiet.supervisor.states["hot"].restarts == 0
    assert await leftovers(redis_url) == NOTHING_LEFT


async def _dead_letters(redis_url: str, n: int) -> list[dict[str, Any]] | None:
    entries = await r(redis_url, "LRANGE", Keys.RESULTS_DEAD, 0, -1)
    return [json.loads(e) for e in entries] if len(entries) >= n else None


async def test_synthesis_complete_carries_the_spec_timings(
    quiet: Daemon, pg_url: str, redis_url: str
) -> None:
    events = Events(quiet)
    user_id, token = await add_user(pg_url, "fay", "plus")
    assert quiet.addresses is not None
    async with WsClient.connect(quiet.addresses.ws_url, token) as client:
        await client.synthesize("doc", ["Timed."], model="premium")
        (job,) = await pull_n(redis_url, 1, model="premium")
        await push(redis_url, job, result_json(job, queue_wait_ms=12.5, processing_time_ms=340.0))
        await client.until(lambda _: 0 in client.terminal())
        (event,) = await wait_until(lambda: events.named("synthesis_complete"), what="event")
    assert event.job_id == job.job_id and event.variant_hash == job.variant_hash
    assert event.user_id == user_id
    assert (event.model, event.voice) == ("premium", "ava")
    assert event.text_length == len("Timed.")
    assert event.queue_wait_ms == 12.5 and event.worker_ms == 340.0
    for field in ("finalize_ms", "cache_store_ms", "notify_ms"):
        assert isinstance(getattr(event, field), float) and getattr(event, field) >= 0
    assert event.cache_store_ms <= event.finalize_ms
    assert event.notified == 1 and event.billed is True


def _variants(job: Job, audio: bytes) -> list[tuple[str, str]]:
    """The same result written by differently-behaved JSON encoders."""
    b64 = base64.b64encode(audio).decode()
    plain = json.loads(result_json(job, audio=audio))
    rest = {k: v for k, v in plain.items() if k != "audio_base64"}
    escaped = json.dumps(plain).replace("/", "\\/")  # PHP-style escaped slashes
    return [
        ("compact", json.dumps(plain, separators=(",", ":"))),
        ("spaced, audio first", json.dumps({"audio_base64": b64, **rest}, indent=2)),
        ("escaped slashes", escaped),
        ("decoy nested key first", json.dumps({"x": {"audio_base64": "QUJD"}, **plain})),
        ("key name as a value", json.dumps({"note": "audio_base64", **plain})),
        (
            "duplicate key, last wins",
            json.dumps(rest)[:-1] + ', "audio_base64": "QUJD", "audio_base64": "' + b64 + '"}',
        ),
    ]


async def test_audio_is_served_exactly_as_the_worker_sent_it(
    quiet: Daemon, pg_url: str, redis_url: str
) -> None:
    _, token = await add_user(pg_url, "gus", "plus")
    assert quiet.addresses is not None
    # 3 KB of audio containing '/' and '+' (and a long one, checked at both ends only).
    texts = [f"Layout number {i}." for i in range(7)]
    async with WsClient.connect(quiet.addresses.ws_url, token) as client:
        await client.synthesize("doc", texts)
        jobs = sorted(await pull_n(redis_url, len(texts)), key=lambda j: j.block_idx)
        expected: dict[int, bytes] = {}
        for job in jobs[:6]:
            audio = bytes(range(256)) * 12 + job.job_id.encode()
            _name, payload = _variants(job, audio)[job.block_idx]
            expected[job.block_idx] = audio
            await push(redis_url, job, payload)
        long_audio = bytes(range(256)) * 400
        expected[6] = long_audio
        await push(redis_url, jobs[6], result_json(jobs[6], audio=long_audio))
        await client.until(lambda _: len(client.terminal()) == len(texts))
    assert {f["status"] for f in client.terminal().values()} == {"cached"}
    async with httpx.AsyncClient(base_url=quiet.addresses.http_url) as http:
        for idx, frame in client.terminal().items():
            response = await http.get(frame["audio_url"])
            assert response.status_code == 200
            assert response.headers["content-type"] == "audio/ogg"
            assert response.content == expected[idx], f"block {idx} served other bytes"


async def test_audio_corrupted_past_the_sampled_check_is_never_served_as_audio(
    quiet: Daemon, pg_url: str, redis_url: str
) -> None:
    _, token = await add_user(pg_url, "hal", "plus")
    assert quiet.addresses is not None
    async with WsClient.connect(quiet.addresses.ws_url, token) as client:
        await client.synthesize("doc", ["Corrupt in the middle."])
        (job,) = await pull_n(redis_url, 1)
        b64 = base64.b64encode(bytes(range(256)) * 100).decode()
        middle = len(b64) // 2
        await push(
            redis_url, job, result_json(job, audio_base64=b64[:middle] + "!!!!" + b64[middle + 4 :])
        )
        await client.until(lambda _: 0 in client.terminal())
    async with httpx.AsyncClient(base_url=quiet.addresses.http_url) as http:
        response = await http.get(client.terminal("doc")[0]["audio_url"])
    assert response.status_code >= 500
    assert b"not base64" in response.content or b"cannot be read" in response.content
