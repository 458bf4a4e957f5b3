"""The gateway service: the WebSocket endpoint and the audio endpoint, one Trio service.

The request path touches no Postgres. A handshake looks the token's hash up in Redis (the token
mirror); a ``synthesize`` is one atomic Redis script that answers each block from the cache, joins
it to an in-flight job, or creates a job with a hold for its characters against the user's
entitlements mirrored in Redis, within the rate limit (docs/billing.md, "Holds and the
entitlements mirror"). A Postgres outage does not stop readers: billing catches up later.

Statuses go back at once; later ones (``processing``, ``cached`` …) arrive over Redis pub/sub,
published by the workers' pull and the hot path, and are routed here to the one connection that
waits for that block (each published status names it) — in any daemon sharing the Redis. After
the subscription is lost and comes back, open waits are re-read from Redis, since pub/sub is
at-most-once. The same subscription carries control messages (a revoked user's connections are
closed).
"""

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from daemon.audio.tiers import AudioTiers
from daemon.config import GatewayConfig
from daemon.contracts import Job, token_hash, usage_amount
from daemon.contracts.events import ConnectionsRevoked, Error
from daemon.gateway.auth import plausible_token, token_from_request
from daemon.gateway.connection import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    Connection,
    PendingKey,
)
from daemon.gateway.hashing import VariantHasher
from daemon.gateway.http import HttpApp
from daemon.gateway.protocol import (
    CursorMoved,
    ProtocolError,
    Synthesize,
    error_frame,
    evicted_frame,
    parse_frame,
    quote,
    status_frame,
)
from daemon.gateway.ratelimit import RateLimiter
from daemon.gateway.reader import Reader, reader_config
from daemon.ops.events import EventLog, Throttle
from daemon.ops.metrics import Metrics
from daemon.runtime.outage import Outage
from daemon.runtime.priority import RequestFirst
from daemon.stores.pg import Catalog
from daemon.stores.redis import RedisStore, is_redis_unavailable

__all__ = ["Gateway", "GatewayAddresses", "MirrorMissing"]

WS_PATH = "/v1/ws"

# Statuses the fan-out routes in one scheduling step (~20 µs each: a JSON decode and encode).
FAN_OUT_SLICE = 32


class MirrorMissing(Exception):
    """The user's entitlements are not in Redis (being rebuilt): the request is refused, to be
    retried."""


def _client_address(request: WebSocketRequest) -> str:
    remote = getattr(request, "remote", None)
    return str(getattr(remote, "address", remote))


