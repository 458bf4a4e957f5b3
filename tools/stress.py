#!/usr/bin/env python3
"""Stress test: does a burst of fast GPU results starve the request path? (docs/stress.md)

Simulates N listeners — WebSocket clients that keep a playback buffer filled while blocks "play" —
and M fast, bursty GPU workers (``tts-worker --simulated`` finishing batches at once) against the
daemon, on fresh embedded Redis and Postgres. A probe client measures ``synthesize`` → first status
before the load (idle) and during it. ``--compare`` runs the same load, same seed, twice: ``split``
(the daemon as designed) and ``inline`` (the pre-split design of tools/inline.py: billing with its
``FOR UPDATE`` inside each result handler, on the request path's pool).

Billing is made as slow as on a small cloud VM with ``--txn-delay-ms``: a fixed delay inside every
billing transaction, applied identically in both architectures.

After each run it verifies that every requested block reached a terminal status, billing drained,
and the reconciliation delta (synthesized, neither billed nor queued) is 0.

    tools/stress.py                       # split only, defaults
    tools/stress.py --compare --json stress.json --plot stress.png
    tools/stress.py --scenario noisy --json noisy.json   # one user floods, readers read along
                                                         # (fair against FIFO: tools/noisy.py)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import psutil
import trio
from trio_websocket import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.contracts.events import SynthesisComplete
from daemon.embedded import EmbeddedServers
from daemon.ops.events import read_events
from daemon.testing.client import WsClient, connect
from daemon.testing.config import write_config
from daemon.testing.figures import pct
from daemon.testing.options import add_param_options, params_from
from daemon.testing.stores import in_thread, pg_query, redis_cmd, setup_database
from daemon.testing.texts import make_texts
from daemon.workers.audio import duration_ms_for

__all__ = ["Params", "main"]

REPO = Path(__file__).resolve().parent.parent
ARCHS = ("split", "inline")


@attrs.frozen
class Params:
    users: int = 5
    workers: int = 4
    blocks: int = 40  # per listener: blocks played
    buffer: int = 16  # blocks a listener keeps requested ahead of playback
    seek_every_s: float = 3.0  # a listener jumps ahead this often (0: never): a burst of demand
    playback_speed: float = 10.0  # 10: a 5 s block "plays" in 0.5 s
    worker_batch: int = 16  # a simulated GPU finishes this many jobs at once: the bursts
    worker_latency_ms: float = 400.0
    worker_jitter_ms: float = 100.0
    worker_chars_per_s: float = 50000.0
    txn_delay_ms: float = 50.0  # inside every billing transaction, both architectures
    probe_hz: float = 10.0
    idle_probes: int = 40
    hot_concurrency: int = 40
    request_pool_size: int = 30
    billing_pool_size: int = 2
    acquire_timeout_s: float = 5.0
    seed: int = 1
    max_load_s: float = 180.0
    drain_timeout_s: float = 120.0


# -- small helpers ----------------------------------------------------------------------------


# -- clients ----------------------------------------------------------------------------------


@attrs.define
class Recorder:
    acks: list[tuple[float, float, str]] = attrs.Factory(list)  # (sent, perf_counter; ms; who)
    idle_acks: list[float] = attrs.Factory(list)
    audio_ms: list[float] = attrs.Factory(list)
    requests: int = 0
    blocks_requested: int = 0
    blocks_terminal: int = 0
    blocks_evicted: int = 0
    errors: int = 0
    pool_timeouts: int = 0
    error_messages: dict[str, int] = attrs.Factory(dict)
    load_started: trio.Event = attrs.Factory(trio.Event)

    def error(self, message: str) -> None:
        self.errors += 1
        self.error_messages[message] = self.error_messages.get(message, 0) + 1
        if "database" in message:
            self.pool_timeouts += 1


@attrs.define(eq=False)
class Client:
    """One WebSocket connection with its requests: acks, arrivals, re-requests on error."""

    name: str
    ws: WsClient
    rec: Recorder
    texts: dict[int, str]
    doc: str
    idle: bool = False
    # unacked requests: (sent at, block idxs, set when acknowledged)
    pending: list[tuple[float, frozenset[int], trio.Event]] = attrs.Factory(list)
    requested_at: dict[int, float] = attrs.Factory(dict)
    terminal: dict[int, trio.Event] = attrs.Factory(dict)
    statuses: dict[int, str] = attrs.Factory(dict)
    evicted: set[int] = attrs.Factory(set)
    evicted_reply: trio.Event = attrs.Factory(trio.Event)

    async def request(self, idxs: Sequence[int]) -> trio.Event:
        now = time.perf_counter()
        for i in idxs:
            self.requested_at.setdefault(i, now)
            self.terminal.setdefault(i, trio.Event())
        acked = trio.Event()
        self.pending.append((now, frozenset(idxs), acked))
        self.rec.requests += 1
        await self.ws.synthesize(self.doc, {i: self.texts[i] for i in idxs})
        return acked

    def _ack(self, idx: int | None, now: float) -> None:
        for n, (sent, idxs, acked) in enumerate(self.pending):
            if idx is None or idx in idxs:
                ms = (now - sent) * 1000
                if self.idle:
                    self.rec.idle_acks.append(ms)
                else:
                    self.rec.acks.append((sent, ms, self.name))
                del self.pending[n]
                acked.set()
                return

    async def receive_loop(self) -> None:
        while True:
            try:
                frame = await self.ws.receive(math.inf)
            except ConnectionClosed:
                return
            now = time.perf_counter()
            if frame["type"] == "error":
                self.rec.error(frame.get("message", ""))
                if self.pending:
                    _, idxs, acked = self.pending.pop(0)
                    acked.set()
                    # A client that was refused asks again (and its latency counts from then).
                    await self.request(sorted(idxs))
                continue
            if frame["type"] == "evicted":
                for i in frame["block_idxs"]:
                    if i not in self.statuses and i not in self.evicted:
                        self.evicted.add(i)
                        self.rec.blocks_evicted += 1
                self.evicted_reply.set()
                continue
            if frame["type"] != "status":
                continue
            idx = frame["block_idx"]
            self._ack(idx, now)
            status = frame["status"]
            if status in ("cached", "skipped", "error") and idx not in self.statuses:
                self.statuses[idx] = status
                self.rec.blocks_terminal += 1
                if status == "cached":
                    self.rec.audio_ms.append((now - self.requested_at[idx]) * 1000)
                else:
                    self.rec.error(f"block {status}: {frame.get('error', '')}")
                self.terminal[idx].set()


async def listener(
    ws_url: str, token: str, name: str, texts: list[str], p: Params, rec: Recorder
) -> None:
    """A reader: plays ``p.blocks`` blocks, keeping ``p.buffer`` requested ahead; every
    ``p.seek_every_s`` it jumps past what it has requested (``cursor_moved`` evicts the queued
    rest) and asks for a fresh buffer there — the burst of demand that fills a GPU batch."""
    async with connect(ws_url, token, keep_frames=False) as ws:
        client = Client(name, ws, rec, dict(enumerate(texts)), f"doc-{name}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.receive_loop)
            requested = 0

            async def fill(upto: int) -> None:
                nonlocal requested
                upto = min(upto, len(texts))
                if upto > requested:
                    new = list(range(requested, upto))
                    rec.blocks_requested += len(new)
                    requested = upto
                    await client.request(new)

            pos = 0
            played = 0
            next_seek = trio.current_time() + p.seek_every_s
            await fill(p.buffer)
            while played < p.blocks and pos < len(texts):
                if p.seek_every_s and trio.current_time() >= next_seek:
                    next_seek = trio.current_time() + p.seek_every_s
                    if requested + p.buffer <= len(texts):
                        client.evicted_reply = trio.Event()
                        await ws.cursor_moved(client.doc, requested)
                        with trio.fail_after(30):
                            await client.evicted_reply.wait()
                        pos = requested
                        await fill(pos + p.buffer)
                        continue
                await client.terminal[pos].wait()
                await fill(pos + 1 + p.buffer)
                await trio.sleep(duration_ms_for(texts[pos], 15.0) / 1000 / p.playback_speed)
                pos += 1
                played += 1
            # Whatever is still on its way (requested, not evicted) must arrive.
            with trio.fail_after(60):
                for i in range(requested):
                    if i not in client.evicted:
                        await client.terminal[i].wait()
            nursery.cancel_scope.cancel()


async def probe(
    ws_url: str,
    token: str,
    texts: list[str],
    rec: Recorder,
    *,
    idle_n: int,
    hz: float,
    stop: trio.Event,
) -> None:
    """Idle probes first (sequential), then one request every 1/hz s until ``stop``."""
    async with connect(ws_url, token, keep_frames=False) as ws:
        client = Client("probe", ws, rec, dict(enumerate(texts)), "doc-probe", idle=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.receive_loop)
            i = 0
            for _ in range(idle_n):
                rec.blocks_requested += 1
                acked = await client.request([i])
                i += 1
                with trio.move_on_after(10):
                    await acked.wait()
                await trio.sleep(0.02)
            client.idle = False
            rec.load_started.set()
            while not stop.is_set() and i < len(texts):
                t = trio.current_time()
                rec.blocks_requested += 1
                await client.request([i])
                i += 1
                with trio.move_on_after(max(0.0, 1 / hz - (trio.current_time() - t))):
                    await stop.wait()
            # every block the probe asked for must still arrive
            with trio.move_on_after(60):
                for j in range(i):
                    await client.terminal[j].wait()
            nursery.cancel_scope.cancel()


# -- one run ----------------------------------------------------------------------------------


def write_daemon_config(path: Path, run_dir: Path, p: Params) -> None:
    """The daemon's configuration for one run: production defaults but these."""
    write_config(
        path,
        run_dir,
        quick=False,
        gateway={"rate_limit_blocks_per_min": 100000, "max_frames_per_s": 100000},
        postgres={
            "request_pool_size": p.request_pool_size,
            "billing_pool_size": p.billing_pool_size,
            "acquire_timeout_s": p.acquire_timeout_s,
        },
        hot={"concurrency": p.hot_concurrency},
        billing={"txn_delay_ms": p.txn_delay_ms},
        workers={"simulated": 0, "visibility_timeout_s": 60.0},
        log={"events_path": str(run_dir / "events.jsonl")},
    )


