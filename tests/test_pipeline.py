"""The walking pipeline, end to end on real servers: one synthesize request through everything."""

from __future__ import annotations

import httpx
import pytest

from daemon.runtime.daemon import Daemon
from daemon.testing.client import WsClient, handshake_status
from daemon.testing.stores import add_user
from daemon.testing.waiting import wait_until
from daemon.workers.audio import wav_header_ok
from tests.helpers import usage_rows_at_least

TEXTS = ["Hello there.", "Second block, a little longer.", "And a third one to finish."]


async def test_three_blocks_cached_fetched_and_billed(daemon: Daemon, pg_url: str) -> None:
    user_id, token = await add_user(pg_url, "alice", "plus")
    assert daemon.addresses is not None
    async with WsClient.connect(daemon.addresses.ws_url, token) as client:
        await client.synthesize("doc-1", TEXTS)
        await client.until(lambda _: len(client.terminal("doc-1")) == 3)
    terminal = client.terminal("doc-1")
    assert sorted(terminal) == [0, 1, 2]
    assert {f["status"] for f in terminal.values()} == {"cached"}
    # each block was acknowledged as queued before it was cached
    for idx in range(3):
        assert client.statuses("doc-1")[idx][0] == "queued"

    async with httpx.AsyncClient(base_url=daemon.addresses.http_url) as http:
        for idx, frame in terminal.items():
            response = await http.get(frame["audio_url"])
            assert response.status_code == 200
            assert response.headers["content-type"] == "audio/wav"
            assert wav_header_ok(response.content), f"block {idx}: not a valid WAV"

    rows = await wait_until(
        lambda: usage_rows_at_least(pg_url, 3, user_id=user_id), what="three usage_log rows"
    )
    assert sorted(r["amount"] for r in rows) == sorted(len(t) for t in TEXTS)
    assert {r["usage_type"] for r in rows} == {"server_kokoro"}


async def test_audio_length_follows_the_text(daemon: Daemon, pg_url: str) -> None:
    _, token = await add_user(pg_url, "bob", "plus")
    assert daemon.addresses is not None
    texts = ["Short.", "A much longer block of text that takes several seconds to read aloud."]
    async with WsClient.connect(daemon.addresses.ws_url, token) as client:
        await client.synthesize("doc-len", texts)
        await client.until(lambda _: len(client.terminal()) == 2)
    async with httpx.AsyncClient(base_url=daemon.addresses.http_url) as http:
        sizes = [len((await http.get(client.terminal()[i]["audio_url"])).content) for i in (0, 1)]
    assert sizes[1] > 3 * sizes[0]


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({}, ""),
        ({"Authorization": "Bearer tts_not-a-real-token"}, ""),
        ({}, "?token=tts_not-a-real-token"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, ""),
    ],
)
async def test_handshake_without_valid_token_is_refused_with_401(
    daemon: Daemon, headers: dict[str, str], query: str
) -> None:
    assert daemon.addresses is not None
    status, _ = await handshake_status(daemon.addresses.ws_url + query, headers)
    assert status == 401
    assert daemon.gateway is not None and daemon.gateway.connection_count == 0


async def test_valid_token_upgrades_to_websocket(daemon: Daemon, pg_url: str) -> None:
    _, token = await add_user(pg_url, "dave", "free")
    assert daemon.addresses is not None
    status, _ = await handshake_status(
        daemon.addresses.ws_url, {"Authorization": f"Bearer {token}"}
    )
    assert status == 101


async def test_token_in_query_string_is_accepted(daemon: Daemon, pg_url: str) -> None:
    _, token = await add_user(pg_url, "carol", "free")
    assert daemon.addresses is not None
    async with WsClient.connect(daemon.addresses.ws_url, token, query_token=True) as client:
        await client.synthesize("doc-q", ["Browsers cannot set headers."])
        frame = await client.receive()
    assert frame["type"] == "status" and frame["status"] == "queued"


async def test_healthz_reports_services_and_queue_depth(daemon: Daemon) -> None:
    assert daemon.addresses is not None
    async with httpx.AsyncClient(base_url=daemon.addresses.ops_url) as http:
        response = await http.get("/healthz")
        missing = await http.get("/v1/audio/" + "0" * 40)
    assert response.status_code == 200
    body = response.json()
    for name in ("gateway", "hot", "billing", "scanner"):
        assert body["services"][name]["state"] == "running"
    assert body["billing_queue_depth"] == 0
    assert body["pools"]["request"]["size"] == 30
    assert body["pools"]["billing"]["size"] == 2
    assert missing.status_code == 404
