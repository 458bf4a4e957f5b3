"""The billing consumer in a running daemon, on real Redis and Postgres: exactly once, whatever
happens — duplicates, poison events, Redis losing its data, crashes mid-batch, a second daemon
taking over a dead one's events, and payment writes racing with billing.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
import trio

from daemon.config import Config
from daemon.contracts import BillingEvent, Keys, usage_amount
from daemon.runtime.daemon import Daemon, open_daemon
from daemon.stores.pg import _credit, _init_connection
from daemon.testing.client import WsClient
from daemon.testing.config import make_config
from daemon.testing.stores import add_user, pg_fetch, pg_val, redis_call
from daemon.testing.waiting import wait_until
from tests.helpers import billing_event

pytestmark = pytest.mark.timeout(90)


async def xadd(redis_url: str, payloads: list[str | BillingEvent | dict[str, str]]) -> None:
    """Append entries to the billing stream the way finalize.lua does, atomically (MULTI), so a
    waiting consumer sees them together."""

    def go() -> None:
        client = redis.Redis.from_url(redis_url)
        try:
            pipe = client.pipeline(transaction=True)
            for p in payloads:
                if isinstance(p, dict):
                    pipe.xadd(Keys.BILLING, p)
                else:
                    raw = p.to_json() if isinstance(p, BillingEvent) else p
                    pipe.xadd(Keys.BILLING, {"event": raw})
            pipe.execute()
        finally:
            client.close()

    await trio.to_thread.run_sync(go)


def record_events(daemon: Daemon) -> list[Any]:
    records: list[Any] = []
    daemon.events.add_listener(records.append)
    return records


async def billed_count(pg_url: str) -> int:
    return int(await pg_val(pg_url, "SELECT count(*) FROM usage_log"))


async def queue_drained(redis_url: str) -> bool:
    depth = await redis_call(redis_url, "XLEN", Keys.BILLING)
    try:
        summary = await redis_call(redis_url, "XPENDING", Keys.BILLING, Keys.BILLING_GROUP)
        pending = summary["pending"]
    except redis.ResponseError:  # no group (yet)
        pending = 0
    return depth == 0 and pending == 0


async def wait_billed(pg_url: str, redis_url: str, n: int, timeout_s: float = 30.0) -> None:
    async def done() -> bool:
        return await billed_count(pg_url) >= n and await queue_drained(redis_url)

    await wait_until(done, timeout_s=timeout_s, what=f"{n} events billed and the queue drained")
    assert await billed_count(pg_url) == n


async def kokoro_used(pg_url: str, user_id: int) -> int:
    return int(
        await pg_val(
            pg_url,
            "SELECT COALESCE(sum(server_kokoro_characters), 0) FROM usage_periods"
            " WHERE user_id = $1",
            user_id,
        )
    )


# -- duplicates ------------------------------------------------------------------------------------


async def test_duplicates_in_one_batch_and_across_batches_are_billed_once(
    daemon: Daemon, pg_url: str, redis_url: str
) -> None:
    records = record_events(daemon)
    user_id, _ = await add_user(pg_url, "dup", "plus")
    a, b = billing_event(user_id, "premium", 50), billing_event(user_id, "kokoro", 20)
    await xadd(redis_url, [a, a, b])
    await wait_billed(pg_url, redis_url, 2)
    first = [r for r in records if r.kind == "billing_processed"]
    assert sum(r.events_count for r in first) == 3
    assert sum(r.duplicates for r in first) == 1
    assert sum(r.text_length for r in first) == 70  # characters billed, the duplicate not
    before = await pg_fetch(pg_url, "SELECT * FROM usage_periods")
    stats = await pg_fetch(pg_url, "SELECT * FROM user_voice_stats ORDER BY model")

    await xadd(redis_url, [b, a])  # redelivered later, in another batch
    await wait_until(
        lambda: sum(r.events_count for r in records if r.kind == "billing_processed") == 5,
        what="the redelivery processed",
    )
    await wait_billed(pg_url, redis_url, 2)
    assert await pg_fetch(pg_url, "SELECT * FROM usage_periods") == before
    assert await pg_fetch(pg_url, "SELECT * FROM user_voice_stats ORDER BY model") == stats
    assert [s["synth_count"] for s in stats] == [1, 1]
    assert (
        before[0]["premium_voice_characters"] == 100 and before[0]["server_kokoro_characters"] == 20
    )
    last = [r for r in records if r.kind == "billing_processed"][-1]
    assert last.billed == 0 and last.duplicates == 2 and last.text_length == 0


# -- poison ----------------------------------------------------------------------------------------


async def test_poison_events_are_dead_lettered_and_the_events_around_them_billed(
    daemon: Daemon, pg_url: str, redis_url: str
) -> None:
    records = record_events(daemon)
    user_id, _ = await add_user(pg_url, "pia", "basic")
    good = [billing_event(user_id, "kokoro", n) for n in (11, 22, 33)]
    unknown_model = json.loads(good[0].to_json()) | {"event_id": "x1", "model": "opera"}
    missing_field = json.loads(good[0].to_json()) | {"event_id": "x2"}
    del missing_field["user_id"]
    no_such_user = billing_event(987_654, "kokoro", 5)
    not_a_number = json.loads(good[0].to_json()) | {"event_id": "x3", "duration_ms": float("nan")}
    # Valid to Python, refused by Postgres (integer columns, text without NUL): the same user's
    # good events around them must still be billed.
    too_long = json.loads(good[0].to_json()) | {"event_id": "x4", "text_length": 2**31}
    too_costly = json.loads(good[0].to_json()) | {"event_id": "x5", "usage_multiplier": 1e300}
    nul_voice = json.loads(good[0].to_json()) | {"event_id": "x6", "voice": "af\x00heart"}
    await xadd(
        redis_url,
        [
            good[0],
            "{not json",
            json.dumps(unknown_model),
            good[1],
            json.dumps(missing_field),
            {"something": "else"},
            no_such_user,
            json.dumps(not_a_number),  # NaN: valid to Python's json, not to Postgres
            json.dumps(too_long),
            json.dumps(too_costly),
            json.dumps(nul_voice),
            {"event": b"\xff\xfe not UTF-8"},  # type: ignore[dict-item]
            good[2],
        ],
    )
    await wait_billed(pg_url, redis_url, 3)
    assert await kokoro_used(pg_url, user_id) == 66
    dead = [json.loads(x) for x in await redis_call(redis_url, "LRANGE", Keys.BILLING_DEAD, 0, -1)]
    reasons = sorted(d["reason"] for d in dead)
    assert len(reasons) == 10, reasons
    assert any("'text_length' out of range" in r for r in reasons)
    assert any("'usage_multiplier' out of range" in r for r in reasons)
    assert any("'voice' contains a NUL character" in r for r in reasons)
    assert any("not JSON" in r for r in reasons)
    assert any("'duration_ms' is not a finite number" in r for r in reasons)
    assert any("not UTF-8" in r for r in reasons)
    assert any("unknown model 'opera'" in r for r in reasons)
    assert any("missing field 'user_id'" in r for r in reasons)
    assert any("no 'event' field" in r for r in reasons)
    assert any("user 987654 has no subscription" in r for r in reasons)
    assert all(d["entry_id"] and d["consumer"] == daemon.instance_id for d in dead)
    errors = [r for r in records if r.kind == "error" and r.service == "billing"]
    assert len(errors) == 10 and all("dead-lettered" in e.message for e in errors)
    assert daemon.supervisor.states["billing"].restarts == 0


async def test_a_user_that_cannot_be_billed_is_found_in_a_shared_transaction(
    daemon: Daemon, pg_url: str, redis_url: str
) -> None:
    """Ten users' events in one batch, so several users share each connection's transaction; one
    user has no subscription. That transaction fails; it is split until the user is found: the
    user's events are dead-lettered, every other user is billed in full, nothing restarts."""
    records = record_events(daemon)
    users = [(await add_user(pg_url, f"many-{i}", "basic"))[0] for i in range(9)]
    rng = random.Random(3)
    events = [billing_event(u, "kokoro", rng.randint(5, 90)) for u in users for _ in range(4)]
    missing = [billing_event(987_001, "kokoro", 7) for _ in range(3)]
    stream = events + missing
    rng.shuffle(stream)
    await xadd(redis_url, stream)  # atomically: one batch
    await wait_billed(pg_url, redis_url, len(events))
    for u in users:
        assert await kokoro_used(pg_url, u) == sum(e.text_length for e in events if e.user_id == u)
    dead = [json.loads(x) for x in await redis_call(redis_url, "LRANGE", Keys.BILLING_DEAD, 0, -1)]
    assert len(dead) == 3
    assert all("user 987001 has no subscription" in d["reason"] for d in dead)
    batches = [r for r in records if r.kind == "billing_processed"]
    assert sum(b.billed for b in batches) == len(events)
    assert sum(b.dead_lettered for b in batches) == 3
    assert daemon.supervisor.states["billing"].restarts == 0


