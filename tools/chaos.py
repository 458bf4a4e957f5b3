#!/usr/bin/env python3
"""Chaos: kill it, restart its servers, run two of it — and lose nothing.

Runs a steady load — WebSocket users asking for blocks with unique texts, ``tts-worker
--simulated`` GPU workers — against ``tts-daemon run`` processes on Redis and Postgres servers this
tool owns, injects faults on a schedule, then drains and reconciles exactly: every block a user
asked for reached a terminal status, every delivered block has exactly one ``usage_log`` row with
the right amount, nothing else is billed, and the subscription counters agree with the log.

Faults (``--scenario``): ``daemon-kill`` (SIGKILL at a random moment, restart), ``sigterm``
(graceful stop under load: exit 0 within 10 s, restart), ``billing`` (the billing service fails
repeatedly: injected through TTS_DAEMON_FAULTS), ``redis`` (Redis restarted gracefully, killed
with SIGKILL, and crashed: a host crash emulated by killing it and cutting its AOF back to what
was last fsynced; ``--appendfsync`` picks the fsync policy), ``redis-crash`` (only the crash: with
``--appendfsync everysec``, the loss window), ``postgres`` (Postgres stopped — fast
or SIGKILL — and unreachable for a while), ``worker-kill`` (a GPU worker SIGKILLed mid-job),
``two-daemons`` (two daemons on the same Redis and Postgres, one killed and left down a while), and
``mixed`` (all of them, at random, against two daemons).

After each fault it measures the time to recover: every daemon healthy (``/healthz`` 200 with all
services running) and a probe block synthesized end to end through each of them. Clients behave as
a browser would: they reconnect after a closed connection and ask again for the blocks that have no
terminal status yet (a repeat joins the job in flight or is answered from the cache: no second job,
no second bill), back off after ``error`` frames, and never wait without a deadline.

    tools/chaos.py --scenario mixed --load-s 180 --json var/chaos.json
    tools/chaos.py --scenario redis-crash --appendfsync everysec --json var/chaos-everysec.json

docs/reliability.md describes the method and the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.embedded import EmbeddedPostgres, EmbeddedRedis, read_secret
from daemon.embedded.process import _free_port
from tools.chaos_audio import AudioChaos
from tools.figures import pct
from tools.stress import in_thread, make_texts, pg_query, redis_cmd
from tools.stress import setup_database as _setup_database

FAULT_KINDS = (
    "daemon_kill",
    "daemon_sigterm",
    "billing_faults",
    "redis_restart",
    "redis_kill",
    "redis_crash",
    "postgres_outage",
    "worker_kill",
    "persister_faults",
    "disk_full",
)
SCENARIOS: dict[str, tuple[str, ...]] = {
    "daemon-kill": ("daemon_kill",),
    "sigterm": ("daemon_sigterm",),
    "billing": ("billing_faults",),
    "redis": ("redis_restart", "redis_kill", "redis_crash"),
    "redis-crash": ("redis_crash",),
    "postgres": ("postgres_outage",),
    "worker-kill": ("worker_kill",),
    "persister": ("persister_faults", "daemon_kill"),
    "disk-full": ("disk_full",),
    "two-daemons": ("daemon_kill",),
    "mixed": FAULT_KINDS,
}
TWO_DAEMON_SCENARIOS = ("two-daemons", "mixed")
SIGTERM_DEADLINE_S = 10.0  # docs/tts-flow.md
CLOCK_KEY = "chaos:clock"


@attrs.frozen
class Params:
    scenario: str = "mixed"
    load_s: float = 120.0  # the load phase; faults are injected during it
    users: int = 6
    rate: float = 2.0  # new blocks a second, per user
    buffer: int = 6  # blocks a user has outstanding at most
    workers: int = 2  # tts-worker processes
    worker_concurrency: int = 2  # worker loops in each
    worker_batch: int = 4
    worker_latency_ms: float = 150.0
    daemons: int = 0  # 0: the scenario's own (2 for two-daemons and mixed, else 1)
    appendfsync: str = "always"
    faults: int = 0  # at least this many faults (0: each kind of the scenario once)
    first_fault_s: float = 3.0  # load time before the first fault
    fault_gap_s: float = 4.0  # mean quiet time between a recovery and the next fault
    daemon_down_s: float = 2.0  # a killed daemon stays down up to this long (two: exactly)
    redis_down_s: float = 1.0
    pg_down_s: float = 4.0
    billing_fault_s: float = 5.0  # how long the billing service is made to fail
    # Probability that a billing batch fails after its commit, before its ack (redelivered: the
    # duplicates path); a quarter of it fails batches before anything is billed.
    billing_fault_rate: float = 0.5
    persister_fault_s: float = 5.0  # how long the persister is made to crash (tools/chaos_audio.py)
    persister_fault_rate: float = 0.5  # per batch, at persist.written (a fifth of it at .read)
    disk_full_s: float = 4.0  # how long the audio store's filesystem stays full
    stall_s: float = 8.0  # a client asks again for a block with no news for this long
    ack_timeout_s: float = 15.0  # a request with no reply for this long: the connection is given up
    recover_timeout_s: float = 60.0
    drain_timeout_s: float = 90.0
    seed: int = 1
    # The daemon's healing knobs (the defaults suit production; chaos wants faults to heal fast).
    visibility_timeout_s: float = 5.0
    consumer_ttl_s: float = 3.0
    claim_idle_s: float = 5.0
    backoff_max_s: float = 2.0
    request_pool_size: int = 8

    @property
    def kinds(self) -> tuple[str, ...]:
        return SCENARIOS[self.scenario]

    @property
    def n_daemons(self) -> int:
        if self.daemons:
            return self.daemons
        return 2 if self.scenario in TWO_DAEMON_SCENARIOS else 1


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


@contextlib.asynccontextmanager
async def ws_connect(
    url: str, token: str, *, connect_timeout_s: float = 5.0
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket client connection that never leaks its socket. (trio-websocket's own client
    leaves it open when the handshake fails — against a daemon going down, say.)"""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    headers = [(b"Authorization", f"Bearer {token}".encode())]
    async with trio.open_nursery() as nursery:
        stream: trio.SocketStream | None = None
        try:
            with trio.fail_after(connect_timeout_s):
                stream = await trio.open_tcp_stream(parts.hostname, parts.port)
                ws = await wrap_client_stream(
                    nursery, stream, f"{parts.hostname}:{parts.port}", parts.path,
                    extra_headers=headers,
                )  # fmt: skip
        except BaseException:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()
            raise
        try:
            yield ws
        finally:
            with trio.move_on_after(1.0, shield=True):
                await ws.aclose()
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


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
        async with ws_connect(url, self.token) as ws:
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


