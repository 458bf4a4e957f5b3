"""The ledger on a real Postgres: record_usage, the set-based tts_bill_events, the waterfall.

Every scenario is checked against a step-by-step model of docs/billing.md written here in Python,
independently of the SQL: one event at a time, plan → rollover → purchased → debt. The model
(``Model``) is the executable specification of ``daemon/billing/ledger.sql``. The end of the file
checks how that SQL is laid out: one definition per function, migrations for the schema only, and
a database migrated by the older layout (functions in migrations) migrating to it.
"""

from __future__ import annotations

import asyncio
import random
import re
import tomllib
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import attrs
import pytest
import trio

from daemon.contracts import MODELS, BillingEvent, usage_amount
from daemon.stores.ledger import (
    BILLING_DATA_ERRORS,
    ChunkResult,
    bill_chunks,
    events_array,
    record_usage,
)
from daemon.stores.pg import FUNCTION_FILES, _init_connection, open_pg_pool
from daemon.testing.stores import add_user, pg_fetch, pg_val
from daemon.testing.unbatched import bill_one
from tests.helpers import billing_event

pytestmark = pytest.mark.timeout(60)

PLANS = {"free": 0, "basic": 0, "plus": 100_000, "unlimited": None}  # premium allowance


async def with_pool(url: str, fn: Callable[[asyncpg.Pool], Awaitable[Any]], size: int = 2) -> Any:
    """Run ``fn(pool)`` on a pool of the daemon's kind, in asyncio, in a worker thread."""

    async def go() -> Any:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=size, init=_init_connection)
        try:
            return await fn(pool)
        finally:
            await pool.close()

    return await trio.to_thread.run_sync(lambda: asyncio.run(go()))


@attrs.frozen
class PreparedEvent:
    """An event with what the step-by-step model needs: its usage type and amount."""

    event: BillingEvent
    usage_type: str
    amount: int


def event(user_id: int, model: str, text_length: int, event_id: str | None = None) -> PreparedEvent:
    info = MODELS[model]
    e = billing_event(user_id, model, text_length, event_id)
    return PreparedEvent(e, info.usage_type, usage_amount(text_length, info.usage_multiplier))


@attrs.frozen
class GroupOutcome:
    billed: tuple[str, ...]  # event ids billed now
    duplicates: tuple[str, ...]  # event ids billed before
    text_length: int  # characters billed now


async def bill_group(pool: asyncpg.Pool, events: list[PreparedEvent]) -> GroupOutcome:
    """The billing consumer's transaction (``tts_bill_batch`` through ``bill_chunks``) for these
    events; its data error raised."""
    ((result,),) = await bill_chunks(
        pool, [[events_array([p.event.to_json() for p in events])]], acquire_timeout_s=5
    )
    if not isinstance(result, ChunkResult):
        raise result
    dups = set(result.duplicates)
    return GroupOutcome(
        billed=tuple(p.event.event_id for i, p in enumerate(events) if i not in dups),
        duplicates=tuple(p.event.event_id for i, p in enumerate(events) if i in dups),
        text_length=result.text_length,
    )


async def bill(url: str, events: list[PreparedEvent]) -> GroupOutcome:
    return await with_pool(url, lambda pool: bill_group(pool, events))


