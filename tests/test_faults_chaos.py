"""Each fault scenario of tools/chaos at a small scale: lose nothing, bill nothing twice.

Every test runs real ``tts-daemon run`` processes, ``tts-worker`` processes and WebSocket users
against a Redis and a Postgres this module owns (started once, restarted by the faults; a fresh
database per test), injects its fault during the load, then drains and reconciles exactly:
every block asked for reached a terminal status, every delivered block has exactly one
``usage_log`` row with the right amount, nothing else is billed, the subscription counters agree
with the log, and every process the run started is gone afterwards.

The long mixed run, with its figures, is ``python -m tools.chaos --scenario mixed``
(docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import attrs
import psutil
import pytest
import redis
import trio

from daemon.embedded import EmbeddedPostgres, EmbeddedRedis
from daemon.testing.chaos import Chaos, Params

# Above the sum of the tool's own ceilings (start 60 s, recover 30 s, drain 30 s), so that a slow
# phase is reported by the tool, by name, rather than cut short by pytest.
pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

# Small and quick: a few blocks a second, one fault, daemons told to heal fast.
SMALL = Params(
    load_s=4.0,
    users=2,
    rate=3.0,
    buffer=4,
    workers=1,
    worker_concurrency=2,
    worker_batch=2,
    worker_latency_ms=50.0,
    first_fault_s=1.5,
    fault_gap_s=60.0,  # one fault per kind in the scenario, then quiet
    daemon_down_s=0.5,
    redis_down_s=0.3,
    pg_down_s=2.0,
    billing_fault_s=2.0,
    billing_fault_rate=1.0,
    stall_s=4.0,
    ack_timeout_s=12.0,
    recover_timeout_s=30.0,
    drain_timeout_s=30.0,
    visibility_timeout_s=2.0,
    consumer_ttl_s=2.0,
    claim_idle_s=2.0,
    backoff_max_s=1.0,
    request_pool_size=4,
)


@attrs.define
class Servers:
    redis: EmbeddedRedis
    postgres: EmbeddedPostgres


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    # Not under pytest's temp root: any pytest session starting meanwhile makes that private
    # again (0700), and Postgres — run as its own system user when we are root — then cannot
    # reach its data directory to restart, which these tests do.
    root = Path(tempfile.mkdtemp(prefix="tts-chaos-servers-"))
    s = Servers(
        EmbeddedRedis(root / "redis", root / "secrets", appendfsync="always"),
        EmbeddedPostgres(root / "postgres" / "data", root / "secrets"),
    )
    s.redis.start()
    s.postgres.start()
    try:
        yield s
    finally:
        s.redis.stop()
        s.postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


def _fresh(servers: Servers) -> str:
    """A new database on the module's Postgres, and an empty Redis."""
    name = f"chaos_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(servers.postgres.url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    client = redis.Redis.from_url(servers.redis.url)
    try:
        client.flushall()
    finally:
        client.close()
    base, _, _ = servers.postgres.url.rpartition("/")
    return f"{base}/{name}"


async def run_chaos(tmp_path: Path, servers: Servers, **changes: Any) -> tuple[Chaos, dict]:
    pg_url = await trio.to_thread.run_sync(_fresh, servers)
    p = attrs.evolve(SMALL, **changes)
    chaos = Chaos(
        p, tmp_path, lambda _: None, redis=servers.redis, postgres=servers.postgres, pg_url=pg_url
    )
    result = await chaos.run()
    # No strays: every process the run started (daemons, workers, replacements) is gone.
    alive = [pid for pid in chaos.started_pids if _alive(pid)]
    assert alive == [], f"processes left behind: {alive}"
    return chaos, result


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_nothing_lost(result: dict, *, kind: str) -> None:
    """The exact books: what every scenario must show."""
    assert result["faults_injected"].get(kind, 0) >= 1, result["faults_injected"]
    assert result["blocks"] > 0
    assert result["lost"] == 0
    assert result["double_billed"] == 0
    assert result["wrong_amount"] == 0
    assert result["phantom_rows"] == 0
    assert result["billed_not_delivered"] == 0
    assert result["delivered"] == result["blocks"] == result["billed"]
    assert result["events_log_unbilled"] == 0
    assert result["clients"]["ack_timeouts"] == 0  # every request got an answer in time
    assert all(f["recover_s"] is not None for f in result["faults"]), result["faults"]
    failed = [name for name, ok in result["verified"].items() if not ok]
    assert failed == [], failed


async def test_daemon_sigkilled_at_a_random_moment(tmp_path: Path, servers: Servers) -> None:
    _, result = await run_chaos(tmp_path, servers, scenario="daemon-kill")
    assert_nothing_lost(result, kind="daemon_kill")
    assert result["daemon_starts"] == {"daemon-0": 2}
    # The clients saw their connection die and came back on their own.
    assert result["clients"]["sessions"] > SMALL.users + 1


async def test_sigterm_under_load_exits_0_within_10_s_and_loses_nothing(
    tmp_path: Path, servers: Servers
) -> None:
    _, result = await run_chaos(tmp_path, servers, scenario="sigterm")
    assert_nothing_lost(result, kind="daemon_sigterm")
    # one SIGTERM under load, one at the end of the run
    assert len(result["sigterm"]) == 2
    for stop in result["sigterm"]:
        assert stop["exit_code"] == 0
        assert stop["exit_s"] <= 10.0


