#!/usr/bin/env python3
"""Hot-path benchmark: worker result pushed → the listener's ``cached`` frame, in round trips.

Starts its own embedded Redis and Postgres in a temporary directory and runs the real daemon as a
subprocess (``workers.simulated = 0``: this tool plays the GPU workers). Real WebSocket clients
request the blocks, so every result has a listener; the tool pulls the jobs with the workers' own
``pull.lua`` and pushes results with ``push_result.lua``, each carrying ~60 KB of incompressible
audio (a five-second Opus block) for a sentence-sized text.

Measured in one run, on one machine:

* ``redis_rtt_ms``: PING through the tool's Redis client (a Trio → asyncio crossing each, as the
  daemon pays); ``redis_rtt_asyncio_ms``: the same PING timed inside asyncio (the wire alone).
* ``floor_ms``: a bare client moving the same payload — LPUSH, BLMOVE, SET, PUBLISH, subscriber
  receives — the cost of the bytes alone, no daemon.
* ``single``: results pushed one at a time (each once the previous one is delivered and billed);
  ``notify_ms`` from the push to the WebSocket client's ``cached`` frame; ``p99_over_floor`` =
  single p99 / floor p99.
* ``burst``: ``results`` pushed at once — staged beforehand, then put in ``tts:results`` with one
  ``RENAME``, as if fast GPU workers had all finished together — and ``results_per_s`` until the
  last ``cached`` frame; ``notify_ms`` from that moment; the same burst against a *baseline* daemon
  whose hot consumer is the shape of the system the design came from — one task per result
  issuing its Redis calls one by one (GET inflight, DEL, HDEL, ZREM, HSET, EXPIRE, XADD, SMEMBERS,
  PUBLISH…, DEL, LREM), at the same concurrency — and ``ratio`` = split / baseline.

* ``persister``: the split daemon is measured twice in the same run, with the durable audio store
  and its persister on (``split``, the default configuration) and off (``split_nopersist``,
  ``audio.enabled = false``): ``burst_ratio`` and ``single_p99_ratio`` = with / without (the
  target: within 10 %). Then ``reread``: the burst's audio is deleted from Redis once persisted,
  and the same blocks are asked for again — over the WebSocket (``synthesize`` → ``cached`` from
  the store: ``blocks_per_s``, per-block ``ms`` from the request to its frame) and over HTTP
  (``GET /v1/audio/HASH`` from the store, 8 at a time).

    .venv/bin/python tools/bench_hot.py                      # 1,000-result burst, 200 singles
    .venv/bin/python tools/bench_hot.py --results 200 --single 50 --json /tmp/hot.json

The machine may be shared: figures are for comparison within one run (ratios), not absolutes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import trio
import trio_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.cli import serve_until_signalled
from daemon.config import Config, HotConfig, load_config
from daemon.contracts import BillingEvent, ContractError, Job, Keys, Result
from daemon.runtime.daemon import Daemon
from daemon.runtime.services import Deps, build_services
from daemon.runtime.supervisor import ServiceSpec
from daemon.stores.redis import RedisStore, open_redis
from daemon.testing.client import connect
from daemon.testing.config import write_config
from daemon.testing.figures import summary
from daemon.testing.stores import setup_database

MODEL = "kokoro"
NOTIFY_LUA = (
    resources.files("daemon.stores") / "lua" / "common.lua"
).read_text() + "\nreturn tts_notify(KEYS[1], ARGV[2], ARGV[1], cjson.decode(ARGV[3]))\n"
PUSH_CHUNK = 50  # results per LPUSH when staging a burst
STAGING = "bench:burst:staging"


# -- statistics -------------------------------------------------------------------------------


async def run_baseline_hot(
    store: RedisStore,
    cfg: HotConfig,
    *,
    block_s: float,
    stopping: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The result consumer of the system the design came from, moved onto this daemon's stores:
    BLMOVE one result, start a task for it, and in that task issue each Redis call on its own.
    Same concurrency bound as the real hot path, so the difference is the round trips."""
    claimed = "bench:baseline:claimed"
    limiter = trio.CapacityLimiter(cfg.concurrency)

    async def handle(raw: bytes) -> None:
        try:
            r = Result.from_json(raw)
            base64.b64decode(r.audio_base64 or "", validate=True)  # the old shape decoded it
        except (ContractError, ValueError):
            await store.execute("LREM", claimed, 1, raw)
            return
        hash_ = r.variant_hash
        if await store.execute("GET", Keys.inflight(hash_)) != r.job_id.encode():
            await store.execute("LREM", claimed, 1, raw)
            return
        await store.execute("DEL", Keys.inflight(hash_))
        await store.execute("HDEL", Keys.JOBS, r.job_id)
        await store.execute("ZREM", Keys.processing(r.model), r.job_id)
        # the stored shape the gateway serves: the base64 audio, then where it is (RPUSH)
        meta = json.dumps({"loc": "i:1", "content_type": r.content_type or ""})
        await store.execute("RPUSH", Keys.audio(hash_), r.audio_base64 or "", meta)
        await store.execute("EXPIRE", Keys.audio(hash_), cfg.audio_ttl_s)
        event = BillingEvent.for_result(r, finalized_at=time.time())
        await store.execute("XADD", Keys.BILLING, "*", "event", event.to_json())
        # SMEMBERS + one PUBLISH per waiter, done by the daemon's own Lua helper so the frames
        # are exactly what the gateway routes (one round trip: flatters the baseline a little).
        frame = {"type": "status", "status": "cached", "audio_url": f"/v1/audio/{hash_}"}
        frame.update(model=r.model, voice=r.voice)
        await store.execute(
            "EVAL", NOTIFY_LUA, 1, Keys.waiters(hash_), hash_, Keys.NOTIFY_PREFIX, json.dumps(frame)
        )
        await store.execute("DEL", Keys.waiters(hash_))
        await store.execute("LREM", claimed, 1, raw)

    async def handle_and_release(raw: bytes, token: object) -> None:
        try:
            await handle(raw)
        finally:
            limiter.release_on_behalf_of(token)

    async with store.dedicated() as reader, trio.open_nursery() as nursery:
        task_status.started()
        while not stopping.is_set():
            raw = await reader.execute("BLMOVE", Keys.RESULTS, claimed, "RIGHT", "LEFT", block_s)
            if raw is None:
                continue
            token = object()
            await limiter.acquire_on_behalf_of(token)
            nursery.start_soon(handle_and_release, raw, token)


