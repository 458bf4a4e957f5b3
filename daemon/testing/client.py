"""The WebSocket protocol client (docs/protocol.md) every test and tool speaks through.

:func:`connect` opens the TCP (or TLS) stream itself and hands it to trio-websocket, so that it
can always close it: trio-websocket's own ``open_websocket_url`` leaves the socket open when the
server rejects the handshake (HTTP 401, 503, ...) or closes the connection first (1009, 1013).
Here nothing outlives the ``async with``: no socket, no reader task. A rejected handshake raises
``trio_websocket.ConnectionRejected`` (its ``status_code`` is the HTTP status).

:func:`handshake_status` speaks the upgrade request by hand and returns the literal HTTP status
and body, for tests of the handshake itself.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

__all__ = ["WsClient", "connect", "handshake_status", "status_frames"]

TERMINAL = ("cached", "skipped", "error")


class WsClient:
    """A connected client that records every frame it receives, in order, in ``frames`` (unless
    ``keep_frames`` is False: a long-running load client keeps its own tallies instead)."""

    def __init__(self, ws: WebSocketConnection, *, keep_frames: bool = True) -> None:
        self.ws = ws
        self.keep_frames = keep_frames
        self.frames: list[dict[str, Any]] = []

    @classmethod
    def connect(
        cls, url: str, token: str | None = None, **kw: Any
    ) -> AbstractAsyncContextManager[WsClient]:
        """``connect(url, token, ...)`` (see :func:`connect`), spelt as in older tests."""
        return connect(url, token, **kw)

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
        """A ``synthesize`` frame: ``texts`` by block index (a dict) or numbered from 0."""
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

    async def cursor_moved(self, document_id: str, block_idx: int) -> None:
        await self.send(
            {"type": "cursor_moved", "document_id": document_id, "block_idx": block_idx}
        )

    async def receive(self, timeout_s: float = 20.0) -> dict[str, Any]:
        """The next frame (also appended to ``frames``); fails after ``timeout_s`` (``math.inf``:
        waits as long as it takes). Raises ``ConnectionClosed`` once the connection is closed."""
        with trio.fail_after(timeout_s):
            frame = json.loads(await self.ws.get_message())
        if self.keep_frames:
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
        """Every status received, by block index (of one document, if given)."""
        out: dict[int, list[str]] = {}
        for f in self.frames:
            if f.get("type") == "status" and document_id in (None, f["document_id"]):
                out.setdefault(f["block_idx"], []).append(f["status"])
        return out

    def terminal(self, document_id: str | None = None) -> dict[int, dict[str, Any]]:
        """The last terminal status frame (cached, skipped, error) per block index."""
        out = {}
        for f in self.frames:
            if (
                f.get("type") == "status"
                and f["status"] in TERMINAL
                and document_id in (None, f["document_id"])
            ):
                out[f["block_idx"]] = f
        return out


def status_frames(client: WsClient, document_id: str, block_idx: int) -> list[dict[str, Any]]:
    """The status frames ``client`` received for one block, in order."""
    return [
        f
        for f in client.frames
        if f.get("type") == "status"
        and f["document_id"] == document_id
        and f["block_idx"] == block_idx
    ]


def _single(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _open_stream(url: str, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"{url!r}: a ws:// or wss:// URL with a host and a port")
    if parts.scheme == "wss" or ssl_context is not None:
        ctx = ssl_context or ssl.create_default_context()
        return await trio.open_ssl_over_tcp_stream(
            parts.hostname, parts.port, ssl_context=ctx, https_compatible=True
        )
    return await trio.open_tcp_stream(parts.hostname, parts.port)


@asynccontextmanager
async def connect(
    url: str,
    token: str | None = None,
    *,
    query_token: bool = False,
    headers: Iterable[tuple[str, str]] = (),
    ssl_context: ssl.SSLContext | None = None,
    message_queue_size: int = 1,
    max_message_size: int = 1 << 20,
    keep_frames: bool = True,
    timeout_s: float = 30.0,
) -> AsyncIterator[WsClient]:
    """Connect to the gateway at ``url`` as the holder of ``token`` (an ``Authorization: Bearer``
    header, or ``?token=`` with ``query_token``). The handshake and the close are bounded by
    ``timeout_s``. On exit, or if the handshake is rejected, the stream is closed and the reader
    task ended; the one error there is propagates as itself (not wrapped in a group)."""
    parts = urlsplit(url)
    resource = parts.path or "/"
    query = parts.query
    if token is not None and query_token:
        query = f"{query}&token={token}" if query else f"token={token}"
    if query:
        resource += "?" + query
    extra = [(k, v) for k, v in headers]
    if token is not None and not query_token:
        extra.append(("Authorization", f"Bearer {token}"))
    host = f"{parts.hostname}:{parts.port}"
    stream: trio.abc.Stream | None = None
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(timeout_s):
                stream = await _open_stream(url, ssl_context)
                ws = await wrap_client_stream(
                    nursery,
                    stream,  # type: ignore[arg-type]
                    host,
                    resource,
                    extra_headers=extra,  # type: ignore[arg-type]
                    message_queue_size=message_queue_size,
                    max_message_size=max_message_size,
                )
            try:
                yield WsClient(ws, keep_frames=keep_frames)
            finally:
                with trio.move_on_after(timeout_s, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _single(group) from None
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)


async def handshake_status(
    url: str, headers: dict[str, str] | None = None, *, ssl_context: Any = None
) -> tuple[int, bytes]:
    """Send a WebSocket upgrade request by hand; return the HTTP status and body (the literal
    check of "HTTP 401")."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"{url!r}: a ws:// or wss:// URL with a host and a port")
    with trio.fail_after(10):
        stream = await _open_stream(url, ssl_context)
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
