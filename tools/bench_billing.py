#!/usr/bin/env python3
"""Billing throughput: the consumer as designed (batched) against one transaction per event.

For each user count (default 5 and 500) a backlog of billing events (default 10,000:
sentence-sized texts, a mix of kokoro and premium, users spread over every branch of the premium
waterfall) is written to the real ``tts:billing`` stream of a fresh embedded Redis, and drained by
the real billing service (``daemon.billing.consumer.run_billing_consumer``) — its own read loop,
``bill_entries``, its own pool of ``postgres.billing_pool_size`` (2) connections — into a fresh
database (the baseline is the same service given another ``bill_users``):

- **batched**: the consumer as shipped (drain-on-wake up to ``billing.max_batch``, the next batch
  read while the current one bills, users split over the two connections and grouped
  ``billing.users_per_txn`` to a ``tts_bill_batch`` transaction, variants and stats included);
- **unbatched** (the baseline, same run, same stream reads, read-ahead and acknowledgements, same
  two connections): each event in a transaction of its own — variant upsert, ``record_usage``,
  stats — two at once, the way the system this design came from billed.

``drain_s`` is the time from the consumer's start (pool connected) until the last event of the
backlog is billed and acknowledged. After each pair of runs the two databases are compared: every
event billed once, and the same counters and balances for every user (so the baseline did the same
work). Prints a table; ``--json PATH`` writes ``{"runs": [...], "params": {...}}``.

    .venv/bin/python tools/bench_billing.py                      # 10,000 events, 5 and 500 users
    .venv/bin/python tools/bench_billing.py --backlog 2000 --json /tmp/b.json
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
import trio_asyncio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from daemon.billing.consumer import (  # noqa: E402
    BillingConsumer,
    BillingSetup,
    BillUsers,
    run_billing_consumer,
)
from daemon.config import BillingConfig, PostgresConfig  # noqa: E402
from daemon.contracts import BillingEvent, Keys  # noqa: E402
from daemon.contracts.events import BillingProcessed, Event  # noqa: E402
from daemon.embedded import EmbeddedServers  # noqa: E402
from daemon.ops.events import EventLog  # noqa: E402
from daemon.ops.metrics import Metrics  # noqa: E402
from daemon.stores.pg import open_pg_pool  # noqa: E402
from daemon.stores.redis import BillingEntry, RedisStore, open_redis  # noqa: E402
from daemon.testing.unbatched import bill_one  # noqa: E402

WORDS = [
    "the",
    "a",
    "reader",
    "listens",
    "while",
    "chapter",
    "story",
    "evening",
    "river",
    "morning",
    "quietly",
    "across",
    "window",
    "light",
    "garden",
    "voice",
    "paper",
    "letter",
    "station",
    "winter",
    "summer",
    "city",
    "mountain",
    "slowly",
    "carefully",
    "suddenly",
    "remembered",
    "opened",
    "walked",
    "believed",
    "answered",
    "through",
    "between",
    "before",
    "after",
    "because",
    "although",
]


def sentence(rng: random.Random) -> str:
    """A sentence-sized text: 8..30 words, about 40..200 characters."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 30))]
    return " ".join(words).capitalize() + "."


def make_events(n: int, user_ids: Sequence[int], rng: random.Random) -> list[BillingEvent]:
    events = []
    now = time.time()
    for i in range(n):
        premium = rng.random() < 0.3
        text = sentence(rng)
        events.append(
            BillingEvent(
                event_id=uuid.UUID(int=rng.getrandbits(128)).hex,
                user_id=rng.choice(user_ids),
                model="premium" if premium else "kokoro",
                voice="ava" if premium else "af_heart",
                variant_hash=f"{rng.getrandbits(256):064x}",
                text_length=len(text),
                usage_multiplier=2.0 if premium else 1.0,
                duration_ms=len(text) * 66,
                document_id=f"doc-{i % 50}",
                block_idx=i,
                finalized_at=now,
            )
        )
    return events