async def _rss_sampler(pid: int, out: list[float]) -> None:
    proc = psutil.Process(pid)
    while True:
        try:
            out.append(proc.memory_info().rss / 1e6)
        except psutil.Error:
            return
        await trio.sleep(0.1)


async def run_one(arch: str, p: Params, work: Path, say: Any) -> dict[str, Any]:
    run_dir = work / arch
    run_dir.mkdir(parents=True)
    rng = random.Random(p.seed)
    seen: set[str] = set()
    docs = [make_texts(rng, p.blocks * 3 + p.buffer * 4, seen) for _ in range(p.users)]
    probe_texts = make_texts(rng, p.idle_probes + int(p.max_load_s * p.probe_hz) + 10, seen)

    servers = EmbeddedServers(run_dir / "servers")
    await in_thread(servers.__enter__)
    try:
        assert servers.redis is not None and servers.postgres is not None
        redis_url, pg_url = servers.redis.url, servers.postgres.url
        names = [f"listener-{i}" for i in range(p.users)] + ["probe"]
        users = await in_thread(setup_database, pg_url, names)
        config = run_dir / "daemon.toml"
        write_daemon_config(config, run_dir, p)
        return await _run_with_servers(
            arch, p, run_dir, config, redis_url, pg_url, users, docs, probe_texts, say
        )
    finally:
        await in_thread(servers.close)


