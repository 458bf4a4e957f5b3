"""Run the daemon for tools/stress.py as its own process: ``split`` (as designed) or ``inline``.

    python tools/stress_daemon.py --arch split --config run.toml --redis-url URL --pg-url URL \
        --samples samples.json

Prints the same "serving ws://… and http://…" line as ``tts-daemon run``; SIGTERM stops it
gracefully. At exit it writes raw samples (seconds) of the request path's pool waits and of the
gateway's own ack time (frame received → statuses queued) to ``--samples``, so the stress tool can
report exact percentiles (the /metrics histograms only have buckets).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.cli import serve_until_signalled
from daemon.config import load_config
from daemon.runtime.daemon import Daemon
from daemon.runtime.services import build_services
from daemon.testing.figures import tap
from tools.inline import inline_services


async def _main(args: argparse.Namespace) -> None:
    cfg = load_config(args.config)
    services = inline_services if args.arch == "inline" else build_services
    daemon = Daemon(cfg, args.redis_url, args.pg_url, services=services)
    samples: list[tuple[float, float]] = []
    gateway_acks: list[tuple[float, float]] = []
    tap(daemon.metrics.request_pool_wait_seconds, lambda s: samples.append((time.time(), s)))
    tap(daemon.metrics.ack_seconds, lambda s: gateway_acks.append((time.time(), s)))
    try:
        await serve_until_signalled(daemon, name=f"stress-daemon {args.arch}")
    finally:
        await trio.Path(args.samples).write_text(
            json.dumps({"pool_wait_s": samples, "gateway_ack_s": gateway_acks})
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=("split", "inline"), required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--pg-url", required=True)
    p.add_argument("--samples", required=True)
    trio.run(_main, p.parse_args())


if __name__ == "__main__":
    main()