async def bill_unbatched(
    consumer: BillingConsumer,
    by_user: dict[int, list[tuple[BillingEntry, str]]],
    failed: dict[int, str],
) -> tuple[int, int, int]:
    """The baseline's billing (given to the real consumer as its ``bill_users``): the same
    consumer loop (reads, checks, acknowledgements), but every event billed in a transaction of
    its own, as many at once as the pool has connections."""
    # The checked JSON texts, parsed once more into events (the batched path sends the text).
    events = [BillingEvent.from_json(text) for mine in by_user.values() for _, text in mine]
    limiter = trio.CapacityLimiter(consumer.pg_cfg.billing_pool_size)
    billed = 0
    text_length = 0

    async def one(e: BillingEvent) -> None:
        nonlocal billed, text_length
        async with limiter:
            dup, _ = await consumer.pool.run(
                bill_one,
                e,
                consumer.usage_types[e.model],
                acquire_timeout_s=consumer.pg_cfg.acquire_timeout_s,
            )
        if not dup:
            billed += 1
            text_length += e.text_length

    async with trio.open_nursery() as nursery:
        for e in events:
            nursery.start_soon(one, e)
    return billed, len(events) - billed, text_length


# -- setup -------------------------------------------------------------------------------------

SEED_USERS_SQL = """
INSERT INTO users (id, name) SELECT g, 'bench-' || g FROM generate_series(1, $1) AS g;
"""
# Every branch of the premium waterfall: a quarter of the users each start with plenty of plan
# allowance; plan nearly used up with rollover and purchased left; nearly used up with only
# purchased left; or already in rollover debt.
SEED_SUBS_SQL = """
INSERT INTO subscriptions (user_id, plan, rollover_voice_chars, purchased_voice_chars)
SELECT g, 'plus',
       CASE g % 4 WHEN 1 THEN 2000 WHEN 3 THEN -100 ELSE 0 END,
       CASE g % 4 WHEN 1 THEN 3000 WHEN 2 THEN 4000 ELSE 0 END
  FROM generate_series(1, $1) AS g;
INSERT INTO usage_periods (user_id, period_start, premium_voice_characters)
SELECT g, tts_period_start(), CASE WHEN g % 4 = 0 THEN 0 ELSE 99000 END
  FROM generate_series(1, $1) AS g;
SELECT setval('users_id_seq', $1);
"""


async def admin(url: str, sql: str, *args: Any, fetch: bool = False) -> Any:
    """One statement on a connection of its own, outside any pool under test."""
    import asyncpg

    async def go() -> Any:
        conn = await asyncpg.connect(url)
        try:
            if fetch:
                return list(await conn.fetch(sql, *args))
            return await conn.execute(sql, *args)
        finally:
            await conn.close()

    return await trio_asyncio.aio_as_trio(go)()


def db_url(base: str, name: str) -> str:
    return base.rpartition("/")[0] + "/" + name


async def make_template(base_url: str) -> None:
    await admin(base_url, "DROP DATABASE IF EXISTS bench_tpl")
    await admin(base_url, "CREATE DATABASE bench_tpl")
    async with open_pg_pool(db_url(base_url, "bench_tpl"), size=1, min_size=1) as db:
        await db.migrate()


