"""The gateway service: the WebSocket endpoint and the HTTP endpoints, one Trio service.

Request path for ``synthesize`` (two round trips, no lock waits): the user's remaining allowance
from Postgres (the request pool — the only Postgres the request path touches), then one atomic
Redis script that answers each block from the cache, joins it to an in-flight job or creates a job
within the allowance and the rate limit. Statuses go back at once; later ones (``processing``,
``cached`` …) arrive over Redis pub/sub, published by the workers' pull and the hot path, and are
routed here to the connections of that user that asked for that document — in any daemon sharing
the Redis.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from daemon.config import GatewayConfig
from daemon.contracts import Job, Keys, usage_amount
from daemon.events import EventLog
from daemon.gateway.auth import TokenCache, token_from_request
from daemon.gateway.connection import CLOSE_GOING_AWAY, Connection
from daemon.gateway.http import HttpApp
from daemon.gateway.protocol import (
    CursorMoved,
    ProtocolError,
    Synthesize,
    error_frame,
    evicted_frame,
    parse_frame,
    status_frame,
)
from daemon.hashing import VariantHasher
from daemon.metrics import Metrics
from daemon.stores.pg import Catalog, PgPool, is_pg_unavailable
from daemon.stores.redis import RedisStore, is_redis_unavailable

__all__ = ["Gateway", "GatewayAddresses"]

WS_PATH = "/v1/ws"


@attrs.frozen
class GatewayAddresses:
    ws_port: int
    http_port: int
    tls: bool

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.ws_port}{WS_PATH}"

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"


@attrs.define(eq=False)
class Gateway:
    cfg: GatewayConfig
    store: RedisStore
    db: PgPool
    catalog: Catalog
    hasher: VariantHasher
    events: EventLog
    metrics: Metrics
    health: Callable[[], Awaitable[tuple[dict[str, Any], bool]]]
    refresh_metrics: Callable[[], Awaitable[None]]
    dashboard: Callable[[str], Awaitable[tuple[bytes, str] | None]] | None = None
    by_user: dict[int, set[Connection]] = attrs.Factory(dict)
    connection_count: int = 0
    tokens: TokenCache = attrs.field(init=False)
    addresses: GatewayAddresses | None = None

    def __attrs_post_init__(self) -> None:
        self.tokens = TokenCache(self.db)

    # -- the service ------------------------------------------------------------------------

    async def run(
        self,
        *,
        stopping: trio.Event,
        task_status: trio.TaskStatus[GatewayAddresses] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until ``stopping``; then stop accepting, let each connection send what is
        queued, close it with 1001, and give up on stragglers after ``close_grace_s``.

        ``started()`` with the bound ports, once notifications are subscribed and both listeners
        accept. A port of 0 in the config binds a free port.
        """
        ssl_context = self.cfg.ssl_context()
        async with trio.open_nursery() as root:
            await root.start(self._listen_notifications)
            async with trio.open_nursery() as conns:
                async with trio.open_nursery() as listeners:
                    ws_server = await listeners.start(
                        functools.partial(
                            serve_websocket,
                            self._handle_request,
                            self.cfg.host,
                            self.cfg.ws_port,
                            ssl_context,
                            handler_nursery=conns,
                            max_message_size=self.cfg.max_message_bytes,
                            message_queue_size=4,
                            connect_timeout=10.0,
                            disconnect_timeout=2.0,
                        )
                    )
                    binds = await listeners.start(self._http_server(stopping))
                    http_port = int(binds[0].rsplit(":", 1)[1])
                    self.addresses = GatewayAddresses(
                        ws_server.port, http_port, ssl_context is not None
                    )
                    task_status.started(self.addresses)
                    await stopping.wait()
                    listeners.cancel_scope.cancel()
                for conn_set in list(self.by_user.values()):
                    for conn in list(conn_set):
                        conn.begin_close(CLOSE_GOING_AWAY, "server shutting down")
                conns.cancel_scope.deadline = trio.current_time() + self.cfg.close_grace_s
            root.cancel_scope.cancel()

    def _http_server(self, stopping: trio.Event) -> Callable[..., Awaitable[None]]:
        app = HttpApp(
            get_audio=self.store.get_audio,
            health=self.health,
            refresh_metrics=self.refresh_metrics,
            registry=self.metrics.registry,
            dashboard=self.dashboard,
        )
        config = HypercornConfig()
        config.bind = [f"{self.cfg.host}:{self.cfg.http_port}"]
        config.accesslog = None
        config.errorlog = None
        config.graceful_timeout = 2.0
        if self.cfg.tls_cert:
            config.certfile = self.cfg.tls_cert
            config.keyfile = self.cfg.tls_key
        return functools.partial(hypercorn_serve, app, config, shutdown_trigger=stopping.wait)

    async def _listen_notifications(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        ready = trio.Event()
        started = False

        def on_ready() -> None:
            ready.set()

        while True:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        functools.partial(
                            self.store.listen_notifications, self._deliver, ready=on_ready
                        )
                    )
                    await ready.wait()
                    if not started:
                        started = True
                        task_status.started()
                    else:
                        await self._resync_pending()
            except Exception as exc:
                if not is_redis_unavailable(exc):
                    raise
                self.events.error("gateway", f"notification listener lost Redis: {exc}")
                ready = trio.Event()
                await trio.sleep(1.0)

    async def _resync_pending(self) -> None:
        """After re-subscribing: statuses published while the listener was away are lost, so tell
        each client what became of the blocks it waits for — ``cached`` if the audio is there, a
        recoverable ``error`` (ask again) if the job is neither done nor in flight any more."""
        waiting = [
            (conn, key, value)
            for conns in list(self.by_user.values())
            for conn in list(conns)
            for key, value in list(conn.pending.items())
        ]
        if not waiting:
            return
        states = await self.store.variant_states([value[0] for _, _, value in waiting])
        resynced = 0
        for (conn, key, (variant_hash, model, voice)), (cached, in_flight) in zip(
            waiting, states, strict=True
        ):
            if key not in conn.pending or (in_flight and not cached):
                continue  # answered meanwhile, or still on its way: its status will come
            document_id, block_idx = key
            if cached:
                frame = status_frame(
                    document_id, block_idx, "cached", model, voice,
                    audio_url=f"/v1/audio/{variant_hash}",
                )  # fmt: skip
            else:
                frame = status_frame(
                    document_id, block_idx, "error", model, voice,
                    error="lost track of this block during an outage, ask again",
                    recoverable=True,
                )  # fmt: skip
            conn.pending.pop(key, None)
            conn.notify(frame)
            resynced += 1
        if resynced:
            self.events.emit("statuses_resynced", service="gateway", count=resynced)

    # -- notifications from Redis -----------------------------------------------------------

    def _deliver(self, user_id: int, data: bytes) -> None:
        conns = self.by_user.get(user_id)
        if not conns:
            return
        try:
            frame = json.loads(data)
            document_id = frame["document_id"]
            block_idx = int(frame["block_idx"])
            status = frame["status"]
        except (ValueError, KeyError, TypeError):
            self.events.error("gateway", "malformed notification", data=data[:200])
            return
        text = status_frame(
            document_id,
            block_idx,
            status,
            frame.get("model", ""),
            frame.get("voice", ""),
            **{k: frame[k] for k in ("audio_url", "error", "recoverable") if k in frame},
        )
        for conn in list(conns):
            if document_id in conn.documents:
                conn.note_status(document_id, block_idx, status)
                conn.notify(text)

    # -- one connection ---------------------------------------------------------------------

    async def _handle_request(self, request: WebSocketRequest) -> None:
        path = request.path
        if path.split("?", 1)[0] != WS_PATH:
            await request.reject(404, body=b"no such endpoint\n")
            return
        if self.connection_count >= self.cfg.max_connections:
            await request.reject(503, body=b"too many connections\n")
            return
        token = token_from_request(request.headers, path)
        if token is None:
            await request.reject(
                401, extra_headers=[(b"WWW-Authenticate", b"Bearer")], body=b"missing token\n"
            )
            return
        try:
            with trio.fail_after(self.db.acquire_timeout_s + 5):
                user, waited = await self.tokens.lookup(token)
        except Exception as exc:
            self.events.error("gateway", f"token lookup failed: {type(exc).__name__}: {exc}")
            await request.reject(503, body=b"authentication unavailable, try again\n")
            return
        if waited:
            self.metrics.request_pool_wait_seconds.observe(waited)
        if user is None:
            await request.reject(
                401, extra_headers=[(b"WWW-Authenticate", b"Bearer")], body=b"invalid token\n"
            )
            return
        ws = await request.accept()
        conn = Connection(user[0], ws, self.cfg.send_queue_frames)
        self._register(conn)
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_then_close, conn)
                    with conn.reader_scope:
                        await self._read_loop(conn)
                    conn.close_queue()
        finally:
            self._unregister(conn)
            with trio.move_on_after(2, shield=True):
                await ws.aclose(conn.close_code, conn.close_reason)

    async def _write_then_close(self, conn: Connection) -> None:
        try:
            await conn.write_loop()
        except ConnectionClosed:
            conn.reader_scope.cancel()

    def _register(self, conn: Connection) -> None:
        self.by_user.setdefault(conn.user_id, set()).add(conn)
        self.connection_count += 1
        self.metrics.ws_connections.set(self.connection_count)

    def _unregister(self, conn: Connection) -> None:
        conns = self.by_user.get(conn.user_id)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_user[conn.user_id]
        self.connection_count -= 1
        self.metrics.ws_connections.set(self.connection_count)

    async def _read_loop(self, conn: Connection) -> None:
        while True:
            try:
                message = await conn.ws.get_message()
            except ConnectionClosed:
                return
            try:
                request = parse_frame(message)
                if isinstance(request, Synthesize):
                    await self._synthesize(conn, request)
                else:
                    await self._cursor_moved(conn, request)
            except ProtocolError as exc:
                conn.push(error_frame(exc.code, exc.message))
            except Exception as exc:
                # Redis or Postgres down, a pool timeout, or a bug: the client hears, the
                # connection stays, a person sees it in the events log.
                timeout = isinstance(exc, TimeoutError | trio.TooSlowError)
                message_text = (
                    "timed out waiting for the database, try again"
                    if timeout
                    else "temporarily unavailable, try again"
                    if is_redis_unavailable(exc) or is_pg_unavailable(exc)
                    else "internal error"
                )
                conn.push(error_frame("internal", message_text))
                self.metrics.requests.labels("internal").inc()
                self.events.error(
                    "gateway", f"request failed: {type(exc).__name__}: {exc}", user_id=conn.user_id
                )

    async def _synthesize(self, conn: Connection, req: Synthesize) -> None:
        t0 = time.perf_counter()
        model = self.catalog.models.get(req.model)
        if model is None:
            raise ProtocolError("unknown_model", f"model: unknown model {req.model[:64]!r}")
        voice = req.voice or model["default_voice"]
        if voice not in self.catalog.voices.get(req.model, ()):
            raise ProtocolError(
                "unknown_voice", f"voice: unknown voice {voice[:64]!r} for {req.model}"
            )
        multiplier = model["usage_multiplier"]
        with trio.fail_after(self.db.acquire_timeout_s + 5):
            budget, waited = await self.db.budget(conn.user_id)
        self.metrics.request_pool_wait_seconds.observe(waited)
        now = time.time()
        blocks = []
        hashes = []
        for block in req.blocks:
            variant_hash = self.hasher(block.text, req.model, voice)
            hashes.append(variant_hash)
            job = Job(
                job_id=uuid.uuid4().hex,
                variant_hash=variant_hash,
                model=req.model,
                voice=voice,
                text=block.text,
                user_id=conn.user_id,
                document_id=req.document_id,
                block_idx=block.idx,
                usage_multiplier=multiplier,
                enqueued_at=now,
            )
            cost = usage_amount(len(block.text), multiplier)
            blocks.append((block.idx, variant_hash, job.job_id, cost, job.to_json()))
        conn.documents.add(req.document_id)
        conn.hold()
        try:
            head, statuses = await self.store.enqueue_blocks(
                user_id=conn.user_id,
                document_id=req.document_id,
                model=req.model,
                now=now,
                rate_key=f"{Keys.RATE_PREFIX}{conn.user_id}:{int(now // 60)}",
                rate_limit=self.cfg.rate_limit_blocks_per_min,
                budget=budget.for_type(model["usage_type"]),
                blocks=blocks,
            )
            if head == "rate_limited":
                self.metrics.requests.labels("rate_limited").inc()
                raise ProtocolError(
                    "rate_limited",
                    f"rate limit: at most {self.cfg.rate_limit_blocks_per_min} blocks a minute",
                )
            assert isinstance(statuses, list)
            for block, variant_hash, status in zip(req.blocks, hashes, statuses, strict=True):
                self.metrics.blocks.labels(status).inc()
                if status == "cached":
                    conn.pending.pop((req.document_id, block.idx), None)
                    conn.push(
                        status_frame(
                            req.document_id,
                            block.idx,
                            "cached",
                            req.model,
                            voice,
                            audio_url=f"/v1/audio/{variant_hash}",
                        )
                    )
                elif status == "limit":
                    conn.pending.pop((req.document_id, block.idx), None)
                    conn.push(
                        status_frame(
                            req.document_id,
                            block.idx,
                            "error",
                            req.model,
                            voice,
                            error="usage limit exceeded",
                            recoverable=False,
                        )
                    )
                else:
                    conn.pending[(req.document_id, block.idx)] = (variant_hash, req.model, voice)
                    conn.push(status_frame(req.document_id, block.idx, status, req.model, voice))
        finally:
            conn.release()
        self.metrics.requests.labels("ok").inc()
        self.metrics.ack_seconds.observe(time.perf_counter() - t0)

    async def _cursor_moved(self, conn: Connection, req: CursorMoved) -> None:
        candidates = [
            (idx, variant_hash, model)
            for (doc, idx), (variant_hash, model, _voice) in conn.pending.items()
            if doc == req.document_id
        ]
        evicted = []
        if candidates:
            evicted = await self.store.evict(
                user_id=conn.user_id, document_id=req.document_id, blocks=candidates
            )
            for idx in evicted:
                conn.pending.pop((req.document_id, idx), None)
        conn.push(evicted_frame(req.document_id, evicted))