@attrs.frozen
class GatewayAddresses:
    ws_port: int
    http_port: int
    tls: bool
    ops_host: str = "127.0.0.1"
    ops_port: int = 0

    @property
    def ops_url(self) -> str:
        """The operations listener (/metrics, /healthz, /dashboard): plain HTTP."""
        return f"http://{self.ops_host}:{self.ops_port}"

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
    catalog: Catalog
    hasher: VariantHasher
    events: EventLog
    metrics: Metrics
    # Redis, then the durable audio store (None: Redis only).
    audio: AudioTiers | None = None
    # Called with a user whose entitlements are missing from Redis: the mirror service copies
    # them from Postgres (off the request path); the request meanwhile gets "try again".
    missing_mirror: Callable[[int], None] = lambda user_id: None
    # Fair scheduling's weight per plan name ([plans] weights); plans not named weigh 1.
    plan_weights: Mapping[str, float] = attrs.Factory(dict)
    by_user: dict[int, set[Connection]] = attrs.Factory(dict)
    by_conn: dict[str, Connection] = attrs.Factory(dict)
    # Connections open or being authenticated (a slot is taken before the token lookup).
    connection_count: int = 0
    # Times the open waits were re-checked against Redis (re-subscribed, or statuses dropped).
    resyncs: int = 0
    # Statuses from Redis dropped because the fan-out's channel was full (each then resynced).
    notifications_dropped: int = 0
    rate: RateLimiter = attrs.field(init=False)
    # Failed token look-ups per client address (docs/protocol.md).
    auth_failures: RateLimiter = attrs.field(init=False)
    # Handshakes of a user between their look-up and their connection's registration: counted
    # with the open ones, so concurrent handshakes cannot pass max_connections_per_user.
    _admitting: dict[int, int] = attrs.Factory(dict)
    # Each connected user's plan (from the token mirror): their fair-scheduling weight.
    _plans: dict[int, str] = attrs.Factory(dict)
    # Connections closed because their user's tokens were revoked.
    revoked_closed: int = 0
    addresses: GatewayAddresses | None = None
    _stopping: bool = False
    # The listener's hand-off to the fan-out (set per run), and drops not yet resynced.
    priority: RequestFirst = attrs.Factory(RequestFirst)
    _notify_send: trio.MemorySendChannel[tuple[int, bytes]] | None = None
    _unsynced_drops: int = 0
    _drops_log: Throttle = attrs.Factory(Throttle)

    def _error(self, message: str, **context: Any) -> None:
        self.events.emit(Error(service="gateway", message=message, context=context))

    def __attrs_post_init__(self) -> None:
        self.rate = RateLimiter(self.cfg.rate_limit_blocks_per_min)
        self.auth_failures = RateLimiter(self.cfg.auth_failures_per_min)

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
        accept. A port of 0 in the config binds a free port. Errors of one connection end that
        connection only (logged as ``error`` events); Redis lost by the notification listener is
        retried every second. Anything else ends the service (the supervisor restarts it).
        """
        ssl_context = self.cfg.ssl_context()
        self._stopping = False
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
                            # trio-websocket counts characters; _read_loop checks the bytes.
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
                    self._stopping = True
                    listeners.cancel_scope.cancel()
                for conn in list(self.by_conn.values()):
                    conn.begin_close(CLOSE_GOING_AWAY, "server shutting down")
                conns.cancel_scope.deadline = trio.current_time() + self.cfg.close_grace_s
            root.cancel_scope.cancel()

    async def _get_audio(self, variant_hash: str) -> tuple[bytes, str] | None:
        await self.priority.bulk_turn()
        if self.audio is not None:
            return await self.audio.fetch(variant_hash)
        return await self.store.get_audio(variant_hash)

    def _reader_config(self) -> dict[str, Any]:
        assert self.addresses is not None  # the HTTP server starts after the WebSocket one
        return reader_config(
            ws_port=self.addresses.ws_port,
            tls=self.addresses.tls,
            ws_path=WS_PATH,
            models=self.catalog.models,
            voices=self.catalog.voices,
        )

    def _http_server(self, stopping: trio.Event) -> Callable[..., Awaitable[None]]:
        # Audio and the reader page: health, metrics and the dashboard are on the operations
        # listener (docs/operations.md).
        app = HttpApp(get_audio=self._get_audio, reader=Reader(self._reader_config))
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
        """Subscribe to every user's statuses, and route them to connections: the asyncio
        listener only hands each raw message over a bounded channel (:meth:`_offer`); the routing
        runs here in Trio, in short slices (:meth:`_fan_out`)."""
        send, receive = trio.open_memory_channel[tuple[int, bytes]](self.cfg.notify_buffer)
        self._notify_send = send
        async with trio.open_nursery() as fan_out:
            fan_out.start_soon(self._fan_out, receive)
            await self._subscribe(task_status)

    async def _subscribe(self, task_status: trio.TaskStatus[None]) -> None:
        ready = trio.Event()
        started = False
        # Retried at least once a second: every second without the subscription is a second in
        # which no client hears of its blocks. The outage is logged once a minute, not per try.
        outage = Outage("gateway", self.events, max_s=1.0)

        def on_ready() -> None:
            ready.set()

        while True:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        functools.partial(
                            self.store.listen_notifications,
                            self._offer,
                            ready=on_ready,
                            control=self._control,
                        )
                    )
                    await ready.wait()
                    if not started:
                        started = True
                        task_status.started()
                    else:
                        outage.ok()
                        # Pub/sub is at-most-once: statuses published while we were not
                        # subscribed are gone. Re-read what they would have said.
                        await self._resync_until_done()
            except Exception as exc:
                # (a group of outage errors, from the listener's nursery, counts as one)
                if not is_redis_unavailable(exc):
                    raise
                ready = trio.Event()
                await outage.failed(exc, "Redis (notifications)")

    def _control(self, data: bytes) -> None:
        """A control message (``tts:control``): ``{"revoke": user_id}`` closes every open
        connection of that user (their tokens are gone from the mirror: they cannot reconnect)."""
        try:
            message = json.loads(data)
            user_id = message.get("revoke") if isinstance(message, dict) else None
        except ValueError:
            return
        if not isinstance(user_id, int) or isinstance(user_id, bool):
            return
        for conn in list(self.by_user.get(user_id, ())):
            conn.abort(CLOSE_POLICY, "token revoked")
            self.revoked_closed += 1
        if user_id in self.by_user:
            self.events.emit(ConnectionsRevoked(service="gateway", user_id=user_id))

    def _offer(self, user_id: int, data: bytes) -> None:
        """Hand one published status to the fan-out. Called by the asyncio listener for each
        message, so it does nothing else: no parsing, no routing. A full channel drops the
        status; the fan-out then re-reads the open waits from Redis, as after a lost
        subscription (pub/sub is at-most-once anyway), so every block still gets its terminal
        status."""
        assert self._notify_send is not None
        try:
            self._notify_send.send_nowait((user_id, data))
        except trio.WouldBlock:
            self._unsynced_drops += 1
            self.notifications_dropped += 1
            self.metrics.notifications_dropped.inc()

    async def _fan_out(self, receive: trio.MemoryReceiveChannel[tuple[int, bytes]]) -> None:
        """Route statuses to connections, at most ``FAN_OUT_SLICE`` per scheduling step (each
        ``receive`` is a checkpoint), so a burst of them never holds up the request path for
        long. Once the channel is empty after drops, resync the open waits."""
        async with receive:
            while True:
                if self._unsynced_drops and not receive.statistics().current_buffer_used:
                    self._log_drops()
                    self._unsynced_drops = 0
                    await self._resync_until_done()
                    continue
                user_id, data = await receive.receive()
                await self.priority.bulk_turn()
                self._deliver(user_id, data)
                for _ in range(FAN_OUT_SLICE - 1):
                    try:
                        user_id, data = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    self._deliver(user_id, data)

    def _log_drops(self) -> None:
        if self._drops_log.due() is None:
            return
        self._error(
            f"notification channel full (gateway.notify_buffer = {self.cfg.notify_buffer}):"
            f" {self._unsynced_drops} statuses dropped; re-reading the open waits from Redis",
            dropped_total=self.notifications_dropped,
        )

    async def _resync_until_done(self) -> None:
        """Resync, retrying while Redis is still unsteady (right after a restart, the pool hands
        out connections the old server closed): a resync given up on leaves clients waiting for
        statuses that were published while nobody listened."""
        outage = Outage("gateway", self.events, max_s=1.0)
        while True:
            try:
                await self.resync()
            except Exception as exc:
                if not is_redis_unavailable(exc):
                    self._error(f"resync after reconnecting failed: {exc!r}")
                    return
                await outage.failed(exc, "Redis (resync)")
                continue
            outage.ok()
            return

    async def resync(
        self, waits: list[tuple[Connection, PendingKey, tuple[str, str]]] | None = None
    ) -> None:
        """Re-check every open wait (or just ``waits``: connection, key, (model, voice)) against
        Redis and answer those whose status was lost.

        A block whose audio is cached gets ``cached``; one whose job is gone without audio
        (failed, skipped, or evicted by Redis losing data) gets ``error`` (recoverable: ask
        again). A block still in flight keeps waiting. A status that also arrives over pub/sub
        is dropped by the connection's routing, so nobody hears a terminal status twice.
        A block whose request is still in progress is skipped (its script may not have run);
        that request re-checks it when it ends (:meth:`_synthesize`).
        """
        if waits is None:
            waits = [
                (conn, key, mv)
                for conn in self.by_conn.values()
                for key, mv in conn.pending.items()
                if key not in conn.requesting
            ]
            self.resyncs += 1
        if not waits:
            return
        hashes = sorted({key[2] for _, key, _ in waits})
        with trio.fail_after(self.store.command_timeout_s):
            states = dict(zip(hashes, await self.store.variant_states(hashes), strict=True))
        for conn, (document_id, block_idx, variant_hash), (model, voice) in waits:
            cached, in_flight = states[variant_hash]
            if cached:
                text = status_frame(
                    document_id,
                    block_idx,
                    "cached",
                    model,
                    voice,
                    audio_url=f"/v1/audio/{variant_hash}",
                )
                conn.notify((document_id, block_idx, variant_hash), "cached", text)
            elif not in_flight:
                text = status_frame(
                    document_id,
                    block_idx,
                    "error",
                    model,
                    voice,
                    error="status lost while the server was disconnected from Redis; ask again",
                    recoverable=True,
                )
                conn.notify((document_id, block_idx, variant_hash), "error", text)

    # -- notifications from Redis -----------------------------------------------------------

    def _deliver(self, user_id: int, data: bytes) -> None:
        """Route one published status to the connection that waits for it (called by the
        fan-out). Only the user's own connections can match: the channel names
        the user, and the connection must belong to that user."""
        try:
            frame = json.loads(data)
            conn_id = frame["conn"]
            document_id = frame["document_id"]
            block_idx = frame["block_idx"]
            variant_hash = frame["variant_hash"]
            status = frame["status"]
            if not isinstance(block_idx, int) or not isinstance(status, str):
                raise TypeError("block_idx or status of the wrong type")
        except (ValueError, KeyError, TypeError) as exc:
            self._error(f"malformed notification: {exc}", data=data[:200])
            return
        conn = self.by_conn.get(conn_id) if isinstance(conn_id, str) else None
        if conn is None or conn.user_id != user_id:
            return
        text = status_frame(
            document_id,
            block_idx,
            status,
            frame.get("model", ""),
            frame.get("voice", ""),
            **{k: frame[k] for k in ("audio_url", "error", "recoverable") if k in frame},
        )
        conn.notify((document_id, block_idx, variant_hash), status, text)

    # -- one connection ---------------------------------------------------------------------

    async def _handle_request(self, request: WebSocketRequest) -> None:
        """One WebSocket connection, from handshake to close. Nothing a client does — vanish
        mid-handshake, send garbage — may escape from here: it would take the gateway down."""
        try:
            await self._serve_request(request)
        except ConnectionClosed:
            pass
        except Exception as exc:
            self._error(f"connection failed: {type(exc).__name__}: {exc}")

    async def _serve_request(self, request: WebSocketRequest) -> None:
        path = request.path
        if path.split("?", 1)[0] != WS_PATH:
            await request.reject(404, body=b"no such endpoint\n")
            return
        if self.connection_count >= self.cfg.max_connections:
            await request.reject(503, body=b"too many connections\n")
            return
        self.connection_count += 1  # the slot is ours from here, released in the finally
        try:
            conn = await self._authenticate(request)
            if conn is None:
                return
            try:
                await self._run_connection(conn)
            finally:
                self._unregister(conn)
                with trio.move_on_after(2, shield=True):
                    await conn.ws.aclose(conn.close_code, conn.close_reason)
                if conn.pending and not self._stopping:
                    await self._forget(conn)
        finally:
            self.connection_count -= 1

    async def _authenticate(self, request: WebSocketRequest) -> Connection | None:
        """The connection for a valid token; else the handshake is rejected and None.

        Redis only (the token mirror): a handshake never waits for Postgres. A client address
        with too many failed look-ups is refused (429) without one. A miss while the mirror is
        being rebuilt is 503 (try again), not 401."""
        token = token_from_request(request.headers, request.path)
        if token is None:
            await request.reject(
                401, extra_headers=[(b"WWW-Authenticate", b"Bearer")], body=b"missing token\n"
            )
            return None
        address = _client_address(request)
        if self.auth_failures.retry_after_s(address, 1) is not None:
            await request.reject(429, body=b"too many failed authentications, slow down\n")
            return None
        user_id = None
        if plausible_token(token):
            try:
                user_id, ready = await self._lookup_user(token)
            except Exception as exc:
                self._error(f"token lookup failed: {type(exc).__name__}: {exc}")
                await request.reject(503, body=b"authentication unavailable, try again\n")
                return None
            if user_id is None and not ready:
                await request.reject(503, body=b"authentication unavailable, try again\n")
                return None
        if user_id is None:
            self.auth_failures.consume(address, 1)
            self.auth_failures.prune(10_000)
            await request.reject(
                401, extra_headers=[(b"WWW-Authenticate", b"Bearer")], body=b"invalid token\n"
            )
            return None
        # No await between this check and the reservation: concurrent handshakes of one user
        # each see the others'.
        admitting = self._admitting.get(user_id, 0)
        if len(self.by_user.get(user_id, ())) + admitting >= self.cfg.max_connections_per_user:
            await request.reject(429, body=b"too many connections for this user\n")
            return None
        self._admitting[user_id] = admitting + 1
        try:
            ws = await request.accept()
            conn = Connection(user_id, ws, self.cfg.send_queue_frames)
            self._register(conn)
        finally:
            left = self._admitting[user_id] - 1
            if left:
                self._admitting[user_id] = left
            else:
                del self._admitting[user_id]
        return conn

    async def _lookup_user(self, token: str) -> tuple[int | None, bool]:
        """(user id or None, whether the token mirror is complete): one Redis round trip (the
        benchmark's baseline overrides this with the old Postgres look-up). The user's plan
        (their fair-scheduling weight) comes with it."""
        with trio.fail_after(self.store.command_timeout_s):
            user_id, plan, ready = await self.store.lookup_token(token_hash(token))
        if user_id is not None:
            self._plans[user_id] = plan
        return user_id, ready

    async def _run_connection(self, conn: Connection) -> None:
        with conn.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_then_close, conn)
                with conn.reader_scope:
                    await self._read_loop(conn)
                conn.close_queue()

    async def _write_then_close(self, conn: Connection) -> None:
        try:
            await conn.write_loop()
        except ConnectionClosed:
            conn.reader_scope.cancel()

    def _register(self, conn: Connection) -> None:
        self.by_user.setdefault(conn.user_id, set()).add(conn)
        self.by_conn[conn.conn_id] = conn
        self.metrics.ws_connections.set(len(self.by_conn))

    def _unregister(self, conn: Connection) -> None:
        self.by_conn.pop(conn.conn_id, None)
        conns = self.by_user.get(conn.user_id)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_user[conn.user_id]
                self.rate.forget(conn.user_id)
                self._plans.pop(conn.user_id, None)
        self.metrics.ws_connections.set(len(self.by_conn))

    async def _forget(self, conn: Connection) -> None:
        """The client left: it stops waiting for its blocks, and a queued job nobody else waits
        for leaves the queue (no GPU time, and no bill, for audio nobody will hear). Not done at
        shutdown: clients then reconnect elsewhere and their queued jobs must still be there."""
        blocks = [(doc, idx, h, model) for (doc, idx, h), (model, _) in conn.pending.items()]
        conn.pending.clear()
        with trio.move_on_after(2, shield=True):
            try:
                await self.store.evict(
                    user_id=conn.user_id, conn_id=conn.conn_id, blocks=blocks, only_queued=False
                )
            except Exception as exc:
                self._error(
                    f"could not drop a closed connection's waits: {exc}",
                    user_id=conn.user_id,
                )

    async def _read_loop(self, conn: Connection) -> None:
        max_bytes = self.cfg.max_message_bytes
        # The frame-rate limit: a token bucket of max_frames_per_s frames, refilled as many a
        # second; a client beyond it is closed (1008).
        per_s = float(self.cfg.max_frames_per_s)
        tokens, last = per_s, trio.current_time()
        while True:
            try:
                message = await conn.ws.get_message()
            except ConnectionClosed:
                return
            now = trio.current_time()
            tokens = min(per_s, tokens + (now - last) * per_s)
            last = now
            if tokens < 1:
                self.metrics.requests.labels("too_many_frames").inc()
                conn.abort(CLOSE_POLICY, f"more than {self.cfg.max_frames_per_s} frames a second")
                return
            tokens -= 1
            # trio-websocket limits text frames in characters; the limit is in bytes (UTF-8 may
            # take up to 4 per character), so a frame it let through may still be too big.
            if (
                isinstance(message, str)
                and len(message) * 4 > max_bytes
                and len(message.encode("utf-8", "surrogatepass")) > max_bytes
            ):
                self.metrics.requests.labels("too_big").inc()
                conn.abort(CLOSE_TOO_BIG, f"message over {max_bytes} bytes")
                return
            try:
                request = parse_frame(message)
                if isinstance(request, Synthesize):
                    with self.priority.request():
                        await self._synthesize(conn, request)
                else:
                    await self._cursor_moved(conn, request)
            except ProtocolError as exc:
                self.metrics.requests.labels(exc.code).inc()
                conn.push(error_frame(exc.code, exc.message))
            except Exception as exc:
                # Redis down, a timeout, or a bug: the client hears, the connection stays, a
                # person sees it in the events log.
                timeout = isinstance(exc, TimeoutError | trio.TooSlowError)
                message_text = (
                    "timed out waiting for the database, try again"
                    if timeout
                    else "temporarily unavailable, try again"
                    if is_redis_unavailable(exc) or isinstance(exc, MirrorMissing)
                    else "internal error"
                )
                conn.push(error_frame("internal", message_text))
                self.metrics.requests.labels("internal").inc()
                self._error(f"request failed: {type(exc).__name__}: {exc}", user_id=conn.user_id)

    async def _synthesize(self, conn: Connection, req: Synthesize) -> None:
        """Validate against the catalog and limits, run ``enqueue.lua`` once (holds against the
        mirrored entitlements: no Postgres), then one status per block. A request either fails
        as a whole with one ``error`` frame, or every block gets its first status here and
        later exactly one terminal status (unless evicted)."""
        t0 = time.perf_counter()
        model = self.catalog.models.get(req.model)
        if model is None:
            raise ProtocolError("unknown_model", f"model: unknown model {quote(req.model)}")
        voice = req.voice or model["default_voice"]
        if voice not in self.catalog.voices.get(req.model, ()):
            raise ProtocolError(
                "unknown_voice", f"voice: unknown voice {quote(voice)} for model {req.model}"
            )
        n = len(req.blocks)
        if len(conn.pending) + n > self.cfg.max_pending_blocks:
            raise ProtocolError(
                "rate_limited",
                f"blocks: this connection already waits for {len(conn.pending)} blocks "
                f"(at most {self.cfg.max_pending_blocks}); move the cursor or wait",
            )
        retry = self.rate.retry_after_s(conn.user_id, n)
        if retry is not None:
            raise self._rate_limited(n, retry)

        multiplier = model["usage_multiplier"]
        now = time.time()
        blocks = []
        keys: list[PendingKey] = []
        for block in req.blocks:
            variant_hash = self.hasher(block.text, req.model, voice)
            keys.append((req.document_id, block.idx, variant_hash))
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

        if self.audio is not None:
            # Audio in the durable store but no longer in Redis goes back into Redis first, so
            # that enqueue.lua answers it `cached`: no job, no hold, no bill (docs/tts-flow.md).
            await self.audio.promote_stored([key[2] for key in keys])

        # Wait for the blocks before the script runs (a status may be published before its
        # reply reaches us); hold notifications until this request's replies are queued.
        added = [key for key in keys if key not in conn.pending]
        for key in added:
            conn.pending[key] = (req.model, voice)
        conn.requesting.update(added)
        conn.hold()
        resyncs = self.resyncs
        try:
            try:
                head, result = await self._enqueue(
                    user_id=conn.user_id,
                    usage_type=model["usage_type"],
                    conn_id=conn.conn_id,
                    document_id=req.document_id,
                    model=req.model,
                    now=now,
                    rate_limit=self.cfg.rate_limit_blocks_per_min,
                    blocks=blocks,
                    weight=self.plan_weights.get(self._plans.get(conn.user_id, ""), 1.0),
                )
            except BaseException:
                # No reply: the client hears an error for the request as a whole, so nothing it
                # asked for here may be answered later (the script may still have run).
                for key in added:
                    conn.pending.pop(key, None)
                raise
            if head == "no_mirror":
                for key in added:
                    conn.pending.pop(key, None)
                self.missing_mirror(conn.user_id)
                raise MirrorMissing(f"user {conn.user_id}: entitlements not in Redis")
            if head == "rate_limited":
                for key in added:
                    conn.pending.pop(key, None)
                assert isinstance(result, int)
                raise self._rate_limited(n, float("inf") if result < 0 else result / 1000)
            assert isinstance(result, list)
            self.rate.consume(conn.user_id, n)
            for block, key, status in zip(req.blocks, keys, result, strict=True):
                self.metrics.blocks.labels(status).inc()
                if status == "cached":
                    conn.pending.pop(key, None)
                    conn.push(
                        status_frame(
                            req.document_id,
                            block.idx,
                            "cached",
                            req.model,
                            voice,
                            audio_url=f"/v1/audio/{key[2]}",
                        )
                    )
                elif status == "limit":
                    conn.pending.pop(key, None)
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
                    conn.pending[key] = (req.model, voice)
                    conn.push(status_frame(req.document_id, block.idx, status, req.model, voice))
        finally:
            conn.requesting.difference_update(added)
            conn.release()
        self.metrics.requests.labels("ok").inc()
        self.metrics.ack_seconds.observe(time.perf_counter() - t0)
        if self.resyncs != resyncs:
            # A resync ran while this request was in progress and skipped its blocks, whose
            # statuses may be among those it was run for: check them now.
            await self._recheck(conn, added)

    async def _enqueue(self, **kwargs: Any) -> tuple[str, list[str] | int]:
        """``enqueue.lua``: the request path's one round trip (the benchmark's baseline
        overrides this with the old Postgres-checked path)."""
        return await self.store.enqueue(**kwargs)

    async def _recheck(self, conn: Connection, keys: list[PendingKey]) -> None:
        waits = [(conn, key, conn.pending[key]) for key in keys if key in conn.pending]
        if not waits:
            return
        try:
            await self.resync(waits)
        except Exception as exc:
            # The request itself succeeded; its client must not hear an error for it. If Redis
            # is gone again, the resync after the next subscription covers these blocks.
            self._error(f"re-checking a request's blocks failed: {exc!r}", user_id=conn.user_id)

    def _rate_limited(self, n: int, retry_after_s: float) -> ProtocolError:
        limit = self.cfg.rate_limit_blocks_per_min
        if math.isinf(retry_after_s):
            return ProtocolError(
                "rate_limited",
                f"blocks: {n} blocks in one request exceed the rate limit of {limit} a minute",
            )
        retry = max(retry_after_s, 0.1)
        return ProtocolError(
            "rate_limited", f"rate limit: at most {limit} blocks a minute; retry in {retry:.1f} s"
        )

    async def _cursor_moved(self, conn: Connection, req: CursorMoved) -> None:
        """Evict this connection's queued blocks of the document; reply with one ``evicted``."""
        candidates = [
            (key, model) for key, (model, _) in conn.pending.items() if key[0] == req.document_id
        ]
        evicted: set[int] = set()
        if candidates:
            positions = await self.store.evict(
                user_id=conn.user_id,
                conn_id=conn.conn_id,
                blocks=[(doc, idx, h, model) for (doc, idx, h), model in candidates],
                cursor=req.block_idx,
            )
            for i in positions:
                key = candidates[i][0]
                conn.pending.pop(key, None)
                evicted.add(key[1])
        conn.push(evicted_frame(req.document_id, list(evicted)))  # it sorts them
