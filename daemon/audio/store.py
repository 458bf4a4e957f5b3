"""The durable audio store: content-addressed by variant hash, behind the Redis cache.

``AudioStore`` is the small interface the persister, the read path and ``tts-daemon audio purge``
use; :class:`FileAudioStore` implements it on a directory (``[audio] dir``), which several daemons
may share. An object store can implement the same interface later.

One object is one file, ``objects/<h[:2]>/<hash>``: a one-line JSON header (model, revision,
content type, duration, created, size) then the audio bytes. A write goes to ``tmp/``, is fsynced,
renamed into place and its directory fsynced (once per batch): a file is there whole or not at
all, and a second write of the same hash (a redelivery, another daemon) changes nothing.

Eviction and pinning use the file's own times, so a read costs no extra write most of the time:
mtime is the last access (write or read), atime the last *read* (set to 0 when written). A read
touches both at most once a minute. Over ``max_bytes`` the least recently accessed objects go
first, down to 90 % of the cap, except those read within ``pin_days`` (pinned). Several daemons
evicting at once take turns through a lock file.

Every blocking call runs in a worker thread (``trio.to_thread``) under a ``CapacityLimiter``: the
Trio thread never waits on the disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

__all__ = [
    "AudioObject",
    "AudioStore",
    "EvictResult",
    "FileAudioStore",
    "StoreFull",
    "StoreStats",
    "valid_hash",
]

_HASH = re.compile(r"^[0-9a-f]{16,128}$")
# A read marks the object read (atime) and accessed (mtime) at most this often.
TOUCH_EVERY_S = 60.0
# Eviction frees down to this share of the cap, so that it does not run after every write.
LOW_WATER = 0.9
# Temporary files older than this are left over from a crash: the scan removes them.
STALE_TMP_S = 3600.0
_HEADER_MAX = 4096
# Reads noted between two flushes, at most (beyond: not noted; pinning is best effort there).
MAX_NOTED_READS = 100_000


def valid_hash(variant_hash: str) -> bool:
    """A variant hash as the daemon makes them (hex): the only names the store accepts."""
    return bool(_HASH.match(variant_hash))


class StoreFull(OSError):
    """The store's disk is full (ENOSPC/EDQUOT): back off, do not acknowledge."""


@attrs.frozen
class AudioObject:
    variant_hash: str
    data: bytes
    content_type: str
    duration_ms: int = 0
    model: str = ""
    revision: str = ""
    created: float = 0.0  # when the audio was finalized (Unix time)

    def header(self) -> bytes:
        return (
            json.dumps(
                {
                    "v": 1,
                    "hash": self.variant_hash,
                    "model": self.model,
                    "revision": self.revision,
                    "content_type": self.content_type,
                    "duration_ms": self.duration_ms,
                    "created": self.created,
                    "size": len(self.data),
                },
                separators=(",", ":"),
            ).encode()
            + b"\n"
        )


@attrs.frozen
class StoreStats:
    objects: int
    bytes: int
    pinned: int = 0


@attrs.frozen
class EvictResult:
    evicted: int
    freed_bytes: int
    remaining_bytes: int
    skipped_pinned: int = 0


class AudioStore(Protocol):
    """What the daemon needs from a durable audio store (async; never blocks the Trio thread)."""

    async def put_many(self, objects: Sequence[AudioObject]) -> list[bool]:
        """Store each object durably; True where it was written, False where it was there
        already. Returns only once everything is on disk. Raises StoreFull on a full disk."""
        ...

    async def get(self, variant_hash: str) -> AudioObject | None: ...

    async def contains_many(self, hashes: Sequence[str]) -> list[bool]: ...

    async def delete(self, variant_hash: str) -> bool: ...

    async def stats(self) -> StoreStats: ...

    async def evict(self) -> EvictResult: ...

    async def purge(self, *, model: str, before: float | None) -> list[str]: ...

    def note_read(self, variant_hash: str) -> None:
        """A read the cache served (counts for pinning); must not block."""
        ...