# -- Redis data loss -------------------------------------------------------------------------------


async def test_redis_data_loss_heals_on_the_read_path_without_a_restart(
    daemon: Daemon, pg_url: str, redis_url: str
) -> None:
    user_id, token = await add_user(pg_url, "lou", "plus")
    await xadd(redis_url, [billing_event(user_id, "kokoro", 10)])
    await wait_billed(pg_url, redis_url, 1)

    # Redis loses everything: stream, group, consumers.
    await redis_call(redis_url, "FLUSHALL")
    await xadd(redis_url, [billing_event(user_id, "kokoro", 20)])
    await wait_billed(pg_url, redis_url, 2)

    # The group alone is lost; the stream keeps two unbilled events: billed, not skipped.
    await redis_call(redis_url, "XGROUP", "DESTROY", Keys.BILLING, Keys.BILLING_GROUP)
    await xadd(
        redis_url, [billing_event(user_id, "kokoro", 30), billing_event(user_id, "kokoro", 40)]
    )
    await wait_billed(pg_url, redis_url, 4)

    # and the whole pipeline still works after the loss: synthesize → cached → billed (once the
    # mirror service has copied the tokens back: the handshake reads only Redis)
    await wait_until(
        lambda: redis_call(redis_url, "EXISTS", Keys.MIRROR_READY), what="mirror rebuilt"
    )
    assert daemon.addresses is not None
    async with WsClient.connect(daemon.addresses.ws_url, token) as client:
        await client.synthesize("after-flush", ["Healed without a restart."])
        await client.until(lambda _: len(client.terminal("after-flush")) == 1)
    assert client.terminal("after-flush")[0]["status"] == "cached"
    await wait_billed(pg_url, redis_url, 5)
    assert await kokoro_used(pg_url, user_id) == 100 + len("Healed without a restart.")
    assert daemon.supervisor.states["billing"].restarts == 0


