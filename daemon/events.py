"""The events log (SPEC section 7): one JSON object per line, ``ts`` and ``event`` first.

Producers call :meth:`EventLog.emit`, which never blocks: it puts the event on a bounded memory
channel, and one writer task (:meth:`EventLog.run`) appends batches to the file from a worker
thread, rotating by size (``events.jsonl`` → ``.1`` … ``.N``). If the channel is full the event is
dropped and counted (``dropped``) rather than stalling the hot path; the count is itself logged.
"""

from __future__ import annotations

import json
import math
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

__all__ = ["EventLog", "utc_iso"]


def utc_iso(ts: float | None = None) -> str:
    dt = datetime.now(UTC) if ts is None else datetime.fromtimestamp(ts, UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        self._listeners: list[Any] = []

    def add_listener(self, fn: Any) -> None:
        """``fn(record: dict)`` is called for each emitted event (dashboard, tests)."""
        self._listeners.append(fn)

    def emit(self, event: str, /, **fields: Any) -> None:
        """Log ``event`` with ``fields``; never blocks, never raises for a full buffer."""
        record = {"ts": utc_iso(), "event": event, **fields}
        for fn in self._listeners:
            fn(record)
        line = json.dumps(record, default=_default, separators=(",", ":"), ensure_ascii=False)
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # After shutdown (a late emit): write through, so nothing a person should see is lost.
            self._write([line])

    def error(self, service: str, message: str, /, **context: Any) -> None:
        self.emit("error", service=service, message=message, **context)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task. Runs until the log is closed by :meth:`aclose`; then drains."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        task_status.started()
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
                    batch.append(
                        json.dumps(
                            {
                                "ts": utc_iso(),
                                "event": "error",
                                "service": "events",
                                "message": f"{n} events dropped: the log writer fell behind",
                            }
                        )
                    )
                await trio.to_thread.run_sync(self._write, batch)

    def close(self) -> None:
        """Stop accepting events; the writer drains what is buffered and returns. Events emitted
        after this are written directly."""
        self._send.close()

    def _write(self, lines: list[str]) -> None:
        data = ("\n".join(lines) + "\n").encode()
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.max_bytes:
            self._rotate()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            self.written += len(lines)
        except OSError as exc:  # a full disk must not take the daemon down with it
            print(f"tts-daemon: cannot write events log {self.path}: {exc}", file=sys.stderr)

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
