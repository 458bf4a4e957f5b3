"""Test helpers: real clients for the real servers the tests start.

Postgres and Redis are reached from tests through their own clients in a worker thread
(``asyncio.run`` there), so a test never shares the daemon's trio-asyncio loop or pools.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import asyncpg
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from daemon.contracts import MODELS, BillingEvent
from tools.stress import pg_query, redis_cmd, setup_database

__all__ = [
    "WsClient",
    "add_user",
    "credit",
    "handshake_status",
    "pg_fetch",
    "pg_val",
    "redis_call",
    "wait_until",
]


async def _in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


async def pg_fetch(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    return await _in_thread(lambda: pg_query(url, sql, *args))


async def pg_val(url: str, sql: str, *args: Any) -> Any:
    rows = await pg_fetch(url, sql, *args)
    return next(iter(rows[0].values())) if rows else None


async def add_user(
    url: str, name: str, plan: str = "plus", *, redis_url: str | None = None
) -> tuple[int, str]:
    """Create a user through the daemon's own code path, mirrored to Redis as ``user add``
    does (to ``redis_url``, else the test's Redis); returns (id, token)."""
    ((user_id, token),) = await _in_thread(
        lambda: setup_database(url, [name], plan, migrate=False, redis_url=redis_url)
    )
    return user_id, token


async def credit(pg_url: str, redis_url: str, user_id: int, voice_chars: int) -> None:
    """``tts-daemon credit``'s own code: purchased characters in Postgres, then the mirror."""
    import redis.asyncio as aioredis

    from daemon.stores.mirror import aio_mirror_users
    from daemon.stores.pg import _credit, _init_connection
    from daemon.stores.redis import RedisStore

    async def go() -> None:
        pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1, init=_init_connection)
        client = aioredis.Redis.from_url(redis_url)
        try:
            await _credit(pool, user_id, voice_chars)
            store = RedisStore(client, url=redis_url, command_timeout_s=10.0)
            await aio_mirror_users(pool, store, [user_id])
        finally:
            await client.aclose()
            await pool.close()

    await _in_thread(lambda: asyncio.run(go()))


async def handshake_status(
    url: str, headers: dict[str, str] | None = None, *, ssl_context: Any = None
) -> tuple[int, bytes]:
    """Send a WebSocket upgrade request by hand; return the HTTP status and body.

    (trio-websocket's client leaks its socket when a handshake is rejected, so rejection tests
    speak the upgrade themselves — which is also the literal check of "HTTP 401".)
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    with trio.fail_after(10):
        if ssl_context is not None:
            stream: Any = await trio.open_ssl_over_tcp_stream(
                parts.hostname, parts.port, ssl_context=ssl_context, https_compatible=True
            )
        else:
            stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        async with stream:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            lines = [
                f"GET {target} HTTP/1.1",
                f"Host: {parts.hostname}:{parts.port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
                *(f"{k}: {v}" for k, v in (headers or {}).items()),
            ]
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                body += chunk
    status = int(head.split(b" ", 2)[1])
    return status, body


async def redis_call(url: str, *args: Any) -> Any:
    """One raw command on a fresh client, in a thread."""
    return await _in_thread(lambda: redis_cmd(url, *args))


async def wait_until(
    check: Callable[[], Any], *, timeout_s: float = 20.0, interval_s: float = 0.05, what: str = ""
) -> Any:
    """Poll an async or sync ``check`` until it returns something truthy; fail after timeout.

    For conditions that come true through the system's own work (a row committed, a key set):
    the test does not guess how long that takes, it waits for it with a ceiling.
    """
    with trio.move_on_after(timeout_s) as scope:
        while True:
            value = check()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await trio.sleep(interval_s)
    if scope.cancelled_caught:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what or check}")
    return None


class WsClient:
    """A WebSocket client that records every frame it receives."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def synthesize(
        self,
        document_id: str,
        texts: Iterable[str] | dict[int, str],
        *,
        model: str = "kokoro",
        voice: str | None = None,
    ) -> None:
        items = texts.items() if isinstance(texts, dict) else enumerate(texts)
        frame: dict[str, Any] = {
            "type": "synthesize",
            "document_id": document_id,
            "model": model,
            "blocks": [{"idx": i, "text": t} for i, t in items],
        }
        if voice is not None:
            frame["voice"] = voice
        await self.send(frame)

    async def receive(self, timeout_s: float = 20.0) -> dict[str, Any]:
        with trio.fail_after(timeout_s):
            frame = json.loads(await self.ws.get_message())
        self.frames.append(frame)
        return frame

    async def until(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 20.0
    ) -> list[dict[str, Any]]:
        """Receive frames until ``predicate(all frames so far)`` holds."""
        with trio.fail_after(timeout_s):
            while not predicate(self.frames):
                await self.receive(timeout_s)
        return self.frames

    def statuses(self, document_id: str | None = None) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for f in self.frames:
            if f.get("type") == "status" and document_id in (None, f["document_id"]):
                out.setdefault(f["block_idx"], []).append(f["status"])
        return out

    def terminal(self, document_id: str | None = None) -> dict[int, dict[str, Any]]:
        out = {}
        for f in self.frames:
            if (
                f.get("type") == "status"
                and f["status"] in ("cached", "skipped", "error")
                and document_id in (None, f["document_id"])
            ):
                out[f["block_idx"]] = f
        return out

    @classmethod
    def connect(cls, url: str, token: str | None = None, *, query_token: bool = False, **kw: Any):
        headers = []
        if token is not None and not query_token:
            headers.append(("Authorization", f"Bearer {token}"))
        if token is not None and query_token:
            url = f"{url}?token={token}"
        return _Connect(cls, url, headers, kw)