def baseline_services(cfg: Config, deps: Deps) -> list[ServiceSpec]:
    """The daemon's services with the baseline result consumer in place of the hot path."""
    run = functools.partial(
        run_baseline_hot,
        deps.store,
        cfg.hot,
        block_s=cfg.redis.block_s,
        stopping=deps.stopping.consumers,
    )
    baseline = ServiceSpec("hot", run)
    return [baseline if s.name == "hot" else s for s in build_services(cfg, deps)]


# -- serving a daemon (the subprocess side) ----------------------------------------------------


async def serve(kind: str, config_path: str) -> None:
    cfg = load_config(config_path)
    # split and split_nopersist differ by their configuration (audio.enabled)
    services = baseline_services if kind == "baseline" else build_services
    daemon = Daemon(cfg, cfg.redis.url, cfg.postgres.url, services=services)
    await serve_until_signalled(daemon, name=kind)


# -- the measuring side -----------------------------------------------------------------------


class Listener:
    """A real WebSocket client that timestamps every status frame as it arrives."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.arrived: dict[tuple[str, int, str], float] = {}
        self.urls: dict[tuple[str, int], str] = {}
        self.waiting: dict[tuple[str, int, str], trio.Event] = {}
        self.counts: dict[str, int] = {}
        self.changed = trio.Event()

    async def run(self) -> None:
        while True:
            text = await self.ws.get_message()
            now = time.perf_counter()
            frame = json.loads(text)
            if frame.get("type") != "status":
                continue
            key = (frame["document_id"], frame["block_idx"], frame["status"])
            self.arrived.setdefault(key, now)
            if frame.get("audio_url"):
                self.urls[key[:2]] = frame["audio_url"]
            self.counts[frame["status"]] = self.counts.get(frame["status"], 0) + 1
            event = self.waiting.pop(key, None)
            if event is not None:
                event.set()
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, key: tuple[str, int, str], timeout_s: float = 30.0) -> float:
        if key not in self.arrived:
            event = self.waiting.setdefault(key, trio.Event())
            with trio.fail_after(timeout_s):
                await event.wait()
        return self.arrived[key]

    async def wait_count(self, status: str, n: int, timeout_s: float = 120.0) -> None:
        with trio.fail_after(timeout_s):
            while self.counts.get(status, 0) < n:
                await self.changed.wait()


def texts_for(prefix: str, n: int) -> list[str]:
    return [
        f"{prefix} sentence number {i}: a line of prose long enough to be read aloud in a few "
        "seconds."
        for i in range(n)
    ]


@contextlib.asynccontextmanager
async def listeners(ws_url: str, token: str, n: int) -> AsyncIterator[list[Listener]]:
    async with contextlib.AsyncExitStack() as stack:
        out = []
        nursery = await stack.enter_async_context(trio.open_nursery())
        for _ in range(n):
            client = await stack.enter_async_context(
                connect(ws_url, token, message_queue_size=4096, keep_frames=False)
            )
            listener = Listener(client.ws)
            nursery.start_soon(listener.run)
            out.append(listener)
        try:
            yield out
        finally:
            nursery.cancel_scope.cancel()


async def request_and_pull(
    store: RedisStore, listener: Listener, doc: str, n: int
) -> list[tuple[int, Job]]:
    """Ask for ``n`` blocks of ``doc`` over the WebSocket, wait for ``queued``, pull the jobs."""
    texts = texts_for(doc, n)
    for start in range(0, n, 64):
        blocks = [{"idx": i, "text": texts[i]} for i in range(start, min(n, start + 64))]
        await listener.ws.send_message(
            json.dumps({"type": "synthesize", "document_id": doc, "model": MODEL, "blocks": blocks})
        )
    for i in range(n):
        await listener.wait_for((doc, i, "queued"))
    jobs: list[tuple[int, Job]] = []
    while True:
        raw = await store.pull_job(MODEL)
        if raw is None:
            break
        job = Job.from_json(raw)
        jobs.append((job.block_idx, job))
    return jobs


def result_json(job: Job, audio_bytes: int) -> str:
    audio = os.urandom(audio_bytes)
    return Result.for_job(
        job,
        worker_id="bench",
        queue_wait_ms=1.0,
        processing_time_ms=1.0,
        audio_base64=base64.b64encode(audio).decode(),
        duration_ms=5000,
        content_type="audio/ogg",
    ).to_json()


async def measure_rtt(store: RedisStore, n: int) -> tuple[dict[str, float], dict[str, float]]:
    trio_side, wire = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        wire.append(await store.ping_ms())
        trio_side.append((time.perf_counter() - t0) * 1000)
    return summary(trio_side), summary(wire)


async def measure_floor(store: RedisStore, n: int, audio_bytes: int) -> dict[str, float]:
    """LPUSH → BLMOVE → SET → PUBLISH → subscriber, one payload at a time, no daemon."""
    src, dst = "bench:floor:results", "bench:floor:claimed"
    got: dict[int, float] = {}
    arrived = trio.Event()

    def deliver(_user: int, data: bytes) -> None:
        got[int(data)] = time.perf_counter()
        arrived.set()

    payload = result_json(
        Job("j", "h", MODEL, "af_heart", texts_for("floor", 1)[0], 1, "d", 0, 1.0, 0.0),
        audio_bytes,
    )
    ready = trio.Event()
    latencies = []
    async with trio.open_nursery() as nursery, store.dedicated() as mover:

        async def move() -> None:
            for i in range(n):
                raw = await mover.execute("BLMOVE", src, dst, "RIGHT", "LEFT", 5)
                await mover.execute("SET", f"bench:floor:audio:{i}", raw, "EX", 60)
                await mover.execute("PUBLISH", f"{Keys.NOTIFY_PREFIX}0", str(i))

        nursery.start_soon(
            functools.partial(store.listen_notifications, deliver, ready=lambda: ready.set())
        )
        await ready.wait()
        nursery.start_soon(move)
        for i in range(n):
            arrived = trio.Event()
            t0 = time.perf_counter()
            await store.execute("LPUSH", src, payload)
            with trio.fail_after(10):
                while i not in got:
                    await arrived.wait()
                    arrived = trio.Event()
            latencies.append((got[i] - t0) * 1000)
        nursery.cancel_scope.cancel()
    await store.execute("DEL", src, dst)
    return summary(latencies)


async def settled(store: RedisStore, limit_s: float = 2.0) -> None:
    """Until the billing stream is empty (polled; the daemon owns no event this tool can use)."""
    with trio.move_on_after(limit_s):
        for _ in range(int(limit_s / 0.002)):
            if not int(await store.execute("XLEN", Keys.BILLING)):
                return
            await trio.sleep(0.002)


async def measure_single(
    store: RedisStore, listener: Listener, n: int, audio_bytes: int
) -> dict[str, Any]:
    jobs = await request_and_pull(store, listener, "single", n)
    payloads = [(idx, job, result_json(job, audio_bytes)) for idx, job in jobs]
    latencies = []
    for idx, job, payload in payloads:
        # One at a time: the previous result is delivered and billed (the daemon is idle again),
        # as the floor's client is between its payloads.
        await settled(store)
        t0 = time.perf_counter()
        await store.push_result(job.model, job.job_id, payload)
        t1 = await listener.wait_for(("single", idx, "cached"))
        latencies.append((t1 - t0) * 1000)
    return {"results": len(latencies), "notify_ms": summary(latencies)}


async def prepare_burst(
    store: RedisStore, group: list[Listener], n: int, audio_bytes: int, doc: str
) -> list[tuple[Listener, str, int]]:
    """Jobs requested by the listeners and pulled; their results staged in a list of their own,
    so that the burst can appear in ``tts:results`` at once (one RENAME), whatever the speed of
    the pushing client."""
    per = [n // len(group) + (1 if i < n % len(group) else 0) for i in range(len(group))]
    work: list[tuple[Listener, str, int]] = []
    payloads: list[str] = []
    for c, (listener, count) in enumerate(zip(group, per, strict=True)):
        d = f"{doc}-{c}"
        for idx, job in await request_and_pull(store, listener, d, count):
            work.append((listener, d, idx))
            payloads.append(result_json(job, audio_bytes))
    await store.execute("DEL", STAGING)
    for start in range(0, len(payloads), PUSH_CHUNK):
        await store.execute("LPUSH", STAGING, *payloads[start : start + PUSH_CHUNK])
    # Let the "processing" frames of the pulls drain before the clock starts.
    for listener, d, idx in work:
        await listener.wait_for((d, idx, "processing"))
    return work


async def measure_burst(store: RedisStore, work: list[tuple[Listener, str, int]]) -> dict[str, Any]:
    """All staged results appear in ``tts:results`` at once; time to each ``cached`` frame."""
    if int(await store.execute("LLEN", Keys.RESULTS)):
        raise RuntimeError("tts:results is not empty before the burst")
    t_start = time.perf_counter()
    await store.execute("RENAME", STAGING, Keys.RESULTS)
    latencies = []
    last = t_start
    for listener, d, idx in work:
        t1 = await listener.wait_for((d, idx, "cached"), timeout_s=300)
        latencies.append((t1 - t_start) * 1000)
        last = max(last, t1)
    elapsed = last - t_start
    return {
        "results": len(work),
        "first_ms": round(min(latencies), 3),
        "elapsed_s": round(elapsed, 3),
        "results_per_s": round(len(work) / elapsed, 1),
        "notify_ms": summary(latencies),
    }


@contextlib.contextmanager
def cpu_meter(daemon_pid: int, redis_pid: int) -> Any:
    """CPU seconds the daemon, Redis and this tool spent inside the block (filled on exit)."""
    import psutil

    procs = {"daemon": psutil.Process(daemon_pid), "bench": psutil.Process()}
    if redis_pid:
        procs["redis"] = psutil.Process(redis_pid)

    def used(p: Any) -> float:
        t = p.cpu_times()
        return t.user + t.system

    before = {k: used(p) for k, p in procs.items()}
    out: dict[str, float] = {}
    try:
        yield out
    finally:
        for k, p in procs.items():
            out[k] = round(used(p) - before[k], 3)


@contextlib.contextmanager
def profiled(directory: str | None, kind: str, pid: int) -> Any:
    """With ``--profile DIR``: py-spy samples the daemon during the burst (collapsed stacks)."""
    if not directory:
        yield
        return
    path = Path(directory) / f"{kind}.folded"
    spy = subprocess.Popen(
        ["py-spy", "record", "--pid", str(pid), "--format", "raw", "-o", str(path), "-r", "200"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)


@contextlib.contextmanager
def daemon_process(kind: str, config_path: Path, log_dir: Path) -> Any:
    log = log_dir / f"daemon-{kind}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--config", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log_dir,
        )
    try:
        deadline = time.monotonic() + 60
        urls = None
        while time.monotonic() < deadline and proc.poll() is None:
            for line in log.read_text().splitlines():
                if ": serving " in line:  # "{kind}: serving WS and HTTP (events: …)"
                    urls = line.split(": serving ")[1].split(" (")[0].split(" and ")
            if urls:
                break
            time.sleep(0.05)
        if not urls:
            raise RuntimeError(f"{kind} daemon did not start:\n{log.read_text()[-3000:]}")
        yield urls[0], urls[1], proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run_kind(
    kind: str,
    args: argparse.Namespace,
    config_path: Path,
    workdir: Path,
    redis_url: str,
    redis_pid: int,
    token: str,
    out: dict[str, Any],
) -> None:
    async with open_redis(redis_url) as store:
        await store.execute("FLUSHALL")
    config = config_path.with_name(f"daemon-{kind}.toml")
    with daemon_process(kind, config, workdir) as (ws_url, http_url, pid):
        async with open_redis(redis_url) as store, listeners(ws_url, token, args.clients) as group:
            if kind.startswith("split") and args.single:
                single = await measure_single(store, group[0], args.single, args.audio_bytes)
                out["single" if kind == "split" else f"single_{kind}"] = single
                print(f"  single ({kind}): {single}", flush=True)
            work = await prepare_burst(store, group, args.results, args.audio_bytes, kind)
            with profiled(args.profile, kind, pid), cpu_meter(pid, redis_pid) as cpu:
                burst = await measure_burst(store, work)
            burst["cpu_s"] = cpu
            print(f"  burst ({kind}): {burst}", flush=True)
            out[f"burst_{kind}"] = burst
            if kind == "split" and args.reread:
                out["reread"] = await measure_reread(store, work[: args.reread], http_url)
                print(f"  reread: {out['reread']}", flush=True)


async def drop_cached_audio(store: RedisStore, timeout_s: float = 300.0) -> int:
    """Once the persister has caught up, delete every audio key from Redis: what is asked for
    next can only come from the durable store."""
    # Polled: the daemon is a subprocess, this tool has no event to wait on.
    for _ in range(int(timeout_s / 0.05)):
        if not int(await store.execute("XLEN", Keys.PERSIST)):
            break
        await trio.sleep(0.05)
    else:
        raise RuntimeError(f"the persister did not catch up within {timeout_s} s")
    dropped = 0
    cursor = b"0"
    while True:
        cursor, keys = await store.execute(
            "SCAN", cursor, "MATCH", Keys.AUDIO_PREFIX + "*", "COUNT", 1000
        )
        if keys:
            dropped += int(await store.execute("DEL", *keys))
        if cursor in (b"0", 0, "0"):
            return dropped


async def measure_reread(
    store: RedisStore, work: list[tuple[Listener, str, int]], http_url: str
) -> dict[str, Any]:
    """The burst's blocks asked for again once they are only in the store: over the WebSocket
    (each listener re-requests its blocks under a new document id; ms from the request to the
    block's ``cached`` frame), then over HTTP (GET each audio URL, 8 at a time)."""
    import httpx

    await drop_cached_audio(store)
    by_listener: dict[int, tuple[Listener, list[tuple[str, int]]]] = {}
    for listener, d, idx in work:
        by_listener.setdefault(id(listener), (listener, []))[1].append((d, idx))
    latencies: list[float] = []
    t_start = time.perf_counter()
    last = t_start

    async def reask(listener: Listener, blocks: list[tuple[str, int]]) -> None:
        nonlocal last
        texts: dict[str, list[str]] = {}
        for start in range(0, len(blocks), 64):
            chunk = blocks[start : start + 64]
            t0 = time.perf_counter()
            for d in {d for d, _ in chunk}:
                n = max(i for dd, i in blocks if dd == d) + 1
                texts.setdefault(d, texts_for(d, n))
                frame = {
                    "type": "synthesize",
                    "document_id": f"{d}-re",
                    "model": MODEL,
                    "blocks": [{"idx": i, "text": texts[d][i]} for dd, i in chunk if dd == d],
                }
                await listener.ws.send_message(json.dumps(frame))
            for d, i in chunk:
                t1 = await listener.wait_for((f"{d}-re", i, "cached"), timeout_s=120)
                latencies.append((t1 - t0) * 1000)
                last = max(last, t1)

    async with trio.open_nursery() as nursery:
        for listener, blocks in by_listener.values():
            nursery.start_soon(reask, listener, blocks)
    elapsed = last - t_start
    ws = {
        "blocks": len(latencies),
        "elapsed_s": round(elapsed, 3),
        "blocks_per_s": round(len(latencies) / elapsed, 1) if elapsed > 0 else None,
        "ms": summary(latencies),
    }
    # Over HTTP, from the store again (the re-read put the audio back into Redis).
    await drop_cached_audio(store)
    urls = [listener.urls[(f"{d}-re", idx)] for listener, d, idx in work]
    http_ms: list[float] = []
    limiter = trio.CapacityLimiter(8)
    failures = 0

    async def get(client: Any, url: str) -> None:
        nonlocal failures
        async with limiter:
            t0 = time.perf_counter()
            response = await client.get(url)
            http_ms.append((time.perf_counter() - t0) * 1000)
            if response.status_code != 200:
                failures += 1

    t_start = time.perf_counter()
    async with (
        httpx.AsyncClient(base_url=http_url, timeout=60) as client,
        trio.open_nursery() as nursery,
    ):
        for url in urls:
            nursery.start_soon(get, client, url)
    elapsed = time.perf_counter() - t_start
    http = {
        "blocks": len(http_ms),
        "failures": failures,
        "elapsed_s": round(elapsed, 3),
        "blocks_per_s": round(len(http_ms) / elapsed, 1) if elapsed > 0 else None,
        "ms": summary(http_ms),
    }
    return {"ws": ws, "http": http}


def _bench_token(pg_url: str) -> str:
    """Migrate and create the benchmark's user; its token."""
    return setup_database(pg_url, ["bench"], "unlimited")[0][1]


def write_daemon_config(path: Path, workdir: Path, redis_url: str, pg_url: str, args: Any) -> None:
    """One configuration per kind, production defaults but these: ``daemon-split.toml`` (the
    durable audio store and its persister on, as by default), ``daemon-split_nopersist.toml`` and
    ``daemon-baseline.toml`` (off: audio in Redis only, as the baseline stores it)."""
    for kind, audio in (("split", True), ("split_nopersist", False), ("baseline", False)):
        write_config(
            path.with_name(f"daemon-{kind}.toml"),
            workdir,
            quick=False,
            gateway={"rate_limit_blocks_per_min": 1000000, "max_frames_per_s": 100000},
            redis={"url": redis_url},
            postgres={"url": pg_url},
            hot={"concurrency": args.concurrency},
            workers={"simulated": 0, "visibility_timeout_s": 3600},
            log={"events_path": str(workdir / "events.jsonl")},
            audio={"enabled": audio, "dir": str(workdir / "audio")},
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=int, default=1000, help="results in the burst")
    p.add_argument("--single", type=int, default=200, help="results pushed one at a time")
    p.add_argument("--audio-bytes", type=int, default=60_000, help="audio bytes per result")
    p.add_argument("--clients", type=int, default=8, help="WebSocket listeners")
    p.add_argument("--concurrency", type=int, default=40, help="hot.concurrency of both daemons")
    p.add_argument("--rtt", type=int, default=500, help="PINGs for redis_rtt_ms")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline daemon")
    p.add_argument("--profile", metavar="DIR", help="py-spy the daemons' bursts into DIR")
    p.add_argument("--workdir", help="make the temporary directory here (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    p.add_argument(
        "--reread", type=int, default=1000, help="blocks re-read from the store (0: skip)"
    )
    p.add_argument(
        "--no-persister-compare",
        action="store_true",
        help="skip the second split run with the persister off",
    )
    p.add_argument(
        "--serve", choices=["split", "split_nopersist", "baseline"], help=argparse.SUPPRESS
    )
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        trio.run(serve, args.serve, args.config)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="bench-hot-", dir=args.workdir))
    out: dict[str, Any] = {}
    try:
        run_all(args, workdir, out)
    finally:
        if args.keep:
            print(f"  kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(out, args)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def run_all(args: argparse.Namespace, workdir: Path, out: dict[str, Any]) -> None:
    from daemon.embedded import EmbeddedServers

    with EmbeddedServers(workdir / "servers") as servers:
        assert servers.redis is not None and servers.postgres is not None
        redis_url, pg_url = servers.redis.url, servers.postgres.url
        token = _bench_token(pg_url)
        redis_pid = servers.redis.pid() or 0
        config_path = workdir / "daemon.toml"
        write_daemon_config(config_path, workdir, redis_url, pg_url, args)

        async def bare() -> None:
            async with trio_asyncio.open_loop(), open_redis(redis_url) as store:
                rtt, wire = await measure_rtt(store, args.rtt)
                out["redis_rtt_ms"], out["redis_rtt_asyncio_ms"] = rtt, wire
                out["floor_ms"] = await measure_floor(store, args.single, args.audio_bytes)
            print(f"  redis_rtt_ms {out['redis_rtt_ms']}  floor_ms {out['floor_ms']}")

        async def kind(k: str) -> None:
            async with trio_asyncio.open_loop():
                await run_kind(k, args, config_path, workdir, redis_url, redis_pid, token, out)

        trio.run(bare)
        trio.run(kind, "split")
        if not args.no_persister_compare:
            trio.run(kind, "split_nopersist")
        if not args.no_baseline:
            trio.run(kind, "baseline")


def build_report(out: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rtt = out["redis_rtt_ms"]
    single = out.get("single", {})
    split = out["burst_split"]
    baseline = out.get("burst_baseline")

    def per_result(burst: dict[str, Any]) -> dict[str, Any]:
        ms = 1000 / burst["results_per_s"]
        return {
            "wall_ms": round(ms, 3),
            "wall_in_rtts": round(ms / rtt["p50"], 2),
            "daemon_cpu_ms": round(burst["cpu_s"]["daemon"] * 1000 / burst["results"], 3),
            "redis_cpu_ms": round(burst["cpu_s"].get("redis", 0) * 1000 / burst["results"], 3),
        }

    floor = out["floor_ms"]
    report: dict[str, Any] = {
        "redis_rtt_ms": rtt,
        "redis_rtt_asyncio_ms": out["redis_rtt_asyncio_ms"],
        "single": {
            "results": single.get("results", 0),
            "notify_ms": single.get("notify_ms"),
            "floor_ms": floor,
            "p99_over_floor": (
                round(single["notify_ms"]["p99"] / floor["p99"], 2) if single else None
            ),
            "p50_over_floor": (
                round(single["notify_ms"]["p50"] / floor["p50"], 2) if single else None
            ),
            "p50_in_rtts": round(single["notify_ms"]["p50"] / rtt["p50"], 1) if single else None,
        },
        "burst": {
            "results": split["results"],
            "results_per_s": split["results_per_s"],
            "notify_ms": split["notify_ms"],
            "first_ms": split["first_ms"],
            "elapsed_s": split["elapsed_s"],
            "per_result": per_result(split),
            "cpu_s": split["cpu_s"],
            "baseline_results_per_s": baseline["results_per_s"] if baseline else None,
            "baseline_notify_ms": baseline["notify_ms"] if baseline else None,
            "baseline_per_result": per_result(baseline) if baseline else None,
            "ratio": (
                round(split["results_per_s"] / baseline["results_per_s"], 2) if baseline else None
            ),
        },
        "persister": persister_report(out),
        "reread": out.get("reread"),
        "params": {
            "reread": args.reread,
            "results": args.results,
            "single": args.single,
            "audio_bytes": args.audio_bytes,
            "clients": args.clients,
            "concurrency": args.concurrency,
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),
        },
    }
    return report


def persister_report(out: dict[str, Any]) -> dict[str, Any] | None:
    """With / without the persister, from the same run: the burst's results/s and the single
    results' p99 and p50 (the target: within 10 %, i.e. ratios 0.9..1.1)."""
    off = out.get("burst_split_nopersist")
    if off is None:
        return None
    on = out["burst_split"]
    single_on, single_off = out.get("single"), out.get("single_split_nopersist")
    report: dict[str, Any] = {
        "burst_results_per_s": on["results_per_s"],
        "burst_results_per_s_without": off["results_per_s"],
        "burst_ratio": round(on["results_per_s"] / off["results_per_s"], 3),
    }
    if single_on and single_off:
        p_on, p_off = single_on["notify_ms"], single_off["notify_ms"]
        report.update(
            single_p99_ms=p_on["p99"],
            single_p99_ms_without=p_off["p99"],
            single_p99_ratio=round(p_on["p99"] / p_off["p99"], 3),
            single_p50_ratio=round(p_on["p50"] / p_off["p50"], 3),
        )
    return report


def print_table(r: dict[str, Any]) -> None:
    s, b = r["single"], r["burst"]
    rtt = r["redis_rtt_ms"]
    rows = [
        ("redis_rtt_ms (PING, same client)", f"p50 {rtt['p50']}  p99 {rtt['p99']}", ""),
        (
            "floor_ms (LPUSH,BLMOVE,SET,PUBLISH)",
            f"p50 {s['floor_ms']['p50']}  p99 {s['floor_ms']['p99']}",
            "",
        ),
    ]
    if s["notify_ms"]:
        rows.append(
            (
                "single: push → cached frame, ms",
                f"p50 {s['notify_ms']['p50']}  p99 {s['notify_ms']['p99']}",
                f"p99/floor {s['p99_over_floor']}  p50 = {s['p50_in_rtts']} RTT",
            )
        )
    pr = b["per_result"]
    rows.append(
        (
            f"burst of {b['results']}: results/s",
            f"{b['results_per_s']}",
            f"baseline {b['baseline_results_per_s']}  ratio {b['ratio']}",
        )
    )
    rows.append(
        (
            "burst: push → cached frame, ms",
            f"p50 {b['notify_ms']['p50']}  p99 {b['notify_ms']['p99']}",
            f"first {b['first_ms']}",
        )
    )
    rows.append(
        (
            "burst: per result",
            f"{pr['wall_ms']} ms = {pr['wall_in_rtts']} RTT",
            f"daemon CPU {pr['daemon_cpu_ms']} ms, Redis CPU {pr['redis_cpu_ms']} ms",
        )
    )
    if b["baseline_per_result"]:
        bp = b["baseline_per_result"]
        rows.append(
            (
                "baseline: per result",
                f"{bp['wall_ms']} ms = {bp['wall_in_rtts']} RTT",
                f"daemon CPU {bp['daemon_cpu_ms']} ms, Redis CPU {bp['redis_cpu_ms']} ms",
            )
        )
    pc = r.get("persister")
    if pc:
        rows.append(
            (
                "persister on / off: burst results/s",
                f"{pc['burst_results_per_s']} / {pc['burst_results_per_s_without']}",
                f"ratio {pc['burst_ratio']} (target 0.9..1.1)",
            )
        )
        if "single_p99_ratio" in pc:
            rows.append(
                (
                    "persister on / off: single p99, ms",
                    f"{pc['single_p99_ms']} / {pc['single_p99_ms_without']}",
                    f"ratio {pc['single_p99_ratio']} (p50 ratio {pc['single_p50_ratio']})",
                )
            )
    rr = r.get("reread")
    if rr:
        for via in ("ws", "http"):
            x = rr[via]
            rows.append(
                (
                    f"re-read of {x['blocks']} from the store ({via})",
                    f"{x['blocks_per_s']} blocks/s",
                    f"p50 {x['ms']['p50']} ms  p99 {x['ms']['p99']} ms",
                )
            )
    width = max(len(a) for a, _, _ in rows)
    print()
    for a, v, extra in rows:
        print(f"{a:<{width}}  {v:<30} {extra}")
    p = r["params"]
    print(f"\n(load average {p['load_avg_1m']} on {p['cpus']} CPUs when done; figures provisional)")


if __name__ == "__main__":
    sys.exit(main())