async def fresh_db(base_url: str, name: str, users: int) -> str:
    await admin(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin(base_url, f'CREATE DATABASE "{name}" TEMPLATE bench_tpl')
    url = db_url(base_url, name)
    for sql in (SEED_USERS_SQL, *SEED_SUBS_SQL.strip().split(";\n")):
        if sql.strip():
            await admin(url, sql.strip().rstrip(";"), users)
    return url


async def fill_stream(store: RedisStore, events: Sequence[BillingEvent]) -> None:
    await store.execute("FLUSHALL")
    await store.execute("XGROUP", "CREATE", Keys.BILLING, Keys.BILLING_GROUP, "0", "MKSTREAM")
    for i in range(0, len(events), 1000):
        chunk = events[i : i + 1000]

        async def add(client: Any, chunk: Sequence[BillingEvent] = chunk) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for e in chunk:
                    pipe.xadd(Keys.BILLING, {"event": e.to_json()})
                await pipe.execute()

        await store._cross(add, store._client)
    assert await store.billing_depth() == len(events)


async def drain(
    bill_users: BillUsers | None,
    store: RedisStore,
    pg_url: str,
    backlog: int,
    pg_cfg: PostgresConfig,
    billing_cfg: BillingConfig,
    log_dir: Path,
) -> tuple[float, int]:
    """Run the consumer (billing with ``bill_users``, None: its own) until ``backlog`` events
    are billed; (drain seconds, batches)."""
    events = EventLog(log_dir / f"events-{uuid.uuid4().hex[:6]}.jsonl")
    done = trio.Event()
    seen = 0

    def count(event: Event) -> None:
        nonlocal seen
        if isinstance(event, BillingProcessed):
            seen += event.events_count
            if seen >= backlog:
                done.set()

    events.add_listener(count)
    stopping = trio.Event()
    setup = BillingSetup(
        store=store,
        pg_url=pg_url,
        pg_cfg=pg_cfg,
        cfg=billing_cfg,
        events=events,
        metrics=Metrics(),
        consumer_name="bench",
        block_s=0.05,
        bill_users=bill_users,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(events.run)
        async with trio.open_nursery() as inner:
            consumer = await inner.start(
                functools.partial(run_billing_consumer, setup, stopping=stopping)
            )
            t0 = time.perf_counter()
            with trio.fail_after(600):
                await done.wait()
            elapsed = time.perf_counter() - t0
            stopping.set()
        events.close()
    return elapsed, consumer.batches


# -- checks --------------------------------------------------------------------------------------

STATE_SQL = """
SELECT s.user_id, s.rollover_voice_chars, s.purchased_voice_chars,
       u.server_kokoro_characters, u.premium_voice_characters,
       (SELECT count(*) FROM usage_log l WHERE l.user_id = s.user_id) AS events,
       (SELECT COALESCE(sum(synth_count), 0) FROM user_voice_stats v
         WHERE v.user_id = s.user_id) AS synths
  FROM subscriptions s JOIN usage_periods u USING (user_id)
 ORDER BY s.user_id
"""


async def ledger_state(url: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await admin(url, STATE_SQL, fetch=True)]


def expected_state(events: Sequence[BillingEvent], users: int) -> dict[int, tuple[int, int, int]]:
    """Per user: (kokoro chars, premium chars, events), from the arithmetic alone."""
    out = {u: [0, 0, 0] for u in range(1, users + 1)}
    for e in events:
        row = out[e.user_id]
        row[0 if e.model == "kokoro" else 1] += e.amount
        row[2] += 1
    return {u: (k, p, n) for u, (k, p, n) in out.items()}


def check(name: str, state: list[tuple[Any, ...]], expected: dict[int, tuple[int, ...]]) -> None:
    premium_start = {u: 0 if u % 4 == 0 else 99000 for u in expected}
    for user_id, _rollover, _purchased, kokoro, premium, n, synths in state:
        k, p, n_expected = expected[user_id]
        got = (kokoro, premium - premium_start[user_id], n, synths)
        if got != (k, p, n_expected, n_expected):
            raise SystemExit(f"{name}: user {user_id}: got {got}, expected {(k, p, n_expected)}")


# -- main ----------------------------------------------------------------------------------------


async def run_bench(args: argparse.Namespace, servers: EmbeddedServers, log_dir: Path) -> dict:
    assert servers.redis is not None and servers.postgres is not None
    base_url = servers.postgres.url
    pg_cfg = PostgresConfig(billing_pool_size=args.pool)
    billing_cfg = BillingConfig(max_batch=args.max_batch, users_per_txn=args.users_per_txn)
    rng = random.Random(args.seed)
    runs = []
    async with trio_asyncio.open_loop():
        await make_template(base_url)
        async with open_redis(servers.redis.url) as store:
            for users in args.users:
                events = make_events(args.backlog, range(1, users + 1), rng)
                expected = expected_state(events, users)
                result: dict[str, Any] = {"backlog": args.backlog, "users": users}
                states = {}
                modes: list[tuple[str, BillUsers | None, BillingConfig]] = [
                    ("batched", None, billing_cfg),
                    ("unbatched", bill_unbatched, billing_cfg),
                ]
                if args.per_user_txn:
                    strict = attrs.evolve(billing_cfg, users_per_txn=1)
                    modes.append(("per_user_txn", None, strict))
                for mode, bill_users, mode_cfg in modes:
                    url = await fresh_db(base_url, f"bench_{mode}_{users}", users)
                    await fill_stream(store, events)
                    drain_s, batches = await drain(
                        bill_users, store, url, len(events), pg_cfg, mode_cfg, log_dir
                    )
                    if await store.billing_depth() != 0:
                        raise SystemExit(f"{mode}: the stream is not empty after the drain")
                    states[mode] = await ledger_state(url)
                    check(mode, states[mode], expected)
                    result[f"{mode}_events_per_s"] = round(len(events) / drain_s, 1)
                    result[f"{mode}_drain_s"] = round(drain_s, 3)
                    result[f"{mode}_batches"] = batches
                if any(st != states["batched"] for st in states.values()):
                    raise SystemExit(f"{users} users: the modes' balances differ")
                result["drain_s"] = result["batched_drain_s"]
                result["ratio"] = round(
                    result["batched_events_per_s"] / result["unbatched_events_per_s"], 2
                )
                runs.append(result)
                print_row(result)
    return {
        "runs": runs,
        "params": {
            "backlog": args.backlog,
            "users": args.users,
            "billing_pool_size": args.pool,
            "max_batch": args.max_batch,
            "users_per_txn": args.users_per_txn,
            "per_user_txn_mode": args.per_user_txn,
            "premium_share": 0.3,
            "seed": args.seed,
        },
    }


HEADER = (
    f"{'backlog':>8} {'users':>6} {'batched ev/s':>13} {'unbatched ev/s':>15} "
    f"{'ratio':>6} {'drain_s':>8} {'batches':>8} {'1 user/txn ev/s':>16}"
)


def print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['backlog']:>8} {r['users']:>6} {r['batched_events_per_s']:>13,.0f} "
        f"{r['unbatched_events_per_s']:>15,.0f} {r['ratio']:>5.1f}x {r['drain_s']:>8.2f} "
        f"{r['batched_batches']:>8} {r.get('per_user_txn_events_per_s', float('nan')):>16,.0f}",
        flush=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backlog", type=int, default=10_000, help="events in the backlog")
    p.add_argument(
        "--users",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[5, 500],
        help="comma-separated user counts (default 5,500)",
    )
    p.add_argument("--pool", type=int, default=2, help="postgres.billing_pool_size")
    p.add_argument(
        "--max-batch",
        type=int,
        default=2000,
        help="billing.max_batch (default 2000, as conf/daemon.toml ships; the built-in default is"
        f" {BillingConfig().max_batch})",
    )
    p.add_argument("--users-per-txn", type=int, default=BillingConfig().users_per_txn)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--no-per-user-txn",
        dest="per_user_txn",
        action="store_false",
        help="skip the third mode: the consumer with billing.users_per_txn = 1",
    )
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (timeout, a CI runner) unwinds like Ctrl-C, so the embedded servers are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="bench-billing-") as tmp:
        root = Path(tmp)
        with EmbeddedServers(root / "data") as servers:
            print(HEADER, flush=True)
            out = trio.run(run_bench, args, servers, root)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