async def _run_with_servers(
    arch: str,
    p: Params,
    run_dir: Path,
    config: Path,
    redis_url: str,
    pg_url: str,
    users: list[tuple[int, str]],
    docs: list[list[str]],
    probe_texts: list[str],
    say: Any,
) -> dict[str, Any]:
    samples_path = run_dir / "samples.json"
    daemon_cmd = [
        sys.executable,
        os.environ.get("STRESS_DAEMON", str(REPO / "tools" / "stress_daemon.py")),
        "--arch", arch, "--config", str(config), "--redis-url", redis_url,
        "--pg-url", pg_url, "--samples", str(samples_path),
    ]  # fmt: skip
    worker_cmd = [
        sys.executable, "-c", "from daemon.workers.cli import main; raise SystemExit(main())",
        "--redis-url", redis_url, "--simulated", "--models", "kokoro",
        "--concurrency", str(p.workers), "--batch", str(p.worker_batch),
        "--latency-ms", str(p.worker_latency_ms), "--jitter-ms", str(p.worker_jitter_ms),
        "--chars-per-s", str(p.worker_chars_per_s), "--worker-id", f"stress-{arch}",
    ]  # fmt: skip
    rec = Recorder()
    rss: list[float] = []
    log_fd = os.open(run_dir / "daemon.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        daemon = await trio.lowlevel.open_process(
            daemon_cmd, stdout=subprocess.PIPE, stderr=log_fd, cwd=run_dir
        )
        workers: list[trio.Process] = []

        async def start_workers() -> None:
            workers.append(
                await trio.lowlevel.open_process(
                    worker_cmd, stdout=subprocess.DEVNULL, stderr=log_fd, cwd=run_dir
                )
            )

        try:
            ws_url = await _serving_url(daemon, run_dir, arch)
            outcome = await _drive(
                arch, p, pg_url, redis_url, ws_url, users, docs, probe_texts, rec, rss,
                daemon.pid, start_workers, say,
            )  # fmt: skip
        finally:
            with trio.CancelScope(shield=True):
                for proc in (*workers, daemon):
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)
                for proc in (*workers, daemon):
                    with trio.move_on_after(20) as scope:
                        await proc.wait()
                    if scope.cancelled_caught:
                        proc.kill()
                        await proc.wait()
                if daemon.stdout is not None:
                    await daemon.stdout.aclose()
    finally:
        os.close(log_fd)
    load_t0, load_s, drain_s, drained, expected = outcome
    return await _summarize(
        arch, p, run_dir, pg_url, redis_url, rec, rss, load_t0, load_s, drain_s, drained, expected,
        samples_path,
    )  # fmt: skip


