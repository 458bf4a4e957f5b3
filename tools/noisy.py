"""The noisy-neighbour scenario of ``tools/stress.py --scenario noisy``: one user floods the queue,
several readers read along; how long does a reader wait for each block's audio?

Three runs on fresh servers, the same seed and the same workers (``--workers`` simulated GPU
workers finishing batches of ``--batch``, run beside the daemon as ``tts-worker`` would be):

- ``quiet``: the readers alone — their audio latency with idle workers;
- ``fair``: the flood and the readers, workers pulling with the shipped ``pull.lua``;
- ``fifo``: the same, workers pulling in enqueue order (the pull before fair scheduling,
  ``ZPOPMIN`` on ``tts:queue:{model}``, kept here as the baseline).

Each reader asks for one block of its document every ``--read-interval-s`` (a person reading one
sentence after another) and records the time from its ``synthesize`` to the block's ``cached``.
The flood asks for ``--flood`` blocks at once, in requests of 16, right after the readers start.
Reported per run: the readers' audio latency p50/p99/max, and how long the flood took to drain.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import open_websocket_url

from daemon.config import Config, config_from_dict
from daemon.contracts import Keys
from daemon.embedded import EmbeddedServers
from daemon.runtime.daemon import open_daemon
from daemon.runtime.services import Deps, build_services
from daemon.runtime.supervisor import ServiceSpec
from daemon.testing.figures import summary
from daemon.testing.options import add_param_options, params_from
from daemon.workers.simulated import SimulatedAdapter
from daemon.workers.worker import run_worker

# The pull before fair scheduling: the lowest enqueue time first.
FIFO_PULL = """
for _ = 1, 100 do
  local popped = redis.call('ZPOPMIN', KEYS[1])
  if #popped == 0 then return false end
  local job_id = popped[1]
  local job = redis.call('HGET', KEYS[3], job_id)
  if job then
    redis.call('ZADD', KEYS[2], tts_now(), job_id)
    local ok, j = pcall(cjson.decode, job)
    if ok and type(j) == 'table' and j['variant_hash'] then
      tts_notify(ARGV[1] .. j['variant_hash'], ARGV[2], j['variant_hash'],
                 {type = 'status', status = 'processing', model = j['model'], voice = j['voice']})
    end
    return job
  end
end
return false
"""


@attrs.frozen
class NoisyParams:
    readers: int = 4
    flood: int = 640
    workers: int = 1
    batch: int = 16
    read_interval_s: float = 0.4
    duration_s: float = 12.0
    chars_per_s: float = 4000.0
    latency_ms: float = 60.0
    seed: int = 7


class FifoPulls:
    """A worker's view of the store whose pull ignores the schedule (the baseline)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        common = (resources.files("daemon.stores") / "lua" / "common.lua").read_text()
        self._script = common + FIFO_PULL

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def pull_job(self, model: str) -> bytes | None:
        keys = [Keys.queue(model), Keys.processing(model), Keys.JOBS]
        return await self._store.execute("EVAL", self._script, len(keys), *keys, *Keys.pull_args())


def fifo_services(cfg: Config, deps: Deps) -> list[ServiceSpec]:
    """The daemon's services with its simulated workers pulling in enqueue order (the baseline)."""
    specs = []
    for spec in build_services(cfg, deps):
        if spec.stage == "workers":
            i = len(specs)
            run = functools.partial(
                run_worker,
                FifoPulls(deps.store),
                SimulatedAdapter(cfg.workers, seed=i),
                models=cfg.workers.models,
                worker_id=f"{deps.instance_id}-fifo-{spec.name}",
                stopping=deps.stopping.workers,
            )
            spec = attrs.evolve(spec, run=run)
        specs.append(spec)
    return specs


def _config(root: Path, p: NoisyParams) -> Any:
    return config_from_dict(
        {
            "data": {"dir": str(root / "data")},
            "gateway": {"ws_port": 0, "http_port": 0, "rate_limit_blocks_per_min": 100_000},
            "ops": {"port": 0},
            "workers": {
                "simulated": p.workers,
                "batch": p.batch,
                "chars_per_s": p.chars_per_s,
                "latency_ms": p.latency_ms,
                "jitter_ms": 0.0,
            },
            "monitor": {"enabled": False},
        }
    )


