"""Audio that outlives Redis, end to end on real servers: a block asked for again after the Redis
TTL, after FLUSHALL or after a daemon restart comes back ``cached`` from the durable store with
the same bytes, no job and no bill; the persister crashing mid-batch loses nothing and writes
each object once; the size cap holds under a flood while pinned audio stays; purge by model
revision; two daemons share one store; HTTP caching and ranges; a full disk."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
import trio
import trio_asyncio

from daemon.audio.purge import purge_audio
from daemon.audio.store import FileAudioStore
from daemon.cli import main as cli_main
from daemon.config import Config
from daemon.contracts import Keys
from daemon.runtime.daemon import Daemon, open_daemon
from daemon.runtime.faults import InjectedFault
from daemon.stores.redis import open_redis
from daemon.testing import WsClient, add_user, make_config, redis_call, wait_until, write_config
from tests.helpers import Events, usage_rows, usage_rows_at_least

TEXTS = [f"Block number {i} of a durable document." for i in range(4)]


async def synthesize(
    daemon: Daemon, token: str, document_id: str, texts: Sequence[str]
) -> WsClient:
    assert daemon.addresses is not None
    async with WsClient.connect(daemon.addresses.ws_url, token) as client:
        await client.synthesize(document_id, list(texts))
        await client.until(lambda _: len(client.terminal(document_id)) == len(texts), 60)
    return client


async def fetch(daemon: Daemon, client: WsClient, document_id: str) -> list[bytes]:
    assert daemon.addresses is not None
    out = []
    async with httpx.AsyncClient(base_url=daemon.addresses.http_url) as http:
        terminal = client.terminal(document_id)
        for idx in sorted(terminal):
            assert terminal[idx]["status"] == "cached", terminal[idx]
            response = await http.get(terminal[idx]["audio_url"])
            assert response.status_code == 200, response.text
            out.append(response.content)
    return out


def hashes(client: WsClient, document_id: str) -> list[str]:
    terminal = client.terminal(document_id)
    return [terminal[i]["audio_url"].rsplit("/", 1)[1] for i in sorted(terminal)]


async def flushall(redis_url: str) -> None:
    """Redis loses everything while a daemon runs; back once its mirror service has copied the
    entitlements and tokens from Postgres again (the handshake reads only Redis)."""
    await redis_call(redis_url, "FLUSHALL")
    await wait_until(
        lambda: redis_call(redis_url, "EXISTS", Keys.MIRROR_READY), what="mirror rebuilt"
    )


async def persisted(daemon: Daemon, n: int) -> bool:
    """Everything finalized is in the store: the persist stream is empty, n objects written."""
    persister = daemon.persister
    if persister is None:  # (restarting)
        return False
    length = int(await redis_call(daemon.redis_url, "XLEN", Keys.PERSIST))
    return length == 0 and persister.written + persister.existing >= n


@pytest.mark.parametrize("lost_by", ["ttl", "flushall", "restart"])
async def test_re_request_after_redis_lost_the_audio_is_cached_from_the_store_and_free(
    tmp_path: Path, redis_url: str, pg_url: str, lost_by: str
) -> None:
    cfg = make_config(tmp_path, hot={"audio_ttl_s": 1})
    user_id, token = await add_user(pg_url, "reader", "plus")
    async with open_daemon(cfg, redis_url, pg_url) as daemon:
        first = await synthesize(daemon, token, "doc-1", TEXTS)
        original = await fetch(daemon, first, "doc-1")
        await wait_until(lambda: persisted(daemon, len(TEXTS)), what="audio persisted")
        await wait_until(lambda: usage_rows_at_least(pg_url, len(TEXTS)), what="billed")
        assert daemon.persister is not None and daemon.persister.written == len(TEXTS)
        keys = [Keys.audio(h) for h in hashes(first, "doc-1")]
        if lost_by == "ttl":
            # Persisted: the TTL applies from now on, and Redis lets the audio go.
            await wait_until(
                lambda: _none_exist(redis_url, keys), timeout_s=30, what="audio expired"
            )
        elif lost_by == "flushall":
            await flushall(redis_url)
        if lost_by != "restart":
            events = Events(daemon)
            again = await synthesize(daemon, token, "doc-2", TEXTS)
            await _check_cached_and_free(daemon, again, original, pg_url, user_id, events)
    if lost_by == "restart":
        await redis_call(redis_url, "FLUSHALL")
        async with open_daemon(cfg, redis_url, pg_url) as daemon:
            events = Events(daemon)
            again = await synthesize(daemon, token, "doc-2", TEXTS)
            await _check_cached_and_free(daemon, again, original, pg_url, user_id, events)


async def _none_exist(redis_url: str, keys: list[str]) -> bool:
    return int(await redis_call(redis_url, "EXISTS", *keys)) == 0


async def _check_cached_and_free(
    daemon: Daemon,
    client: WsClient,
    original: list[bytes],
    pg_url: str,
    user_id: int,
    events: Events,
) -> None:
    # The first and only status of each block is `cached`: no job was created.
    assert client.statuses("doc-2") == {i: ["cached"] for i in range(len(TEXTS))}
    assert await fetch(daemon, client, "doc-2") == original
    assert int(await redis_call(daemon.redis_url, "HLEN", Keys.JOBS)) == 0
    assert int(await redis_call(daemon.redis_url, "XLEN", Keys.BILLING)) == 0
    # …and no usage hold was placed for them (only its running sums may be there).
    held = await redis_call(daemon.redis_url, "HKEYS", Keys.holds(user_id))
    assert [k for k in held if not k.startswith(b"sum:")] == []
    assert not events.named("synthesis_complete")
    assert len(await usage_rows(pg_url, user_id=user_id)) == len(TEXTS)
    assert daemon.metrics.audio_store_hits.labels("synthesize")._value.get() == len(TEXTS)


class CrashOnce:
    """A fault point that crashes the persister once, at one point."""

    def __init__(self, point: str) -> None:
        self.point = point
        self.fired = 0

    async def __call__(self, point: str) -> None:
        if point == self.point and not self.fired:
            self.fired += 1
            raise InjectedFault(f"injected fault at {point}")


@pytest.mark.parametrize("point", ["persist.read", "persist.written"])
async def test_persister_crash_mid_batch_loses_nothing_and_writes_each_object_once(
    tmp_path: Path, redis_url: str, pg_url: str, point: str
) -> None:
    cfg = make_config(tmp_path, audio={"persist_batch": 4})
    fault = CrashOnce(point)
    _, token = await add_user(pg_url, "reader", "plus")
    texts = [f"Crash test block {i}, long enough to be audio." for i in range(12)]
    async with open_daemon(cfg, redis_url, pg_url, persist_fault=fault) as daemon:
        events = Events(daemon)
        client = await synthesize(daemon, token, "doc", texts)
        original = await fetch(daemon, client, "doc")
        await wait_until(lambda: persisted(daemon, len(texts)), timeout_s=30, what="persisted")
        assert fault.fired == 1
        assert events.named("service_restarted", service="persister")
        persister, store = daemon.persister, daemon.audio_store
        assert persister is not None and store is not None
        assert persister.written == len(texts)  # each object written once
        assert store.writes == len(texts)
        if point == "persist.written":
            assert persister.existing >= 1  # the redelivered batch found its objects there
        await flushall(redis_url)
        again = await synthesize(daemon, token, "doc-2", texts)
        assert await fetch(daemon, again, "doc-2") == original


async def test_size_cap_holds_under_a_flood_and_pinned_audio_survives(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    text = "A flood block of fairly even length, number {:03d}."
    # Simulated audio is ~12 KB a second of speech; these texts are ~3.4 s: ~41 KB each.
    cfg = make_config(tmp_path, audio={"max_bytes": 400_000, "pin_days": 1.0, "persist_batch": 8})
    _, token = await add_user(pg_url, "flooder", "unlimited")
    async with open_daemon(cfg, redis_url, pg_url) as daemon:
        store = daemon.audio_store
        assert store is not None
        pinned_client = await synthesize(daemon, token, "pinned", [text.format(999)])
        await wait_until(lambda: persisted(daemon, 1), what="pinned block persisted")
        await fetch(daemon, pinned_client, "pinned")  # a read: pins it (once flushed)
        (pinned,) = hashes(pinned_client, "pinned")
        await wait_until(
            lambda: store.path(pinned).stat().st_atime > 0, what="the read marked in the store"
        )
        flood = [text.format(i) for i in range(40)]
        for start in range(0, len(flood), 10):
            await synthesize(daemon, token, f"flood-{start}", flood[start : start + 10])
        await wait_until(lambda: persisted(daemon, 41), timeout_s=60, what="flood persisted")
        # (the last batch's eviction follows its acknowledgement)
        await wait_until(
            lambda: _store_bytes_at_most(store, 400_000), timeout_s=30, what="under the cap"
        )
        assert (await store.contains_many([pinned])) == [True]
        assert daemon.metrics.audio_store_evictions._value.get() > 0


async def _store_bytes_at_most(store: FileAudioStore, cap: int) -> bool:
    return (await store.stats()).bytes <= cap


async def test_purge_by_model_revision_removes_old_audio_from_both_tiers(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    _, token = await add_user(pg_url, "reader", "plus")
    text = ["The same sentence under two model builds."]
    cfg1 = make_config(tmp_path, models={"revision": {"kokoro": "build-1"}})
    async with open_daemon(cfg1, redis_url, pg_url) as daemon:
        old = await synthesize(daemon, token, "doc", text)
        await wait_until(lambda: persisted(daemon, 1), what="persisted")
    (old_hash,) = hashes(old, "doc")
    bumped_at = time.time()
    await trio.sleep(0.01)
    cfg2 = make_config(tmp_path, models={"revision": {"kokoro": "build-2"}})
    async with open_daemon(cfg2, redis_url, pg_url) as daemon:
        new = await synthesize(daemon, token, "doc", text)
        # A new revision is a new variant: synthesized again, not served from the old audio.
        assert new.statuses("doc")[0][0] == "queued"
        (new_hash,) = hashes(new, "doc")
        assert new_hash != old_hash
        await wait_until(lambda: persisted(daemon, 1), what="persisted")
        store = daemon.audio_store
        assert store is not None
        obj = await store.get(new_hash)
        assert obj is not None and (obj.model, obj.revision) == ("kokoro", "build-2")
        async with trio_asyncio.open_loop(), open_redis(redis_url) as redis:
            result = await purge_audio(redis, store, model="kokoro", before=bumped_at)
        assert (result.redis, result.store) == (1, 1)
        assert await store.contains_many([old_hash, new_hash]) == [False, True]
        assert int(await redis_call(redis_url, "EXISTS", Keys.audio(old_hash))) == 0
        assert int(await redis_call(redis_url, "EXISTS", Keys.audio(new_hash))) == 1


def test_audio_purge_command_line_is_checked() -> None:
    assert cli_main(["audio", "purge", "--model", "no-such-model"]) == 2
    assert cli_main(["audio", "purge", "--model", "kokoro", "--before", "last tuesday"]) == 2


async def test_two_daemons_share_one_store(tmp_path: Path, redis_url: str, pg_url: str) -> None:
    shared = {"dir": str(tmp_path / "shared-audio")}
    secret = {"variant_secret_path": str(tmp_path / "variant.key")}
    cfg_a = make_config(tmp_path / "a", audio=shared, gateway=secret)
    cfg_b = make_config(tmp_path / "b", audio=shared, gateway=secret)
    user_id, token = await add_user(pg_url, "reader", "plus")
    async with (
        open_daemon(cfg_a, redis_url, pg_url) as a,
        open_daemon(cfg_b, redis_url, pg_url) as b,
    ):
        client = await synthesize(a, token, "doc", TEXTS)
        original = await fetch(a, client, "doc")
        await wait_until(lambda: usage_rows_at_least(pg_url, len(TEXTS)), what="billed")
        await wait_until(
            lambda: _stream_empty(redis_url, Keys.PERSIST), what="persisted by either daemon"
        )
        assert a.audio_store is not None and b.audio_store is not None
        assert (await b.audio_store.stats()).objects == len(TEXTS)
        await flushall(redis_url)
        events = Events(b)
        again = await synthesize(b, token, "doc-2", TEXTS)
        await _check_cached_and_free(b, again, original, pg_url, user_id, events)


async def _stream_empty(redis_url: str, key: str) -> bool:
    return int(await redis_call(redis_url, "XLEN", key)) == 0


async def test_audio_http_is_immutable_with_etag_and_ranges(daemon: Daemon, pg_url: str) -> None:
    _, token = await add_user(pg_url, "seeker", "plus")
    client = await synthesize(daemon, token, "doc", TEXTS[:1])
    (data,) = await fetch(daemon, client, "doc")
    assert daemon.addresses is not None
    url = client.terminal("doc")[0]["audio_url"]
    async with httpx.AsyncClient(base_url=daemon.addresses.http_url) as http:
        full = await http.get(url)
        assert full.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert full.headers["accept-ranges"] == "bytes"
        etag = full.headers["etag"]
        assert etag.startswith('"') and etag.endswith('"')
        not_modified = await http.get(url, headers={"If-None-Match": etag})
        assert not_modified.status_code == 304 and not_modified.content == b""
        part = await http.get(url, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206
        assert part.content == data[10:20]
        assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"
        tail = await http.get(url, headers={"Range": "bytes=-5"})
        assert tail.status_code == 206 and tail.content == data[-5:]
        open_ended = await http.get(url, headers={"Range": f"bytes={len(data) - 3}-"})
        assert open_ended.content == data[-3:]
        beyond = await http.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert beyond.status_code == 416
        assert beyond.headers["content-range"] == f"bytes */{len(data)}"
        stale = await http.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
        assert stale.status_code == 200 and stale.content == data
        # The operations view of the store: /healthz, /metrics, the dashboard's data.
        await wait_until(lambda: persisted(daemon, 1), what="persisted")
        await wait_until(
            lambda: daemon.persister is not None and daemon.persister.store.known_objects == 1,
            what="store measured",
        )
    # (on the operations listener, apart from the gateway)
    async with httpx.AsyncClient(base_url=daemon.addresses.ops_url) as ops:
        health = (await ops.get("/healthz")).json()["audio"]
        assert health["state"] == "running" and health["store_objects"] == 1
        assert health["persist_backlog"] == 0 and health["write_errors"] == 0
        metrics = (await ops.get("/metrics")).text
        assert "tts_audio_store_objects 1.0" in metrics
        assert "tts_audio_persist_backlog 0.0" in metrics
        dashboard = (await ops.get("/dashboard/data")).json()
        assert dashboard["audio"]["store_objects"] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_full_disk_backs_the_persister_off_and_never_the_hot_path(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        cfg: Config = make_config(tmp_path, audio={"dir": str(mnt)})
        _, token = await add_user(pg_url, "reader", "plus")
        texts = [f"Disk full block {i}, long enough to take some room." for i in range(6)]
        async with open_daemon(cfg, redis_url, pg_url) as daemon:
            client = await synthesize(daemon, token, "doc", texts)
            # The hot path served every block although the store cannot take them.
            assert {f["status"] for f in client.terminal("doc").values()} == {"cached"}
            original = await fetch(daemon, client, "doc")
            persister = daemon.persister
            assert persister is not None
            await wait_until(lambda: persister.state == "disk_full", what="disk_full reported")
            assert daemon.addresses is not None
            async with httpx.AsyncClient(base_url=daemon.addresses.ops_url) as ops:
                health = await ops.get("/healthz")
                metrics = (await ops.get("/metrics")).text
            assert health.status_code == 200 and health.json()["audio"]["state"] == "disk_full"
            assert "tts_audio_store_write_errors_total" in metrics
            assert daemon.metrics.audio_store_write_errors._value.get() >= 1
            # Redis keeps the audio meanwhile: nothing has a TTL, the backlog waits.
            assert int(await redis_call(redis_url, "XLEN", Keys.PERSIST)) > 0
            subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
            await wait_until(lambda: persisted(daemon, len(texts)), timeout_s=60, what="caught up")
            assert persister.state == "running"
            await flushall(redis_url)
            again = await synthesize(daemon, token, "doc-2", texts)
            assert await fetch(daemon, again, "doc-2") == original
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


class Hold:
    """A fault point that parks the persister at one point until the daemon stops."""

    def __init__(self, point: str) -> None:
        self.point = point

    async def __call__(self, point: str) -> None:
        if point == self.point:
            await trio.sleep_forever()


def _objects(root: Path) -> dict[str, int]:
    """The store's objects: hash → inode (a rewrite would be a new inode: rename of a new file)."""
    return {p.name: p.stat().st_ino for p in (root / "objects").glob("*/*")}


