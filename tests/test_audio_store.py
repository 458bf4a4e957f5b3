"""The durable audio store on its own: atomic, idempotent writes, LRU eviction under a cap with
pinning, purge by model, a full disk, and two stores sharing one directory."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import trio

from daemon.audio.store import AudioObject, FileAudioStore, StoreFull


def obj(i: int, size: int = 1000, *, model: str = "kokoro", created: float = 0.0) -> AudioObject:
    h = f"{i:040x}"
    return AudioObject(
        variant_hash=h,
        data=bytes([i % 256]) * size,
        content_type="audio/wav",
        duration_ms=100,
        model=model,
        revision="r1",
        created=created or time.time(),
    )


async def open_store(root: Path, **kw: object) -> FileAudioStore:
    store = FileAudioStore(root, **kw)  # type: ignore[arg-type]
    await store.open()
    return store


async def test_put_get_roundtrip_and_idempotent(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "a")
    o = obj(1)
    assert await store.put_many([o]) == [True]
    path = store.path(o.variant_hash)
    inode = path.stat().st_ino
    # A redelivery, or a second daemon, writes nothing new.
    assert await store.put_many([o, obj(2)]) == [False, True]
    assert path.stat().st_ino == inode
    got = await store.get(o.variant_hash)
    assert got is not None
    assert (got.data, got.content_type) == (o.data, "audio/wav")
    assert (got.model, got.revision) == ("kokoro", "r1")
    assert await store.contains_many([o.variant_hash, f"{99:040x}", "../etc"]) == [
        True,
        False,
        False,
    ]
    assert await store.get(f"{99:040x}") is None
    assert not list((tmp_path / "a" / "tmp").iterdir())  # no temporary file left
    stats = await store.stats()
    sizes = path.stat().st_size + store.path(obj(2).variant_hash).stat().st_size
    assert (stats.objects, stats.bytes) == (2, sizes)


async def test_damaged_object_is_refused_not_served(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    o = obj(3)
    await store.put_many([o])
    path = store.path(o.variant_hash)
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(ValueError, match="damaged"):
        await store.get(o.variant_hash)


async def test_cap_evicts_least_recently_used_and_keeps_pinned(tmp_path: Path) -> None:
    size = 1000
    store = await open_store(tmp_path, max_bytes=20 * 1100, pin_days=1.0)
    first = [obj(i, size) for i in range(10)]
    await store.put_many(first)
    # Object 0 is read (pinned for a day); objects 1..9 are older than what comes next.
    assert await store.get(first[0].variant_hash) is not None
    past = time.time_ns() - 3600 * 10**9
    for o in first[1:]:
        os.utime(store.path(o.variant_hash), ns=(0, past))
    # A flood: 5 batches of 10 new objects, each followed by eviction when over the cap.
    for batch in range(5):
        await store.put_many([obj(100 + batch * 10 + i, size) for i in range(10)])
        if store.over_cap():
            await store.evict()
    stats = await store.stats()
    assert stats.bytes <= store.max_bytes
    assert await store.contains_many([first[0].variant_hash]) == [True]  # pinned survives
    # The oldest unpinned ones went first.
    assert await store.contains_many([o.variant_hash for o in first[1:]]) == [False] * 9
    assert store.evictions > 0
    # The newest batch is all there.
    newest = [obj(140 + i).variant_hash for i in range(10)]
    assert all(await store.contains_many(newest))


async def test_purge_by_model_and_date(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    old = time.time() - 86400
    objs = [
        obj(1, model="kokoro", created=old),
        obj(2, model="kokoro"),
        obj(3, model="premium", created=old),
    ]
    await store.put_many(objs)
    purged = await store.purge(model="kokoro", before=time.time() - 3600)
    assert purged == [objs[0].variant_hash]
    assert await store.contains_many([o.variant_hash for o in objs]) == [False, True, True]
    # Reading headers for a purge is not a read: nothing got pinned by it.
    assert store.path(objs[1].variant_hash).stat().st_atime == 0
    assert sorted(await store.purge(model="kokoro", before=None)) == [objs[1].variant_hash]


async def test_two_stores_share_one_directory(tmp_path: Path) -> None:
    a = await open_store(tmp_path, max_bytes=15 * 1100)
    b = await open_store(tmp_path, max_bytes=15 * 1100)

    async def write(store: FileAudioStore, base: int) -> None:
        for i in range(10):
            await store.put_many([obj(base + i), obj(i)])  # obj(i): both write the same ones
            if store.over_cap():
                await store.evict()

    async with trio.open_nursery() as n:
        n.start_soon(write, a, 1000)
        n.start_soon(write, b, 2000)
    await a.evict()
    stats = await b.stats()
    assert stats.bytes <= 15 * 1100
    for h in (obj(5).variant_hash, obj(1009).variant_hash, obj(2009).variant_hash):
        got = await b.get(h)
        assert got is None or len(got.data) == 1000  # evicted or whole, never torn


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_full_disk_raises_store_full_and_leaves_nothing_half_written(
    tmp_path: Path,
) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        store = await open_store(mnt)
        with pytest.raises(StoreFull):
            await store.put_many([obj(i, 16000) for i in range(10)])
        assert not list((mnt / "tmp").iterdir())
        for o in [obj(i, 16000) for i in range(10)]:
            got = store.get_sync(o.variant_hash, touch=False)
            assert got is None or got.data == o.data
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