class FileAudioStore:
    """:class:`AudioStore` on a directory (see the module docstring for the layout)."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int = 0,
        pin_days: float = 0.0,
        threads: int = 4,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes  # 0: no cap
        self.pin_s = pin_days * 86400.0
        # Writes, scans and evictions (the persister, purge) and the request path's lookups have
        # limiters of their own: a slow batch of fsyncs never queues a synthesize behind it.
        self._limiter = trio.CapacityLimiter(threads)
        self._read_limiter = trio.CapacityLimiter(threads)
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self.lock_path = self.root / "evict.lock"
        # What this process knows of the size: the last scan plus what it wrote since.
        self.known_bytes = 0
        self.known_objects = 0
        self.evictions = 0
        self.writes = 0
        # Hashes read from the Redis cache, to be marked read here too (pinning counts every read,
        # not only those the store served); flushed by the persister in a worker thread.
        self._reads: set[str] = set()

    # -- the interface (async) ------------------------------------------------------------

    async def open(self) -> None:
        """Create the directories and take a first measure of the size."""
        await self._thread(self._open)

    async def put_many(self, objects: Sequence[AudioObject]) -> list[bool]:
        return await self._thread(self.put_many_sync, objects)

    async def get(self, variant_hash: str) -> AudioObject | None:
        return await self._read(self.get_sync, variant_hash)

    async def contains_many(self, hashes: Sequence[str]) -> list[bool]:
        return await self._read(self.contains_many_sync, hashes)

    async def delete(self, variant_hash: str) -> bool:
        return await self._thread(self.delete_sync, variant_hash)

    async def stats(self) -> StoreStats:
        return await self._thread(self.scan_sync)

    async def evict(self) -> EvictResult:
        return await self._thread(self.evict_sync)

    async def purge(self, *, model: str, before: float | None) -> list[str]:
        return await self._thread(self.purge_sync, model, before)

    def note_read(self, variant_hash: str) -> None:
        """A read served by the Redis cache: marked read here later (:meth:`flush_reads`)."""
        if len(self._reads) < MAX_NOTED_READS:
            self._reads.add(variant_hash)

    async def flush_reads(self) -> int:
        """Mark the objects read since the last flush as read (and recently used)."""
        if not self._reads:
            return 0
        reads, self._reads = self._reads, set()
        return await self._thread(self._touch_all, reads)

    def _touch_all(self, hashes: set[str]) -> int:
        now = time.time()
        touched = 0
        for h in hashes:
            if not valid_hash(h):
                continue
            try:
                path = self.path(h)
                if now - path.stat().st_atime > TOUCH_EVERY_S:
                    os.utime(path)
                    touched += 1
            except FileNotFoundError:
                continue
        return touched

    def over_cap(self) -> bool:
        """True when what this process knows of the size is over the cap: time to evict."""
        return bool(self.max_bytes) and self.known_bytes > self.max_bytes

    async def _thread(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _read(self, fn: Any, *args: Any) -> Any:
        # A read changes nothing but an access time: a caller whose deadline passes (a hung
        # network filesystem) may abandon it rather than wait for the thread.
        return await trio.to_thread.run_sync(
            fn, *args, limiter=self._read_limiter, abandon_on_cancel=True
        )

    # -- blocking implementation (worker threads) -----------------------------------------

    def _open(self) -> None:
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.scan_sync()

    def path(self, variant_hash: str) -> Path:
        if not valid_hash(variant_hash):
            raise ValueError(f"not a variant hash: {variant_hash!r}")
        return self.objects_dir / variant_hash[:2] / variant_hash

    def put_many_sync(self, objects: Sequence[AudioObject]) -> list[bool]:
        written: list[bool] = []
        dirs: set[Path] = set()
        for obj in objects:
            final = self.path(obj.variant_hash)
            if final.exists():
                written.append(False)
                continue
            final.parent.mkdir(exist_ok=True)
            self._write_one(obj, final)
            dirs.add(final.parent)
            written.append(True)
            self.known_bytes += len(obj.data)
            self.known_objects += 1
            self.writes += 1
        # One fsync per directory per batch makes the renames durable: only then is the batch
        # on disk, and only then does the persister acknowledge it.
        for d in dirs:
            _fsync_dir(d)
        return written

    def _write_one(self, obj: AudioObject, final: Path) -> None:
        tmp = self.tmp_dir / f"{obj.variant_hash}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(obj.header() + obj.data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            # Written, never read: atime 0 (not pinned), mtime now (its place in the LRU order).
            os.utime(tmp, ns=(0, time.time_ns()))
            os.rename(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(exc.errno, f"audio store {self.root}: {exc.strerror}") from None
            raise

    def get_sync(self, variant_hash: str, *, touch: bool = True) -> AudioObject | None:
        if not valid_hash(variant_hash):
            return None
        path = self.path(variant_hash)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except FileNotFoundError:
            return None
        obj = _parse(variant_hash, raw)
        if touch and time.time() - st.st_atime > TOUCH_EVERY_S:
            with contextlib.suppress(OSError):  # evicted meanwhile: the read still counts
                os.utime(path)  # read now: pinned for pin_days, and last in the LRU order
        return obj

    def contains_many_sync(self, hashes: Sequence[str]) -> list[bool]:
        return [valid_hash(h) and self.path(h).exists() for h in hashes]

    def delete_sync(self, variant_hash: str) -> bool:
        if not valid_hash(variant_hash):
            return False
        try:
            size = self.path(variant_hash).stat().st_size
            os.unlink(self.path(variant_hash))
        except FileNotFoundError:
            return False
        self.known_bytes = max(0, self.known_bytes - size)
        self.known_objects = max(0, self.known_objects - 1)
        return True

    def _entries(self) -> Iterator[tuple[os.DirEntry[str], os.stat_result]]:
        try:
            subdirs = list(os.scandir(self.objects_dir))
        except FileNotFoundError:
            return
        for sub in subdirs:
            if not sub.is_dir(follow_symlinks=False):
                continue
            try:
                entries = list(os.scandir(sub.path))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield entry, st

    def scan_sync(self) -> StoreStats:
        """Count objects and bytes (the whole directory: every daemon's writes), remove
        temporary files a crash left behind."""
        objects = total = pinned = 0
        now = time.time()
        for _entry, st in self._entries():
            objects += 1
            total += st.st_size
            if self._pinned(st, now):
                pinned += 1
        self.known_bytes, self.known_objects = total, objects
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.tmp_dir):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > STALE_TMP_S:
                        os.unlink(entry.path)
        return StoreStats(objects, total, pinned)

    def _pinned(self, st: os.stat_result, now: float) -> bool:
        return self.pin_s > 0 and st.st_atime > 0 and st.st_atime >= now - self.pin_s

    def evict_sync(self) -> EvictResult:
        """Evict least recently accessed, unpinned objects until the store is under 90 % of
        ``max_bytes``. One at a time (a lock file: other threads, other daemons): each measures
        the store afresh once it has the lock, so the last one to run sees every write before
        it."""
        if not self.max_bytes:
            return EvictResult(0, 0, self.known_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                return self._evict_locked()
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _evict_locked(self) -> EvictResult:
        now = time.time()
        entries = []
        total = 0
        pinned = 0
        for entry, st in self._entries():
            total += st.st_size
            if self._pinned(st, now):
                pinned += 1
                continue
            entries.append((st.st_mtime_ns, st.st_size, entry.path))
        target = int(self.max_bytes * LOW_WATER)
        evicted = freed = 0
        objects = pinned + len(entries)
        if total > self.max_bytes:
            entries.sort()
            for _mtime, size, path in entries:
                if total - freed <= target:
                    break
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue  # another process removed it (purge)
                evicted += 1
                freed += size
        self.known_bytes, self.known_objects = total - freed, objects - evicted
        self.evictions += evicted
        return EvictResult(evicted, freed, total - freed, skipped_pinned=pinned)

    def read_header(self, path: str) -> dict[str, Any] | None:
        """The header of one object, read without counting as a read (its times are put back)."""
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                line = f.readline(_HEADER_MAX)
            with contextlib.suppress(OSError):
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            return json.loads(line)
        except (OSError, ValueError):
            return None

    def purge_sync(self, model: str, before: float | None) -> list[str]:
        """Delete the objects of ``model`` created before ``before`` (all of them: None);
        returns their hashes."""
        purged = []
        for entry, _st in self._entries():
            header = self.read_header(entry.path)
            if header is None or header.get("model") != model:
                continue
            if before is not None and float(header.get("created") or 0) >= before:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                purged.append(entry.name)
        return purged


def _parse(variant_hash: str, raw: bytes) -> AudioObject:
    line, sep, data = raw.partition(b"\n")
    try:
        if not sep:
            raise ValueError("no header")
        h = json.loads(line)
        if h.get("hash") != variant_hash or int(h["size"]) != len(data):
            raise ValueError("header does not match the object")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"audio store object {variant_hash} is damaged: {exc}") from None
    return AudioObject(
        variant_hash=variant_hash,
        data=data,
        content_type=str(h.get("content_type") or "application/octet-stream"),
        duration_ms=int(h.get("duration_ms") or 0),
        model=str(h.get("model") or ""),
        revision=str(h.get("revision") or ""),
        created=float(h.get("created") or 0.0),
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
