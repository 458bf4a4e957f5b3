"""Workers are untrusted: a result is input, validated once at the hot path's boundary.

The daemon runs without simulated workers; the test plays a worker with bugs (docs/workers.md's
pull and push scripts on a client of its own). What a user must see, whatever the worker sends:
the daemon stays up, every block it waits for reaches a terminal status, a failed block can be
asked again and gets audio, and the bill follows the job the daemon created, never the result.
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
from daemon.contracts import Keys
from daemon.runtime.daemon import Daemon, open_daemon
from daemon.testing.client import WsClient
from daemon.testing.config import make_config
from daemon.testing.stores import add_user
from daemon.testing.waiting import wait_until
from daemon.testing.worker import pull_n, push, r, result_json, settle
from tests.helpers import Events, usage_rows, usage_rows_at_least

pytestmark = pytest.mark.timeout(120)

MAX_AUDIO = 64 * 1024


@pytest.fixture
async def quiet(tmp_path: Path, redis_url: str, pg_url: str) -> AsyncIterator[Daemon]:
    cfg: Config = make_config(tmp_path, workers={"simulated": 0, "max_audio_bytes": MAX_AUDIO})
    async with open_daemon(cfg, redis_url, pg_url) as d:
        yield d


def _poison(job: Any, kind: str) -> bytes:
    """One bad result for ``job``, as a buggy worker would write it."""
    if kind == "duration NaN":
        return result_json(job, duration_ms=float("nan")).encode()  # json.dumps writes NaN
    if kind == "duration Infinity":
        return result_json(job, duration_ms=float("inf")).encode()
    if kind == "duration huge":
        return result_json(job).replace('"duration_ms": 1500', '"duration_ms": 1e400').encode()
    if kind == "duration null":
        return result_json(job, duration_ms=None).encode()
    if kind == "duration negative":
        return result_json(job, duration_ms=-5).encode()
    if kind == "timing not a number":
        return result_json(job, queue_wait_ms="soon").encode()
    if kind == "bad base64":
        return result_json(job, audio_base64="!!not base64!!!!").encode()
    if kind == "urlsafe base64":
        return result_json(job, audio_base64=base64.urlsafe_b64encode(b"\xfb\xff" * 30).decode())
    if kind == "content type html":
        return result_json(job, content_type="text/html").encode()
    if kind == "content type header injection":
        return result_json(job, content_type="audio/ogg\r\nSet-Cookie: a=b").encode()
    if kind == "audio too big":
        return result_json(job, audio=b"\x01" * (MAX_AUDIO + 1)).encode()
    if kind == "lone surrogate":
        return result_json(job, worker_id="w\udcff").encode()  # Python reads it, Redis does not
    if kind == "invalid utf-8":
        data = json.loads(result_json(job))
        data["worker_id"] = "w\udcff"
        return json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogateescape")
    if kind == "not json":
        return b'{"job_id": "' + job.job_id.encode() + b'", "audio_base64": '
    if kind == "variant of another job":
        return result_json(job, variant_hash="0" * 40).encode()
    if kind == "worker_id not a string":
        return result_json(job, worker_id=["x"]).encode()
    raise AssertionError(kind)


POISONS = [
    "duration NaN",
    "duration Infinity",
    "duration huge",
    "duration null",
    "duration negative",
    "timing not a number",
    "bad base64",
    "urlsafe base64",
    "content type html",
    "content type header injection",
    "audio too big",
    "lone surrogate",
    "invalid utf-8",
    "not json",
    "variant of another job",
    "worker_id not a string",
]


async def test_a_bad_result_fails_its_block_recoverably_and_the_block_can_be_asked_again(
    quiet: Daemon, pg_url: str, redis_url: str
) -> None:
    events = Events(quiet)
    user_id, token = await add_user(pg_url, "ann", "plus")
    texts = [f"Poisoned block number {i}." for i in range(len(POISONS))]
    assert quiet.addresses is not None
    async with WsClient.connect(quiet.addresses.ws_url, token) as client:
        await client.synthesize("doc", texts)
        jobs = sorted(await pull_n(redis_url, len(texts)), key=lambda j: j.block_idx)
        for job, kind in zip(jobs, POISONS, strict=True):
            await push(redis_url, job, _poison(job, kind))
        await client.until(lambda _: len(client.terminal("doc")) == len(texts), timeout_s=30)
        for idx, frame in client.terminal("doc").items():
            assert frame["status"] == "error", (POISONS[idx], frame)
            assert frame["recoverable"] is True
        # The in-flight keys are gone: asking again makes new jobs, which get audio.
        await client.synthesize("again", texts)
        again = await pull_n(redis_url, len(texts))
        assert not {j.job_id for j in again} & {j.job_id for j in jobs}
        for job in again:
            await push(redis_url, job, result_json(job))
        await client.until(lambda _: len(client.terminal("again")) == len(texts), timeout_s=30)
        assert {f["status"] for f in client.terminal("again").values()} == {"cached"}
        rows = await wait_until(
            lambda: usage_rows_at_least(pg_url, len(texts)), what="the second round billed"
        )
    assert sorted(r["event_id"] for r in rows) == sorted(j.job_id for j in again)
    entries = await r(redis_url, "LRANGE", Keys.RESULTS_DEAD, 0, -1)
    dead = [json.loads(e.decode(errors="replace")) for e in entries]  # raw is kept byte for byte
    assert len(dead) == len(POISONS)
    assert all(d["reason"] for d in dead)
    # An error event per bad result, naming the worker that sent it.
    bad = [e for e in events.named("error", service="hot") if "dead-lettered" in e.message]
    assert len(bad) == len(POISONS)
    assert sum(e.get("worker_id") == "test-worker" for e in bad) >= len(POISONS) - 6
    assert quiet.supervisor.state("hot") == "running"
    assert quiet.supervisor.states["hot"].restarts == 0
    assert user_id


async def test_the_bill_comes_from_the_job_not_from_the_result(
    quiet: Daemon, pg_url: str, redis_url: str
) -> None:
    ann, token = await add_user(pg_url, "ann", "plus")
    bob, _ = await add_user(pg_url, "bob", "plus")
    text = "Bill me for exactly this."
    assert quiet.addresses is not None
    async with WsClient.connect(quiet.addresses.ws_url, token) as client:
        await client.synthesize("doc", [text])
        (job,) = await pull_n(redis_url, 1)
        forged = result_json(
            job,
            user_id=bob,
            text_length=999_999,
            usage_multiplier=50.0,
            model="premium",
            voice="ava",
            document_id="other",
            block_idx=7,
        )
        await push(redis_url, job, forged)
        await client.until(lambda _: 0 in client.terminal("doc"))
        assert client.terminal("doc")[0]["status"] == "cached"
        (row,) = await wait_until(lambda: usage_rows_at_least(pg_url, 1), what="the bill")
    assert row["user_id"] == ann
    assert row["amount"] == len(text)  # kokoro: 1 unit a character
    assert row["usage_type"] == "server_kokoro" and row["event_id"] == job.job_id


async def test_a_result_for_an_unknown_job_is_never_billed(
    quiet: Daemon, pg_url: str, redis_url: str
) -> None:
    events = Events(quiet)
    _, token = await add_user(pg_url, "cid", "plus")
    assert quiet.addresses is not None
    async with WsClient.connect(quiet.addresses.ws_url, token) as client:
        await client.synthesize("doc", ["A real job."])
        (job,) = await pull_n(redis_url, 1)
        forged = json.loads(result_json(job))
        forged["job_id"] = "f" * 32
        await r(redis_url, "LPUSH", Keys.RESULTS, json.dumps(forged))
        await wait_until(
            lambda: (
                events.named("result_duplicate", job_id="f" * 32)
                or events.named("error", service="hot")
            ),
            what="the forged result handled",
        )
        # The real job is untouched: its own result still finalizes it.
        await push(redis_url, job, result_json(job))
        await client.until(lambda _: 0 in client.terminal("doc"))
        sentinel = await settle(client, redis_url, pg_url)
    assert [r["event_id"] for r in await usage_rows(pg_url) if r["event_id"] != sentinel] == [
        job.job_id
    ]


async def test_audio_is_served_only_as_audio(quiet: Daemon, pg_url: str, redis_url: str) -> None:
    """Stored audio whose content type is not audio/* (written before validation existed, or by
    hand) is never served as such: it would be script on the dashboard's origin."""
    _, token = await add_user(pg_url, "dot", "plus")
    assert quiet.addresses is not None
    async with WsClient.connect(quiet.addresses.ws_url, token) as client:
        await client.synthesize("doc", ["Served safely."])
        (job,) = await pull_n(redis_url, 1)
        await push(redis_url, job, result_json(job))
        await client.until(lambda _: 0 in client.terminal("doc"))
    key = Keys.audio(job.variant_hash)
    meta = json.loads(await r(redis_url, "LINDEX", key, -1))
    meta["content_type"] = "text/html"
    await r(redis_url, "LSET", key, -1, json.dumps(meta))
    async with httpx.AsyncClient(base_url=quiet.addresses.http_url) as http:
        response = await http.get(f"/v1/audio/{job.variant_hash}")
    assert response.status_code == 200
    assert not response.headers["content-type"].startswith("text/")
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_a_reused_item_name_never_attaches_one_jobs_audio_to_another(
    redis_url: str,
) -> None:
    """A claimed result's name reused for another result (as a Redis that lost its last second
    once did with its counter): the handler holding the first result's op must not finalize the
    second result under it. Finalize checks the item is the result it validated."""
    import trio_asyncio

    from daemon.hot.consumer import HotConsumer, _Claimed
    from daemon.ops.events import EventLog
    from daemon.ops.metrics import Metrics
    from daemon.stores.redis import open_redis
    from daemon.testing.worker import stage_job

    a = await stage_job(redis_url, "Text of job A.")
    b = await stage_job(redis_url, "Text of job B.", block_idx=1)
    for job in (a, b):
        await r(redis_url, "SET", Keys.inflight(job.variant_hash), job.job_id)
    async with trio_asyncio.open_loop(), open_redis(redis_url) as store:
        consumer = HotConsumer(
            store=store,
            cfg=make_config(Path("/nonexistent")).hot,
            events=EventLog(Path("/nonexistent/events.jsonl")),
            metrics=Metrics(),
            consumer_id="c1",
        )
        await r(redis_url, "LPUSH", Keys.RESULTS, result_json(a, audio=b"A" * 300))
        (claimed_a,) = await store.claim_results("c1", tokens=["7"], block_s=0.1)
        op_a = consumer._prepare(_Claimed(claimed_a, 0.0)).op
        # Redis loses item 7; the name is handed out again, to B's result.
        await r(redis_url, "DEL", Keys.hot_item("7"))
        await r(redis_url, "LPUSH", Keys.RESULTS, result_json(b, audio=b"B" * 300))
        (claimed_b,) = await store.claim_results("c1", tokens=["7"], block_s=0.1)
        assert claimed_b.token == "7"
        ((outcome, _),) = await store.finalize_many("c1", [op_a], ttl_s=60)
        assert outcome == "gone"
        assert await r(redis_url, "EXISTS", Keys.audio(a.variant_hash)) == 0
        # B's result is still claimed, and finalizes as B's.
        op_b = consumer._prepare(_Claimed(claimed_b, 0.0)).op
        ((outcome, _),) = await store.finalize_many("c1", [op_b], ttl_s=60)
        assert outcome == "finalized"
        audio = await store.get_audio(b.variant_hash)
    assert audio is not None and audio[0] == b"B" * 300