async def _serving_url(daemon: trio.Process, run_dir: Path, arch: str) -> str:
    """Read the daemon's stdout until its "serving ws://… and http://…" line."""
    assert daemon.stdout is not None
    buffer = b""
    with trio.move_on_after(90):
        while b"\n" not in buffer:
            chunk = await daemon.stdout.receive_some(4096)
            if not chunk:
                break
            buffer += chunk
    line = buffer.decode(errors="replace")
    if "serving" not in line:
        log = (await trio.Path(run_dir / "daemon.log").read_text())[-3000:]
        raise RuntimeError(f"{arch} daemon did not start: {log}")
    return line.split("serving ")[1].split(" and ")[0]


async def _drive(
    arch: str,
    p: Params,
    pg_url: str,
    redis_url: str,
    ws_url: str,
    users: list[tuple[int, str]],
    docs: list[list[str]],
    probe_texts: list[str],
    rec: Recorder,
    rss: list[float],
    daemon_pid: int,
    start_workers: Any,
    say: Any,
) -> tuple[float, float, float, bool, int]:
    """Idle probes, then the load, then the drain; returns timings and whether it drained."""
    stop_probe = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_rss_sampler, daemon_pid, rss)
        probe_done = trio.Event()

        async def run_probe() -> None:
            try:
                await probe(
                    ws_url, users[-1][1], probe_texts, rec,
                    idle_n=p.idle_probes, hz=p.probe_hz, stop=stop_probe,
                )  # fmt: skip
            finally:
                probe_done.set()

        nursery.start_soon(run_probe)
        await rec.load_started.wait()
        # Workers start after the idle measurement, so that "idle" means idle.
        await start_workers()
        say(
            f"[{arch}] idle ack p50 {pct(rec.idle_acks, 50):.1f} ms,"
            f" p99 {pct(rec.idle_acks, 99):.1f} ms; load starts"
        )
        load_t0 = time.perf_counter()
        nursery.start_soon(_progress, arch, rec, p, say)
        with trio.move_on_after(p.max_load_s) as load_scope:
            async with trio.open_nursery() as listeners:
                for n in range(p.users):
                    listeners.start_soon(
                        listener, ws_url, users[n][1], f"listener-{n}", docs[n], p, rec
                    )
        load_s = time.perf_counter() - load_t0
        stop_probe.set()
        if load_scope.cancelled_caught:
            say(f"[{arch}] load did not finish within {p.max_load_s:.0f} s")
        with trio.move_on_after(60):
            await probe_done.wait()
        # Drain: every block asked for is billed (texts are unique: one job, one row each).
        drain_t0 = time.perf_counter()
        expected = rec.blocks_requested - rec.blocks_evicted
        drained = False
        with trio.move_on_after(p.drain_timeout_s):
            while True:
                rows = await in_thread(pg_query, pg_url, "SELECT count(*) AS n FROM usage_log")
                depth = await in_thread(redis_cmd, redis_url, "XLEN", "tts:billing")
                if rows[0]["n"] >= expected and depth == 0:
                    drained = True
                    break
                await trio.sleep(0.2)
        drain_s = time.perf_counter() - drain_t0
        nursery.cancel_scope.cancel()
    return load_t0, load_s, drain_s, drained, expected


