#!/usr/bin/env python3
"""Gateway benchmark: ``synthesize`` → first status, with many connections at once.

Starts its own embedded Redis and PostgreSQL in a temporary directory, creates users, and runs two
daemons in this process, one after the other, on the same servers and users:

- **postgres_checked**: the request path before holds (``tools/baseline_gateway.py``): the token
  looked up in Postgres (cached 60 s) and every ``synthesize`` reading the allowance on the
  request pool before ``enqueue.lua``;
- **redis_only**: the daemon as shipped: tokens and entitlements from Redis, holds in
  ``enqueue.lua`` (docs/billing.md), no Postgres on the request path.

For each it measures:

- **single**: one connection sending requests one after another (the same request shape);
- **load**: ``--connections`` authenticated connections (loopback) that each send one request at
  the same moment, ``--rounds`` times (a burst of that many ``synthesize`` at once).

Each request is one sentence-sized block with a text never seen before (so every request creates a
job and a hold). The billing path is idle: no workers run, so nothing is finalized or billed
during the measurement.
``pool_wait_ms`` is every observation of the daemon's ``tts_request_pool_wait_seconds`` histogram
during the phase (the histogram's ``observe`` is tapped). Figures are stated as ratios to the
baseline measured in the same run; the client runs in the same process (and on the same cores) as
the daemon, so absolute figures include the client's own work.

    python tools/bench_gateway.py [--connections 200] [--rounds 3] [--json PATH]
    python tools/bench_gateway.py --connections 4 --users 2 --rounds 1 --baseline-requests 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.config import Config
from daemon.embedded import EmbeddedServers
from daemon.runtime.daemon import Daemon, open_daemon
from daemon.runtime.services import build_services
from daemon.testing.client import WsClient, connect
from daemon.testing.config import make_config
from daemon.testing.figures import summary, tap
from daemon.testing.stores import setup_database
from tools.baseline_gateway import baseline_services

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the riverbank",
    "She sells sea shells by the sea shore every summer morning",
    "A journey of a thousand miles begins with a single step forward",
    "Reading aloud helps the words stay with you a little longer",
]


class Tap:
    """Every observation of a histogram, kept while ``on``."""

    def __init__(self, histogram: Any) -> None:
        self.values: list[float] = []
        self.on = False
        tap(histogram, self._record)

    def _record(self, seconds: float) -> None:
        if self.on:
            self.values.append(seconds * 1000.0)

    def take(self) -> list[float]:
        values, self.values = self.values, []
        return values


def bench_config(root: Path, args: argparse.Namespace) -> Config:
    return make_config(
        root,
        quick=False,
        gateway={
            "rate_limit_blocks_per_min": 1_000_000,
            "max_connections": max(2000, args.connections + 10),
            "max_connections_per_user": args.connections,
            "send_queue_frames": 512,
            "max_frames_per_s": 100_000,
        },
        postgres={"request_pool_size": args.pool_size},
        workers={"simulated": 0},
    )


async def create_users(pg_url: str, n: int) -> list[str]:
    """Users on a plan without limits; both daemons copy them into Redis at their start."""
    names = [f"bench-{i}" for i in range(n)]
    users = await trio.to_thread.run_sync(setup_database, pg_url, names, "unlimited")
    return [token for _, token in users]


class Texts:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"{SENTENCES[self.n % len(SENTENCES)]}, request number {self.n}."


async def one_request(ws: WsClient, doc: str, idx: int, text: str) -> float:
    """Send one synthesize; milliseconds until its first status."""
    t0 = time.perf_counter()
    await ws.synthesize(doc, {idx: text})
    while True:
        reply = await ws.receive(math.inf)
        if reply.get("type") == "status" and reply["block_idx"] == idx:
            return (time.perf_counter() - t0) * 1000.0
        if reply.get("type") == "error":
            raise RuntimeError(f"request refused: {reply}")


async def baseline(url: str, token: str, n: int, texts: Texts) -> list[float]:
    acks = []
    async with connect(url, token, keep_frames=False) as ws:
        for i in range(n):
            acks.append(await one_request(ws, "baseline", i, texts()))
    return acks


async def burst(
    url: str, tokens: list[str], connections: int, rounds: int, texts: Texts, tap: Tap
) -> dict[str, Any]:
    """``connections`` clients, all connected first; then ``rounds`` bursts (all at once)."""
    acks: list[list[float]] = [[] for _ in range(rounds + 1)]
    connect_ms: list[float] = []
    connected = 0
    all_connected = trio.Event()
    go = [trio.Event() for _ in range(rounds + 1)]
    done = [0] * (rounds + 1)
    round_done = [trio.Event() for _ in range(rounds + 1)]

    async def client(i: int) -> None:
        nonlocal connected
        token = tokens[i % len(tokens)]
        t0 = time.perf_counter()
        async with connect(url, token, keep_frames=False) as ws:
            connect_ms.append((time.perf_counter() - t0) * 1000.0)
            connected += 1
            if connected == connections:
                all_connected.set()
            for r in range(rounds + 1):
                await go[r].wait()
                acks[r].append(await one_request(ws, f"doc-{i}", r, texts()))
                done[r] += 1
                if done[r] == connections:
                    round_done[r].set()

    pool_waits: list[float] = []
    burst_s = 0.0
    async with trio.open_nursery() as nursery:
        for i in range(connections):
            nursery.start_soon(client, i)
        await all_connected.wait()
        for r in range(rounds + 1):  # round 0 warms up (pool connections, caches): not counted
            await trio.sleep(0.2)
            tap.take()
            tap.on = r > 0
            t0 = time.perf_counter()
            go[r].set()
            await round_done[r].wait()
            if r > 0:
                burst_s += time.perf_counter() - t0
            tap.on = False
            pool_waits.extend(tap.take())
    return {
        "acks": [a for r in acks[1:] for a in r],
        "pool_waits": pool_waits,
        "connect_ms": connect_ms,
        "burst_s": burst_s,
    }


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    servers = EmbeddedServers(root / "servers")
    await trio.to_thread.run_sync(servers.__enter__)
    try:
        assert servers.redis is not None and servers.postgres is not None
        redis_url, pg_url = servers.redis.url, servers.postgres.url
        await trio.to_thread.run_sync(setup_database, pg_url, [])  # the schema
        tokens = await create_users(pg_url, args.users)
        out: dict[str, Any] = {}
        with trio.fail_after(args.timeout):
            for name, services in (
                ("postgres_checked", baseline_services),
                ("redis_only", build_services),
            ):
                cfg = bench_config(root / name, args)
                async with open_daemon(cfg, redis_url, pg_url, services=services) as daemon:
                    out[name] = await measure(args, daemon, tokens)
        old, new = out["postgres_checked"], out["redis_only"]
        out["improvement"] = {
            "ack_p50": round(old["ack_ms"]["p50"] / new["ack_ms"]["p50"], 2),
            "ack_p99": round(old["ack_ms"]["p99"] / new["ack_ms"]["p99"], 2),
            "throughput": round(new["throughput_rps"] / old["throughput_rps"], 2),
        }
        out["provisional"] = True
        return out
    finally:
        await trio.to_thread.run_sync(servers.close)


async def measure(args: argparse.Namespace, daemon: Daemon, tokens: list[str]) -> dict[str, Any]:
    assert daemon.addresses is not None
    url = daemon.addresses.ws_url
    tap = Tap(daemon.metrics.request_pool_wait_seconds)
    texts = Texts()

    await baseline(url, tokens[0], 10, texts)  # warm-up
    tap.take()
    tap.on = True
    base_acks = await baseline(url, tokens[0], args.baseline_requests, texts)
    tap.on = False
    base_waits = tap.take()

    load = await burst(url, tokens, args.connections, args.rounds, texts, tap)
    throughput = len(load["acks"]) / max(load["burst_s"], 1e-9)
    base = {"ack_ms": summary(base_acks), "pool_wait_ms": summary(base_waits)}
    ack = summary(load["acks"])
    return {
        "connections": args.connections,
        "users": args.users,
        "rounds": args.rounds,
        "requests": len(load["acks"]),
        "ack_ms": ack,
        "pool_wait_ms": summary(load["pool_waits"]),
        "connect_ms": summary(load["connect_ms"]),
        "throughput_rps": round(throughput, 1),
        "baseline": {"connections": 1, "requests": len(base_acks), **base},
        "ratio": {
            "ack_p50": round(ack["p50"] / base["ack_ms"]["p50"], 2),
            "ack_p99": round(ack["p99"] / base["ack_ms"]["p99"], 2),
        },
        "params": {
            "request_pool_size": args.pool_size,
            "billing": "idle (no workers: nothing finalized or billed)",
            "client": "same process as the daemon",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
            "python": sys.version.split()[0],
        },
    }


def table(both: dict[str, Any]) -> str:
    parts = []
    for name in ("postgres_checked", "redis_only"):
        parts += [f"{name}:", _table(both[name]), ""]
    imp = both["improvement"]
    parts.append(
        f"redis_only vs postgres_checked: ack p99 {imp['ack_p99']}x lower, "
        f"ack p50 {imp['ack_p50']}x lower, burst throughput x{imp['throughput']}"
    )
    return "\n".join(parts)


def _table(result: dict[str, Any]) -> str:
    rows = [
        ("phase", "connections", "requests", "ack p50 ms", "ack p99 ms", "pool wait p50", "p99"),
        (
            "single",
            "1",
            str(result["baseline"]["requests"]),
            f"{result['baseline']['ack_ms']['p50']:.2f}",
            f"{result['baseline']['ack_ms']['p99']:.2f}",
            f"{result['baseline']['pool_wait_ms']['p50']:.3f}",
            f"{result['baseline']['pool_wait_ms']['p99']:.3f}",
        ),
        (
            "burst",
            str(result["connections"]),
            str(result["requests"]),
            f"{result['ack_ms']['p50']:.2f}",
            f"{result['ack_ms']['p99']:.2f}",
            f"{result['pool_wait_ms']['p50']:.3f}",
            f"{result['pool_wait_ms']['p99']:.3f}",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        f"burst / baseline: ack p50 ×{result['ratio']['ack_p50']}, "
        f"ack p99 ×{result['ratio']['ack_p99']}   "
        f"(burst throughput {result['throughput_rps']} requests/s, "
        f"connect p50 {result['connect_ms']['p50']:.1f} ms, "
        f"load avg {result['machine']['loadavg_1m_at_end']} on {result['machine']['cpus']} cpus)"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=200, help="concurrent connections (≤ 1000)")
    p.add_argument("--users", type=int, default=20, help="users the connections belong to")
    p.add_argument("--rounds", type=int, default=3, help="bursts measured (after one warm-up)")
    p.add_argument("--baseline-requests", type=int, default=100)
    p.add_argument("--pool-size", type=int, default=30, help="postgres.request_pool_size")
    p.add_argument("--timeout", type=float, default=300.0, help="cap on the whole run, seconds")
    p.add_argument("--json", metavar="PATH", help="write the figures here")
    args = p.parse_args()
    if not 1 <= args.connections <= 1000:
        p.error("--connections must be 1..1000 (loopback load stays bounded)")
    if not 1 <= args.users <= args.connections:
        p.error("--users must be 1..connections")
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        os.chmod(tmp, 0o755)  # the embedded Postgres runs as its own user when we are root
        result = trio.run(run, args, Path(tmp))
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
