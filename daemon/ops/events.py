"""The events log (docs/metrics.md): one JSON object per line, ``ts`` and ``event`` first.

Producers call :meth:`EventLog.emit` with an event of ``daemon.contracts.events`` (one class per
kind: the log's contract), which never blocks: it puts the event on a bounded memory
channel, and one writer task (:meth:`EventLog.run`) appends batches to the file from a worker
thread, rotating by size (``events.jsonl`` → ``.1`` … ``.N``). If the channel is full the event is
dropped and counted (``dropped``) rather than stalling the hot path; the count is itself logged.

Each file stays within ``max_bytes`` (a batch that does not fit is split across a rotation; only a
single line longer than ``max_bytes`` makes a file larger), and at most ``backups`` rotated files
are kept, so the log's disk use is bounded by ``(backups + 1) × max_bytes``. Lines are written
whole, with ``O_APPEND``: ``tail -F`` (capital F: it follows the name across rotations) shows
complete JSON objects, and so does a second daemon appending to the same file.

In-process consumers (the dashboard's statistics) register with :meth:`EventLog.add_listener`
instead of re-reading the file; everything else reads it with :func:`read_events`, the one reader
(rotations, a line cut short, kinds from a newer daemon). A listener runs inside :meth:`emit` — on
the hot path — so it must be quick and must not block; one that raises is reported once as an
``error`` event and never breaks the emitter.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import attrs
import trio

from daemon.contracts.events import Error, Event, event_from_record

__all__ = [
    "EventLog",
    "ReadTally",
    "Throttle",
    "describe",
    "log_files",
    "parse_ts",
    "read_events",
    "read_files",
    "rotation_names",
    "utc_iso",
]

Listener = Callable[[Event], None]


def utc_iso(ts: float | None = None) -> str:
    dt = datetime.now(UTC) if ts is None else datetime.fromtimestamp(ts, UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe(exc: BaseException) -> str:
    """``Type: message`` of an error for a person, a group of one unwrapped to its error."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Throttle:
    """At most one report per ``every_s`` per kind, so that a failure repeating every second does
    not flood the log (lesson 4). ``due(kind)`` says whether to report now, and how many were held
    back since the last report."""

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def due(self, kind: str = "") -> int | None:
        """None: not now (counted as held back). Else the number held back since the last report."""
        now = self.clock()
        if now - self._last.get(kind, -math.inf) < self.every_s:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._held.pop(kind, 0)

    def reset(self, kind: str = "") -> None:
        """The next ``due(kind)`` reports at once."""
        self._last.pop(kind, None)
        self._held.pop(kind, None)


def _line(event: Event) -> str:
    record = {"ts": utc_iso(event.ts), "event": event.kind, **event.fields()}
    return json.dumps(record, default=_default, separators=(",", ":"), ensure_ascii=False)


def _default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