# -- crash mid-batch -------------------------------------------------------------------------------


async def test_crash_loop_mid_batch_loses_nothing_bills_nothing_twice_and_serving_goes_on(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    """The billing service crashes after the first of a batch's transactions committed, four
    times in a row, and is restarted with backoff; meanwhile clients keep getting queued and
    cached. Afterwards every synthesis is billed exactly once."""
    cfg = make_config(
        tmp_path,
        billing={"users_per_txn": 1},  # one transaction per user: a batch has several
        supervisor={"backoff_min_s": 0.2, "backoff_max_s": 1.0},
    )
    crashes = 0
    served_while_billing_down = 0  # rounds whose statuses all came while billing was backing off

    async def fault(point: str) -> None:
        nonlocal crashes
        # At least four crashes, and more (up to 20) until a round has been served in a backoff.
        if point == "billing.after_commit" and (
            crashes < 4 or (not served_while_billing_down and crashes < 20)
        ):
            crashes += 1
            raise RuntimeError(f"injected crash {crashes}")

    users = [await add_user(pg_url, name, "plus") for name in ("cara", "cole")]
    async with open_daemon(cfg, redis_url, pg_url, billing_fault=fault) as daemon:
        records = record_events(daemon)
        # When billing was down: from each restart's event, for its backoff (Trio's clock).
        down: list[tuple[float, float]] = []
        daemon.events.add_listener(
            lambda e: (
                down.append((trio.current_time(), trio.current_time() + e.backoff_s))
                if e.kind == "service_restarted"
                else None
            )
        )
        assert daemon.addresses is not None
        expected = {user_id: 0 for user_id, _ in users}
        async with (
            WsClient.connect(daemon.addresses.ws_url, users[0][1]) as c0,
            WsClient.connect(daemon.addresses.ws_url, users[1][1]) as c1,
        ):
            round_ = 0
            with trio.fail_after(40):
                while crashes < 4 or round_ < 3 or not served_while_billing_down:
                    doc = f"doc-{round_}"
                    for (user_id, _), client in zip(users, (c0, c1), strict=True):
                        texts = [
                            f"Round {round_}, block {i}, read by user {user_id}." for i in (0, 1)
                        ]
                        await client.synthesize(doc, texts)
                        expected[user_id] += sum(len(t) for t in texts)
                    for client in (c0, c1):
                        await client.until(lambda _, c=client, d=doc: len(c.terminal(d)) == 2)
                        statuses = client.statuses(doc)
                        # (a fast worker's `processing` may overtake `queued`)
                        assert all(
                            "queued" in s and s[-1] == "cached" for s in statuses.values()
                        ), statuses
                    now = trio.current_time()
                    if any(start <= now <= end for start, end in down):
                        served_while_billing_down += 1
                    round_ += 1
        blocks = 4 * round_
        await wait_billed(pg_url, redis_url, blocks, timeout_s=40)
        for user_id, chars in expected.items():
            assert await kokoro_used(pg_url, user_id) == chars
        restarted = [r for r in records if r.kind == "service_restarted"]
        assert {r.service for r in restarted} == {"billing"}
        assert len(restarted) >= 4
        assert all(0.2 <= r.backoff_s <= 1.0 for r in restarted)
        assert daemon.supervisor.states["gateway"].restarts == 0
        assert daemon.supervisor.states["hot"].restarts == 0
        assert served_while_billing_down >= 1
        dups = sum(r.duplicates for r in records if r.kind == "billing_processed")
        assert dups >= 1  # a committed transaction's events were redelivered, and not re-billed


# -- two daemons -----------------------------------------------------------------------------------


async def test_two_daemons_bill_every_event_once_when_one_dies_mid_batch(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    def config(name: str) -> Config:
        return make_config(
            tmp_path / name,
            workers={"simulated": 0},
            billing={"claim_idle_s": 0.5, "max_batch": 50, "users_per_txn": 1},
        )

    users = [await add_user(pg_url, f"two-{i}", "basic") for i in range(5)]
    rng = random.Random(2)
    events = [
        billing_event(rng.choice(users)[0], "kokoro", rng.randint(5, 200)) for _ in range(400)
    ]
    stuck = trio.Event()

    async def die_mid_batch(point: str) -> None:
        if point == "billing.after_commit":  # the batch committed, not acknowledged
            stuck.set()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        a_scope = trio.CancelScope()

        async def run_a(*, task_status: trio.TaskStatus[Daemon]) -> None:
            with a_scope:
                async with open_daemon(
                    config("a"), redis_url, pg_url, billing_fault=die_mid_batch
                ) as a:
                    task_status.started(a)
                    await trio.sleep_forever()

        a = await nursery.start(run_a)
        await xadd(redis_url, events[:100])
        with trio.fail_after(20):
            await stuck.wait()
        async with open_daemon(config("b"), redis_url, pg_url) as b:
            records = record_events(b)
            assert a.instance_id != b.instance_id
            await xadd(redis_url, events[100:250])
            a_scope.cancel()  # abruptly: no drain, its batch stays pending in the group
            await xadd(redis_url, events[250:])
            await wait_billed(pg_url, redis_url, len(events), timeout_s=40)
            claimed = sum(r.count for r in records if r.kind == "billing_claimed")
            assert claimed >= 1
    for user_id, _ in users:
        expected = sum(e.text_length for e in events if e.user_id == user_id)
        assert await kokoro_used(pg_url, user_id) == expected
    assert await pg_val(pg_url, "SELECT count(DISTINCT event_id) FROM usage_log") == len(events)


# -- payments racing with billing ------------------------------------------------------------------


async def test_concurrent_credits_and_premium_billing_lose_no_update(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    """20 `credit` calls race with a stream of premium events for the same user; the balances end
    exactly at the arithmetic. The plan's allowance is used up, so every premium character comes
    from rollover, purchased or debt: rollover + purchased falls by exactly the characters billed
    and rises by exactly the characters credited, in whatever order the writers got the lock."""
    # At most 10 events a batch: billing runs in many transactions (20 or more), interleaved
    # with the payments, however fast or slow the consumer is here.
    cfg = make_config(
        tmp_path, workers={"simulated": 0}, billing={"txn_delay_ms": 5.0, "max_batch": 10}
    )
    user_id, _ = await add_user(pg_url, "payer", "plus")
    await pg_fetch(
        pg_url,
        "UPDATE subscriptions SET purchased_voice_chars = 300, rollover_voice_chars = 100"
        " WHERE user_id = $1",
        user_id,
    )
    await pg_fetch(
        pg_url,
        "INSERT INTO usage_periods (user_id, period_start, premium_voice_characters)"
        " VALUES ($1, tts_period_start(), 100000)",
        user_id,
    )
    rng = random.Random(20)
    credits = [rng.randint(50, 400) for _ in range(20)]
    events = [billing_event(user_id, "premium", rng.randint(10, 150)) for _ in range(200)]
    billed = sum(usage_amount(e.text_length, e.usage_multiplier) for e in events)

    def pay_all() -> list[dict[str, Any]]:
        async def go() -> list[dict[str, Any]]:
            pool = await asyncpg.create_pool(
                pg_url, min_size=20, max_size=20, init=_init_connection
            )
            try:

                async def one(i: int, n: int) -> dict[str, Any]:
                    await asyncio.sleep(i * 0.03)
                    return await _credit(pool, str(user_id), n)

                return await asyncio.gather(*(one(i, n) for i, n in enumerate(credits)))
            finally:
                await pool.close()

        return asyncio.run(go())

    async with open_daemon(cfg, redis_url, pg_url) as daemon:
        records = record_events(daemon)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, pay_all)
            for i in range(0, len(events), 10):
                await xadd(redis_url, events[i : i + 10])
                await trio.sleep(0.03)
        await wait_billed(pg_url, redis_url, len(events))
        batches = [r for r in records if r.kind == "billing_processed"]
        assert len(batches) >= 5  # billing ran in many transactions, interleaved with payments

    sub = (await pg_fetch(pg_url, "SELECT * FROM subscriptions WHERE user_id = $1", user_id))[0]
    assert sub["rollover_voice_chars"] + sub["purchased_voice_chars"] == 400 + sum(credits) - billed
    assert sub["purchased_voice_chars"] >= 0
    used = await pg_val(
        pg_url, "SELECT premium_voice_characters FROM usage_periods WHERE user_id = $1", user_id
    )
    assert used == 100_000 + billed
    rows = await pg_fetch(pg_url, "SELECT details FROM usage_log WHERE user_id = $1", user_id)
    parts = [json.loads(r["details"]) for r in rows]
    assert sum(p["from_plan"] for p in parts) == 0
    # each balance on its own: every draw recorded in usage_log, every credit, nothing else
    assert sub["purchased_voice_chars"] == 300 + sum(credits) - sum(
        p["from_purchased"] for p in parts
    )
    assert sub["rollover_voice_chars"] == 100 - sum(
        p["from_rollover"] + p["rollover_debt"] for p in parts
    )
    assert (
        sum(p["from_rollover"] + p["from_purchased"] + p["rollover_debt"] for p in parts) == billed
    )
    assert await pg_val(
        pg_url, "SELECT sum(voice_chars) FROM credits WHERE user_id = $1", user_id
    ) == sum(credits)
    assert sum(p["from_purchased"] for p in parts) > 0  # the credits were drawn on