@pytest.mark.slow
async def test_persister_sigkilled_mid_batch_loses_nothing_and_writes_each_object_once(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    """A real ``tts-daemon run`` SIGKILLed while its persister works through a backlog; another
    daemon finishes it: every object in the store once, readable, the bytes that were served."""
    audio = {"persist_batch": 4, "claim_idle_s": 1.0, "dir": str(tmp_path / "audio")}
    cfg = make_config(tmp_path, audio=audio)
    _, token = await add_user(pg_url, "reader", "plus")
    texts = [f"Backlog block {i}, with enough words to make some audio." for i in range(60)]
    # 1. A daemon whose persister is parked: everything finalized waits in tts:persist.
    async with open_daemon(cfg, redis_url, pg_url, persist_fault=Hold("persist.read")) as d:
        client = await synthesize(d, token, "doc", texts)
        served = dict(zip(hashes(client, "doc"), await fetch(d, client, "doc"), strict=True))
    assert int(await redis_call(redis_url, "XLEN", Keys.PERSIST)) == len(texts)
    # 2. A daemon process persisting that backlog, SIGKILLed once the store has some of it.
    config_file = write_config(
        tmp_path / "daemon.toml",
        tmp_path,
        redis={"url": redis_url, "block_s": 0.2},
        postgres={"url": pg_url},
        audio=audio,
        workers={"simulated": 0},
    )
    store_root = tmp_path / "audio"
    with subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--config", str(config_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    ) as proc:
        try:
            await wait_until(lambda: len(_objects(store_root)) >= 1, timeout_s=60, interval_s=0.005)
        finally:
            proc.kill()
    before = _objects(store_root)
    assert len(before) >= 1
    assert len(before) < len(texts)  # killed with the backlog in hand
    # 3. Another daemon takes the killed one's pending entries over and finishes the backlog.
    async with open_daemon(cfg, redis_url, pg_url) as d:
        await wait_until(
            lambda: _stream_empty(redis_url, Keys.PERSIST), timeout_s=60, what="backlog done"
        )
        after = _objects(store_root)
        assert sorted(after) == sorted(served)  # nothing lost
        # Written once: what the killed daemon had renamed into place was not written again.
        assert {h: after[h] for h in before} == before
        store = d.audio_store
        assert store is not None
        for h, data in served.items():
            obj = await store.get(h)
            assert obj is not None and obj.data == data