# -- the write clock: what a Redis crash loses ------------------------------------------------


class WriteClock:
    """A steady stream of acknowledged Redis writes (INCR) from a thread of its own.

    After a Redis crash and restart, the counter that survived against the last value Redis
    acknowledged says how many acknowledged writes were lost, and their ack times how many seconds
    of writes: the loss window, measured rather than assumed.
    """

    def __init__(self, url: str, interval_s: float = 0.005) -> None:
        self.url = url
        self.interval_s = interval_s
        self.history: dict[int, float] = {}  # value → monotonic time its INCR was acknowledged
        self.last: tuple[int, float] = (0, 0.0)
        self.writes = 0
        self._pause = threading.Event()
        self._paused = threading.Event()
        self._stop = threading.Event()

    def run(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while not self._stop.is_set():
                if self._pause.is_set():
                    self._paused.set()
                    time.sleep(0.01)
                    continue
                try:
                    n = int(client.incr(CLOCK_KEY))
                except (redis.RedisError, OSError):
                    time.sleep(0.02)
                    continue
                t = time.monotonic()
                self.history[n] = t
                self.last = (n, t)
                self.writes += 1
                time.sleep(self.interval_s)
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()

    async def pause(self) -> None:
        self._paused.clear()
        self._pause.set()
        while not self._paused.is_set() and not self._stop.is_set():  # noqa: ASYNC110 - a thread
            await trio.sleep(0.01)

    def measure(self, survived: int) -> dict[str, Any]:
        """After a restart (paused): acknowledged writes lost, and the seconds they span."""
        last_n, last_t = self.last
        lost = max(0, last_n - survived)
        seconds = 0.0
        if lost:
            kept_t = self.history.get(survived)
            first_lost_t = self.history.get(survived + 1, last_t)
            seconds = last_t - (kept_t if kept_t is not None else first_lost_t)
        return {"acked": last_n, "survived": survived, "lost": lost, "seconds": round(seconds, 3)}

    def resume(self, start_from: int) -> None:
        self.history = {start_from: time.monotonic()}
        self.last = (start_from, time.monotonic())
        self._pause.clear()


# -- processes and servers ---------------------------------------------------------------------


@attrs.define(eq=False)
class DaemonSlot:
    name: str
    ws_port: int
    http_port: int
    config: Path
    events: Path
    log: Path
    proc: trio.Process | None = None
    starts: int = 0

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/v1/ws"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


@attrs.define
class FaultRecord:
    kind: str
    target: str
    at_s: float  # since the load started
    lifted_s: float  # the fault was lifted (server back, daemon restarted, injection off)
    recover_s: float | None = None  # fault → every daemon healthy and a probe answered
    heal_s: float | None = None  # lifted → the same: the daemon's own healing time
    detail: dict[str, Any] = attrs.Factory(dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "at_s": round(self.at_s, 3),
            "lifted_s": round(self.lifted_s, 3),
            "recover_s": None if self.recover_s is None else round(self.recover_s, 3),
            "heal_s": None if self.heal_s is None else round(self.heal_s, 3),
            **self.detail,
        }


class Chaos:
    """One chaos run: servers, daemons, workers, users, the fault schedule, the reconciliation."""

    def __init__(
        self,
        p: Params,
        work: Path,
        say: Callable[[str], None],
        *,
        redis: EmbeddedRedis | None = None,
        postgres: EmbeddedPostgres | None = None,
        pg_url: str | None = None,
    ) -> None:
        """``redis``/``postgres``: servers to use (tests share one pair between runs); by default
        the run starts its own under ``work``. ``pg_url``: a database on ``postgres`` to use."""
        self.p = p
        self.work = work
        self.say = say
        self.rng = random.Random(p.seed)
        self.own_servers = redis is None
        secrets_dir = work / "secrets"
        self.redis = redis or EmbeddedRedis(work / "redis", secrets_dir, appendfsync=p.appendfsync)
        self.postgres = postgres or EmbeddedPostgres(work / "postgres" / "data", secrets_dir)
        self._pg_url = pg_url
        self.faults_file = work / "faults.spec"
        self.slots: list[DaemonSlot] = []
        self.workers: list[trio.Process] = []
        self.worker_log = work / "workers.log"
        self.started_pids: list[int] = []
        self.users: list[ChaosUser] = []
        self.probe_user: ChaosUser | None = None
        self.stats = ClientStats()
        self.records: list[FaultRecord] = []
        self.sigterm_exits: list[dict[str, Any]] = []
        self.worker_exits: list[int] = []
        self.clock: WriteClock | None = None
        self.redis_losses: list[dict[str, Any]] = []
        self.load_t0 = 0.0
        self.texts = TextSource(p.seed)
        self.baseline_s: float | None = None
        self.clients_drain_s = 0.0
        self.clients_drained = False
        self.pipeline_quiet = False
        self.pipeline_drain_s = 0.0
        self._killed_workers: set[trio.Process] = set()
        self._held_at_kill: list[str] = []
        self._fsync_log = work / "aof-fsync.log"
        self._fsync_shim: Path | None = None
        self.audio = AudioChaos(work)

    # -- set-up -------------------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def pg_url(self) -> str:
        return self._pg_url or self.postgres.url

    async def start_servers(self) -> None:
        if self.own_servers:
            await in_thread(self.redis.start)
            await in_thread(self.postgres.start)
        else:
            self.redis.appendfsync = self.p.appendfsync
            await in_thread(redis_cmd, self.redis_url, "CONFIG", "SET", "appendfsync",
                            self.p.appendfsync)  # fmt: skip

    async def stop_servers(self) -> None:
        if self.own_servers:
            with contextlib.suppress(Exception):
                await in_thread(self.redis.stop)
            with contextlib.suppress(Exception):
                await in_thread(self.postgres.stop)

    def _write_configs(self) -> None:
        data = self.work / "data"
        (self.work / "secrets").mkdir(parents=True, exist_ok=True)
        secret = self.work / "secrets" / "variant_hmac.key"
        read_secret(secret, nbytes=32)  # one key for every daemon: one variant, one job
        self.faults_file.write_text("")
        p = self.p
        for i in range(p.n_daemons):
            d = self.work / f"daemon-{i}"
            d.mkdir(parents=True, exist_ok=True)
            slot = DaemonSlot(
                f"daemon-{i}", _free_port(), _free_port(), d / "daemon.toml",
                d / "events.jsonl", d / "daemon.log",
            )  # fmt: skip
            slot.config.write_text(
                f"""
[data]
dir = {json.dumps(str(data))}
[gateway]
ws_port = {slot.ws_port}
http_port = {slot.http_port}
rate_limit_blocks_per_min = 1000000
close_grace_s = 1.0
variant_secret_path = {json.dumps(str(secret))}
[redis]
url = {json.dumps(self.redis_url)}
block_s = 0.5
command_timeout_s = 5.0
[postgres]
url = {json.dumps(self.pg_url)}
request_pool_size = {p.request_pool_size}
acquire_timeout_s = 3.0
command_timeout_s = 10.0
[hot]
heartbeat_s = 0.5
consumer_ttl_s = {p.consumer_ttl_s}
[billing]
claim_idle_s = {p.claim_idle_s}
[workers]
simulated = 0
visibility_timeout_s = {p.visibility_timeout_s}
scan_interval_s = 0.5
[supervisor]
backoff_min_s = 0.2
backoff_max_s = {p.backoff_max_s}
shutdown_timeout_s = 8.0
[log]
events_path = {json.dumps(str(slot.events))}
"""
                + self.audio.config_toml(p.claim_idle_s)
            )
            self.slots.append(slot)

    # -- daemons ------------------------------------------------------------------------------

    async def start_daemon(self, slot: DaemonSlot, *, timeout_s: float = 60.0) -> float:
        """Start ``slot``'s daemon; returns the seconds until its /healthz answered 200."""
        env = dict(os.environ, TTS_DAEMON_FAULTS=f"@{self.faults_file}", PYTHONUNBUFFERED="1")
        log_fd = os.open(slot.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            slot.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "daemon", "run", "--config", str(slot.config)],
                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, env=env, cwd=self.work,
            )  # fmt: skip
        finally:
            os.close(log_fd)
        self.started_pids.append(slot.proc.pid)
        slot.starts += 1
        t0 = trio.current_time()
        with trio.move_on_after(timeout_s):
            while slot.alive:
                if await self._healthy(slot, services=False):
                    return trio.current_time() - t0
                await trio.sleep(0.1)
        tail = slot.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{slot.name} did not start (exit {slot.proc.returncode}): {tail}")

    async def _healthy(self, slot: DaemonSlot, *, services: bool = True) -> bool:
        try:
            status, body = await http_get(slot.http_port, "/healthz")
        except (OSError, trio.TooSlowError, ValueError, IndexError):
            return False
        if status != 200:
            return False
        if not services:
            return True
        states = {k: v.get("state") for k, v in (body or {}).get("services", {}).items()}
        return bool(states) and all(s == "running" for s in states.values())

    async def kill_daemon(self, slot: DaemonSlot) -> None:
        assert slot.proc is not None
        slot.proc.kill()
        await slot.proc.wait()

    async def sigterm_daemon(self, slot: DaemonSlot) -> dict[str, Any]:
        """SIGTERM; the exit status and time (docs/tts-flow.md: 0 within 10 s)."""
        assert slot.proc is not None
        t0 = trio.current_time()
        slot.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(SIGTERM_DEADLINE_S * 2):
            await slot.proc.wait()
        exit_s = trio.current_time() - t0
        code = slot.proc.returncode
        if code is None:  # it hung: count it, then make sure it is gone
            slot.proc.kill()
            await slot.proc.wait()
        out = {
            "daemon": slot.name,
            "exit_code": code,
            "exit_s": round(exit_s, 3),
            "ok": code == 0 and exit_s <= SIGTERM_DEADLINE_S,
        }
        self.sigterm_exits.append(out)
        return out

    # -- workers ------------------------------------------------------------------------------

    async def start_worker(self) -> trio.Process:
        p = self.p
        n = len(self.started_pids)
        cmd = [
            sys.executable, "-c", "from daemon.workers.cli import main; raise SystemExit(main())",
            "--redis-url", self.redis_url, "--simulated", "--models", "kokoro",
            "--concurrency", str(p.worker_concurrency), "--batch", str(p.worker_batch),
            "--latency-ms", str(p.worker_latency_ms), "--jitter-ms", str(p.worker_latency_ms / 4),
            "--chars-per-s", "50000", "--worker-id", f"chaos-{n}",
        ]  # fmt: skip
        log_fd = os.open(self.worker_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            proc = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, cwd=self.work
            )
        finally:
            os.close(log_fd)
        self.started_pids.append(proc.pid)
        self.workers.append(proc)
        return proc

    async def _keep_workers(self) -> None:
        """A process manager's job: a worker that exits on its own is counted and replaced."""
        while True:
            for proc in list(self.workers):
                if proc.returncode is not None and proc not in self._killed_workers:
                    self.worker_exits.append(proc.returncode)
                    self.workers.remove(proc)
                    self.say(f"worker {proc.pid} exited with {proc.returncode}: replaced")
                    await self.start_worker()
            await trio.sleep(0.2)

    # -- recovery -----------------------------------------------------------------------------

    async def probe(self, slot: DaemonSlot) -> int:
        """A fresh block through ``slot``, end to end, until one comes back ``cached``; returns
        the attempts it took."""
        assert self.probe_user is not None
        user = self.probe_user
        attempts = 0
        while True:
            attempts += 1
            with trio.move_on_after(5.0):
                try:
                    async with ws_connect(slot.ws_url, user.token, connect_timeout_s=3.0) as ws:
                        block = user.new_block()
                        now = trio.current_time()
                        block.requested_at = block.first_requested_at = now
                        block.requests += 1
                        # as if asked on the probe user's own connection: it asks again only
                        # if the block has no news for stall_s (or that connection is renewed)
                        block.session = user.session
                        frame = {
                            "type": "synthesize",
                            "document_id": user.doc,
                            "model": "kokoro",
                            "blocks": [{"idx": block.idx, "text": block.text}],
                        }
                        await ws.send_message(json.dumps(frame))
                        while True:
                            reply = json.loads(await ws.get_message())
                            if reply.get("type") == "error":
                                break
                            if reply.get("type") != "status" or reply["block_idx"] != block.idx:
                                continue
                            if reply["status"] == "cached":
                                user.finish(block, "cached", trio.current_time())
                                return attempts
                            if reply["status"] in ("error", "skipped"):
                                break
                except Exception:
                    # Not up yet; the block (if sent) is the probe user's to see through.
                    pass
            await trio.sleep(0.2)

    async def wait_recovered(self, record: FaultRecord) -> None:
        t_fault = self.load_t0 + record.at_s
        t_lifted = self.load_t0 + record.lifted_s
        with trio.move_on_after(self.p.recover_timeout_s):
            for slot in self.slots:
                if not slot.alive:
                    continue
                while not await self._healthy(slot):  # noqa: ASYNC110 - another process
                    await trio.sleep(0.05)
                record.detail.setdefault("healthy_s", {})[slot.name] = round(
                    trio.current_time() - t_lifted, 3
                )
                attempts = await self.probe(slot)
                record.detail.setdefault("probe_attempts", {})[slot.name] = attempts
            now = trio.current_time()
            record.recover_s = now - t_fault
            record.heal_s = now - t_lifted
        if record.recover_s is None:
            self.say(f"NOT recovered within {self.p.recover_timeout_s:g} s: {record.kind}")

    # -- faults -------------------------------------------------------------------------------

    def _t(self) -> float:
        return trio.current_time() - self.load_t0

    async def inject(self, kind: str) -> FaultRecord:
        fn = getattr(self, f"fault_{kind}")
        record: FaultRecord = await fn()
        self.records.append(record)
        await self.wait_recovered(record)
        self.say(
            f"{record.kind} ({record.target}) at {record.at_s:.1f} s: recovered in "
            f"{record.recover_s if record.recover_s is None else round(record.recover_s, 2)} s"
        )
        return record

    async def fault_daemon_kill(self) -> FaultRecord:
        slot = self.rng.choice([s for s in self.slots if s.alive])
        at = self._t()
        await self.kill_daemon(slot)
        down = self.rng.uniform(0, self.p.daemon_down_s)
        if len(self.slots) > 1:
            down = self.p.daemon_down_s  # the peer serves meanwhile
        await trio.sleep(down)
        lifted = self._t()
        start_s = await self.start_daemon(slot)
        detail = {"down_s": round(down, 3), "start_s": round(start_s, 3)}
        return FaultRecord("daemon_kill", slot.name, at, lifted, detail=detail)

    async def fault_daemon_sigterm(self) -> FaultRecord:
        slot = self.rng.choice([s for s in self.slots if s.alive])
        at = self._t()
        exit_info = await self.sigterm_daemon(slot)
        lifted = self._t()
        start_s = await self.start_daemon(slot)
        detail = {k: exit_info[k] for k in ("exit_code", "exit_s", "ok")}
        detail["start_s"] = round(start_s, 3)
        return FaultRecord("daemon_sigterm", slot.name, at, lifted, detail=detail)

    async def fault_billing_faults(self) -> FaultRecord:
        rate = self.p.billing_fault_rate
        at = self._t()
        await trio.Path(self.faults_file).write_text(
            f"billing.before_batch={rate / 4:g}\nbilling.after_commit={rate:g}\n"
        )
        await trio.sleep(self.p.billing_fault_s)
        await trio.Path(self.faults_file).write_text("")
        lifted = self._t()
        return FaultRecord("billing_faults", "billing", at, lifted, detail={"rate": rate})

    async def _redis_fault(self, kind: str, *, kill: bool, crash: bool = False) -> FaultRecord:
        at = self._t()
        detail: dict[str, Any] = {"appendfsync": self.p.appendfsync}
        if kill:
            await in_thread(lambda: self.redis.stop(kill=True))
        else:
            await in_thread(self.redis.stop)
        if self.clock is not None:
            await self.clock.pause()
        if crash:
            detail["aof_cut_bytes"] = await in_thread(self._cut_aof_to_last_fsync)
        await trio.sleep(self.rng.uniform(0, self.p.redis_down_s))
        lifted = self._t()
        await in_thread(self._start_redis)
        if self.clock is not None:
            survived = int(await in_thread(redis_cmd, self.redis_url, "GET", CLOCK_KEY) or 0)
            loss = self.clock.measure(survived)
            loss["kind"] = kind
            self.redis_losses.append(loss)
            detail["acked_writes_lost"] = loss["lost"]
            detail["seconds_of_writes_lost"] = loss["seconds"]
            self.clock.resume(survived)
        return FaultRecord(kind, "redis", at, lifted, detail=detail)

    async def fault_redis_restart(self) -> FaultRecord:
        return await self._redis_fault("redis_restart", kill=False)

    async def fault_redis_kill(self) -> FaultRecord:
        return await self._redis_fault("redis_kill", kill=True)

    async def fault_redis_crash(self) -> FaultRecord:
        return await self._redis_fault("redis_crash", kill=True, crash=True)

    def _cut_aof_to_last_fsync(self) -> int:
        """Emulate a host crash: the AOF loses what was written after its last fsync."""
        return cut_to_last_fsync(self.redis.root / "appendonly.aof", self._fsync_log)

    async def fault_postgres_outage(self) -> FaultRecord:
        kill = self.rng.random() < 0.5
        at = self._t()
        await in_thread(lambda: self.postgres.stop(kill=kill))
        await trio.sleep(self.p.pg_down_s)
        lifted = self._t()
        await in_thread(self.postgres.start)
        detail = {"stop": "SIGKILL" if kill else "fast", "down_s": self.p.pg_down_s}
        return FaultRecord("postgres_outage", "postgres", at, lifted, detail=detail)

    async def fault_worker_kill(self) -> FaultRecord:
        """SIGKILL a worker process while jobs are held (mid-job), start a replacement; the jobs
        it held must come back through the visibility scanner and be billed once."""
        proc = self.rng.choice([w for w in self.workers if w.returncode is None])
        held: list[bytes] = []
        with trio.move_on_after(5.0):
            while not held:  # (with one worker process: held by the one killed)
                held = await in_thread(
                    redis_cmd, self.redis_url, "ZRANGE", "tts:processing:kokoro", 0, -1
                )
                if not held:
                    await trio.sleep(0.01)
        at = self._t()
        self._killed_workers.add(proc)
        proc.kill()
        await proc.wait()
        self.workers.remove(proc)
        lifted = self._t()
        await self.start_worker()
        self._held_at_kill.extend(j.decode() for j in held)
        detail = {"jobs_held": len(held)}
        return FaultRecord("worker_kill", f"worker {proc.pid}", at, lifted, detail=detail)

    async def fault_persister_faults(self) -> FaultRecord:
        rate = self.p.persister_fault_rate
        at = self._t()
        await trio.Path(self.faults_file).write_text(
            f"persist.read={rate / 5:g}\npersist.written={rate:g}\n"
        )
        await trio.sleep(self.p.persister_fault_s)
        await trio.Path(self.faults_file).write_text("")
        lifted = self._t()
        return FaultRecord("persister_faults", "persister", at, lifted, detail={"rate": rate})

    async def fault_disk_full(self) -> FaultRecord:
        at = self._t()
        detail = await in_thread(self.audio.fill)
        if "skipped" not in detail:
            await trio.sleep(self.p.disk_full_s)
            await in_thread(self.audio.make_room)
        lifted = self._t()
        return FaultRecord("disk_full", "audio store", at, lifted, detail=detail)

    async def schedule(self) -> None:
        """Faults one after another during the load, each recovered from before the next. A
        fault is never cut short by the end of the load: the load lasts until it has healed."""
        p = self.p
        kinds = list(p.kinds)
        await trio.sleep(min(p.first_fault_s, p.load_s))
        n = 0
        at_least = p.faults or len(kinds)
        while n < at_least or self._t() < p.load_s - 1.0:
            if p.scenario == "mixed" and n >= len(kinds):
                kind = self.rng.choice(kinds)
            else:
                kind = kinds[n % len(kinds)]  # mixed: every kind once first
            n += 1
            await self.inject(kind)
            gap = self.rng.uniform(0.5, 1.5) * p.fault_gap_s
            await trio.sleep(min(gap, max(0.0, p.load_s - self._t())))
        await trio.sleep(max(0.0, p.load_s - self._t()))

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        p = self.p
        await self.start_servers()
        await in_thread(self.audio.set_up)
        try:
            if "redis_crash" in p.kinds:
                await in_thread(self._arm_fsync_log)
            return await self._run_started()
        finally:
            with trio.CancelScope(shield=True):
                await self.cleanup()
                await self.stop_servers()
                await in_thread(self.audio.tear_down)

    async def _run_started(self) -> dict[str, Any]:
        p = self.p
        names = [f"chaos-{i}" for i in range(p.users)] + ["chaos-probe"]
        tag = f"{os.getpid()}-{self.rng.randrange(1 << 30)}"
        accounts = await in_thread(_setup_database, self.pg_url, [f"{n}-{tag}" for n in names])
        self._write_configs()
        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(self.start_daemon, slot)
        for _ in range(p.workers):
            await self.start_worker()
        urls = [s.ws_url for s in self.slots]
        for i, ((user_id, token), name) in enumerate(zip(accounts, names, strict=True)):
            user = ChaosUser(
                name, user_id, token, f"doc-{name}", urls, i % len(urls), p, self.stats,
                self.texts, random.Random(p.seed * 1000 + i), probe_only=name == "chaos-probe",
            )  # fmt: skip
            if user.probe_only:
                self.probe_user = user
            else:
                self.users.append(user)
        assert self.probe_user is not None
        self.say(
            f"{p.scenario}: {len(self.slots)} daemon(s), {p.workers} worker process(es), "
            f"{p.users} users, faults {', '.join(p.kinds)}"
        )
        async with trio.open_nursery() as nursery:
            try:
                if any(k.startswith("redis") for k in p.kinds):
                    self.clock = WriteClock(self.redis_url)
                    nursery.start_soon(trio.to_thread.run_sync, self.clock.run)
                nursery.start_soon(self._keep_workers)
                async with trio.open_nursery() as clients:
                    self.load_t0 = trio.current_time()
                    for user in (*self.users, self.probe_user):
                        clients.start_soon(user.run)
                    baseline = FaultRecord("baseline", "-", 0.0, 0.0)
                    await self.wait_recovered(baseline)
                    self.baseline_s = baseline.recover_s
                    # The load's clock starts once every daemon has answered a probe.
                    self.load_t0 = trio.current_time()
                    await self.schedule()
                    self.say(f"load over at {self._t():.1f} s; draining clients")
                    for user in (*self.users, self.probe_user):
                        user.drain()
                    drain_t0 = trio.current_time()
                    with trio.move_on_after(p.drain_timeout_s) as drain_scope:
                        while not all(u.done() for u in self._all_users()):  # noqa: ASYNC110
                            await trio.sleep(0.1)
                    self.clients_drain_s = trio.current_time() - drain_t0
                    self.clients_drained = not drain_scope.cancelled_caught
                    clients.cancel_scope.cancel()
            finally:
                # the clock is a thread: it stops when told, whatever ended the run
                if self.clock is not None:
                    self.clock.stop()
                nursery.cancel_scope.cancel()
        self.pipeline_quiet, self.pipeline_drain_s = await self._wait_quiescent()
        for slot in self.slots:
            if slot.alive:
                await self.sigterm_daemon(slot)
        return await self.reconcile()

    async def _wait_quiescent(self) -> tuple[bool, float]:
        """Until no result, claimed result, billing event or pending entry is left in Redis."""
        t0 = trio.current_time()
        limit = self.p.claim_idle_s + self.p.consumer_ttl_s + self.p.drain_timeout_s
        with trio.move_on_after(limit):
            while True:
                state = await in_thread(self._redis_state)
                if not any(state[k] for k in ("billing_depth", "billing_pending", "results",
                                              "claimed", "persist_depth")):  # fmt: skip
                    return True, trio.current_time() - t0
                await trio.sleep(0.25)
        return False, trio.current_time() - t0

    def _redis_state(self) -> dict[str, int]:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=5.0)
        try:
            claimed = sum(int(client.llen(k)) for k in client.scan_iter(match="tts:hot:claimed:*"))
            try:
                pending = int(client.xpending("tts:billing", "billing")["pending"])
            except redis.ResponseError:
                pending = 0
            return {
                "persist_depth": int(client.xlen("tts:persist")),
                "billing_depth": int(client.xlen("tts:billing")),
                "billing_pending": pending,
                "results": int(client.llen("tts:results")),
                "claimed": claimed,
                "queued": int(client.zcard("tts:queue:kokoro")),
                "processing": int(client.zcard("tts:processing:kokoro")),
                "dlq": int(client.llen("tts:dlq:kokoro")),
                "billing_dead": int(client.llen("tts:billing:dead")),
                "results_dead": int(client.llen("tts:results:dead")),
            }
        finally:
            client.close()

    async def cleanup(self) -> None:
        """Every process this run started is gone when it returns (SIGTERM, then SIGKILL)."""
        procs = [s.proc for s in self.slots if s.proc is not None] + list(self.workers)
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in procs:
            with trio.move_on_after(SIGTERM_DEADLINE_S * 1.5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    # -- reconciliation -----------------------------------------------------------------------

    async def reconcile(self) -> dict[str, Any]:
        p = self.p
        rows = await in_thread(
            pg_query,
            self.pg_url,
            "SELECT event_id, user_id, usage_type, amount, details->>'document_id' AS doc,"
            " (details->>'block_idx')::int AS idx FROM usage_log",
        )
        users = {u.user_id for u in self._all_users()}
        rows = [r for r in rows if r["user_id"] in users]  # tests share a database server
        by_key: dict[tuple[int, str, int], list[dict[str, Any]]] = {}
        for r in rows:
            by_key.setdefault((r["user_id"], r["doc"], r["idx"]), []).append(r)
        blocks = [b for u in self._all_users() for b in u.blocks.values()]
        c = Counter[str]()
        for b in blocks:
            billed = by_key.pop(b.key, [])
            if b.status is None:
                c["undelivered"] += 1
            elif b.status == "cached":
                c["delivered"] += 1
                if not billed:
                    c["delivered_unbilled"] += 1
            else:
                c[f"terminal_{b.status}"] += 1
            if billed and b.status != "cached":
                c["billed_not_delivered"] += 1
            if len(billed) > 1:
                c["double_billed"] += 1
            for r in billed:
                if r["amount"] != len(b.text) or r["usage_type"] != "server_kokoro":
                    c["wrong_amount"] += 1
        phantom = sum(len(v) for v in by_key.values())
        counters = await in_thread(self._counters_match, sorted(users))
        state = await in_thread(self._redis_state)
        events_unbilled = self._events_log_unbilled({r["event_id"] for r in rows})
        lost = c["undelivered"] + c["delivered_unbilled"] + c["terminal_error"]
        recover = [r.recover_s for r in self.records if r.recover_s is not None]
        by_kind: dict[str, list[float]] = {}
        for r in self.records:
            if r.recover_s is not None:
                by_kind.setdefault(r.kind, []).append(r.recover_s)
        injected = Counter(r.kind for r in self.records)
        billing_restarts = self._billing_injected_failures()
        redis_loss = self._loss_window()
        billed_ids = {r["event_id"] for r in rows}
        held_unbilled = [j for j in self._held_at_kill if j not in billed_ids]
        delivered_texts = [b.text for b in blocks if b.status == "cached"]
        audio = await in_thread(
            self.audio.verdict, self.work / "secrets" / "variant_hmac.key", delivered_texts
        )
        billed_once = (
            c["delivered_unbilled"] == 0 and c["double_billed"] == 0 and c["wrong_amount"] == 0
        )
        verified = {
            "every_block_terminal": c["undelivered"] == 0 and c["terminal_error"] == 0,
            "every_delivered_block_billed_once": billed_once,
            "nothing_billed_that_was_not_delivered": c["billed_not_delivered"] == 0
            and phantom == 0,
            "counters_match_usage_log": counters,
            "billing_drained": self.pipeline_quiet,
            "no_dead_letters": state["billing_dead"] == 0 and state["results_dead"] == 0,
            "events_log_reconciles": events_unbilled == 0,
            "recovered_from_every_fault": all(r.recover_s is not None for r in self.records),
            "sigterm_exit_0_within_10s": all(x["ok"] for x in self.sigterm_exits),
            "no_request_unanswered": self.stats.ack_timeouts == 0,
            "faults_injected": len(self.records) > 0 or p.load_s < p.first_fault_s,
            # Durable audio (tools/chaos_audio.py): nothing left to persist, every delivered
            # block's audio in the store, every stored object whole.
            "persist_drained": state["persist_depth"] == 0,
            "every_delivered_block_in_store": audio["delivered_not_in_store"] == 0,
            "every_stored_object_readable": audio["unreadable_objects"] == 0,
        }
        if self._held_at_kill:
            verified["jobs_of_killed_workers_billed"] = not held_unbilled
        if redis_loss is not None:
            redis_loss["blocks_unbilled"] = c["delivered_unbilled"]
            redis_loss["blocks_double_billed"] = c["double_billed"]
            if p.appendfsync == "always":
                verified["no_acknowledged_redis_write_lost"] = redis_loss["acked_writes_lost"] == 0
            elif injected["redis_crash"]:
                # With everysec a host crash may lose up to about a second of Redis writes, by
                # design: what that cost is reported in loss_window, not counted as a failure.
                del verified["every_delivered_block_billed_once"]
                del verified["events_log_reconciles"]
                # (the lost second may hold finalized audio not yet persisted: reported only)
                del verified["every_delivered_block_in_store"]
                verified["wrong_amounts_none"] = c["wrong_amount"] == 0
                # …and the loss shows where a person looks: every delivered block left unbilled
                # is in the reconciliation delta of the events log (tools/report.sh). A SIGKILLed
                # daemon may lose its last log lines, so then it is at most that.
                if injected["daemon_kill"]:
                    visible = events_unbilled <= c["delivered_unbilled"]
                else:
                    visible = events_unbilled == c["delivered_unbilled"]
                verified["loss_visible_in_events_log"] = visible
                verified["loss_window_measured"] = redis_loss["clock_writes"] > 0 and len(
                    redis_loss["by_fault"]
                ) == sum(injected[k] for k in ("redis_restart", "redis_kill", "redis_crash"))
        return {
            "scenario": p.scenario,
            "faults_injected": dict(injected),
            "faults": [r.as_dict() for r in self.records],
            "blocks": len(blocks),
            "delivered": c["delivered"],
            "billed": len(rows),
            "lost": lost,
            "double_billed": c["double_billed"],
            "wrong_amount": c["wrong_amount"],
            "undelivered": c["undelivered"],
            "delivered_unbilled": c["delivered_unbilled"],
            "billed_not_delivered": c["billed_not_delivered"],
            "phantom_rows": phantom,
            "terminal_errors": c["terminal_error"],
            "recover_s": {
                "p50": pct(recover, 50),
                "max": pct(recover, 100),
                "by_kind": {
                    k: {"n": len(v), "p50": pct(v, 50), "max": pct(v, 100)}
                    for k, v in sorted(by_kind.items())
                },
            },
            "baseline_probe_s": None if self.baseline_s is None else round(self.baseline_s, 3),
            "loss_window": redis_loss,
            "billing_injected_failures": billing_restarts,
            "billing_duplicates_redelivered": self._billing_duplicates(),
            "jobs_held_by_killed_workers": len(self._held_at_kill),
            "jobs_held_by_killed_workers_unbilled": len(held_unbilled),
            "sigterm": self.sigterm_exits,
            "worker_exits": self.worker_exits,
            "clients": self.stats.as_dict(),
            "clients_drained": self.clients_drained,
            "clients_drain_s": round(self.clients_drain_s, 3),
            "pipeline_drain_s": round(self.pipeline_drain_s, 3),
            "redis_end": state,
            "audio": audio,
            "events_log_unbilled": events_unbilled,
            "daemon_starts": {s.name: s.starts for s in self.slots},
            "verified": verified,
        }

    def _counters_match(self, user_ids: list[int]) -> bool:
        """usage_periods and user_voice_stats hold what usage_log holds: nothing counted twice."""
        logged = pg_query(
            self.pg_url,
            "SELECT user_id, sum(amount)::bigint AS total, count(*)::bigint AS n FROM usage_log"
            " WHERE user_id = ANY($1::bigint[]) GROUP BY user_id",
            user_ids,
        )
        periods = pg_query(
            self.pg_url,
            "SELECT user_id, sum(server_kokoro_characters)::bigint AS total FROM usage_periods"
            " WHERE user_id = ANY($1::bigint[]) GROUP BY user_id",
            user_ids,
        )
        stats = pg_query(
            self.pg_url,
            "SELECT user_id, sum(total_characters)::bigint AS total, sum(synth_count)::bigint AS n"
            " FROM user_voice_stats WHERE user_id = ANY($1::bigint[]) GROUP BY user_id",
            user_ids,
        )
        want = {r["user_id"]: (r["total"], r["n"]) for r in logged}
        got_periods = {r["user_id"]: r["total"] for r in periods if r["total"]}
        got_stats = {r["user_id"]: (r["total"], r["n"]) for r in stats}
        return got_periods == {u: t for u, (t, _) in want.items()} and got_stats == want

    def _all_users(self) -> list[ChaosUser]:
        return [*self.users, *([self.probe_user] if self.probe_user is not None else [])]

    def _events(self) -> Iterable[dict[str, Any]]:
        for slot in self.slots:
            for path in sorted(slot.events.parent.glob(slot.events.name + "*")):
                for line in path.read_text(errors="replace").splitlines():
                    with contextlib.suppress(ValueError):
                        yield json.loads(line)

    def _events_log_unbilled(self, billed_ids: set[str]) -> int:
        """Synthesized by the daemons' own account (``synthesis_complete``) but never billed.
        (A SIGKILLed daemon may lose its last log lines: this can only undercount.)"""
        users = {u.user_id for u in self._all_users()}
        synthesized = {
            ev["job_id"]
            for ev in self._events()
            if ev.get("event") == "synthesis_complete"
            and ev.get("billed", True)
            and ev.get("user_id") in users
        }
        return len(synthesized - billed_ids)

    def _billing_injected_failures(self) -> int:
        return sum(
            1
            for ev in self._events()
            if ev.get("event") == "service_restarted"
            and ev.get("service") == "billing"
            and "InjectedFault" in str(ev.get("reason", ""))
        )

    def _billing_duplicates(self) -> int:
        """Billing events delivered again after they were billed, and recognised as such."""
        return sum(
            int(ev.get("duplicates", 0))
            for ev in self._events()
            if ev.get("event") == "billing_processed"
        )

    def _loss_window(self) -> dict[str, Any] | None:
        if not self.redis_losses:
            return None
        return {
            "appendfsync": self.p.appendfsync,
            "redis_faults": len(self.redis_losses),
            "acked_writes_lost": sum(x["lost"] for x in self.redis_losses),
            "seconds_of_writes_lost_max": max(x["seconds"] for x in self.redis_losses),
            "seconds_of_writes_lost_total": round(sum(x["seconds"] for x in self.redis_losses), 3),
            "by_fault": self.redis_losses,
            "clock_writes": self.clock.writes if self.clock else 0,
        }

    # -- host crash emulation -----------------------------------------------------------------

    def _arm_fsync_log(self) -> None:
        """Restart Redis with the fsync recorder preloaded (see :func:`fsync_shim`)."""
        self._fsync_shim = fsync_shim(self.work / "fsync-shim")
        self.redis.stop()
        self._start_redis()

    def _start_redis(self) -> None:
        if self._fsync_shim is None:
            self.redis.start()
            return
        # EmbeddedRedis starts redis-server with this process's environment.
        old = {k: os.environ.get(k) for k in ("LD_PRELOAD", "CHAOS_FSYNC_LOG")}
        os.environ["LD_PRELOAD"] = str(self._fsync_shim)
        os.environ["CHAOS_FSYNC_LOG"] = str(self._fsync_log)
        try:
            self.redis.start()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# -- host crash emulation: which AOF bytes were durable? ---------------------------------------

_SHIM_C = r"""
/* Preloaded into redis-server by tools/chaos.py: after every successful fsync/fdatasync of a
   file whose name ends in ".aof", append "<dev> <inode> <size at the call>" to $CHAOS_FSYNC_LOG.
   What was written before the call is on disk once it returns; what came after may not be. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int record(int fd, int (*real)(int)) {
    struct stat st;
    char link[64], path[4096];
    int have = fstat(fd, &st) == 0;
    int rc = real(fd);
    if (rc != 0 || !have) return rc;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 4) return rc;
    path[n] = 0;
    if (strcmp(path + n - 4, ".aof") != 0) return rc;
    const char *log = getenv("CHAOS_FSYNC_LOG");
    if (!log) return rc;
    int out = open(log, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (out < 0) return rc;
    char line[128];
    int len = snprintf(line, sizeof line, "%lu %lu %lld\n", (unsigned long)st.st_dev,
                       (unsigned long)st.st_ino, (long long)st.st_size);
    if (write(out, line, len) < 0) { /* best effort */ }
    close(out);
    return rc;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    return record(fd, real);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    return record(fd, real);
}
"""


def fsync_shim(build_dir: Path) -> Path:
    """Compile the fsync recorder (needs a C compiler) and return the shared object's path."""
    build_dir.mkdir(parents=True, exist_ok=True)
    src, out = build_dir / "fsync_shim.c", build_dir / "fsync_shim.so"
    src.write_text(_SHIM_C)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("redis-crash needs a C compiler (cc) to build its fsync recorder")
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
                   check=True, capture_output=True)  # fmt: skip
    return out


