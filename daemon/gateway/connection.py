"""One client's WebSocket connection: its outgoing queue and the blocks it waits for.

Frames to the client — replies and notifications alike — go through one bounded queue and one
writer task, so they leave in order. A client that does not read fills its queue; it is then
closed with 1013 (try again later) rather than letting its frames pile up in memory.

Notifications are routed per connection: each waits for a set of blocks, keyed by
``(document_id, block_idx, variant_hash)``. A notification for a block the connection does not
wait for (evicted, already answered, or asked for by a request that failed) is dropped, and a
terminal status ends the wait — so each block gets exactly one terminal status on this connection.
"""

from __future__ import annotations

import secrets

import attrs
import trio
from trio_websocket import WebSocketConnection

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_POLICY",
    "CLOSE_TOO_BIG",
    "CLOSE_TOO_SLOW",
    "TERMINAL",
    "Connection",
    "PendingKey",
]

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008  # too many frames; the user's tokens were revoked
CLOSE_TOO_BIG = 1009
CLOSE_TOO_SLOW = 1013

TERMINAL = frozenset({"cached", "skipped", "error"})

PendingKey = tuple[str, int, str]  # (document_id, block_idx, variant_hash)


def new_conn_id() -> str:
    """An id for a connection's waits in Redis, unique across daemons (alphanumeric)."""
    return secrets.token_hex(8)


@attrs.define(eq=False)
class Connection:
    user_id: int
    ws: WebSocketConnection
    queue_size: int
    conn_id: str = attrs.Factory(new_conn_id)
    # The blocks this connection waits for a terminal status of → (model, voice).
    pending: dict[PendingKey, tuple[str, str]] = attrs.Factory(dict)
    # Waits a request in progress has registered before its Redis script ran (not yet in Redis).
    requesting: set[PendingKey] = attrs.Factory(set)
    close_code: int = 1000
    close_reason: str = ""
    _held: list[tuple[PendingKey, str, str]] | None = None
    _send: trio.MemorySendChannel[str] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[str] = attrs.field(init=False)
    reader_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[str](self.queue_size)

    # -- frames out -------------------------------------------------------------------------

    def push(self, text: str) -> None:
        """Queue a frame for the client without blocking; a full queue closes the connection."""
        try:
            self._send.send_nowait(text)
        except trio.WouldBlock:
            self.abort(CLOSE_TOO_SLOW, "client too slow: outgoing queue full")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def notify(self, key: PendingKey, status: str, text: str) -> None:
        """A status from Redis for one of this connection's waits (or a stale one: dropped)."""
        if self._held is not None:
            if len(self._held) >= self.queue_size:
                self.abort(CLOSE_TOO_SLOW, "client too slow: too many notifications held")
                return
            self._held.append((key, status, text))
            return
        self._route(key, status, text)

    def _route(self, key: PendingKey, status: str, text: str) -> None:
        if key not in self.pending:
            return
        if status in TERMINAL:
            del self.pending[key]
        self.push(text)

    def hold(self) -> None:
        """Hold notifications back while a request's own replies are produced, so that a block's
        first status always precedes its later ones, even if its job finishes at once."""
        self._held = []

    def release(self) -> None:
        """Let held notifications through, judged against the waits as they are now."""
        held, self._held = self._held or [], None
        for key, status, text in held:
            self._route(key, status, text)

    # -- lifecycle --------------------------------------------------------------------------

    def abort(self, code: int, reason: str) -> None:
        """Close now (queued frames are dropped)."""
        self.close_code, self.close_reason = code, reason
        self.scope.cancel()

    def begin_close(
        self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutting down"
    ) -> None:
        """Stop reading; frames already queued are still sent, then the connection closes."""
        self.close_code, self.close_reason = code, reason
        self.reader_scope.cancel()

    def close_queue(self) -> None:
        self._send.close()

    async def write_loop(self) -> None:
        async with self._receive:
            async for text in self._receive:
                await self.ws.send_message(text)