async def _progress(arch: str, rec: Recorder, p: Params, say: Any) -> None:
    total = p.users * p.blocks
    while True:
        await trio.sleep(2.0)
        recent = [ms for t, ms, _ in rec.acks if t > time.perf_counter() - 2.0]
        say(
            f"[{arch}] {rec.blocks_terminal}/{total}+ blocks, {rec.requests} requests,"
            f" ack p99 (last 2 s) {pct(recent, 99):.1f} ms, errors {rec.errors}"
        )


async def _summarize(
    arch: str,
    p: Params,
    run_dir: Path,
    pg_url: str,
    redis_url: str,
    rec: Recorder,
    rss: list[float],
    load_t0: float,
    load_s: float,
    drain_s: float,
    drained: bool,
    expected: int,
    samples_path: Path,
) -> dict[str, Any]:
    rows = await in_thread(
        pg_query, pg_url, "SELECT event_id, extract(epoch FROM created_at) AS t FROM usage_log"
    )
    billed_ids = {r["event_id"] for r in rows}
    synthesized, completes = set(), []
    wall_t0 = time.time() - (time.perf_counter() - load_t0)
    events = await trio.to_thread.run_sync(lambda: list(read_events(run_dir / "events.jsonl")))
    for ev in events:
        if isinstance(ev, SynthesisComplete) and ev.billed and ev.ts is not None:
            synthesized.add(ev.job_id)
            completes.append(ev.ts - wall_t0)
    queued = await in_thread(_stream_event_ids, redis_url)
    delta = len(synthesized - billed_ids - queued)
    times = sorted(float(r["t"]) for r in rows)
    span = (times[-1] - times[0]) if len(times) > 1 else 0.0
    samples: dict[str, list[tuple[float, float]]] = {}
    if await trio.Path(samples_path).exists():
        samples = json.loads(await trio.Path(samples_path).read_text())
    waits = [s * 1000 for _, s in samples.get("pool_wait_s", [])]
    gateway_acks = [s * 1000 for _, s in samples.get("gateway_ack_s", [])]
    acks = [ms for _, ms, _ in rec.acks]
    # By request shape: the probe's one-block requests are the shape the idle figure measures;
    # the listeners' requests carry up to --buffer blocks each (more work per request).
    probe_acks = [ms for _, ms, who in rec.acks if who == "probe"]
    listener_acks = [ms for _, ms, who in rec.acks if who != "probe"]
    idle_p99 = pct(rec.idle_acks, 99)
    result = {
        "idle_ack_ms": {"p50": pct(rec.idle_acks, 50), "p99": idle_p99},
        "ack_ms": {
            "p50": pct(acks, 50),
            "p95": pct(acks, 95),
            "p99": pct(acks, 99),
            "max": pct(acks, 100),
        },
        "audio_ms": {"p50": pct(rec.audio_ms, 50), "p99": pct(rec.audio_ms, 99)},
        "pool_wait_ms": {"p50": pct(waits, 50), "p99": pct(waits, 99), "max": pct(waits, 100)},
        # In the daemon: synthesize frame received → its statuses queued (no network, no wait to
        # be scheduled): where the ack time goes when the pool is not the cause.
        "gateway_ack_ms": {"p50": pct(gateway_acks, 50), "p99": pct(gateway_acks, 99)},
        "pool_timeouts": rec.pool_timeouts,
        "requests": rec.requests,
        "blocks": rec.blocks_requested,
        "blocks_evicted": rec.blocks_evicted,
        "errors": rec.errors,
        "events_billed": len(billed_ids),
        "billing_events_per_s": round(len(billed_ids) / span, 1) if span else 0.0,
        "billing_drain_s": round(drain_s, 3),
        "reconciliation_delta": delta,
        "rss_mb_max": round(max(rss), 1) if rss else 0.0,
        "ack_p99_over_idle": round(pct(acks, 99) / idle_p99, 2) if idle_p99 else None,
        "probe_ack_ms": {"p50": pct(probe_acks, 50), "p99": pct(probe_acks, 99)},
        "listener_ack_ms": {"p50": pct(listener_acks, 50), "p99": pct(listener_acks, 99)},
        "probe_ack_p99_over_idle": (
            round(pct(probe_acks, 99) / idle_p99, 2) if idle_p99 and probe_acks else None
        ),
        "load_s": round(load_s, 2),
        "verified": {
            "all_blocks_terminal": rec.blocks_terminal + rec.blocks_evicted >= rec.blocks_requested,
            "billing_drained": drained,
            "billed_equals_requested": len(billed_ids) == expected,
            "reconciliation_zero": delta == 0,
        },
        "error_messages": rec.error_messages,
        "timeline": {
            # seconds since the load started (a probe request may precede it by a few ms)
            "acks": [(round(t - load_t0, 4), round(ms, 3), who) for t, ms, who in rec.acks],
            "results": [round(t, 4) for t in completes],
        },
    }
    return result