def cut_to_last_fsync(aof: Path, fsync_log: Path) -> int:
    """Truncate ``aof`` to its size at the last fsync of that very file (same inode): what a
    power loss would leave on disk at worst. Returns the bytes cut."""
    st = aof.stat()
    durable = 0
    if fsync_log.exists():
        for line in fsync_log.read_text().splitlines():
            try:
                dev, ino, size = (int(x) for x in line.split())
            except ValueError:
                continue
            if (dev, ino) == (st.st_dev, st.st_ino):
                durable = size
    cut = max(0, st.st_size - durable)
    if cut:
        os.truncate(aof, durable)
    return cut


# -- output -----------------------------------------------------------------------------------


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tools/chaos.py — scenario {result['scenario']}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("faults injected", ", ".join(f"{k} {v}" for k, v in result["faults_injected"].items())),
        ("blocks / delivered / billed",
         f"{result['blocks']} / {result['delivered']} / {result['billed']}"),
        ("lost", str(result["lost"])),
        ("double-billed", str(result["double_billed"])),
        ("wrong amount / phantom rows",
         f"{result['wrong_amount']} / {result['phantom_rows']}"),
        ("recover s p50 / max",
         f"{result['recover_s']['p50']:.2f} / {result['recover_s']['max']:.2f}"),
        ("client sessions / ack timeouts",
         f"{result['clients']['sessions']} / {result['clients']['ack_timeouts']}"),
        ("billing failures injected", str(result["billing_injected_failures"])),
    ]  # fmt: skip
    for kind, v in result["recover_s"]["by_kind"].items():
        rows.append((f"  recover {kind} (n={v['n']})", f"{v['p50']:.2f} / {v['max']:.2f}"))
    if result["loss_window"]:
        lw = result["loss_window"]
        rows.append(
            (
                f"Redis loss window ({lw['appendfsync']})",
                f"{lw['acked_writes_lost']} writes, {lw['seconds_of_writes_lost_max']:.3f} s max",
            )
        )
    for name, ok in result["verified"].items():
        rows.append((name, "yes" if ok else "NO"))
    for label, value in rows:
        table.add_row(label, value)
    Console().print(table)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Params]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    defaults = Params()
    for field in attrs.fields(Params):
        name = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if field.name == "scenario":
            ap.add_argument(name, choices=sorted(SCENARIOS), default=default)
        elif field.name == "appendfsync":
            ap.add_argument(name, choices=("always", "everysec"), default=default)
        else:
            ap.add_argument(name, type=type(default), default=default)
    args = ap.parse_args(argv)
    params = Params(**{f.name: getattr(args, f.name) for f in attrs.fields(Params)})
    return args, params


def main(argv: list[str] | None = None) -> int:
    args, p = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tts-chaos-"))
    from rich.console import Console

    console = Console(stderr=True)

    def say(message: str) -> None:
        console.log(message)

    try:
        chaos = Chaos(p, work, say)
        result = trio.run(chaos.run)
    finally:
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["params"] = attrs.asdict(p)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    ok = all(result["verified"].values())
    if not ok:
        failed = [k for k, v in result["verified"].items() if not v]
        print(f"chaos: verification FAILED: {', '.join(failed)}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