class _Connect:
    def __init__(self, cls: type[WsClient], url: str, headers: list, kw: dict) -> None:
        self._cm = open_websocket_url(url, extra_headers=headers, **kw)
        self._cls = cls
        self._ws: WebSocketConnection | None = None

    async def __aenter__(self) -> WsClient:
        self._ws = await self._cm.__aenter__()
        return self._cls(self._ws)

    async def __aexit__(self, *exc: Any) -> Any:
        try:
            return await self._cm.__aexit__(*exc)
        finally:
            # trio-websocket's client never closes its socket when the server closed the
            # connection first (1009, 1013, 1001): its aclose() returns early. Close it here.
            if self._ws is not None:
                await self._ws._stream.aclose()


def billing_event(
    user_id: int, model: str = "kokoro", text_length: int = 40, event_id: str | None = None
) -> BillingEvent:
    """A billing event as the hot path writes it, for ``model``'s default voice."""
    info = MODELS[model]
    return BillingEvent(
        event_id=event_id or uuid.uuid4().hex,
        user_id=user_id,
        model=model,
        voice=info.default_voice,
        variant_hash=uuid.uuid4().hex * 2,
        text_length=text_length,
        usage_multiplier=info.usage_multiplier,
        duration_ms=text_length * 60,
        document_id="doc",
        block_idx=0,
        finalized_at=time.time(),
    )


class Events:
    """Every event a daemon emits, as it emits it."""

    def __init__(self, daemon: Any) -> None:
        self.all: list[dict[str, Any]] = []
        daemon.events.add_listener(self.all.append)

    def named(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.all
            if e["event"] == name and all(e.get(k) == v for k, v in match.items())
        ]


async def usage_rows(pg_url: str, *, user_id: int | None = None) -> list[dict[str, Any]]:
    """``usage_log`` rows in insertion order (of one user, if given)."""
    if user_id is None:
        return await pg_fetch(pg_url, "SELECT * FROM usage_log ORDER BY id")
    return await pg_fetch(pg_url, "SELECT * FROM usage_log WHERE user_id = $1 ORDER BY id", user_id)


async def usage_rows_at_least(
    pg_url: str, n: int, *, user_id: int | None = None
) -> list[dict[str, Any]] | None:
    """The rows once there are ``n`` or more, else None (also while Postgres is down): a check
    for :func:`wait_until`."""
    try:
        rows = await usage_rows(pg_url, user_id=user_id)
    except (OSError, asyncpg.PostgresError):
        return None
    return rows if len(rows) >= n else None
