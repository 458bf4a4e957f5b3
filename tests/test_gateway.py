"""The WebSocket protocol of docs/protocol.md, end to end on real Redis and Postgres.

Most tests run the daemon without simulated workers and drive a :class:`ManualWorker` by hand, so
that "queued", "processing" and "cached" happen exactly when the test says.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from daemon.config import Config
from daemon.gateway.hashing import VariantHasher
from daemon.runtime.daemon import Daemon, open_daemon
from daemon.testing.client import WsClient, handshake_status, status_frames
from daemon.testing.config import make_config
from daemon.testing.stores import add_user, pg_fetch, redis_call
from daemon.testing.waiting import wait_until
from daemon.testing.worker import ManualWorker, job_ids, queue_ids
from tests.ops_support import scrape

# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def manual_cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path, workers={"simulated": 0})


@pytest.fixture
async def manual_daemon(manual_cfg: Config, redis_url: str, pg_url: str) -> AsyncIterator[Daemon]:
    async with open_daemon(manual_cfg, redis_url, pg_url) as d:
        yield d


def ws_url(d: Daemon) -> str:
    assert d.addresses is not None
    return d.addresses.ws_url


def syn(document_id: str = "doc", blocks: Any = None, **fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "synthesize",
        "document_id": document_id,
        "model": "kokoro",
        "blocks": [{"idx": 0, "text": "Hello."}] if blocks is None else blocks,
    }
    frame.update(fields)
    return frame


def without(frame: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k != key}


def first_statuses(client: WsClient, document_id: str) -> dict[int, str]:
    return {idx: s[0] for idx, s in client.statuses(document_id).items()}


def gateway_healthy(d: Daemon) -> None:
    assert d.supervisor.state("gateway") == "running"
    assert d.supervisor.states["gateway"].restarts == 0


# -- validation --------------------------------------------------------------------------------

BAD_FRAMES: list[tuple[str, Any, str, str]] = [
    # (case, frame (dict → JSON, str/bytes sent as is), code, message prefix)
    ("truncated JSON", '{"type": "synth', "bad_request", "frame: not valid JSON"),
    ("binary frame", b'{"type": "synthesize"}', "bad_request", "frame: must be a JSON text"),
    ("array", "[1, 2]", "bad_request", "frame: must be a JSON object"),
    ("no type", "{}", "bad_request", "type: missing"),
    ("type not a string", {"type": 5}, "bad_request", "type: must be a string"),
    ("unknown type", {"type": "subscribe"}, "bad_request", "type: unknown message type"),
    ("deep nesting", "[" * 5000 + "]" * 5000, "bad_request", "frame: JSON nested too deeply"),
    ("nesting over 16", '{"type":' * 17 + "1" + "}" * 17, "bad_request", "frame: JSON nested"),
    ("huge integer", '{"type": ' + "9" * 5000 + "}", "bad_request", "frame: not valid JSON"),
    ("no document_id", without(syn(), "document_id"), "bad_request", "document_id: missing"),
    ("empty document_id", syn(""), "bad_request", "document_id: must be 1..128 characters"),
    ("long document_id", syn("d" * 129), "bad_request", "document_id: must be 1..128"),
    ("document_id number", syn(7), "bad_request", "document_id: must be a string"),
    ("document_id inf", '{"type":"synthesize","document_id":1e999}', "bad_request", "document_id:"),
    ("document_id control", syn("a\nb"), "bad_request", "document_id: must not contain control"),
    ("no model", without(syn(), "model"), "bad_request", "model: missing"),
    ("model a list", syn(model=["kokoro"]), "bad_request", "model: must be a string"),
    ("unknown model", syn(model="nope"), "unknown_model", "model: unknown model 'nope'"),
    ("unknown voice", syn(voice="nobody"), "unknown_voice", "voice: unknown voice 'nobody'"),
    ("voice of another model", syn(model="premium", voice="af_heart"), "unknown_voice", "voice:"),
    ("voice a number", syn(voice=3), "bad_request", "voice: must be a string"),
    ("no blocks", without(syn(), "blocks"), "bad_request", "blocks: missing"),
    ("blocks an object", syn(blocks={}), "bad_request", "blocks: must be a list"),
    ("no block", syn(blocks=[]), "bad_request", "blocks: must hold 1..64 blocks"),
    (
        "65 blocks",
        syn(blocks=[{"idx": i, "text": "a"} for i in range(65)]),
        "bad_request",
        "blocks: must hold 1..64 blocks",
    ),
    ("block a string", syn(blocks=["text"]), "bad_request", "blocks[0]: must be an object"),
    ("no idx", syn(blocks=[{"text": "a"}]), "bad_request", "blocks[0].idx: missing"),
    (
        "idx a string",
        syn(blocks=[{"idx": 0, "text": "a"}, {"idx": "1", "text": "b"}]),
        "bad_request",
        "blocks[1].idx: must be an integer",
    ),
    ("idx a bool", syn(blocks=[{"idx": True, "text": "a"}]), "bad_request", "blocks[0].idx: must"),
    ("idx a float", syn(blocks=[{"idx": 1.0, "text": "a"}]), "bad_request", "blocks[0].idx: must"),
    ("idx negative", syn(blocks=[{"idx": -1, "text": "a"}]), "bad_request", "blocks[0].idx: must"),
    (
        "idx too big",
        syn(blocks=[{"idx": 1_000_001, "text": "a"}]),
        "bad_request",
        "blocks[0].idx: must be 0..1000000",
    ),
    ("no text", syn(blocks=[{"idx": 0}]), "bad_request", "blocks[0].text: missing"),
    (
        "empty text",
        syn(blocks=[{"idx": 0, "text": ""}]),
        "bad_request",
        "blocks[0].text: must be 1..2000 characters",
    ),
    (
        "text too long",
        syn(blocks=[{"idx": 0, "text": "a" * 2001}]),
        "bad_request",
        "blocks[0].text: must be 1..2000 characters",
    ),
    ("text a number", syn(blocks=[{"idx": 0, "text": 5}]), "bad_request", "blocks[0].text: must"),
    (
        "text a lone surrogate",
        '{"type":"synthesize","document_id":"d","model":"kokoro",'
        '"blocks":[{"idx":0,"text":"a\\ud800b"}]}',
        "bad_request",
        "blocks[0].text: must be valid Unicode",
    ),
    (
        "text with NUL",
        syn(blocks=[{"idx": 0, "text": "a\x00b"}]),
        "bad_request",
        "blocks[0].text: must not contain NUL",
    ),
    (
        "duplicate idx",
        syn(blocks=[{"idx": 0, "text": "a"}, {"idx": 0, "text": "b"}]),
        "bad_request",
        "blocks[1].idx: duplicate idx 0",
    ),
    (
        "cursor_moved without block_idx",
        {"type": "cursor_moved", "document_id": "doc"},
        "bad_request",
        "block_idx: missing",
    ),
    (
        "cursor_moved block_idx negative",
        {"type": "cursor_moved", "document_id": "doc", "block_idx": -1},
        "bad_request",
        "block_idx: must be 0..1000000",
    ),
    (
        "cursor_moved long document_id",
        {"type": "cursor_moved", "document_id": "d" * 129, "block_idx": 0},
        "bad_request",
        "document_id: must be 1..128",
    ),
]


async def test_every_bad_frame_gets_an_error_naming_the_field_and_the_connection_stays(
    manual_daemon: Daemon, pg_url: str
) -> None:
    _, token = await add_user(pg_url, "val", "unlimited")
    wrong = []
    async with WsClient.connect(ws_url(manual_daemon), token) as client:
        for case, frame, code, prefix in BAD_FRAMES:
            await client.ws.send_message(json.dumps(frame) if isinstance(frame, dict) else frame)
            reply = await client.receive()
            if (
                reply.get("type") != "error"
                or reply.get("code") != code
                or not str(reply.get("message", "")).startswith(prefix)
            ):
                wrong.append(f"{case}: expected {code} {prefix!r}, got {reply}")
        # the same connection still serves a valid request
        await client.synthesize("after", ["Still here."])
        reply = await client.receive()
        assert len(await job_ids(manual_daemon.redis_url)) == 1
    assert not wrong, "\n".join(wrong)
    assert reply["type"] == "status" and reply["status"] == "queued"
    gateway_healthy(manual_daemon)


async def test_limits_are_inclusive(manual_daemon: Daemon, pg_url: str) -> None:
    """The largest valid values of every limit are accepted (one status per block)."""
    _, token = await add_user(pg_url, "edges", "unlimited")
    requests = [
        syn("d" * 128, blocks=[{"idx": 1_000_000, "text": "x" * 2000}]),
        syn("sixty-four", blocks=[{"idx": i, "text": f"Block {i}."} for i in range(64)]),
        syn("voice", voice="af_heart", blocks=[{"idx": 0, "text": "Explicit voice."}]),
        syn("null-voice", voice=None, blocks=[{"idx": 0, "text": "Null voice."}]),
        syn("unicode ✓ 文書", blocks=[{"idx": 0, "text": "Grüße, 世界 👋"}], extra="ignored"),
        {"type": "cursor_moved", "document_id": "nothing-pending", "block_idx": 1_000_000},
    ]
    async with WsClient.connect(ws_url(manual_daemon), token) as client:
        for frame in requests:
            await client.send(frame)
        await client.until(lambda fs: len(fs) == 1 + 64 + 1 + 1 + 1 + 1)
    errors = [f for f in client.frames if f["type"] == "error"]
    assert not errors
    assert first_statuses(client, "d" * 128) == {1_000_000: "queued"}
    assert first_statuses(client, "sixty-four") == {i: "queued" for i in range(64)}
    assert {
        f["voice"] for f in client.frames if f.get("document_id") in ("voice", "null-voice")
    } == {"af_heart"}
    assert first_statuses(client, "unicode ✓ 文書") == {0: "queued"}
    assert client.frames[-1] == {
        "type": "evicted",
        "document_id": "nothing-pending",
        "block_idxs": [],
    }


async def test_frame_over_max_message_bytes_closes_with_1009(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    cfg = make_config(tmp_path, gateway={"max_message_bytes": 1024}, workers={"simulated": 0})
    _, token = await add_user(pg_url, "big", "unlimited")
    async with open_daemon(cfg, redis_url, pg_url) as d:
        # exactly at the limit: answered
        async with WsClient.connect(ws_url(d), token) as client:
            frame = json.dumps(syn(blocks=[{"idx": 0, "text": ""}]))
            exact = frame.replace('"text": ""', '"text": "' + "a" * (1024 - len(frame)) + '"')
            assert len(exact.encode()) == 1024
            await client.send(exact)
            assert (await client.receive())["status"] == "queued"
        # over it, in ASCII (trio-websocket's own check) and in multi-byte characters (fewer
        # characters than the limit, more bytes: the gateway's check)
        for text in ("a" * 1100, "€" * 400):
            async with WsClient.connect(ws_url(d), token) as client:
                await client.send(syn(blocks=[{"idx": 0, "text": text}]))
                with pytest.raises(ConnectionClosed) as closed:
                    await client.receive()
                assert closed.value.reason.code == 1009
        gateway_healthy(d)


# -- authentication ----------------------------------------------------------------------------


async def test_handshake_rejections(tmp_path: Path, redis_url: str, pg_url: str) -> None:
    cfg = make_config(tmp_path, gateway={"max_connections_per_user": 2})
    _, token = await add_user(pg_url, "auth", "free")
    async with open_daemon(cfg, redis_url, pg_url) as d:
        url = ws_url(d)
        bearer = {"Authorization": f"Bearer {token}"}
        assert (await handshake_status(url))[0] == 401
        assert (await handshake_status(url, {"Authorization": "Bearer " + "x" * 5000}))[0] == 401
        assert (await handshake_status(url, {"Authorization": "Bearer tts_<script>"}))[0] == 401
        wrong = token[:-1] + ("Q" if token[-1] != "Q" else "R")  # one character off, never equal
        assert (await handshake_status(url + "?token=" + wrong))[0] == 401
        assert (await handshake_status(url.replace("/v1/ws", "/v1/other"), bearer))[0] == 404
        async with WsClient.connect(url, token), WsClient.connect(url, token):
            status, body = await handshake_status(url, bearer)
            assert status == 429 and b"too many connections" in body
        async with WsClient.connect(url, token) as client:  # slots are given back on close
            await client.synthesize("d", ["Back in."])
            assert (await client.receive())["type"] == "status"
        assert d.gateway is not None
        await wait_until(lambda: d.gateway.connection_count == 0, what="all connections closed")
        gateway_healthy(d)


# -- deduplication, caching, processing --------------------------------------------------------


async def test_two_users_same_text_share_one_job_both_notified_only_creator_billed(
    manual_daemon: Daemon, redis_url: str, pg_url: str
) -> None:
    alice, token_a = await add_user(pg_url, "alice", "plus")
    bob, token_b = await add_user(pg_url, "bob", "plus")
    worker = ManualWorker(redis_url)
    text = "The same sentence, asked for twice."
    url = ws_url(manual_daemon)
    async with WsClient.connect(url, token_a) as a, WsClient.connect(url, token_b) as b:
        await a.synthesize("doc-a", {3: text})
        assert (await a.receive())["status"] == "queued"
        await b.synthesize("doc-b", {7: text})
        assert (await b.receive())["status"] == "queued"
        assert len(await job_ids(redis_url)) == 1
        assert len(await queue_ids(redis_url)) == 1

        job = await worker.pull_wait()
        assert job.user_id == alice
        for client, doc, idx in ((a, "doc-a", 3), (b, "doc-b", 7)):
            frame = await client.receive()
            assert (frame["document_id"], frame["block_idx"], frame["status"]) == (
                doc,
                idx,
                "processing",
            )
        await worker.finish(job)
        cached_a = await a.receive()
        cached_b = await b.receive()
    assert cached_a["status"] == cached_b["status"] == "cached"
    assert cached_a["audio_url"] == cached_b["audio_url"]
    assert set(cached_a) == {
        "type",
        "document_id",
        "block_idx",
        "status",
        "model",
        "voice",
        "audio_url",
    }

    rows = await wait_until(
        lambda: pg_fetch(pg_url, "SELECT user_id, amount FROM usage_log"), what="billing"
    )
    assert [(r["user_id"], r["amount"]) for r in rows] == [(alice, len(text))]
    assert not await pg_fetch(pg_url, "SELECT 1 FROM usage_log WHERE user_id = $1", bob)


async def test_cached_block_is_answered_at_once_without_a_job(
    daemon: Daemon, redis_url: str, pg_url: str
) -> None:
    alice, token_a = await add_user(pg_url, "alice", "plus")
    bob, token_b = await add_user(pg_url, "bob", "plus")
    url = ws_url(daemon)
    async with WsClient.connect(url, token_a) as a:
        await a.synthesize("doc", ["Cache me once."])
        await a.until(lambda _: 0 in a.terminal())
    await wait_until(
        lambda: pg_fetch(pg_url, "SELECT 1 FROM usage_log WHERE user_id = $1", alice),
        what="alice billed",
    )
    async with WsClient.connect(url, token_b) as b:
        await b.synthesize("other-doc", {5: "Cache me once."})
        first = await b.receive()
    assert first["status"] == "cached" and first["block_idx"] == 5
    assert first["audio_url"] == a.terminal()[0]["audio_url"]
    assert await job_ids(redis_url) == []
    assert len(await pg_fetch(pg_url, "SELECT 1 FROM usage_log")) == 1
    assert not await pg_fetch(pg_url, "SELECT 1 FROM usage_log WHERE user_id = $1", bob)


async def test_variant_hash_is_a_keyed_hmac_kept_under_data_dir(
    daemon: Daemon, cfg: Config, pg_url: str
) -> None:
    _, token = await add_user(pg_url, "hmac", "plus")
    async with WsClient.connect(ws_url(daemon), token) as client:
        await client.synthesize("doc", ["Who said this?"])
        await client.until(lambda _: 0 in client.terminal())
    url_hash = client.terminal()[0]["audio_url"].rsplit("/", 1)[1]
    key_file = cfg.data.dir / "secrets" / "variant_hmac.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip().encode()
    assert len(key) >= 32
    assert url_hash == VariantHasher(key)("Who said this?", "kokoro", "af_heart")
    # without the key the text cannot be confirmed: plain digests do not match
    for digest in (hashlib.sha256, hashlib.sha1):
        assert digest(b"Who said this?").hexdigest()[:40] != url_hash
    assert hmac.new(b"another key", b"Who said this?", hashlib.sha256).hexdigest()[:40] != url_hash


# -- usage limits, rate limit ------------------------------------------------------------------


async def test_usage_limit_errors_blocks_over_the_plan_without_postgres(
    manual_daemon: Daemon, pg_url: str, redis_url: str
) -> None:
    user, token = await add_user(pg_url, "frugal", "free")
    async with WsClient.connect(ws_url(manual_daemon), token) as client:
        before = _histogram_count(manual_daemon, "tts_request_pool_wait_seconds")
        # free: 20,000 kokoro characters; twelve blocks of 2,000 → ten fit
        await client.synthesize("long", [f"{i:04d}" + "x" * 1996 for i in range(12)])
        await client.until(lambda fs: len(fs) == 12)
        # free: no premium characters at all
        await client.synthesize("prem", ["Premium please."], model="premium")
        limited = await client.receive()
    statuses = first_statuses(client, "long")
    assert [statuses[i] for i in range(12)] == ["queued"] * 10 + ["error"] * 2
    for frame in client.frames[10:12]:
        assert frame["error"] == "usage limit exceeded" and frame["recoverable"] is False
    assert limited["status"] == "error" and limited["recoverable"] is False
    assert limited["model"] == "premium" and limited["voice"] == "ava"
    # no Postgres pool on the request path: the limits come from Redis (holds and the mirror)
    assert _histogram_count(manual_daemon, "tts_request_pool_wait_seconds") == before
    # the connection closed: its queued jobs left the queue and their holds were released
    await wait_until(
        lambda: _no_holds(redis_url, user), what="the closed connection's holds released"
    )

    # usage already billed this period counts (copied from Postgres into the mirror)
    await pg_fetch(
        pg_url,
        "INSERT INTO usage_periods (user_id, period_start, server_kokoro_characters)"
        " VALUES ($1, tts_period_start(), 19990)",
        user,
    )
    assert manual_daemon.mirror is not None
    manual_daemon.mirror.want(user)  # what the gateway asks for a user it finds without a copy

    async def copied() -> bool:
        used = await redis_call(redis_url, "HGET", f"tts:ent:{user}", "kokoro_used")
        return used == b"19990"

    await wait_until(copied, what="the mirror to copy the new usage")
    async with WsClient.connect(ws_url(manual_daemon), token) as client:
        await client.synthesize("tail", ["Eleven char", "Ten chars!"])
        await client.until(lambda fs: len(fs) == 2)
    assert first_statuses(client, "tail") == {0: "error", 1: "queued"}


async def _no_holds(redis_url: str, user_id: int) -> bool:
    return not await redis_call(redis_url, "EXISTS", f"tts:holds:{user_id}")


def _histogram_count(d: Daemon, name: str) -> float:
    for metric in d.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == f"{name}_count":
                return sample.value
    raise AssertionError(f"no histogram {name}")


async def test_rate_limit_per_user(tmp_path: Path, redis_url: str, pg_url: str) -> None:
    cfg = make_config(tmp_path, gateway={"rate_limit_blocks_per_min": 3}, workers={"simulated": 0})
    _, token = await add_user(pg_url, "hasty", "unlimited")
    _, other = await add_user(pg_url, "calm", "unlimited")
    async with open_daemon(cfg, redis_url, pg_url) as d:
        async with WsClient.connect(ws_url(d), token) as client:
            await client.synthesize("d", ["One.", "Two."])
            await client.until(lambda fs: len(fs) == 2)
            await client.synthesize("d", {2: "Three.", 3: "Four."})
            limited = await client.receive()
            await client.synthesize("d", {4: "Five.", 5: "Six.", 6: "Seven.", 7: "Eight."})
            too_many = await client.receive()
            await client.synthesize("d", {2: "Three."})  # one block still fits
            fits = await client.receive()
        async with WsClient.connect(ws_url(d), other) as client:  # others are not limited
            await client.synthesize("d", ["One.", "Two.", "Three."])
            await client.until(lambda fs: len(fs) == 3)
            assert {f["status"] for f in client.frames} == {"queued"}
            assert len(await job_ids(redis_url)) == 3
    assert limited["type"] == "error" and limited["code"] == "rate_limited"
    assert limited["message"].startswith("rate limit: at most 3 blocks a minute; retry in")
    assert (
        too_many["code"] == "rate_limited" and "exceed the rate limit of 3" in too_many["message"]
    )
    assert fits["type"] == "status" and fits["block_idx"] == 2


async def test_blocks_waited_for_per_connection_are_capped(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    cfg = make_config(tmp_path, gateway={"max_pending_blocks": 3}, workers={"simulated": 0})
    _, token = await add_user(pg_url, "hoarder", "unlimited")
    async with open_daemon(cfg, redis_url, pg_url) as d, WsClient.connect(ws_url(d), token) as c:
        await c.synthesize("d", ["One.", "Two."])
        await c.until(lambda fs: len(fs) == 2)
        await c.synthesize("d", {2: "Three.", 3: "Four."})
        refused = await c.receive()
        assert refused["code"] == "rate_limited"
        assert refused["message"].startswith("blocks: this connection already waits for 2 blocks")
        await c.send({"type": "cursor_moved", "document_id": "d", "block_idx": 5})
        assert (await c.receive())["block_idxs"] == [0, 1]
        await c.synthesize("d", {2: "Three.", 3: "Four."})  # room again
        await c.until(lambda fs: len(fs) == 6)
        assert first_statuses(c, "d") == {0: "queued", 1: "queued", 2: "queued", 3: "queued"}


# -- eviction ----------------------------------------------------------------------------------


async def test_cursor_moved_evicts_queued_blocks_keeps_held_and_shared_jobs(
    manual_daemon: Daemon, redis_url: str, pg_url: str
) -> None:
    _, token_a = await add_user(pg_url, "reader", "plus")
    _, token_b = await add_user(pg_url, "other", "plus")
    worker = ManualWorker(redis_url)
    texts = [f"Sentence number {i}." for i in range(5)]
    url = ws_url(manual_daemon)
    async with WsClient.connect(url, token_a) as a, WsClient.connect(url, token_b) as b:
        await a.synthesize("book", texts)
        await a.until(lambda fs: len(fs) == 5)
        await b.synthesize("elsewhere", {0: texts[2]})  # b also wants block 2's audio
        assert (await b.receive())["status"] == "queued"
        held = await worker.pull_wait()  # block 0: a worker holds it now
        assert held.block_idx == 0
        await a.until(lambda _: "processing" in a.statuses("book")[0])

        await a.send({"type": "cursor_moved", "document_id": "other-doc", "block_idx": 0})
        assert await a.receive() == {
            "type": "evicted",
            "document_id": "other-doc",
            "block_idxs": [],
        }
        await a.send({"type": "cursor_moved", "document_id": "book", "block_idx": 12})
        evicted = await a.receive()
        assert evicted == {"type": "evicted", "document_id": "book", "block_idxs": [1, 2, 3, 4]}

        # blocks 1, 3, 4 left the queue; block 2 stays for b
        queued = [json.loads(j) for j in await _jobs(redis_url)]
        assert sorted(j["text"] for j in queued) == [texts[0], texts[2]]
        assert len(await queue_ids(redis_url)) == 1
        # a second cursor_moved finds nothing left to evict
        await a.send({"type": "cursor_moved", "document_id": "book", "block_idx": 0})
        assert (await a.receive())["block_idxs"] == []

        await worker.finish(held)
        shared = await worker.pull_wait()
        await worker.finish(shared)
        await a.until(lambda _: 0 in a.terminal("book"))
        await b.until(lambda _: 0 in b.terminal("elsewhere"))
        # a's evicted block 2 finished too (for b): a must not hear of it. A sentinel request
        # proves a has received everything sent before it.
        await a.synthesize("sentinel", ["Sentinel."])
        await a.until(lambda _: 0 in a.statuses("sentinel"))
    assert set(a.terminal("book")) == {0}
    assert a.statuses("book")[2] == ["queued"]


async def _jobs(redis_url: str) -> list[bytes]:
    return await redis_call(redis_url, "HVALS", "tts:jobs")


async def test_two_connections_of_one_user_each_hear_only_their_own_blocks(
    manual_daemon: Daemon, redis_url: str, pg_url: str
) -> None:
    _, token = await add_user(pg_url, "two-tabs", "plus")
    worker = ManualWorker(redis_url)
    url = ws_url(manual_daemon)
    async with WsClient.connect(url, token) as tab1, WsClient.connect(url, token) as tab2:
        await tab1.synthesize("doc", {0: "Only tab one."})
        await tab2.synthesize("doc", {1: "Only tab two."})
        await tab1.synthesize("doc", {2: "Both tabs."})
        await tab2.synthesize("doc", {2: "Both tabs."})
        await tab1.synthesize("doc", {3: "Both, then tab one moves on."})
        await tab2.synthesize("doc", {3: "Both, then tab one moves on."})
        await tab1.until(lambda fs: len(fs) == 3)
        await tab2.until(lambda fs: len(fs) == 3)
        assert len(await job_ids(redis_url)) == 4
        await tab1.send({"type": "cursor_moved", "document_id": "doc", "block_idx": 9})
        await tab1.until(lambda fs: fs[-1]["type"] == "evicted")
        assert tab1.frames[-1]["block_idxs"] == [0, 2, 3]
        # tab2 still waits for 2 and 3: their jobs stay; tab1's block 0 job is gone
        assert len(await job_ids(redis_url)) == 3
        for _ in range(3):
            await worker.finish(await worker.pull_wait())
        await tab2.until(lambda _: set(tab2.terminal("doc")) == {1, 2, 3})
        await tab1.synthesize("doc", {0: "Only tab one."})  # asked again after the eviction
        await tab1.until(lambda fs: fs[-1].get("block_idx") == 0)
        await worker.finish(await worker.pull_wait())
        await tab1.until(lambda _: set(tab1.terminal("doc")) == {0})
        await tab2.synthesize("sentinel", ["Sentinel."])
        await tab2.until(lambda _: 0 in tab2.statuses("sentinel"))
    assert set(tab1.statuses("doc")) == {0, 2, 3}
    assert set(tab2.statuses("doc")) == {1, 2, 3}
    for idx in (1, 2, 3):
        assert len([f for f in status_frames(tab2, "doc", idx) if f["status"] == "cached"]) == 1


async def test_closing_a_connection_drops_its_queued_jobs_unless_someone_else_waits(
    manual_daemon: Daemon, redis_url: str, pg_url: str
) -> None:
    _, token_a = await add_user(pg_url, "leaver", "plus")
    _, token_b = await add_user(pg_url, "stayer", "plus")
    url = ws_url(manual_daemon)
    async with WsClient.connect(url, token_b) as b:
        await b.synthesize("doc", ["Shared one."])
        assert (await b.receive())["status"] == "queued"
        async with WsClient.connect(url, token_a) as a:
            await a.synthesize("doc", ["Shared one.", "Mine alone.", "Mine too."])
            await a.until(lambda fs: len(fs) == 3)
            assert len(await queue_ids(redis_url)) == 3
        await wait_until(
            lambda: _queue_len_is(redis_url, 1), what="the leaver's own jobs to leave the queue"
        )
        worker = ManualWorker(redis_url)
        job = await worker.pull_wait()
        assert job.text == "Shared one."
        await worker.finish(job)
        await b.until(lambda _: 0 in b.terminal("doc"))


async def _queue_len_is(redis_url: str, n: int) -> bool:
    return len(await queue_ids(redis_url)) == n


# -- isolation and several daemons -------------------------------------------------------------


async def test_two_users_same_document_id_each_see_only_their_own_statuses(
    daemon: Daemon, pg_url: str
) -> None:
    _, token_a = await add_user(pg_url, "ann", "plus")
    _, token_b = await add_user(pg_url, "ben", "plus")
    url = ws_url(daemon)
    texts_a = {0: "Ann reads this.", 1: "Ann's second block.", 2: "Shared words."}
    texts_b = {1: "Ben reads that.", 2: "Shared words.", 5: "Ben's own block five."}
    async with WsClient.connect(url, token_a) as a, WsClient.connect(url, token_b) as b:
        await a.synthesize("doc-1", texts_a)
        await b.synthesize("doc-1", texts_b)
        await a.until(lambda _: set(a.terminal("doc-1")) == set(texts_a))
        await b.until(lambda _: set(b.terminal("doc-1")) == set(texts_b))
        for client in (a, b):  # everything published so far has arrived: a sentinel each
            await client.synthesize("sentinel", ["Sentinel."])
            await client.until(lambda fs, c=client: 0 in c.statuses("sentinel"))
    assert set(a.statuses("doc-1")) == set(texts_a)
    assert set(b.statuses("doc-1")) == set(texts_b)
    for client in (a, b):
        for frames in client.statuses("doc-1").values():
            assert len([s for s in frames if s in ("cached", "skipped", "error")]) == 1
    # block 1 differs between them: each got the audio of their own text
    assert a.terminal("doc-1")[1]["audio_url"] != b.terminal("doc-1")[1]["audio_url"]
    assert a.terminal("doc-1")[2]["audio_url"] == b.terminal("doc-1")[2]["audio_url"]


async def test_two_daemons_sharing_redis_share_jobs_notify_across_and_rate_limit_together(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    secret = tmp_path / "shared-secret" / "variant_hmac.key"
    common = {
        "gateway": {"variant_secret_path": str(secret), "rate_limit_blocks_per_min": 4},
        "workers": {"simulated": 0},
    }
    cfg_a = make_config(tmp_path / "a", **common)
    cfg_b = make_config(tmp_path / "b", **common)
    alice, token_a = await add_user(pg_url, "alice", "plus")
    _, token_b = await add_user(pg_url, "bob", "plus")
    worker = ManualWorker(redis_url)
    async with (
        open_daemon(cfg_a, redis_url, pg_url) as da,
        open_daemon(cfg_b, redis_url, pg_url) as db,
    ):
        async with (
            WsClient.connect(ws_url(da), token_a) as a,
            WsClient.connect(ws_url(db), token_b) as b,
            WsClient.connect(ws_url(db), token_a) as a_on_b,
        ):
            await a.synthesize("doc", ["Across daemons."])
            assert (await a.receive())["status"] == "queued"
            await b.synthesize("doc", ["Across daemons."])
            assert (await b.receive())["status"] == "queued"
            assert len(await job_ids(redis_url)) == 1  # same HMAC key: one variant, one job
            job = await worker.pull_wait()
            await worker.finish(job)
            await a.until(lambda _: 0 in a.terminal("doc"))
            await b.until(lambda _: 0 in b.terminal("doc"))
            assert a.terminal("doc")[0]["audio_url"] == b.terminal("doc")[0]["audio_url"]

            # alice's rate limit (4) is hers across daemons: 1 block used through a, 2 through b;
            # 2 more through a are one too many although a alone has seen only 1 (the bucket
            # lives in Redis)
            await a_on_b.synthesize("doc2", ["One.", "Two."])
            await a_on_b.until(lambda fs: len(fs) == 2)
            await a.synthesize("doc2", {2: "Three.", 3: "Four."})
            limited = await a.receive()
            assert limited["code"] == "rate_limited"
            await a_on_b.synthesize("sentinel", ["The last one that fits."])
            assert (await a_on_b.receive())["status"] == "queued"
        # bob's statuses never reached alice's connection on daemon b, nor hers his
        assert {f["document_id"] for f in a_on_b.frames} == {"doc2", "sentinel"}
        assert {f["document_id"] for f in b.frames} == {"doc"}
    rows = await wait_until(lambda: pg_fetch(pg_url, "SELECT user_id FROM usage_log"))
    assert [r["user_id"] for r in rows] == [alice]


# -- failures ----------------------------------------------------------------------------------


async def test_a_redis_error_mid_request_answers_internal_and_nothing_later(
    manual_daemon: Daemon, redis_url: str, pg_url: str
) -> None:
    user, token = await add_user(pg_url, "unlucky", "plus")
    worker = ManualWorker(redis_url)
    async with WsClient.connect(ws_url(manual_daemon), token) as client:
        # a key of the wrong type makes enqueue.lua fail (before it creates anything)
        await redis_call(redis_url, "SET", f"tts:rate:{user}", "not a hash")
        await client.synthesize("doc", ["Lost in transit."])
        reply = await client.receive()
        assert reply == {"type": "error", "code": "internal", "message": "internal error"}
        assert await job_ids(redis_url) == []
        await redis_call(redis_url, "DEL", f"tts:rate:{user}")
        await client.synthesize("doc", {1: "Works again."})
        assert (await client.receive())["status"] == "queued"
        await worker.finish(await worker.pull_wait())
        await client.until(lambda _: 1 in client.terminal("doc"))
    assert set(client.statuses("doc")) == {1}
    gateway_healthy(manual_daemon)


async def test_statuses_lost_while_pubsub_was_down_are_recovered(
    manual_daemon: Daemon, redis_url: str, pg_url: str
) -> None:
    """Pub/sub is at-most-once. After the listener reconnects, the gateway re-reads the state of
    every open wait: done → ``cached``; gone → ``error`` (ask again); in flight → keep waiting."""
    _, token = await add_user(pg_url, "resync", "plus")
    worker = ManualWorker(redis_url)
    assert manual_daemon.gateway is not None
    async with WsClient.connect(ws_url(manual_daemon), token) as client:
        await client.synthesize("doc", ["Finishes unheard.", "Vanishes.", "Still running."])
        await client.until(lambda fs: len(fs) == 3)
        jobs = {j.text: j for j in [await worker.pull_wait() for _ in range(3)]}
        await client.until(lambda fs: len(fs) == 6)  # three "processing"
        # the notifications of the first two are lost: nobody is listed as waiting for them
        for job in (jobs["Finishes unheard."], jobs["Vanishes."]):
            await redis_call(redis_url, "DEL", f"tts:waiters:{job.variant_hash}")
        await worker.finish(jobs["Finishes unheard."])
        await wait_until(
            lambda: redis_call(
                redis_url, "EXISTS", f"tts:audio:{jobs['Finishes unheard.'].variant_hash}"
            ),
            what="audio stored",
        )
        vanished = jobs["Vanishes."]
        await redis_call(redis_url, "DEL", f"tts:inflight:{vanished.variant_hash}")
        resyncs = manual_daemon.gateway.resyncs
        await redis_call(redis_url, "CLIENT", "KILL", "TYPE", "pubsub")
        await wait_until(lambda: manual_daemon.gateway.resyncs > resyncs, what="a resync")
        await client.until(lambda _: set(client.terminal("doc")) == {0, 1})
        terminal = client.terminal("doc")
        assert terminal[0]["status"] == "cached"
        assert terminal[1]["status"] == "error" and terminal[1]["recoverable"] is True
        # the third still gets its status the ordinary way, once
        await worker.finish(jobs["Still running."])
        await client.until(lambda _: 2 in client.terminal("doc"))
    assert [s for s in client.statuses("doc")[2] if s == "cached"] == ["cached"]
    gateway_healthy(manual_daemon)  # losing pub/sub did not take the gateway down


async def test_hostile_connections_do_not_hurt_the_gateway(
    manual_daemon: Daemon, pg_url: str
) -> None:
    _, token = await add_user(pg_url, "victim", "plus")
    url = ws_url(manual_daemon)
    assert manual_daemon.addresses is not None
    port = manual_daemon.addresses.ws_port
    for payload in (
        b"GARBAGE\r\n\r\n",
        b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n\r\n",  # not an upgrade
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on a plain port
        b"GET /v1/ws HTTP/1.1\r\n",  # then vanish mid-handshake
        b"",
    ):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            if payload:
                await stream.send_all(payload)
            with trio.move_on_after(0.5):
                await stream.receive_some(4096)
    # a client that accepts then closes its socket without a close frame, mid-request
    async with WsClient.connect(url, token) as rude:
        await rude.synthesize("doc", ["Abandoned."])
        await rude.ws._stream.aclose()  # a rude client: no close frame
    async with WsClient.connect(url, token) as client:
        await client.synthesize("doc", ["Still serving."])
        assert (await client.receive())["status"] == "queued"
    gateway_healthy(manual_daemon)


async def test_statuses_dropped_by_a_full_fan_out_are_recovered_exactly_once(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    """The notification listener never waits for the fan-out: with its channel full, a status is
    dropped and the open waits are re-read from Redis instead. Bursts of finished jobs against a
    one-slot channel: every block still hears exactly one terminal status, and the drops show in
    the metric and an ``error`` event."""
    cfg = make_config(tmp_path, workers={"simulated": 0}, gateway={"notify_buffer": 1})
    _, token = await add_user(pg_url, "burst", "plus")
    worker = ManualWorker(redis_url)
    n = 24
    async with open_daemon(cfg, redis_url, pg_url) as daemon:
        assert daemon.gateway is not None
        errors: list[Any] = []
        daemon.events.add_listener(lambda e: errors.append(e) if e.kind == "error" else None)
        async with WsClient.connect(ws_url(daemon), token) as client:
            for burst in range(5):
                doc = f"doc{burst}"
                await client.synthesize(doc, [f"Burst {burst}, block {i}." for i in range(n)])
                jobs = [await worker.pull_wait() for _ in range(n)]
                async with trio.open_nursery() as nursery:
                    for job in jobs:
                        nursery.start_soon(worker.finish, job)
                await client.until(lambda _, doc=doc: len(client.terminal(doc)) == n)
                if daemon.gateway.notifications_dropped:
                    break
            assert daemon.gateway.notifications_dropped > 0, "five bursts and never a full channel"
            # Settled: nothing more arrives for any block (no second terminal status).
            await wait_until(
                lambda: daemon.gateway is not None and not daemon.gateway._unsynced_drops,
                what="the drops resynced",
            )
            await client.synthesize("last", ["After the bursts."])
            last = await worker.pull_wait()
            await worker.finish(last)
            await client.until(lambda _: len(client.terminal("last")) == 1)
        for b in range(burst + 1):
            for idx, statuses in client.statuses(f"doc{b}").items():
                assert [s for s in statuses if s in ("cached", "error", "skipped")] == ["cached"], (
                    b,
                    idx,
                    statuses,
                )
        assert daemon.addresses is not None
        dropped = (await scrape(daemon.addresses.ops_url))[("tts_notifications_dropped_total", ())]
        assert dropped == daemon.gateway.notifications_dropped
        assert any("notification channel full" in e.message for e in errors)