class EventLog:
    """A non-blocking JSON-lines event log with size rotation."""

    def __init__(
        self, path: Path, *, max_bytes: int = 50 << 20, backups: int = 5, buffer: int = 10000
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._send, self._receive = trio.open_memory_channel[str](buffer)
        self.dropped = 0
        self.written = 0
        self.write_errors = 0
        self._finished = trio.Event()
        self._listeners: list[Listener] = []
        self._broken_listeners: set[int] = set()

    def add_listener(self, fn: Listener) -> None:
        """``fn(event)`` is called for each emitted event, its ``ts`` stamped (dashboard, tests).
        It runs inside :meth:`emit`, so it must not block."""
        self._listeners.append(fn)

    def emit(self, event: Event, /) -> None:
        """Log ``event`` (stamped with the time now unless it has a ``ts``); never blocks, never
        raises for a full buffer."""
        if event.ts is None:
            event = attrs.evolve(event, ts=time.time())
        self._notify(event)
        line = _line(event)
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # After shutdown (a late emit): write through, so nothing a person should see is lost.
            self._write([line])

    def _listener_failed(self, fn: Callable[..., Any], exc: Exception) -> None:
        # Reported once per listener: a listener that fails on every event must not double the
        # log's volume (lesson 4), and must not take the emitter (the hot path) down with it.
        if id(fn) in self._broken_listeners:
            return
        self._broken_listeners.add(id(fn))
        name = getattr(fn, "__qualname__", repr(fn))
        self.emit(
            Error(
                service="events",
                message=f"event listener {name} failed: {type(exc).__name__}: {exc}",
            )
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task. Runs until the log is closed by :meth:`close`; then drains."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        task_status.started()
        try:
            await self._write_loop()
        finally:
            self._finished.set()

    async def drain(self, timeout_s: float = 5.0) -> None:
        """After :meth:`close`: wait (shielded, at most ``timeout_s``) until the writer has
        written everything buffered. For a daemon going down on an error, whose nursery would
        otherwise cancel the writer — and lose the very event that says why."""
        with trio.move_on_after(timeout_s, shield=True):
            await self._finished.wait()

    async def _write_loop(self) -> None:
        reported_drops = 0
        async with self._receive:
            while True:
                try:
                    first = await self._receive.receive()
                except trio.EndOfChannel:
                    return
                batch = [first]
                while len(batch) < 1000:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if self.dropped != reported_drops:
                    n = self.dropped - reported_drops
                    reported_drops = self.dropped
                    batch.append(self._drop_report(n))
                await trio.to_thread.run_sync(self._write, batch)

    def _drop_report(self, n: int) -> str:
        # Straight into the batch (the channel is what overflowed), and to the listeners.
        event = Error(
            ts=time.time(),
            service="events",
            message=f"{n} events dropped: the log writer fell behind",
            context={"dropped": n},
        )
        self._notify(event)
        return _line(event)

    def _notify(self, event: Event) -> None:
        for fn in self._listeners:
            try:
                fn(event)
            except Exception as exc:
                self._listener_failed(fn, exc)

    def close(self) -> None:
        """Stop accepting events; the writer drains what is buffered and returns. Events emitted
        after this are written directly."""
        self._send.close()

    def _write(self, lines: list[str]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            chunk: list[bytes] = []
            chunk_bytes = 0
            for line in lines:
                data = line.encode() + b"\n"
                if size + chunk_bytes + len(data) > self.max_bytes and (size or chunk):
                    # This line would overflow the file: write what fits, then rotate.
                    self._append(chunk, len(chunk))
                    self._rotate()
                    size, chunk, chunk_bytes = 0, [], 0
                chunk.append(data)
                chunk_bytes += len(data)
            self._append(chunk, len(chunk))
        except OSError as exc:  # a full disk must not take the daemon down with it
            self.write_errors += 1
            print(f"tts-daemon: cannot write events log {self.path}: {exc}", file=sys.stderr)

    def _append(self, chunk: list[bytes], count: int) -> None:
        if not chunk:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # One write per chunk: a reader (tail -F) sees whole lines.
            os.write(fd, b"".join(chunk))
        finally:
            os.close(fd)
        self.written += count

    def files(self) -> list[Path]:
        """The log's files that exist, oldest first (``.N`` … ``.1``, then the live file)."""
        return log_files(self.path, self.backups)

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


def rotation_names(path: Path, backups: int) -> list[Path]:
    """Every file name of an events log at ``path`` with ``backups`` rotations, oldest first."""
    return [path.with_name(f"{path.name}.{i}") for i in range(backups, 0, -1)] + [path]


def log_files(path: Path, backups: int) -> list[Path]:
    """The files of an events log at ``path`` with ``backups`` rotations that exist, oldest
    first."""
    return [p for p in rotation_names(path, backups) if p.exists()]


# -- the one reader -------------------------------------------------------------------------


@attrs.define
class ReadTally:
    """What :func:`read_files` went through: the files it read, lines, and lines it skipped
    (not JSON, no ``event``, no valid ``ts``: a line cut short by a crash, for one)."""

    files: list[Path] = attrs.Factory(list)
    lines: int = 0
    bad_lines: int = 0


def parse_ts(value: Any) -> float | None:
    """A line's ``ts`` (ISO 8601) as unix time; None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def read_events(path: Path, *, backups: int = 5, tally: ReadTally | None = None) -> Iterator[Event]:
    """Every event of the log at ``path`` and its rotated files (``log.backups`` of them),
    oldest first, as the classes of ``daemon.contracts.events`` (a kind this version does not
    know as ``GenericEvent``). Lines that are not events are skipped (counted in ``tally``)."""
    return read_files(rotation_names(path, backups), tally=tally)


def read_files(paths: Iterable[Path], *, tally: ReadTally | None = None) -> Iterator[Event]:
    """The events of log files in the order given (oldest first: :func:`rotation_names`);
    names that do not exist are skipped. The files are opened together, so that a rotation
    while they are read cannot make one be read twice or missed."""
    tally = ReadTally() if tally is None else tally
    handles = _open_consistently(list(paths))
    try:
        for path, handle in handles:
            tally.files.append(path)
            for raw in handle:
                tally.lines += 1
                event = _parse(raw)
                if event is None:
                    tally.bad_lines += 1
                else:
                    yield event
    finally:
        for _, handle in handles:
            handle.close()


def _parse(raw: bytes) -> Event | None:
    try:
        record = json.loads(raw)
    except ValueError:  # a line cut short (no newline: the writer died mid-line), not UTF-8
        return None
    if not isinstance(record, dict):
        return None
    kind, ts = record.get("event"), parse_ts(record.get("ts"))
    if not isinstance(kind, str) or ts is None:
        return None
    return event_from_record(kind, record, ts=ts)


def _open_consistently(paths: Sequence[Path]) -> list[tuple[Path, IO[bytes]]]:
    """Open every file of a log so that a rotation in between cannot make us read one file
    twice or miss one: open all, then check that each name still has the inode we opened;
    if not (rotated meanwhile), try again."""
    handles: list[tuple[Path, IO[bytes]]] = []
    for attempt in range(5):
        handles = []
        try:
            for p in paths:
                try:
                    handles.append((p, open(p, "rb")))  # noqa: SIM115 (closed by the caller)
                except FileNotFoundError:
                    continue
            same = all(os.fstat(f.fileno()).st_ino == _inode(p) for p, f in handles)
        except BaseException:
            for _, f in handles:
                f.close()
            raise
        if same or attempt == 4:  # rotating all the time: read what we have
            return handles
        for _, f in handles:
            f.close()
        time.sleep(0.05)
    return handles


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None