async def test_billing_service_failing_repeatedly(tmp_path: Path, servers: Servers) -> None:
    _, result = await run_chaos(tmp_path, servers, scenario="billing")
    assert_nothing_lost(result, kind="billing_faults")
    # It really failed (the supervisor restarted it), and batches committed but not acknowledged
    # came back and were recognised as already billed.
    assert result["billing_injected_failures"] >= 1
    assert result["billing_duplicates_redelivered"] >= 1


async def test_redis_restarted_killed_and_crashed_with_fsync_always(
    tmp_path: Path, servers: Servers
) -> None:
    """A graceful restart, a SIGKILL and an emulated host crash (the AOF cut back to its last
    fsync): with ``appendfsync always`` not one acknowledged write is lost, and nothing billed."""
    _, result = await run_chaos(
        tmp_path, servers, scenario="redis", fault_gap_s=0.3, appendfsync="always"
    )
    for kind in ("redis_restart", "redis_kill", "redis_crash"):
        assert_nothing_lost(result, kind=kind)
    window = result["loss_window"]
    assert window["appendfsync"] == "always"
    assert window["acked_writes_lost"] == 0
    assert [f["acked_writes_lost"] for f in result["faults"]] == [0, 0, 0]


async def test_redis_host_crash_with_fsync_everysec_measures_its_loss_window(
    tmp_path: Path, servers: Servers
) -> None:
    """everysec may lose up to about a second of writes in a host crash: measured, reported."""
    _, result = await run_chaos(
        tmp_path, servers, scenario="redis-crash", appendfsync="everysec", faults=2,
        fault_gap_s=0.3,
    )  # fmt: skip
    window = result["loss_window"]
    assert window["appendfsync"] == "everysec"
    assert len(window["by_fault"]) == result["faults_injected"]["redis_crash"] >= 2
    # The AOF really lost its unsynced tail, and acknowledged writes with it: the window is real,
    # and within what Redis documents for everysec (about a second, two when the disk is slow).
    assert window["acked_writes_lost"] > 0
    assert 0 < window["seconds_of_writes_lost_max"] <= 2.0
    # What that cost the books is counted, not hidden; and nothing else went wrong.
    assert window["blocks_unbilled"] == result["delivered_unbilled"]
    assert window["blocks_double_billed"] == result["double_billed"]
    # …and visible to monitoring: each unbilled block is in the events log's reconciliation delta.
    assert result["events_log_unbilled"] == result["delivered_unbilled"]
    assert result["verified"]["loss_visible_in_events_log"]
    assert result["undelivered"] == 0 and result["wrong_amount"] == 0
    failed = [name for name, ok in result["verified"].items() if not ok]
    assert failed == [], failed


async def test_postgres_restarted_and_unreachable_for_a_while(
    tmp_path: Path, servers: Servers
) -> None:
    _, result = await run_chaos(tmp_path, servers, scenario="postgres")
    assert_nothing_lost(result, kind="postgres_outage")
    # The clients heard no error at all meanwhile: the request path reads no Postgres (tokens,
    # entitlements and holds are in Redis, docs/billing.md); only billing waited.
    errors = result["clients"]["error_frames"]
    assert errors == {}, errors


async def test_worker_killed_mid_job(tmp_path: Path, servers: Servers) -> None:
    _, result = await run_chaos(tmp_path, servers, scenario="worker-kill")
    assert_nothing_lost(result, kind="worker_kill")
    # It held jobs when it died; the scanner gave them to another worker and each was billed once.
    assert result["jobs_held_by_killed_workers"] >= 1
    assert result["jobs_held_by_killed_workers_unbilled"] == 0


async def test_a_hostile_worker_fails_its_blocks_recoverably_and_misbills_nothing(
    tmp_path: Path, servers: Servers
) -> None:
    _, result = await run_chaos(tmp_path, servers, scenario="hostile-worker")
    assert_nothing_lost(result, kind="hostile_worker")
    (fault,) = [f for f in result["faults"] if f["kind"] == "hostile_worker"]
    assert sum(fault["results"].values()) >= 1, fault
    # Its refused results reached clients as recoverable errors, which they asked again.
    refused = [e for e in result["clients"]["block_errors"] if "refused" in e]
    assert refused or fault["results"].keys() <= {"forged_payer"}, result["clients"]


async def test_two_daemons_on_one_redis_and_postgres_one_killed(
    tmp_path: Path, servers: Servers
) -> None:
    _, result = await run_chaos(tmp_path, servers, scenario="two-daemons", daemon_down_s=2.0)
    assert_nothing_lost(result, kind="daemon_kill")
    assert set(result["daemon_starts"]) == {"daemon-0", "daemon-1"}
    assert sum(result["daemon_starts"].values()) == 3  # one of them killed and restarted
    # The killed daemon's clients failed over to the survivor and carried on.
    assert result["clients"]["sessions"] > SMALL.users + 1
