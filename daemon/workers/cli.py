"""``tts-worker``: run synthesis workers against a Redis, with any adapter.

    tts-worker --redis-url redis://127.0.0.1:6379/0 --adapter mypkg.gpu:KokoroAdapter
    tts-worker --redis-url ... --engine espeak --concurrency 2
    tts-worker --redis-url ... --simulated --concurrency 4 --batch 8

An adapter is a class (or factory) taking no arguments whose instances have
``async def synthesize(job) -> Synthesized`` (see ``daemon.workers.worker``). Workers need only
Redis; SIGINT/SIGTERM let each worker finish the job in hand, then exit (a second signal exits at
once: the daemon's visibility scanner requeues what was held).

Exit status: 0 stopped by a signal; 1 a failure at run time; 2 a bad command line (an adapter that
cannot be loaded included).
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

from daemon.config import WorkersConfig
from daemon.contracts import MODELS
from daemon.stores.bridge import open_bridge
from daemon.stores.redis import open_redis
from daemon.workers.engines import ENGINES, make_adapters
from daemon.workers.worker import DEFAULT_LEASE_S, run_worker

__all__ = ["load_adapter", "main"]


def load_adapter(spec: str) -> Any:
    """``module:attribute`` → an adapter instance. Raises ValueError with a readable reason."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--adapter must be module:attribute, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise ValueError(f"--adapter {spec}: cannot import {module_name}: {exc}") from None
    except AttributeError:
        raise ValueError(f"--adapter {spec}: {module_name} has no {attr}") from None
    adapter = factory()
    if not callable(getattr(adapter, "synthesize", None)) and not callable(
        getattr(adapter, "synthesize_batch", None)
    ):
        raise ValueError(f"--adapter {spec}: has no synthesize(job) method")
    return adapter


async def _run(args: argparse.Namespace, adapters: list[Any]) -> None:
    stopping = trio.Event()

    def report(message: str, detail: dict[str, Any]) -> None:
        print(f"tts-worker: asyncio: {message} {detail}", file=sys.stderr, flush=True)

    async with open_bridge(report), open_redis(args.redis_url) as store:
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
                                lease_s=args.lease_s,
                            )
                        )
                    print(
                        f"tts-worker: {len(adapters)} worker(s) on {' '.join(args.models)}",
                        flush=True,
                    )
                # Every worker returned: stopping was set and each finished its job in hand.
                outer.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tts-worker", description=__doc__.split("\n")[0])
    p.add_argument("--redis-url", required=True)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--concurrency", type=int, default=1, help="worker loops in this process")
    p.add_argument("--worker-id", default=f"{socket.gethostname()}")
    p.add_argument(
        "--lease-s",
        type=float,
        default=DEFAULT_LEASE_S,
        help="lease on the jobs in hand, renewed every third of it (docs/workers.md)",
    )
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--adapter", help="module:attribute of an adapter class or factory")
    group.add_argument("--engine", choices=ENGINES, help="a built-in engine (docs/workers.md)")
    group.add_argument("--simulated", action="store_true", help="the same as --engine simulated")
    sim = p.add_argument_group("simulated adapter")
    sim.add_argument("--chars-per-s", type=float, default=2000.0, help="synthesis speed")
    sim.add_argument("--latency-ms", type=float, default=20.0, help="fixed cost per job/batch")
    sim.add_argument("--jitter-ms", type=float, default=10.0, help="random extra, up to this")
    sim.add_argument("--batch", type=int, default=1, help="jobs finished together")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    if not 0.1 <= args.lease_s <= 3600:
        p.error("--lease-s must be 0.1..3600")
    if args.simulated:
        args.engine = "simulated"
    if args.engine == "simulated":
        if args.chars_per_s <= 0 or args.latency_ms < 0 or args.jitter_ms < 0:
            p.error("--chars-per-s must be > 0, --latency-ms and --jitter-ms >= 0")
        if not 1 <= args.batch <= 256:
            p.error("--batch must be 1..256")
        cfg = WorkersConfig(
            chars_per_s=args.chars_per_s,
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
            batch=args.batch,
        )
        adapters: list[Any] = make_adapters("simulated", cfg, args.concurrency)
    elif args.engine is not None:
        try:
            adapters = make_adapters(args.engine, WorkersConfig(), args.concurrency)
        except Exception as exc:
            p.error(f"--engine {args.engine}: {exc}")
    else:
        try:
            adapters = [load_adapter(args.adapter) for _ in range(args.concurrency)]
        except Exception as exc:
            p.error(str(exc))
    try:
        trio.run(_run, args, adapters)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print(f"tts-worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
