"""The HTTP side (docs/protocol.md): audio, health, metrics, dashboard, the reader page — a small
ASGI app served by hypercorn.

No framework: four routes do not need one. The app runs in Trio tasks inside the daemon's
trio-asyncio loop, so it reaches Redis through the same store as everything else.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["HttpApp", "serve_ops"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_AUDIO = re.compile(r"^/v1/audio/([0-9a-f]{16,128})$")
# The dashboard loads nothing from anywhere else (its chart library is vendored), so it can say
# so; and its data is live, so nothing of it is cached.
_DASHBOARD_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        b"frame-ancestors 'none'",
    ),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
]
# The reader page also opens the WebSocket (another port: 'self' does not cover it) and plays the
# audio of this origin.
_READER_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        b"object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
]


class HttpApp:
    """``health()`` returns (JSON-able report, healthy); ``refresh_metrics()`` updates gauges
    before a scrape; ``get_audio(hash)`` returns (bytes, content type) or None;
    ``dashboard()`` and ``reader()`` return (body, content type) or None for paths not theirs."""

    def __init__(
        self,
        *,
        get_audio: Callable[[str], Awaitable[tuple[bytes, str] | None]] | None = None,
        health: Callable[[], Awaitable[tuple[dict[str, Any], bool]]] | None = None,
        refresh_metrics: Callable[[], Awaitable[None]] | None = None,
        registry: Any = None,
        dashboard: Callable[[str], Awaitable[tuple[bytes, str] | None]] | None = None,
        reader: Callable[[str], Awaitable[tuple[bytes, str] | None]] | None = None,
    ) -> None:
        """The gateway's HTTP port serves the audio only; the operations listener (``[ops]``)
        health, metrics and the dashboard. An endpoint whose callable is None is a 404."""
        self.get_audio = get_audio
        self.health = health
        self.refresh_metrics = refresh_metrics
        self.registry = registry
        self.dashboard = dashboard
        self.reader = reader

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, send)
        except trio.TooSlowError:
            await _respond(send, 504, b"upstream timeout\n", "text/plain")
        except Exception as exc:
            # Redis down (or a bug): answer, do not let one request take the server down.
            body = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
            await _respond(send, 503, body, "application/json")

    async def _route(self, scope: Scope, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", "text/plain", [(b"allow", b"GET")])
            return
        m = _AUDIO.match(path) if self.get_audio is not None else None
        if m and self.get_audio is not None:
            audio = await self.get_audio(m.group(1))
            if audio is None:
                await _respond(send, 404, b"no such audio (unknown, or expired)\n", "text/plain")
                return
            await _send_audio(send, method, _headers(scope), *audio)
            return
        if path == "/healthz" and self.health is not None:
            report, healthy = await self.health()
            await _respond(
                send, 200 if healthy else 503, json.dumps(report).encode(), "application/json"
            )
            return
        if path == "/metrics" and self.registry is not None:
            if self.refresh_metrics is not None:
                await self.refresh_metrics()
            await _respond(send, 200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
            return
        if self.reader is not None and path.startswith("/reader"):
            page = await self.reader(path)
            if page is not None:
                body = page[0] if method == "GET" else b""
                await _respond(
                    send, 200, body, page[1], _READER_HEADERS, content_length=len(page[0])
                )
                return
        if self.dashboard is not None:
            page = await self.dashboard(path)
            if page is not None:
                body = page[0] if method == "GET" else b""
                await _respond(
                    send, 200, body, page[1], _DASHBOARD_HEADERS, content_length=len(page[0])
                )
                return
        await _respond(send, 404, b"not found\n", "text/plain")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers") or []}


def etag_of(data: bytes) -> bytes:
    """A strong ETag: a digest of the bytes served (a variant synthesized again after both tiers
    lost it may differ, so the hash in the URL alone is not enough for Range and If-Range)."""
    return b'"' + hashlib.sha256(data).hexdigest()[:32].encode() + b'"'


def parse_range(header: bytes, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=`` range → (first, last) inclusive; ``None``: ignore the header (serve it
    all: several ranges, or not a byte range); ``"unsatisfiable"``: 416."""
    try:
        text = header.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    unit, _, spec = text.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, dash, last_s = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first_s == "":
            suffix = int(last_s)
            if suffix <= 0:
                return "unsatisfiable"
            return max(0, size - suffix), size - 1
        first = int(first_s)
        last = int(last_s) if last_s != "" else size - 1
    except ValueError:
        return None
    if first < 0:
        return None
    if first >= size:
        return "unsatisfiable"
    if last < first:
        return None
    return first, min(last, size - 1)


async def _send_audio(
    send: Send, method: str, headers: dict[bytes, bytes], data: bytes, content_type: str
) -> None:
    """Audio addressed by its hash never changes: cacheable for a year by anyone (a CDN), with
    an ETag, conditional requests and single byte ranges for seeking (docs/protocol.md)."""
    etag = etag_of(data)
    common = [
        (b"cache-control", b"public, max-age=31536000, immutable"),
        (b"etag", etag),
        (b"accept-ranges", b"bytes"),
    ]
    inm = headers.get(b"if-none-match")
    if inm is not None and (inm.strip() == b"*" or etag in [t.strip() for t in inm.split(b",")]):
        await _respond(send, 304, b"", content_type, common, content_length=0)
        return
    size = len(data)
    wanted = headers.get(b"range")
    if_range = headers.get(b"if-range")
    if wanted is not None and (if_range is None or if_range.strip() == etag):
        r = parse_range(wanted, size)
        if r == "unsatisfiable":
            await _respond(
                send,
                416,
                b"",
                content_type,
                [*common, (b"content-range", f"bytes */{size}".encode())],
                content_length=0,
            )
            return
        if isinstance(r, tuple):
            first, last = r
            part = data[first : last + 1]
            await _respond(
                send,
                206,
                part if method == "GET" else b"",
                content_type,
                [*common, (b"content-range", f"bytes {first}-{last}/{size}".encode())],
                content_length=len(part),
            )
            return
    await _respond(
        send, 200, data if method == "GET" else b"", content_type, common, content_length=size
    )


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    content_length: int | None = None,
) -> None:
    all_headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body) if content_length is None else content_length).encode()),
        (b"x-content-type-options", b"nosniff"),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def serve_ops(
    app: HttpApp,
    host: str,
    port: int,
    *,
    stopping: trio.Event,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The operations listener (``[ops] host``/``port``): serve ``app`` until ``stopping``;
    ``started(port)`` once bound (a port of 0 binds a free one)."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve as hypercorn_serve

    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 2.0

    async def serve(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await hypercorn_serve(app, config, shutdown_trigger=stopping.wait, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve)
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
