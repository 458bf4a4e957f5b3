#!/usr/bin/env python3
"""Engine benchmark: how fast a worker's engine turns blocks into audio (docs/workers.md).

Runs the engine's adapters directly — no Redis, no daemon — so the figure is the engine's own,
the ceiling of what ``tts-worker --engine E --concurrency P`` can deliver. For each process count
P, P adapters (for eSpeak NG: P worker processes, each initialising the library once, started
and warmed up before the clock starts) share a list of sentence-sized blocks and synthesize them
as fast as they can. Reported per P:

* ``blocks_per_s``: blocks finished per second of wall time, all P together, and per worker;
* ``rtf``: real-time factor per worker — seconds spent synthesizing a block / seconds of audio it
  made (below 1: faster than real time); ``audio_s_per_s``: seconds of audio made per second of
  wall time, all P together;
* ``block_ms`` p50/p99: one block's synthesis, as the worker loop waits for it.

    .venv/bin/python tools/bench_engine.py                        # espeak, P = 1 and 2
    .venv/bin/python tools/bench_engine.py --processes 1 2 4 --blocks 400 --json var/engine.json
    .venv/bin/python tools/bench_engine.py --engine simulated --blocks 50

The machine may be shared: run it on a quiet one for figures (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.config import WorkersConfig
from daemon.contracts import Job
from daemon.workers.engines import ENGINES, make_adapters

WORDS = [
    "the",
    "a",
    "reader",
    "block",
    "sentence",
    "voice",
    "quiet",
    "morning",
    "river",
    "window",
    "story",
    "evening",
    "garden",
    "letter",
    "station",
    "mountain",
    "question",
    "answer",
    "journey",
    "kitchen",
    "daylight",
    "thunder",
    "harbour",
    "village",
    "lantern",
    "carefully",
    "slowly",
    "almost",
    "never",
    "always",
    "suddenly",
    "together",
    "again",
    "tomorrow",
    "perhaps",
    "really",
]


def corpus(n: int, seed: int) -> list[str]:
    """``n`` sentence-sized blocks, 40 to 200 characters, the same for a given seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = rng.randint(40, 200)
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < target:
            words.append(rng.choice(WORDS))
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice(".!?"))
    return out


def _job(text: str, voice: str) -> Job:
    return Job(uuid.uuid4().hex, uuid.uuid4().hex, "kokoro", voice, text, 1, "bench", 0, 1.0, 0.0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_level(engine: str, processes: int, texts: list[str], voice: str) -> dict[str, Any]:
    adapters = make_adapters(engine, WorkersConfig(), processes)
    # Warm-up: every worker process started and its library initialised before the clock starts.
    async with trio.open_nursery() as nursery:
        for adapter in adapters:
            nursery.start_soon(adapter.synthesize, _job("Warming up.", voice))
    todo = list(reversed(texts))
    block_s: list[float] = []
    audio_s: list[float] = []

    async def worker(adapter: Any) -> None:
        while todo:
            text = todo.pop()
            t0 = time.perf_counter()
            out = await adapter.synthesize(_job(text, voice))
            block_s.append(time.perf_counter() - t0)
            audio_s.append(out.duration_ms / 1000.0)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for adapter in adapters:
            nursery.start_soon(worker, adapter)
    wall = time.perf_counter() - t0
    rtfs = [b / a for b, a in zip(block_s, audio_s, strict=True) if a > 0]
    return {
        "engine": engine,
        "processes": processes,
        "blocks": len(block_s),
        "chars_per_block": round(statistics.fmean(len(t) for t in texts), 1),
        "wall_s": round(wall, 3),
        "blocks_per_s": round(len(block_s) / wall, 2),
        "blocks_per_s_per_worker": round(len(block_s) / wall / processes, 2),
        "audio_s_per_s": round(sum(audio_s) / wall, 1),
        "rtf_p50": round(statistics.median(rtfs), 4),
        "rtf_mean": round(sum(block_s) / sum(audio_s), 4),
        "block_ms_p50": round(_percentile(block_s, 0.5) * 1000, 2),
        "block_ms_p99": round(_percentile(block_s, 0.99) * 1000, 2),
        "audio_s_per_block": round(statistics.fmean(audio_s), 2),
    }


async def run_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    texts = corpus(args.blocks, args.seed)
    return [await run_level(args.engine, p, texts, args.voice) for p in args.processes]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=ENGINES, default="espeak")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="worker counts")
    p.add_argument("--blocks", type=int, default=200, help="blocks per worker count")
    p.add_argument("--voice", default="af_heart", help="a catalog voice")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)
    if args.blocks < 1 or any(n < 1 for n in args.processes):
        p.error("--blocks and --processes must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = trio.run(run_bench, args)
    header = (
        "engine", "processes", "blocks", "blocks_per_s", "blocks_per_s_per_worker",
        "rtf_p50", "rtf_mean", "audio_s_per_s", "block_ms_p50", "block_ms_p99",
    )  # fmt: skip
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