class _Reader:
    """A WebSocket client of the protocol (docs/protocol.md) that waits for one block's audio."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.cached: set[tuple[str, int]] = set()

    async def synthesize(self, doc: str, blocks: dict[int, str]) -> None:
        frame = {
            "type": "synthesize",
            "document_id": doc,
            "model": "kokoro",
            "blocks": [{"idx": i, "text": text} for i, text in blocks.items()],
        }
        await self.ws.send_message(json.dumps(frame))

    async def until_cached(self, doc: str, idxs: set[int]) -> None:
        while not all((doc, i) in self.cached for i in idxs):
            frame = json.loads(await self.ws.get_message())
            if frame.get("type") == "status" and frame["status"] == "cached":
                self.cached.add((frame["document_id"], frame["block_idx"]))
            elif frame.get("type") == "status" and frame["status"] == "error":
                raise RuntimeError(f"noisy: a block failed: {frame}")


async def _read_along(
    url: str, token: str, name: str, p: NoisyParams, seed: int, out: list[float], until: float
) -> None:
    rng = random.Random(seed)
    async with open_websocket_url(url, extra_headers=[("Authorization", f"Bearer {token}")]) as ws:
        reader = _Reader(ws)
        idx = 0
        await trio.sleep(rng.random() * p.read_interval_s)
        while time.monotonic() < until:
            t0 = time.monotonic()
            text = f"{name} reads sentence {idx}, which nobody else reads ({rng.random():.6f})."
            await reader.synthesize("book", {idx: text})
            with trio.fail_after(120):
                await reader.until_cached("book", {idx})
            out.append((time.monotonic() - t0) * 1000)
            idx += 1
            await trio.sleep(max(0.0, p.read_interval_s - (time.monotonic() - t0)))


async def _flood(url: str, token: str, p: NoisyParams, drained: list[float]) -> None:
    async with open_websocket_url(url, extra_headers=[("Authorization", f"Bearer {token}")]) as ws:
        reader = _Reader(ws)
        t0 = time.monotonic()
        # Read while sending, as a client must: the gateway closes one that lets its statuses
        # pile up (gateway.send_queue_frames).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.until_cached, "flood", set(range(p.flood)))
            for start in range(0, p.flood, 16):
                end = min(p.flood, start + 16)
                text = "Flooded sentence number {} of a very long book."
                await reader.synthesize("flood", {i: text.format(i) for i in range(start, end)})
            nursery.cancel_scope.deadline = trio.current_time() + 600
        if nursery.cancel_scope.cancelled_caught:
            raise RuntimeError("noisy: the flood did not drain within 600 s")
        drained.append(time.monotonic() - t0)


async def run_noisy(mode: str, p: NoisyParams, work: Path) -> dict[str, Any]:
    """One run (``quiet``, ``fair`` or ``fifo``) on fresh embedded servers under ``work``."""
    from daemon.testing.stores import setup_database

    root = work / mode
    root.mkdir(parents=True)
    cfg = _config(root, p)
    with EmbeddedServers(root / "servers") as servers:
        assert servers.redis is not None and servers.postgres is not None
        names = ["flooder"] + [f"reader{i}" for i in range(p.readers)]
        users = await trio.to_thread.run_sync(
            setup_database, servers.postgres.url, names, "unlimited"
        )
        tokens = dict(zip(names, (token for _, token in users), strict=True))
        latencies: list[float] = []
        drained: list[float] = []
        services = fifo_services if mode == "fifo" else build_services
        async with open_daemon(
            cfg, servers.redis.url, servers.postgres.url, services=services
        ) as daemon:
            url = daemon.addresses.ws_url
            until = time.monotonic() + p.duration_s
            async with trio.open_nursery() as load:
                for i in range(p.readers):
                    load.start_soon(
                        _read_along, url, tokens[f"reader{i}"], f"reader{i}", p,
                        p.seed * 100 + i, latencies, until,
                    )  # fmt: skip
                if mode != "quiet":
                    load.start_soon(_flood, url, tokens["flooder"], p, drained)
    return {
        "mode": mode,
        "reader_audio_ms": summary(latencies),
        "flood_drain_s": round(drained[0], 2) if drained else None,
    }


async def compare(p: NoisyParams, say: Any = print) -> dict[str, Any]:
    """The three runs, one after the other; the figures docs/stress.md reports."""
    with tempfile.TemporaryDirectory(prefix="noisy-") as tmp:
        runs = {}
        for mode in ("quiet", "fair", "fifo"):
            say(f"noisy neighbour: {mode} run ({p.duration_s:.0f} s)")
            runs[mode] = await run_noisy(mode, p, Path(tmp))
    quiet = runs["quiet"]["reader_audio_ms"]["p99"] or 1.0
    verdict = {
        mode: round(runs[mode]["reader_audio_ms"]["p99"] / quiet, 2) for mode in ("fair", "fifo")
    }
    return {"params": attrs.asdict(p), "runs": runs, "p99_over_quiet": verdict}


def print_noisy(result: dict[str, Any]) -> None:
    head = ("run", "reader p50", "reader p99", "max", "n", "flood drained")
    print("{:>6} {:>11} {:>11} {:>9} {:>5} {:>14}".format(*head))
    for mode, r in result["runs"].items():
        a = r["reader_audio_ms"]
        drained = "–" if r["flood_drain_s"] is None else f"{r['flood_drain_s']} s"
        cells = (mode, f"{a['p50']} ms", f"{a['p99']} ms", f"{a['max']} ms", a["n"], drained)
        print("{:>6} {:>11} {:>11} {:>9} {:>5} {:>14}".format(*cells))
    ratios = result["p99_over_quiet"]
    print(f"readers' p99 over quiet: fair {ratios['fair']}x, FIFO {ratios['fifo']}x")


def main(argv: list[str]) -> int:
    """``tools/stress.py --scenario noisy [--readers N] [--flood N] ... [--json PATH]``."""
    ap = argparse.ArgumentParser(prog="stress.py --scenario noisy", description=__doc__)
    ap.add_argument("--json", type=Path, help="write the figures (docs/stress.md format)")
    add_param_options(ap, NoisyParams)
    args = ap.parse_args(argv)
    p = params_from(args, NoisyParams)
    result = trio.run(compare, p)
    print_noisy(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    fair, fifo = result["p99_over_quiet"]["fair"], result["p99_over_quiet"]["fifo"]
    return 0 if fair < fifo else 1