def _stream_event_ids(redis_url: str) -> set[str]:
    entries = redis_cmd(redis_url, "XRANGE", "tts:billing", "-", "+")
    out = set()
    for _id, fields in entries or []:
        for k, v in zip(fields[::2], fields[1::2], strict=False):
            if k == b"event":
                out.add(json.loads(v)["event_id"])
    return out


# -- output -----------------------------------------------------------------------------------


def _ms(r: dict[str, Any], key: str, *qs: str, digits: int = 1) -> str:
    return " / ".join(f"{r[key][q]:.{digits}f}" for q in qs)


def _within(r: dict[str, Any]) -> str:
    ratio = r["ack_p99_over_idle"]
    return f"{ratio}× ({'yes' if ratio is not None and ratio <= 1.5 else 'no'})"


ROWS = [
    ("idle ack p50 / p99 (ms)", lambda r: _ms(r, "idle_ack_ms", "p50", "p99")),
    ("ack p50 / p95 / p99 (ms)", lambda r: _ms(r, "ack_ms", "p50", "p95", "p99")),
    ("ack max (ms)", lambda r: _ms(r, "ack_ms", "max")),
    ("ack p99 / idle p99 (≤ 1.5×?)", _within),
    ("  probe (1 block) p50 / p99 (ms)", lambda r: _ms(r, "probe_ack_ms", "p50", "p99")),
    ("  probe p99 / idle p99", lambda r: f"{r['probe_ack_p99_over_idle']}×"),
    ("  listeners (≤ buffer blocks) p50 / p99", lambda r: _ms(r, "listener_ack_ms", "p50", "p99")),
    ("audio p50 / p99 (ms)", lambda r: _ms(r, "audio_ms", "p50", "p99", digits=0)),
    (
        "pool wait p50 / p99 / max (ms)",
        lambda r: _ms(r, "pool_wait_ms", "p50", "p99", "max", digits=2),
    ),
    ("in-daemon ack p50 / p99 (ms)", lambda r: _ms(r, "gateway_ack_ms", "p50", "p99", digits=2)),
    ("pool timeouts", lambda r: str(r["pool_timeouts"])),
    ("requests / blocks / errors", lambda r: f"{r['requests']} / {r['blocks']} / {r['errors']}"),
    ("events billed", lambda r: str(r["events_billed"])),
    ("billing events/s", lambda r: f"{r['billing_events_per_s']:.0f}"),
    ("billing drain (s)", lambda r: f"{r['billing_drain_s']:.2f}"),
    ("reconciliation delta", lambda r: str(r["reconciliation_delta"])),
    ("daemon RSS max (MB)", lambda r: f"{r['rss_mb_max']:.0f}"),
    ("verified", lambda r: "yes" if all(r["verified"].values()) else f"NO {r['verified']}"),
]


