"""Operating the daemon on real servers: the events it logs, /metrics, /healthz, the monitor."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from daemon.config import Config
from daemon.contracts import Keys
from daemon.runtime.daemon import Daemon, open_daemon
from daemon.runtime.services import BuildServices, Deps, build_services
from daemon.runtime.supervisor import ServiceSpec
from daemon.testing.client import WsClient
from daemon.testing.config import make_config
from daemon.testing.stores import add_user, pg_fetch, pg_val
from daemon.testing.waiting import wait_until
from tests.ops_support import BillingGate, events_of, log_records, scrape, synthesis_event

TEXTS = ["Hello there.", "Second block, a little longer.", "And a third one to finish."]
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

SYNTHESIS_FIELDS = {
    "job_id": str,
    "variant_hash": str,
    "user_id": int,
    "model": str,
    "voice": str,
    "text_length": int,
    "queue_wait_ms": (int, float),
    "worker_ms": (int, float),
    "finalize_ms": (int, float),
    "cache_store_ms": (int, float),
    "notify_ms": (int, float),
}
BILLING_FIELDS = {"events_count": int, "users_count": int, "duration_ms": (int, float)}


async def _synthesize(daemon: Daemon, token: str, doc: str, texts: list[str]) -> dict[int, Any]:
    assert daemon.addresses is not None
    async with WsClient.connect(daemon.addresses.ws_url, token) as client:
        await client.synthesize(doc, texts)
        await client.until(lambda _: len(client.terminal(doc)) == len(texts))
    return client.terminal(doc)


async def _billed(pg_url: str, n: int) -> bool:
    return (await pg_val(pg_url, "SELECT count(*) FROM usage_log")) >= n


async def test_pinned_events_are_logged_with_their_fields(daemon: Daemon, pg_url: str) -> None:
    user_id, token = await add_user(pg_url, "alice", "plus")
    await _synthesize(daemon, token, "doc-1", TEXTS)
    await wait_until(lambda: _billed(pg_url, 3), what="three billed events")
    path = daemon.cfg.events_path
    await wait_until(
        lambda: sum(e.events_count for e in events_of(path, "billing_processed")) >= 3,
        what="billing_processed events in the log",
    )
    records = log_records(path)  # the on-disk format, as outside programs read it
    for record in records:
        assert list(record)[:2] == ["ts", "event"]
        assert TS.match(record["ts"]), record["ts"]
    synthesized = [r for r in records if r["event"] == "synthesis_complete"]
    assert len(synthesized) == 3
    for r in synthesized:
        for name, kind in SYNTHESIS_FIELDS.items():
            assert isinstance(r[name], kind), (name, r)
        assert r["user_id"] == user_id and r["model"] == "kokoro" and r["voice"] == "af_heart"
        assert r["finalize_ms"] >= 0 and r["worker_ms"] > 0
    assert sorted(r["text_length"] for r in synthesized) == sorted(len(t) for t in TEXTS)
    logged_ids = {r["job_id"] for r in synthesized}
    billed_ids = {r["event_id"] for r in await pg_fetch(pg_url, "SELECT event_id FROM usage_log")}
    assert logged_ids == billed_ids  # the log's job_id is usage_log's event_id
    batches = [r for r in records if r["event"] == "billing_processed"]
    for r in batches:
        for name, kind in BILLING_FIELDS.items():
            assert isinstance(r[name], kind), (name, r)
        assert r["users_count"] == 1
    assert sum(r["text_length"] for r in batches) == sum(len(t) for t in TEXTS)


async def test_metrics_are_exposed_and_move_after_a_synthesis(daemon: Daemon, pg_url: str) -> None:
    assert daemon.addresses is not None
    http_url = daemon.addresses.ops_url
    before = await scrape(http_url)
    for name in (
        "tts_billing_queue_depth",
        "tts_billing_events_total",
        "tts_billing_batch_seconds_count",
        "tts_request_pool_wait_seconds_count",
        "tts_hot_finalize_seconds_count",
        "tts_ws_connections",
    ):
        assert (name, ()) in before, name
    for service in ("gateway", "hot", "billing", "scanner", "monitor"):
        assert before[("tts_service_restarts_total", (("service", service),))] == 0

    _, token = await add_user(pg_url, "bob", "plus")
    assert daemon.addresses is not None
    async with WsClient.connect(daemon.addresses.ws_url, token) as client:
        await wait_until(
            lambda: _gauge(http_url, "tts_ws_connections", 1), what="one open connection"
        )
        await client.synthesize("doc-m", TEXTS)
        await client.until(lambda _: len(client.terminal("doc-m")) == 3)
    await wait_until(lambda: _billed(pg_url, 3), what="three billed events")
    after = await wait_until(lambda: _scrape_when_billed(http_url, 3), what="metrics to move")

    def moved(name: str) -> float:
        return after[(name, ())] - before[(name, ())]

    assert moved("tts_billing_events_total") == 3
    assert moved("tts_hot_finalize_seconds_count") == 3
    assert moved("tts_billing_batch_seconds_count") >= 1
    assert moved("tts_billing_batch_seconds_sum") > 0
    # the request path waits on no Postgres pool: the handshake and the holds are Redis only
    assert moved("tts_request_pool_wait_seconds_count") == 0
    assert moved("tts_holds_settled_total") == 3
    assert after[("tts_billing_queue_depth", ())] == 0
    assert after[("tts_ws_connections", ())] == 0
    assert after[("tts_hot_results_total", (("outcome", "audio"),))] == 3


async def _gauge(http_url: str, name: str, value: float) -> bool:
    return (await scrape(http_url)).get((name, ())) == value


async def _scrape_when_billed(http_url: str, n: int) -> dict | None:
    metrics = await scrape(http_url)
    return metrics if metrics[("tts_billing_events_total", ())] >= n else None


def breakable_hot(break_hot: trio.Event) -> BuildServices:
    """The daemon's services, with the real hot path wrapped so that a test can make it fail."""

    def build(cfg: Config, deps: Deps) -> list[ServiceSpec]:
        specs = build_services(cfg, deps)
        (hot,) = [s for s in specs if s.name == "hot"]

        async def run(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            async with trio.open_nursery() as nursery:
                task_status.started(await nursery.start(hot.run))
                await break_hot.wait()
                raise RuntimeError("hot path broken by the test")

        return [attrs.evolve(s, run=run) if s is hot else s for s in specs]

    return build


async def test_healthz_is_503_while_the_hot_path_is_down(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    # A long backoff keeps the hot path down ("restarting") while the test looks.
    cfg = make_config(tmp_path, supervisor={"backoff_min_s": 30.0, "backoff_max_s": 30.0})
    break_hot = trio.Event()
    async with open_daemon(cfg, redis_url, pg_url, services=breakable_hot(break_hot)) as d:
        async with httpx.AsyncClient(base_url=d.addresses.ops_url) as http:
            ok = await http.get("/healthz")
            assert ok.status_code == 200 and ok.json()["status"] == "ok"
            break_hot.set()
            down = await wait_until(lambda: _status(http, 503), what="/healthz to turn 503")
        body = down.json()
        assert body["status"] == "unavailable"
        assert body["services"]["hot"]["state"] == "restarting"
        assert "hot path broken by the test" in body["services"]["hot"]["last_error"]
        assert body["services"]["gateway"]["state"] == "running"
        assert body["billing_queue_depth"] == 0
        assert body["pools"]["request"]["size"] == 30
        metrics = await scrape(d.addresses.ops_url)
        assert metrics[("tts_service_restarts_total", (("service", "hot"),))] == 1
        assert metrics[("tts_errors_total", (("service", "hot"),))] >= 1
        path = cfg.events_path
        await wait_until(lambda: events_of(path, "service_restarted"), what="service_restarted")
    (restarted,) = events_of(path, "service_restarted")
    (line,) = [r for r in log_records(path) if r["event"] == "service_restarted"]
    assert list(line)[:6] == ["ts", "event", "service", "attempt", "backoff_s", "reason"]
    assert restarted.service == "hot" and restarted.attempt == 1
    assert 15.0 <= restarted.backoff_s <= 30.0
    assert "hot path broken by the test" in restarted.reason
    errors = [e for e in events_of(path, "error") if e.service == "hot"]
    assert errors and "hot path broken by the test" in errors[0].message


async def _status(http: httpx.AsyncClient, code: int) -> httpx.Response | None:
    response = await http.get("/healthz")
    return response if response.status_code == code else None


async def test_health_reads_the_billing_consumer_of_its_current_start(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    """The billing service opens its pool afresh on every start and hands it over with
    started(): after a crash, /healthz and the daemon's handle show the new start's pool, and
    the events the crash left pending are billed by it."""
    crashed = trio.Event()

    async def crash_once(point: str) -> None:
        if point == "billing.after_commit" and not crashed.is_set():
            crashed.set()
            raise RuntimeError("billing crashed by the test")

    cfg = make_config(tmp_path)
    async with open_daemon(cfg, redis_url, pg_url, billing_fault=crash_once) as d:
        first = d.handle("billing")
        assert first is not None and first.pool.size == cfg.postgres.billing_pool_size
        _, token = await add_user(pg_url, "hana", "plus")
        await _synthesize(d, token, "doc", TEXTS)
        await wait_until(lambda: _billed(pg_url, len(TEXTS)), what="billed after the restart")
        await wait_until(lambda: d.supervisor.state("billing") == "running", what="billing up")
        second = d.handle("billing")
        assert second is not None and second is not first and second.pool is not first.pool
        assert d.supervisor.states["billing"].restarts == 1
        async with httpx.AsyncClient(base_url=d.addresses.ops_url) as http:
            body = (await http.get("/healthz")).json()
        billing_pool = body["pools"]["billing"]
        assert billing_pool["size"] == cfg.postgres.billing_pool_size
        assert isinstance(billing_pool["in_use"], int)  # null while billing is not running
        assert body["services"]["billing"]["state"] == "running"
    assert await pg_val(pg_url, "SELECT count(*) FROM usage_log") == len(TEXTS)


async def test_a_daemon_that_cannot_start_says_why_in_the_events_log(
    tmp_path: Path, redis_url: str
) -> None:
    cfg = make_config(tmp_path, postgres={"acquire_timeout_s": 1.0})
    closed_port = "postgresql://nobody:x@127.0.0.1:9/none"
    with pytest.raises(ExceptionGroup) as caught:
        async with open_daemon(cfg, redis_url, closed_port):
            pass
    assert caught.group_contains(OSError, depth=None)
    (error,) = [e for e in events_of(cfg.events_path, "error") if e.service == "daemon"]
    assert "daemon stopped by a failure" in error.message and error.context["fatal"] is True


async def test_live_reconciliation_names_events_that_were_never_billed(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    cfg: Config = make_config(tmp_path, monitor={"sample_s": 0.2, "interval_s": 0.3})
    gate = BillingGate()
    async with open_daemon(cfg, redis_url, pg_url, billing_fault=gate) as d:
        assert d.addresses is not None
        _, alice = await add_user(pg_url, "alice", "plus")
        await _synthesize(d, alice, "doc-a", TEXTS)
        await wait_until(lambda: _billed(pg_url, 3), what="alice billed")
        await wait_until(
            lambda: d.stats.reconciliation.delta == 0 and not d.stats.pending,
            what="a clean reconciliation",
        )

        # Bob's subscription disappears while his events wait to be billed: billing
        # dead-letters them, so they are neither billed nor waiting.
        bob_id, bob = await add_user(pg_url, "bob", "plus")
        gate.close()
        await _synthesize(d, bob, "doc-b", ["Bob's first block.", "Bob's second block."])
        await wait_until(lambda: gate.holding, what="billing to hold bob's batch")
        await pg_val(pg_url, "DELETE FROM subscriptions WHERE user_id = $1 RETURNING 1", bob_id)
        gate.open()
        await wait_until(lambda: d.stats.reconciliation.delta == 2, what="delta 2")

        data = (await _get_json(d.addresses.ops_url, "/dashboard/data"))["reconciliation"]
        bob_jobs = {
            e.job_id
            for e in events_of(cfg.events_path, "synthesis_complete")
            if e.user_id == bob_id
        }
        assert data["delta"] == 2 and data["grade"] == "amber"
        assert {m["job_id"] for m in data["missing"]} == bob_jobs
        assert all("dead-lettered" in m["reason"] for m in data["missing"])
        metrics = await scrape(d.addresses.ops_url)
        assert metrics[("tts_billing_reconciliation_delta", ())] == 2
        assert metrics[("tts_dead_letter_depth", (("queue", "tts:billing:dead"),))] == 2
        await wait_until(
            lambda: [e for e in events_of(cfg.events_path, "error") if e.service == "monitor"],
            what="the monitor's error event",
        )
    (monitor_error,) = [e for e in events_of(cfg.events_path, "error") if e.service == "monitor"]
    assert set(monitor_error.context["job_ids"]) == bob_jobs and monitor_error.context["delta"] == 2


async def _get_json(http_url: str, path: str) -> Any:
    async with httpx.AsyncClient(base_url=http_url) as http:
        response = await http.get(path)
    assert response.status_code == 200
    return response.json()


async def test_dashboard_routes_serve_the_page_and_vendored_files(daemon: Daemon) -> None:
    assert daemon.addresses is not None
    async with httpx.AsyncClient(base_url=daemon.addresses.ops_url) as http:
        page = await http.get("/dashboard")
        script = await http.get("/dashboard/static/uPlot.iife.min.js")
        licence = await http.get("/dashboard/static/uPlot.LICENSE")
        traversal = await http.get("/dashboard/static/..%2F..%2Fapp.py")
        unknown = await http.get("/dashboard/static/nope.js")
        data = await http.get("/dashboard/data")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="/dashboard/static/uPlot.iife.min.js"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from outside
    assert script.status_code == 200 and "uPlot" in script.text[:200]
    assert licence.status_code == 200 and "MIT" in licence.text
    assert traversal.status_code == 404 and unknown.status_code == 404
    body = data.json()
    assert data.headers["cache-control"] == "no-store"
    assert {"request", "hot", "billing", "reconciliation", "series", "batches"} <= set(body)
    assert body["services"]["billing"]["state"] == "running"


async def test_live_reconciliation_does_not_call_an_event_missing_when_its_log_line_came_late(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    """The stream scan starts at the time the events were logged (minus a margin); an event
    appended to the stream long before its line was logged must still be found, not reported."""
    import json
    import time

    import trio_asyncio

    from daemon.config import MonitorConfig, PostgresConfig
    from daemon.ops.events import EventLog
    from daemon.ops.metrics import Metrics
    from daemon.ops.monitor import Monitor
    from daemon.ops.stats import OpsStats
    from daemon.stores.pg import open_pg_pool
    from daemon.stores.redis import open_redis

    async with (
        trio_asyncio.open_loop(),
        open_redis(redis_url) as store,
        open_pg_pool(pg_url, size=1) as pool,
    ):
        ids = [f"{i:032x}" for i in range(250)]  # more than one XRANGE chunk
        for job_id in ids:
            event = {"event_id": job_id, "user_id": 1, "model": "kokoro", "voice": "af_heart"}
            await store.execute("XADD", Keys.BILLING, "*", "event", json.dumps(event))
        late = time.time() + 120.0  # the lines were "logged" two minutes after the XADDs
        stats = OpsStats(MonitorConfig(), Metrics(), clock=lambda: late)
        for job_id in ids:
            stats.on_event(synthesis_event(job_id, finalize_ms=1.0))
        log = EventLog(tmp_path / "events.jsonl")
        seen: list[Any] = []
        log.add_listener(seen.append)
        monitor = Monitor(
            store=store,
            pg_url=pg_url,
            pg_cfg=PostgresConfig(),
            cfg=MonitorConfig(),
            stats=stats,
            events=log,
            metrics=Metrics(),
            models=["kokoro"],
        )
        rec = await monitor.reconcile_once(pool)
        assert (rec.delta, rec.waiting, rec.complete) == (0, 250, True)
        # One of them really is gone: exactly that one is named, and an error says so.
        await store.execute("XDEL", Keys.BILLING, (await _first_entry(store)))
        rec = await monitor.reconcile_once(pool)
        assert (rec.delta, rec.waiting) == (1, 249)
        assert rec.missing == [(ids[0], "lost: in neither")]
        (error,) = [e for e in seen if e.kind == "error"]
        assert error.service == "monitor" and error.context["job_ids"] == [ids[0]]


async def _first_entry(store: Any) -> bytes:
    (entry,) = await store.execute("XRANGE", Keys.BILLING, "-", "+", "COUNT", 1)
    return entry[0]
