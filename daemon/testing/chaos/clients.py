"""The load: WebSocket users that behave as a browser would (reconnect, ask again for blocks
with no news, back off after errors, never wait without a deadline), and their bookkeeping."""

from __future__ import annotations

import json
import random
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from daemon.testing.chaos.params import Params
from daemon.testing.client import connect
from daemon.testing.texts import make_texts

# -- small helpers ----------------------------------------------------------------------------


async def http_get(port: int, path: str, timeout_s: float = 3.0) -> tuple[int, Any]:
    """A bare HTTP/1.0 GET on 127.0.0.1 (no client library): (status, parsed JSON body or None)."""
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


class TextSource:
    """Unique sentence-sized texts, across every user of the run."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._seen: set[str] = set()

    def __call__(self) -> str:
        return make_texts(self._rng, 1, self._seen)[0]


# -- clients ----------------------------------------------------------------------------------


class Reconnect(Exception):
    """The session is given up (a request had no reply in time); connect again."""


@attrs.define(eq=False)
class Block:
    user_id: int
    doc: str
    idx: int
    text: str
    requested_at: float = float("-inf")  # trio clock: last (re)request
    first_requested_at: float | None = None
    session: int = -1  # the session that last requested it
    status: str | None = None  # terminal status, once seen
    done_at: float | None = None
    retry_at: float | None = None  # a recoverable failure: ask again at
    requests: int = 0
    error: str = ""

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.user_id, self.doc, self.idx)


@attrs.define
class ClientStats:
    blocks: int = 0
    requests: int = 0
    sessions: int = 0
    connect_failures: int = 0
    ack_timeouts: int = 0
    rerequests: Counter[str] = attrs.Factory(Counter)  # reconnect | error | stall
    error_frames: Counter[str] = attrs.Factory(Counter)  # "code: message"
    block_errors: Counter[str] = attrs.Factory(Counter)  # recoverable status errors
    closes: Counter[str] = attrs.Factory(Counter)  # why sessions ended
    max_block_s: float = 0.0  # first request → terminal status, worst block

    def as_dict(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "requests": self.requests,
            "sessions": self.sessions,
            "connect_failures": self.connect_failures,
            "ack_timeouts": self.ack_timeouts,
            "rerequests": dict(self.rerequests),
            "error_frames": dict(self.error_frames),
            "block_errors": dict(self.block_errors),
            "closes": dict(self.closes),
            "max_block_s": round(self.max_block_s, 3),
        }


@attrs.define(eq=False)
class ChaosUser:
    """One user: a reader who keeps ``buffer`` blocks requested, at most ``rate`` new a second.

    Reconnects (to the next daemon when there are several) whenever its connection ends, and asks
    again for every block without a terminal status; asks again after a recoverable error (with
    backoff) or when a block had no news for ``stall_s``. ``probe_only`` users create no blocks of
    their own: they see to it that blocks handed to them (recovery probes) reach a status.
    """

    name: str
    user_id: int
    token: str
    doc: str
    urls: list[str]
    home: int
    p: Params
    stats: ClientStats
    texts: Callable[[], str]
    rng: random.Random
    probe_only: bool = False
    blocks: dict[int, Block] = attrs.Factory(dict)
    draining: bool = False
    _session: int = 0
    _errors_in_row: int = 0
    _wake: trio.Event = attrs.Factory(trio.Event)
    _t0: float = 0.0

    def new_block(self) -> Block:
        block = Block(self.user_id, self.doc, len(self.blocks), self.texts())
        self.blocks[block.idx] = block
        self.stats.blocks += 1
        return block

    def outstanding(self) -> int:
        return sum(1 for b in self.blocks.values() if b.status is None)

    def done(self) -> bool:
        return self.draining and self.outstanding() == 0

    def drain(self) -> None:
        self.draining = True
        self._wake.set()

    @property
    def session(self) -> int:
        return self._session

    async def run(self) -> None:
        self._t0 = trio.current_time()
        turn = self.home
        failures = 0
        while not self.done():
            url = self.urls[turn % len(self.urls)]
            try:
                await self._session_at(url)
                failures = 0
            except Reconnect:
                self.stats.closes["no reply in time"] += 1
            except Exception as exc:
                # The daemon is down or restarting (refused, 503 at the handshake, reset...).
                self.stats.connect_failures += 1
                self.stats.closes[f"{type(exc).__name__}"] += 1
            if self.done():
                return
            failures += 1
            turn += 1  # several daemons: the next one (a load balancer's failover)
            await trio.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)) * (0.5 + self.rng.random()))

    async def _session_at(self, url: str) -> None:
        self._session += 1
        sid = self._session
        pending: deque[tuple[float, list[int]]] = deque()
        async with connect(url, self.token, timeout_s=5.0, keep_frames=False) as client:
            ws = client.ws
            self.stats.sessions += 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, ws, pending, nursery.cancel_scope)
                await self._send_loop(ws, sid, pending)
                nursery.cancel_scope.cancel()

    def _backoff(self) -> float:
        self._errors_in_row += 1
        base = min(2.0, 0.1 * 2 ** min(self._errors_in_row - 1, 5))
        return base * (0.5 + self.rng.random())

    async def _send_loop(
        self, ws: WebSocketConnection, sid: int, pending: deque[tuple[float, list[int]]]
    ) -> None:
        while not self.done():
            now = trio.current_time()
            batch: list[Block] = []
            if not self.draining and not self.probe_only:
                due = int((now - self._t0) * self.p.rate) + 1 - len(self.blocks)
                room = self.p.buffer - self.outstanding()
                batch.extend(self.new_block() for _ in range(max(0, min(due, room))))
            fresh = {id(b) for b in batch}
            for b in self.blocks.values():
                if b.status is not None or id(b) in fresh:
                    continue
                if b.session != sid:
                    reason = "reconnect"
                elif b.retry_at is not None:
                    if now < b.retry_at:
                        continue
                    reason = "error"
                elif now - b.requested_at >= self.p.stall_s:
                    reason = "stall"
                else:
                    continue
                batch.append(b)
                self.stats.rerequests[reason] += 1
            for i in range(0, len(batch), 64):
                chunk = batch[i : i + 64]
                for b in chunk:
                    b.session, b.requested_at, b.retry_at = sid, now, None
                    b.requests += 1
                    if b.first_requested_at is None:
                        b.first_requested_at = now
                pending.append((now, [b.idx for b in chunk]))
                frame = {
                    "type": "synthesize",
                    "document_id": self.doc,
                    "model": "kokoro",
                    "blocks": [{"idx": b.idx, "text": b.text} for b in chunk],
                }
                await ws.send_message(json.dumps(frame))
                self.stats.requests += 1
            if pending and now - pending[0][0] > self.p.ack_timeout_s:
                self.stats.ack_timeouts += 1
                raise Reconnect(f"no reply to a request in {self.p.ack_timeout_s:g} s")
            with trio.move_on_after(0.05):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _receive(
        self,
        ws: WebSocketConnection,
        pending: deque[tuple[float, list[int]]],
        scope: trio.CancelScope,
    ) -> None:
        try:
            while True:
                frame = json.loads(await ws.get_message())
                self._on_frame(frame, pending, trio.current_time())
        except ConnectionClosed as exc:
            reason = exc.reason
            self.stats.closes[f"closed {getattr(reason, 'code', '?')}"] += 1
            scope.cancel()

    def _on_frame(
        self, frame: dict[str, Any], pending: deque[tuple[float, list[int]]], now: float
    ) -> None:
        kind = frame.get("type")
        if kind == "error":
            self.stats.error_frames[f"{frame.get('code')}: {frame.get('message')}"] += 1
            if pending:
                _, idxs = pending.popleft()
                delay = self._backoff()
                for i in idxs:
                    if self.blocks[i].status is None:
                        self.blocks[i].retry_at = now + delay
            return
        if kind != "status" or frame.get("document_id") != self.doc:
            return
        block = self.blocks.get(frame["block_idx"])
        if block is None:
            return
        for n, (_, idxs) in enumerate(pending):
            if block.idx in idxs:
                del pending[n]
                break
        self._errors_in_row = 0
        status = frame["status"]
        if status == "error":
            if frame.get("recoverable", False):
                self.stats.block_errors[str(frame.get("error", ""))[:80]] += 1
                block.retry_at = now + self._backoff()
                return
            self.finish(block, "error", now, error=str(frame.get("error", "")))
        elif status in ("cached", "skipped"):
            self.finish(block, status, now)

    def finish(self, block: Block, status: str, now: float, *, error: str = "") -> None:
        if block.status is not None:
            return
        block.status, block.done_at, block.error = status, now, error
        if block.first_requested_at is not None:
            self.stats.max_block_s = max(self.stats.max_block_s, now - block.first_requested_at)
        self._wake.set()
