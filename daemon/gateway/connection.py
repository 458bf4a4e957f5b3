"""One client's WebSocket connection: its outgoing queue, its documents, its pending blocks.

Frames to the client — replies and notifications alike — go through one bounded queue and one
writer task, so they leave in order. A client that does not read fills its queue; it is then
closed with 1013 (try again later) rather than letting its frames pile up in memory.
"""

from __future__ import annotations

import attrs
import trio
from trio_websocket import WebSocketConnection

__all__ = ["CLOSE_GOING_AWAY", "CLOSE_TOO_SLOW", "Connection"]

CLOSE_GOING_AWAY = 1001
CLOSE_TOO_SLOW = 1013


@attrs.define(eq=False)
class Connection:
    user_id: int
    ws: WebSocketConnection
    queue_size: int
    documents: set[str] = attrs.Factory(set)
    # (document_id, block_idx) → (variant_hash, model, voice) for blocks with no terminal status yet
    pending: dict[tuple[str, int], tuple[str, str, str]] = attrs.Factory(dict)
    close_code: int = 1000
    close_reason: str = ""
    _held: list[str] | None = None
    _send: trio.MemorySendChannel[str] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[str] = attrs.field(init=False)
    reader_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[str](self.queue_size)

    # -- frames out -------------------------------------------------------------------------

    def notify(self, text: str) -> None:
        """Queue a notification (a status published by a worker or the hot path); held back while
        a request's own replies are being produced (see :meth:`hold`)."""
        if self._held is not None:
            self._held.append(text)
            return
        self.push(text)

    def push(self, text: str) -> None:
        """Queue a frame for the client without blocking; a full queue closes the connection."""
        try:
            self._send.send_nowait(text)
        except trio.WouldBlock:
            self.abort(CLOSE_TOO_SLOW, "client too slow: outgoing queue full")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def hold(self) -> None:
        """Hold notifications back while a request's own replies are being produced, so that a
        block's ``queued`` always precedes its ``cached`` even if the job finishes at once."""
        self._held = []

    def release(self) -> None:
        held, self._held = self._held or [], None
        for text in held:
            self.notify(text)

    def note_status(self, document_id: str, block_idx: int, status: str) -> None:
        if status in ("cached", "skipped", "error"):
            self.pending.pop((document_id, block_idx), None)

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