async def set_state(
    url: str, user_id: int, *, rollover: int = 0, purchased: int = 0, premium_used: int = 0
) -> None:
    async def go(pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn:
            await conn.execute(
                "UPDATE subscriptions SET rollover_voice_chars = $2, purchased_voice_chars = $3"
                " WHERE user_id = $1",
                user_id,
                rollover,
                purchased,
            )
            await conn.execute(
                "INSERT INTO usage_periods (user_id, period_start, premium_voice_characters)"
                " VALUES ($1, tts_period_start(), $2)",
                user_id,
                premium_used,
            )

    await with_pool(url, go)


async def add_users(url: str, setup: list[tuple[str, str, dict[str, int]]]) -> list[int]:
    """Users (name, plan, starting balances) on one connection; their ids in order."""

    async def go(pool: asyncpg.Pool) -> list[int]:
        ids = []
        async with pool.acquire() as conn:
            for name, plan, start in setup:
                user_id = await conn.fetchval(
                    "INSERT INTO users (name) VALUES ($1) RETURNING id", name
                )
                await conn.execute(
                    "INSERT INTO subscriptions (user_id, plan, rollover_voice_chars,"
                    " purchased_voice_chars) VALUES ($1, $2, $3, $4)",
                    user_id,
                    plan,
                    start["rollover"],
                    start["purchased"],
                )
                await conn.execute(
                    "INSERT INTO usage_periods (user_id, period_start, premium_voice_characters)"
                    " VALUES ($1, tts_period_start(), $2)",
                    user_id,
                    start["premium_used"],
                )
                ids.append(user_id)
        return ids

    return await with_pool(url, go)


async def state(url: str, user_id: int) -> dict[str, int]:
    rows = await pg_fetch(
        url,
        "SELECT s.rollover_voice_chars AS rollover, s.purchased_voice_chars AS purchased,"
        " COALESCE(u.premium_voice_characters, 0) AS premium_used,"
        " COALESCE(u.server_kokoro_characters, 0) AS kokoro_used"
        " FROM subscriptions s LEFT JOIN usage_periods u"
        "   ON u.user_id = s.user_id AND u.period_start = tts_period_start()"
        " WHERE s.user_id = $1",
        user_id,
    )
    return rows[0]


@attrs.define
class Model:
    """docs/billing.md, one event at a time."""

    allowance: int | None
    rollover: int = 0
    purchased: int = 0
    premium_used: int = 0
    kokoro_used: int = 0
    seen: set[str] = attrs.Factory(set)

    def bill(self, p: PreparedEvent) -> dict[str, int] | None:
        if p.event.event_id in self.seen:
            return None
        self.seen.add(p.event.event_id)
        a = p.amount
        if p.usage_type == "server_kokoro":
            self.kokoro_used += a
            return {"from_plan": a}
        left = None if self.allowance is None else max(self.allowance - self.premium_used, 0)
        plan = a if left is None else min(a, left)
        rest = a - plan
        roll = min(rest, max(self.rollover, 0))
        rest -= roll
        bought = min(rest, self.purchased)
        debt = rest - bought
        self.rollover -= roll + debt
        self.purchased -= bought
        self.premium_used += a
        return {
            "from_plan": plan,
            "from_rollover": roll,
            "from_purchased": bought,
            "rollover_debt": debt,
        }

    def state(self) -> dict[str, int]:
        return {
            "rollover": self.rollover,
            "purchased": self.purchased,
            "premium_used": self.premium_used,
            "kokoro_used": self.kokoro_used,
        }


async def logged(url: str, event_ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = await pg_fetch(
        url, "SELECT event_id, details FROM usage_log WHERE event_id = ANY($1::text[])", event_ids
    )
    return {r["event_id"]: r["details"] for r in rows}


def breakdown(details: Any) -> dict[str, int]:
    import json

    d = json.loads(details) if isinstance(details, str) else details
    keys = ("from_plan", "from_rollover", "from_purchased", "rollover_debt")
    return {k: d[k] for k in keys if k in d}


# -- amounts ---------------------------------------------------------------------------------------


async def test_kokoro_and_premium_amounts_and_details(pg_url: str) -> None:
    user_id, _ = await add_user(pg_url, "amy", "plus")
    kokoro, premium = event(user_id, "kokoro", 37), event(user_id, "premium", 37)
    outcome = await bill(pg_url, [kokoro, premium])
    assert outcome.billed == (kokoro.event.event_id, premium.event.event_id)
    assert outcome.text_length == 74
    rows = await pg_fetch(pg_url, "SELECT * FROM usage_log ORDER BY amount")
    assert [(r["usage_type"], r["amount"]) for r in rows] == [
        ("server_kokoro", 37),
        ("premium_voice", 74),
    ]
    import json

    details = json.loads(rows[1]["details"])
    period = datetime.now(UTC).date().replace(day=1).isoformat()
    assert details["model"] == "premium" and details["voice"] == "ava"
    assert details["period_start"] == period
    assert details["variant_hash"] == premium.event.variant_hash
    assert breakdown(details) == {
        "from_plan": 74,
        "from_rollover": 0,
        "from_purchased": 0,
        "rollover_debt": 0,
    }
    assert await state(pg_url, user_id) == {
        "rollover": 0,
        "purchased": 0,
        "premium_used": 74,
        "kokoro_used": 37,
    }
    # amount = round(text_length × multiplier), halves up
    assert usage_amount(3, 1.5) == 5 and usage_amount(7, 2.0) == 14 and usage_amount(0, 2.0) == 0


# -- the waterfall, branch by branch ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "start", "amount", "expected", "end"),
    [
        # plan allowance covers it
        ("plus", {"premium_used": 0}, 500, (500, 0, 0, 0), {"rollover": 0, "purchased": 0}),
        # plan → rollover
        (
            "plus",
            {"premium_used": 99_900, "rollover": 300, "purchased": 50},
            500,
            (100, 300, 50, 50),
            {"rollover": -50, "purchased": 0},
        ),
        # rollover → purchased (no plan left)
        (
            "plus",
            {"premium_used": 100_000, "rollover": 200, "purchased": 1000},
            500,
            (0, 200, 300, 0),
            {"rollover": 0, "purchased": 700},
        ),
        # purchased → debt
        (
            "basic",
            {"purchased": 150},
            500,
            (0, 0, 150, 350),
            {"rollover": -350, "purchased": 0},
        ),
        # already in debt: rollover is not taken while negative, the debt grows
        (
            "free",
            {"rollover": -40, "purchased": 0},
            100,
            (0, 0, 0, 100),
            {"rollover": -140, "purchased": 0},
        ),
        # unlimited plan: all from the plan, balances untouched
        (
            "unlimited",
            {"premium_used": 10**9, "rollover": -5, "purchased": 9},
            500,
            (500, 0, 0, 0),
            {"rollover": -5, "purchased": 9},
        ),
    ],
    ids=[
        "plan",
        "plan-rollover-purchased-debt",
        "rollover-purchased",
        "purchased-debt",
        "debt-grows",
        "unlimited",
    ],
)
async def test_premium_waterfall_branches(
    pg_url: str,
    plan: str,
    start: dict[str, int],
    amount: int,
    expected: tuple[int, int, int, int],
    end: dict[str, int],
) -> None:
    user_id, _ = await add_user(pg_url, "wanda", plan)
    await set_state(pg_url, user_id, **start)
    e = event(user_id, "premium", amount // 2)
    await bill(pg_url, [e])
    got = breakdown((await logged(pg_url, [e.event.event_id]))[e.event.event_id])
    assert tuple(got.values()) == expected
    after = await state(pg_url, user_id)
    assert {k: after[k] for k in ("rollover", "purchased")} == end
    assert after["premium_used"] == start.get("premium_used", 0) + amount


async def test_batched_waterfall_matches_one_event_at_a_time(pg_url: str) -> None:
    """Random users, balances and event sequences (with duplicates), billed in random groupings:
    every event's breakdown and every final balance equal the step-by-step model's."""
    rng = random.Random(4)
    users: dict[int, Model] = {}
    all_events: list[PreparedEvent] = []
    setup = []
    for i in range(24):
        start = {
            "rollover": rng.choice([0, rng.randint(1, 3000), -rng.randint(1, 500)]),
            "purchased": rng.choice([0, rng.randint(1, 4000)]),
            "premium_used": rng.choice([0, 99_000, 100_000, rng.randint(0, 120_000)]),
        }
        setup.append((f"u{i}", rng.choice(list(PLANS)), start))
    for user_id, (_, plan, start) in zip(await add_users(pg_url, setup), setup, strict=True):
        users[user_id] = Model(PLANS[plan], **start)
        for _ in range(rng.randint(3, 25)):
            all_events.append(
                event(user_id, rng.choice(["premium", "premium", "kokoro"]), rng.randint(1, 900))
            )
    rng.shuffle(all_events)
    # duplicates: some events again, later in the stream
    stream = all_events + rng.sample(all_events, 30)
    expected = [users[p.event.user_id].bill(p) for p in stream]

    async def go(pool: asyncpg.Pool) -> list[bool]:
        dup_flags: list[bool] = []
        i = 0
        while i < len(stream):
            n = rng.randint(1, 60)
            part = stream[i : i + n]
            i += n
            if n % 5 == 0:  # some through record_usage, one event per transaction
                for p in part:
                    dup, _ = await bill_one(pool, p.event, p.usage_type, acquire_timeout_s=5)
                    dup_flags.append(dup)
                continue
            # bill_group bills whole users in arrival order: group the way the consumer does
            for users_part in _split_users(part, rng):
                outcome = await bill_group(pool, users_part)
                dups = set(outcome.duplicates)
                dup_flags.extend(p.event.event_id in dups for p in users_part)
        return dup_flags

    dup_flags = await with_pool(pg_url, go)
    assert sum(dup_flags) == sum(e is None for e in expected) == 30
    rows = await logged(pg_url, [p.event.event_id for p in all_events])
    assert len(rows) == len(all_events)
    for p, exp in zip(stream, expected, strict=True):
        if exp is not None:
            assert breakdown(rows[p.event.event_id]) == exp, p
    for user_id, model in users.items():
        assert await state(pg_url, user_id) == model.state(), user_id


def _split_users(part: list[PreparedEvent], rng: random.Random) -> list[list[PreparedEvent]]:
    """Groups of whole users (a user's events of this part stay together, in order)."""
    ids = sorted({p.event.user_id for p in part})
    rng.shuffle(ids)
    groups: list[list[int]] = []
    while ids:
        k = rng.randint(1, len(ids))
        groups.append(ids[:k])
        ids = ids[k:]
    return [[p for p in part if p.event.user_id in g] for g in groups]


# -- duplicates ------------------------------------------------------------------------------------


async def test_duplicate_is_a_noop_in_one_batch_across_batches_and_in_record_usage(
    pg_url: str,
) -> None:
    user_id, _ = await add_user(pg_url, "dora", "plus")
    await set_state(pg_url, user_id, premium_used=100_000, purchased=1000)
    a, b = event(user_id, "premium", 100), event(user_id, "kokoro", 50)
    # the same event twice in one batch
    first = await bill(pg_url, [a, a, b])
    assert first.billed == (a.event.event_id, b.event.event_id)
    assert first.duplicates == (a.event.event_id,)
    after_first = await state(pg_url, user_id)
    stats_first = await pg_fetch(pg_url, "SELECT * FROM user_voice_stats ORDER BY model")
    # and again in a later batch
    second = await bill(pg_url, [b, a])
    assert second.billed == () and second.duplicates == (b.event.event_id, a.event.event_id)
    assert second.text_length == 0

    async def single(pool: asyncpg.Pool) -> Any:
        async with pool.acquire() as conn, conn.transaction():
            return await record_usage(user_id, "premium_voice", 200, a.event.event_id, conn)

    record = await with_pool(pg_url, single)
    assert record.duplicate and record.details is None
    assert (
        await state(pg_url, user_id)
        == after_first
        == {
            "rollover": 0,
            "purchased": 800,
            "premium_used": 100_200,
            "kokoro_used": 50,
        }
    )
    assert await pg_val(pg_url, "SELECT count(*) FROM usage_log") == 2
    # engagement stats: counted once, duplicates skipped
    stats = await pg_fetch(pg_url, "SELECT * FROM user_voice_stats ORDER BY model")
    assert stats == stats_first
    assert [(s["model"], s["synth_count"], s["total_characters"]) for s in stats] == [
        ("kokoro", 1, 50),
        ("premium", 1, 100),
    ]


async def test_record_usage_bills_once_in_its_own_or_the_callers_transaction(
    pg_url: str,
) -> None:
    user_id, _ = await add_user(pg_url, "rita", "basic")

    async def go(pool: asyncpg.Pool) -> list[Any]:
        out = []
        async with pool.acquire() as conn:
            out.append(await record_usage(user_id, "server_kokoro", 10, "e-1", conn, commit=True))
            async with conn.transaction():
                out.append(await record_usage(user_id, "server_kokoro", 20, "e-2", conn))
                out.append(await record_usage(user_id, "server_kokoro", 20, "e-2", conn))
            tx = conn.transaction()
            await tx.start()
            out.append(await record_usage(user_id, "server_kokoro", 40, "e-3", conn))
            await tx.rollback()  # the caller's transaction: rolled back, nothing billed
        return out

    r = await with_pool(pg_url, go)
    assert [x.duplicate for x in r] == [False, False, True, False]
    assert r[0].details["from_plan"] == 10
    assert (await state(pg_url, user_id))["kokoro_used"] == 30
    assert await pg_val(pg_url, "SELECT count(*) FROM usage_log") == 2


# -- bad data --------------------------------------------------------------------------------------


async def test_unknown_user_or_no_subscription_is_a_data_error(pg_url: str) -> None:
    user_id, _ = await add_user(pg_url, "nosub", "plus")
    await pg_fetch(pg_url, "DELETE FROM subscriptions WHERE user_id = $1", user_id)
    for who in (user_id, 999_999):
        with pytest.raises(BILLING_DATA_ERRORS, match=f"user {who} has no subscription"):
            await bill(pg_url, [event(who, "kokoro", 5)])
    assert await pg_val(pg_url, "SELECT count(*) FROM usage_log") == 0


async def test_variants_metadata_upserted_idempotently(pg_url: str) -> None:
    user_id, _ = await add_user(pg_url, "vic", "plus")
    p = event(user_id, "kokoro", 12)
    later = attrs.evolve(p.event, duration_ms=999)

    # the same variant billed again by another event (another job), later, with a new duration
    again = attrs.evolve(later, event_id=uuid.uuid4().hex)
    await bill(pg_url, [p])
    await bill(pg_url, [p, PreparedEvent(again, p.usage_type, p.amount)])
    rows = await pg_fetch(pg_url, "SELECT * FROM block_variants")
    assert [(r["hash"], r["model"], r["text_length"], r["duration_ms"]) for r in rows] == [
        (p.event.variant_hash, "kokoro", 12, 999)
    ]


# -- how a batch is split into transactions ------------------------------------------------------


@pytest.mark.parametrize(
    ("users", "per_txn", "pool"),
    [(1, 50, 2), (5, 50, 2), (500, 50, 2), (500, 1, 2), (60, 7, 2), (60, 7, 3)],
)
def test_batch_split_keeps_users_whole_on_one_connection_within_users_per_txn(
    users: int, per_txn: int, pool: int
) -> None:
    from daemon.billing.consumer import BillingConsumer
    from daemon.config import BillingConfig, PostgresConfig

    rng = random.Random(users)
    batch = [rng.randint(1, users) for _ in range(200)]  # the users of 200 events
    counts = {u: batch.count(u) for u in set(batch)}
    consumer = BillingConsumer(
        pool=None,  # type: ignore[arg-type]
        reader=None,  # type: ignore[arg-type]
        redis=None,  # type: ignore[arg-type]
        usage_types={},
        pg_cfg=PostgresConfig(billing_pool_size=pool),
        cfg=BillingConfig(users_per_txn=per_txn),
        events=None,  # type: ignore[arg-type]
        metrics=None,  # type: ignore[arg-type]
        consumer_name="t",
    )
    lanes = consumer.lanes(counts)
    # one lane per connection (fewer only with fewer users), none empty
    assert len(lanes) == min(pool, len(counts)) and all(lanes)
    txns = [txn for lane in lanes for txn in lane]
    # every user in exactly one transaction: whole users, never on two connections at once
    assert sorted(u for txn in txns for u in txn) == sorted(counts)
    assert all(0 < len(txn) <= per_txn for txn in txns)
    # the connections get about equal work: no lane ahead by more than the largest user
    loads = [sum(counts[u] for txn in lane for u in txn) for lane in lanes]
    assert max(loads) - min(loads) <= max(counts.values())


async def test_sql_amount_rounds_like_usage_amount(pg_url: str) -> None:
    """tts_bill_batch computes each amount in SQL: halves up, exactly as contracts.usage_amount,
    on the edges (x.5, binary fractions that are not exact, large lengths)."""
    rng = random.Random(6)
    cases = [(1, 0.5), (3, 0.5), (5, 1.5), (7, 2.5), (1, 0.1), (3, 0.1), (5, 0.3), (0, 2.0)]
    cases += [(2**40 + 1, 0.5), (999_999, 1.0000001), (12, 1e-9), (13, 0.0)]
    cases += [(rng.randint(0, 100_000), rng.choice([0.5, 1.5, 2.0, 0.25, rng.random() * 3]))]
    cases += [(rng.randint(0, 5000), rng.random() * 4) for _ in range(200)]
    rows = await pg_fetch(
        pg_url,
        "SELECT tts_usage_amount(c, m) AS a FROM unnest($1::bigint[], $2::float8[])"
        " WITH ORDINALITY AS x(c, m, o) ORDER BY o",
        [c for c, _ in cases],
        [m for _, m in cases],
    )
    assert [r["a"] for r in rows] == [usage_amount(c, m) for c, m in cases]


# -- usage types come from the models table --------------------------------------------------------


async def test_usage_types_are_the_ones_the_models_table_bills(pg_url: str) -> None:
    user_id, _ = await add_user(pg_url, "tess", "plus")

    async def go(pool: asyncpg.Pool) -> list[str]:
        errors = []
        async with pool.acquire() as conn:

            async def bill_5(usage_type: str) -> None:
                try:
                    await record_usage(user_id, usage_type, 5, uuid.uuid4().hex, conn, commit=True)
                except asyncpg.exceptions.InvalidParameterValueError as exc:
                    errors.append(str(exc))

            await bill_5("nonsense")
            # no model bills premium_voice any more: it is no usage type
            await conn.execute("DELETE FROM voices WHERE model = 'premium'")
            await conn.execute("DELETE FROM models WHERE name = 'premium'")
            await bill_5("premium_voice")
            await bill_5("server_kokoro")
        return errors

    assert await with_pool(pg_url, go) == [
        "unknown usage type nonsense",
        "unknown usage type premium_voice",
    ]
    assert await pg_val(pg_url, "SELECT count(*) FROM usage_log") == 1


# -- the SQL's layout: one definition per function, migrations for the schema ----------------------

_CREATE_FUNCTION = re.compile(r"\bCREATE\s+(OR\s+REPLACE\s+)?FUNCTION\s+([\w.\"]+)", re.IGNORECASE)
BEFORE_LEDGER = Path(__file__).parent / "data" / "migrations_before_ledger"


def _sql_files() -> Iterator[tuple[str, str]]:
    """(where, text) of every SQL file ``migrate`` applies: the migrations, then the functions."""
    for f in sorted(resources.files("daemon.migrations").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".sql"):
            yield f"migrations/{f.name}", f.read_text()
    for package, name in FUNCTION_FILES:
        yield f"{package}/{name}", resources.files(package).joinpath(name).read_text()


def _functions(text: str) -> list[tuple[str, bool]]:
    """(name, or_replace) of every function the SQL text creates, comments left out."""
    code = re.sub(r"--[^\n]*", "", text)
    return [(m[2].lower(), bool(m[1])) for m in _CREATE_FUNCTION.finditer(code)]


def test_every_sql_function_has_one_definition_outside_the_migrations() -> None:
    defined: dict[str, list[str]] = {}
    for where, text in _sql_files():
        for name, or_replace in _functions(text):
            defined.setdefault(name, []).append(where)
            # re-applied on every migrate: only CREATE OR REPLACE can run twice
            assert or_replace, f"{where}: CREATE FUNCTION {name} without OR REPLACE"
    assert {"tts_bill_events", "tts_bill_batch", "tts_record_usage"} <= set(defined)
    assert {name: where for name, where in defined.items() if len(where) > 1} == {}
    in_migrations = {n: w for n, w in defined.items() if w[0].startswith("migrations/")}
    assert in_migrations == {}, "versioned migrations hold the schema only"
    # the check itself: the older layout had a function defined three times
    old = [n for f in sorted(BEFORE_LEDGER.glob("*.sql")) for n, _ in _functions(f.read_text())]
    assert old.count("tts_record_usage") == 2 and old.count("tts_bill_events") == 2


def test_package_data_ships_every_sql_and_lua_file() -> None:
    import daemon

    root = Path(daemon.__file__).parent
    pyproject = tomllib.loads((root.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["daemon"]
    shipped = {p for pattern in patterns for p in root.glob(pattern)}
    needed = {p for p in root.rglob("*") if p.suffix in {".sql", ".lua"}}
    assert {p for _, name in FUNCTION_FILES for p in needed if p.name == name}
    assert sorted(str(p.relative_to(root)) for p in needed - shipped) == []


async def migrate(url: str) -> list[str]:
    """``tts-daemon migrate`` on ``url`` (the store's public API, in a thread of its own, as a
    daemon starting); the versions applied."""

    async def go() -> list[str]:
        import trio_asyncio

        async with trio_asyncio.open_loop(), open_pg_pool(url, size=1, min_size=1) as db:
            return await db.migrate()

    return await trio.to_thread.run_sync(trio.run, go)


@pytest.fixture
async def empty_pg_url(servers: Any) -> Any:
    """A database with nothing in it: not even the schema."""
    base, _, _ = servers.postgres.url.rpartition("/")
    name = f"e_{uuid.uuid4().hex[:12]}"
    await pg_fetch(servers.postgres.url, f'CREATE DATABASE "{name}"')
    yield f"{base}/{name}"
    await pg_fetch(servers.postgres.url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _layout(url: str) -> dict[str, Any]:
    """What a migrated database is made of: columns, indexes, constraints, functions."""
    columns = await pg_fetch(
        url,
        "SELECT table_name, column_name, data_type, is_nullable, column_default"
        "  FROM information_schema.columns WHERE table_schema = 'public'"
        " ORDER BY table_name, column_name",
    )
    indexes = await pg_fetch(
        url, "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexdef"
    )
    constraints = await pg_fetch(
        url,
        "SELECT conrelid::regclass::text AS t, pg_get_constraintdef(oid) AS c FROM pg_constraint"
        " WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2",
    )
    functions = await pg_fetch(
        url,
        "SELECT p.proname, pg_get_functiondef(p.oid) AS def FROM pg_proc p"
        " WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1, 2",
    )
    return {
        "columns": columns,
        "indexes": indexes,
        "constraints": constraints,
        "functions": functions,
    }


@pytest.mark.parametrize(
    "old_versions",
    [("0001_init",), ("0001_init", "0002_bill_events", "0003_bill_batch")],
    ids=["0001", "0001-0003"],
)
async def test_a_database_of_the_older_layout_migrates_and_bills_as_specified(
    empty_pg_url: str, pg_url: str, old_versions: tuple[str, ...]
) -> None:
    """A database migrated when the functions lived in the migrations (the files, byte for
    byte, under tests/data/): ``migrate`` applies no version, leaves the old rows in
    schema_migrations, replaces every function with ledger.sql's, and ends with the same schema
    as a fresh database (pg_url). The events billed before and after bill as the model says."""
    url = empty_pg_url
    rng = random.Random(12)

    async def old_migrate(pool: asyncpg.Pool) -> None:  # the runner those databases had
        async with pool.acquire() as conn:
            await conn.execute(
                "CREATE TABLE schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version in old_versions:
                async with conn.transaction():
                    await conn.execute((BEFORE_LEDGER / f"{version}.sql").read_text())
                    await conn.execute("INSERT INTO schema_migrations VALUES ($1)", version)

    await with_pool(url, old_migrate)
    setup = [
        ("old-plus", "plus", {"rollover": 300, "purchased": 500, "premium_used": 99_500}),
        ("old-basic", "basic", {"rollover": -20, "purchased": 700, "premium_used": 0}),
        ("old-free", "free", {"rollover": 0, "purchased": 0, "premium_used": 0}),
    ]
    ids = await add_users(url, setup)
    models = {
        u: Model(PLANS[plan], **start) for u, (_, plan, start) in zip(ids, setup, strict=True)
    }

    def some_events(n: int) -> list[PreparedEvent]:
        return [
            event(rng.choice(ids), rng.choice(["premium", "kokoro"]), rng.randint(1, 400))
            for _ in range(n)
        ]

    before = some_events(20)

    async def bill_before(pool: asyncpg.Pool) -> None:  # with the old functions
        async with pool.acquire() as conn:
            for p in before:
                await record_usage(
                    p.event.user_id, p.usage_type, p.amount, p.event.event_id, conn, commit=True
                )

    await with_pool(url, bill_before)
    expected = {p.event.event_id: models[p.event.user_id].bill(p) for p in before}

    # the one version newer than those layouts: the mirror's ledger version (docs/billing.md)
    assert await migrate(url) == ["0004_mirror"]
    assert await migrate(url) == []  # and again: ledger.sql runs any number of times
    versions = await pg_fetch(url, "SELECT version FROM schema_migrations ORDER BY version")
    assert tuple(r["version"] for r in versions) == (*old_versions, "0004_mirror")
    assert await _layout(url) == await _layout(pg_url)

    # billed after: new events, and the ones billed before again (duplicates: no-ops)
    after = some_events(40) + rng.sample(before, 5)
    rng.shuffle(after)
    outcome = await with_pool(url, lambda pool: bill_group(pool, after))
    assert set(outcome.duplicates) == {p.event.event_id for p in before} & {
        p.event.event_id for p in after
    }
    for p in after:
        if p.event.event_id not in expected:
            expected[p.event.event_id] = models[p.event.user_id].bill(p)
    rows = await logged(url, list(expected))
    assert {e: breakdown(d) for e, d in rows.items()} == expected
    for user_id, model in models.items():
        assert await state(url, user_id) == model.state(), user_id


@pytest.mark.timeout(120)
async def test_daemons_migrating_at_once_do_not_race(empty_pg_url: str) -> None:
    """Four migrations at once on an empty database (four daemons starting together): each
    version is applied once, and ``schema_migrations`` and the functions are created one migrator
    after the other (two sessions creating one of them at once: a unique violation in the
    catalog)."""

    async def one(results: list[list[str]]) -> None:
        results.append(await migrate(empty_pg_url))

    for _ in range(2):  # the empty database, then re-applying ledger.sql alone
        results: list[list[str]] = []
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one, results)
        assert len(results) == 4
        assert sorted(v for r in results for v in r) in ([], ["0001_init", "0004_mirror"])
    versions = await pg_fetch(
        empty_pg_url, "SELECT version FROM schema_migrations ORDER BY version"
    )
    assert [r["version"] for r in versions] == ["0001_init", "0004_mirror"]
