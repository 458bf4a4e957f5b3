#!/usr/bin/env python3
"""Pull cost: the fair ``pull.lua`` with 1, 100 and 10,000 users waiting, against a FIFO pop.

A fresh embedded Redis is filled through the shipped ``enqueue.lua`` (exactly as the gateway
queues jobs: requests of 16 blocks, sentence-sized texts), then drained by the shipped
``pull.lua`` in pipelines of ``--pipeline`` calls, so the figure is Redis's own cost of a pull,
not the round trip. The baseline, in the same run on the same data, is what a pull cost before
fair scheduling: ``ZPOPMIN`` on ``tts:queue:{model}`` plus the same job read and bookkeeping
(``--fifo``: the same script with the schedule empty, which falls back to enqueue order).

A second table holds the users at 100 and grows the queued jobs (1,000 → 100,000): a pull stays
O(log n), so its cost barely moves while the queue grows a hundredfold.

    .venv/bin/python tools/bench_pull.py                     # the tables (about a minute)
    .venv/bin/python tools/bench_pull.py --pulls 2000 --json /tmp/pull.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from daemon.contracts import Job, Keys  # noqa: E402
from daemon.embedded import EmbeddedServers  # noqa: E402
from daemon.stores.redis import SCRIPTS, enqueue_call  # noqa: E402
from daemon.testing.stores import mirror_unlimited  # noqa: E402

MODEL = "kokoro"


def fill(client: redis.Redis, users: int, jobs: int, *, fair: bool) -> None:
    """``jobs`` jobs spread over ``users`` users, 16 a request, through ``enqueue.lua``; without
    ``fair`` the schedule is then dropped (jobs stay queued in enqueue order: the FIFO pull)."""
    enqueue = client.register_script(SCRIPTS["enqueue"])
    per_user = max(1, jobs // users)
    pipe = client.pipeline(transaction=False)
    for user in range(1, users + 1):
        # Unlimited entitlements in the Redis mirror (docs/billing.md): the holds never refuse.
        mirror_unlimited(pipe, user)
    pipe.execute()
    queued = 0
    for start in range(0, per_user, 16):
        for user in range(1, users + 1):
            rows = []
            for idx in range(start, min(per_user, start + 16)):
                text = f"User {user} reads sentence number {idx} of a long document."
                job = Job(
                    uuid.uuid4().hex, f"{user}-{idx}", MODEL, "af_heart", text, user, "doc",
                    idx, 1.0, time.time(),
                )  # fmt: skip
                rows.append((idx, job.variant_hash, job.job_id, len(text), job.to_json()))
            keys, args = enqueue_call(
                user_id=user,
                conn_id="c",
                document_id="doc",
                model=MODEL,
                now=time.time(),
                rate_limit=10**9,
                usage_type="server_kokoro",
                blocks=rows,
            )
            enqueue(keys, args, client=pipe)
            queued += len(rows)
            if len(pipe) >= 200:
                pipe.execute()
    pipe.execute()
    if not fair:
        client.delete(Keys.fair(MODEL), Keys.fair_users(MODEL), Keys.fair_state(MODEL))


def time_pulls(client: redis.Redis, pulls: int, pipeline: int) -> float:
    """Seconds per pull over ``pulls`` pulls (pipelined)."""
    pull = client.register_script(SCRIPTS["pull"])
    keys = Keys.pull_keys(MODEL)
    done = 0
    t0 = time.perf_counter()
    while done < pulls:
        pipe = client.pipeline(transaction=False)
        n = min(pipeline, pulls - done)
        for _ in range(n):
            pull(keys, Keys.pull_args(), client=pipe)
        replies = pipe.execute()
        assert all(r is not None for r in replies), "the queue ran dry: fill more jobs"
        done += n
    return (time.perf_counter() - t0) / pulls


def run(client: redis.Redis, users: int, jobs: int, pulls: int, pipeline: int) -> dict[str, Any]:
    out: dict[str, Any] = {"users": users, "queued": jobs}
    for mode in ("fifo", "fair"):
        client.flushall()
        fill(client, users, jobs, fair=mode == "fair")
        per_pull = time_pulls(client, pulls, pipeline)
        out[f"{mode}_us"] = round(per_pull * 1e6, 1)
        out[f"{mode}_pulls_per_s"] = round(1 / per_pull)
    out["fair_over_fifo"] = round(out["fair_us"] / out["fifo_us"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pulls", type=int, default=5000, help="pulls timed per run")
    p.add_argument("--pipeline", type=int, default=100, help="pulls per round trip")
    p.add_argument("--users", type=int, nargs="+", default=[1, 100, 10000])
    p.add_argument("--jobs", type=int, default=20000, help="jobs queued for the users table")
    p.add_argument("--growth", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp,
        EmbeddedServers(Path(tmp), postgres=False) as servers,
    ):
        assert servers.redis is not None
        client = redis.Redis.from_url(servers.redis.url)
        by_users = []
        for users in args.users:
            jobs = max(args.jobs, users * 2, args.pulls + users)
            by_users.append(run(client, users, jobs, args.pulls, args.pipeline))
        by_size = [
            run(client, 100, max(jobs, args.pulls + 100), args.pulls, args.pipeline)
            for jobs in args.growth
        ]
        client.close()

    head = f"{'users':>7} {'queued':>8} {'fair µs':>8} {'pulls/s':>9} {'FIFO µs':>8} {'ratio':>6}"
    for title, rows in (("users waiting", by_users), ("queued jobs, 100 users", by_size)):
        print(f"\n{title}\n{head}")
        for r in rows:
            print(
                f"{r['users']:>7} {r['queued']:>8} {r['fair_us']:>8} {r['fair_pulls_per_s']:>9} "
                f"{r['fifo_us']:>8} {r['fair_over_fifo']:>6}"
            )
    if args.json:
        params = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(
            json.dumps({"by_users": by_users, "by_size": by_size, "params": params})
        )


if __name__ == "__main__":
    main()
