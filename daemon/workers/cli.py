"""``tts-worker``: run synthesis workers against a Redis, with any adapter.

    tts-worker --redis-url redis://127.0.0.1:6379/0 --adapter mypkg.gpu:KokoroAdapter
    tts-worker --redis-url ... --simulated --concurrency 4 --batch 8

An adapter is a class (or factory) taking no arguments whose instances have
``async def synthesize(job) -> Synthesized`` (see ``daemon.workers.worker``). Workers need only
Redis; SIGINT/SIGTERM let each worker finish the job in hand, then exit.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import signal
import socket
import sys
from typing import Any

import trio
import trio_asyncio

from daemon.config import WorkersConfig
from daemon.contracts import MODELS
from daemon.stores.redis import open_redis
from daemon.workers.simulated import SimulatedAdapter
from daemon.workers.worker import run_worker

__all__ = ["main"]


def load_adapter(spec: str) -> Any:
    """``module:attribute`` → an adapter instance."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--adapter must be module:attribute, got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory()


async def _run(args: argparse.Namespace) -> None:
    if args.simulated:
        cfg = WorkersConfig(
            chars_per_s=args.chars_per_s,
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
            batch=args.batch,
        )
        adapters = [SimulatedAdapter(cfg) for _ in range(args.concurrency)]
    else:
        adapters = [load_adapter(args.adapter) for _ in range(args.concurrency)]
    stopping = trio.Event()
    async with trio_asyncio.open_loop(), open_redis(args.redis_url) as store:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as outer:

                async def watch_signals() -> None:
                    async for _ in signals:
                        if stopping.is_set():
                            outer.cancel_scope.cancel()
                            return
                        print("tts-worker: finishing jobs in hand (again to force)", flush=True)
                        stopping.set()

                outer.start_soon(watch_signals)
                async with trio.open_nursery() as workers:
                    for i, adapter in enumerate(adapters):
                        await workers.start(
                            functools.partial(
                                run_worker,
                                store,
                                adapter,
                                models=args.models,
                                worker_id=f"{args.worker_id}-{i}",
                                stopping=stopping,
                            )
                        )
                    print(f"tts-worker: {len(adapters)} worker(s) on {args.models}", flush=True)
                # Every worker returned: stopping was set and each finished its job in hand.
                outer.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tts-worker", description=__doc__.split("\n")[0])
    p.add_argument("--redis-url", required=True)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--concurrency", type=int, default=1, help="worker loops in this process")
    p.add_argument("--worker-id", default=f"{socket.gethostname()}")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--adapter", help="module:attribute of an adapter class or factory")
    group.add_argument("--simulated", action="store_true", help="the simulated adapter (WAV)")
    p.add_argument("--chars-per-s", type=float, default=2000.0)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--jitter-ms", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    try:
        trio.run(_run, args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print(f"tts-worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