def print_table(runs: dict[str, dict[str, Any]], p: Params) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"tools/stress.py — {p.users} users, {p.workers} workers,"
        f" billing txn delay {p.txn_delay_ms:g} ms"
    )
    table.add_column("")
    for arch in runs:
        table.add_column(arch, justify="right")
    for label, fmt in ROWS:
        table.add_row(label, *(fmt(r) for r in runs.values()))
    Console().print(table)


def plot(runs: dict[str, dict[str, Any]], path: Path, p: Params) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(runs), 1, figsize=(11, 3.6 * len(runs)), sharex=True, squeeze=False
    )
    for ax, (arch, r) in zip(axes[:, 0], runs.items(), strict=True):
        acks = r["timeline"]["acks"]
        ax.scatter(
            [t for t, _, _ in acks],
            [ms for _, ms, _ in acks],
            s=6,
            alpha=0.7,
            label="synthesize → first status",
        )
        ax.axhline(r["idle_ack_ms"]["p99"], color="green", lw=1, ls="--", label="idle p99")
        ax.axhline(
            r["idle_ack_ms"]["p99"] * 1.5, color="orange", lw=1, ls=":", label="1.5 × idle p99"
        )
        ax.set_yscale("log")
        ax.set_ylabel("ack latency (ms)")
        ax.set_title(
            f"{arch}: ack p99 {r['ack_ms']['p99']:.1f} ms, pool timeouts {r['pool_timeouts']}"
        )
        results = r["timeline"]["results"]
        if results:
            bins = [i * 0.1 for i in range(int(max(results) / 0.1) + 2)]
            ax2 = ax.twinx()
            ax2.hist(
                results, bins=bins, color="grey", alpha=0.25, label="results finalized / 100 ms"
            )
            ax2.set_ylabel("results / 100 ms (bursts)")
            ax2.set_ylim(bottom=0)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since load start")
    fig.suptitle(
        f"{p.users} listeners, {p.workers} GPU workers (batch {p.worker_batch}),"
        f" billing txn delay {p.txn_delay_ms:g} ms"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def judge(runs: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """The claims the stress test exists to check (reported, not asserted: a benchmark)."""
    targets = {}
    split = runs.get("split")
    if split is not None:
        ratio = split["ack_p99_over_idle"]
        targets["split_ack_p99_within_1.5x_idle"] = (
            ratio is not None and ratio <= 1.5 and split["pool_timeouts"] == 0
        )
    inline = runs.get("inline")
    if inline is not None:
        ratio = inline["ack_p99_over_idle"]
        targets["inline_starves"] = inline["pool_timeouts"] > 0 or (
            ratio is not None and ratio > 3.0
        )
    return targets


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Params]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--compare", action="store_true", help="run split and inline, same load and seed"
    )
    ap.add_argument("--arch", choices=ARCHS, default="split", help="without --compare: which one")
    ap.add_argument("--json", type=Path, help="write the figures (docs/stress.md format)")
    ap.add_argument("--plot", type=Path, help="write a PNG of ack latency over time")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    add_param_options(ap, Params)
    args = ap.parse_args(argv)
    return args, params_from(args, Params)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--scenario", "noisy"]:
        from tools.noisy import main as noisy_main

        return noisy_main(argv[2:])
    args, p = parse_args(argv)
    archs = ARCHS if args.compare else (args.arch,)
    work = Path(tempfile.mkdtemp(prefix="tts-stress-"))
    from rich.console import Console

    console = Console(stderr=True)

    def say(message: str) -> None:
        console.log(message)

    runs: dict[str, dict[str, Any]] = {}
    try:
        for arch in archs:
            say(f"[{arch}] starting fresh servers and daemon")
            runs[arch] = trio.run(run_one, arch, p, work, say)
    finally:
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(runs, p)
    targets = judge(runs)
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    if args.json:
        out = {"runs": runs, "params": attrs.asdict(p), "targets": targets}
        args.json.write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(runs, args.plot, p)
    ok = all(all(r["verified"].values()) for r in runs.values())
    if not ok:
        print("stress: verification FAILED (see 'verified')", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
