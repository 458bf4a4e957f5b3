"""tools/report.sh as an operator (or cron) runs it: a separate process, its exit status."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import trio

from daemon.config import Config, load_config
from daemon.contracts import Keys
from daemon.contracts.events import BillingProcessed, Error, Event
from daemon.runtime.daemon import Daemon, open_daemon
from daemon.runtime.services import Deps, build_services
from daemon.runtime.supervisor import ServiceSpec
from daemon.testing.client import WsClient
from daemon.testing.stores import add_user, pg_val, redis_call
from daemon.testing.waiting import wait_until
from tests.ops_support import events_of, synthesis_event, write_config

REPORT = Path(__file__).resolve().parent.parent / "tools" / "report.sh"
TEXTS = ["Hello there.", "Second block, a little longer.", "And a third one.", "A fourth."]


async def run_report(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(90):
        return await trio.run_process(
            [str(REPORT), "--config", str(config), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=config.parent,
        )


async def _synthesize(daemon: Daemon, token: str, doc: str, texts: list[str]) -> None:
    assert daemon.addresses is not None
    async with WsClient.connect(daemon.addresses.ws_url, token) as client:
        await client.synthesize(doc, texts)
        await client.until(lambda _: len(client.terminal(doc)) == len(texts))
    assert {f["status"] for f in client.terminal(doc).values()} == {"cached"}


async def test_clean_run_is_green(tmp_path: Path, redis_url: str, pg_url: str) -> None:
    config = write_config(tmp_path, redis_url, pg_url)
    cfg = load_config(config)
    async with open_daemon(cfg, redis_url, pg_url) as d:
        _, token = await add_user(pg_url, "alice", "plus")
        await _synthesize(d, token, "doc-1", TEXTS)
        await _synthesize(d, token, "doc-2", [*TEXTS[:2], "Something new."])
        await wait_until(
            lambda: (
                sum(b.events_count for b in events_of(cfg.events_path, "billing_processed")) >= 5
            ),
            what="five events billed and logged",
        )
        # Beside the running daemon:
        beside = await run_report(config)
        as_json = await run_report(config, "--json")
    alone = await run_report(config)  # and with the daemon gone

    out = beside.stdout.decode()
    assert beside.returncode == 0, out + beside.stderr.decode()
    assert "GREEN  (exit 0)" in out
    assert "delta              0" in out
    assert "batch time         p50" in out
    report: dict[str, Any] = json.loads(as_json.stdout)
    assert as_json.returncode == 0
    rec = report["reconciliation"]
    # doc-2 repeats two of doc-1's texts: answered from the cache, synthesized once, billed once
    assert (rec["synthesized"], rec["billed"], rec["waiting"], rec["missing"]) == (5, 5, 0, 0)
    billing = report["billing_processed"]
    assert billing["events_billed"] == 5
    assert billing["characters"] == sum(len(t) for t in TEXTS) + len("Something new.")
    assert (
        billing["batch_ms"]["p50"] > 0 and billing["batch_ms"]["p95"] >= billing["batch_ms"]["p50"]
    )
    assert billing["events_per_s_busy"] > 0
    assert report["liveness"]["ok"] is True
    assert report["dead_letters"][Keys.BILLING_DEAD] == 0
    assert alone.returncode == 0, alone.stdout.decode() + alone.stderr.decode()


def no_billing(cfg: Config, deps: Deps) -> list[ServiceSpec]:
    """Billing stopped while synthesis goes on: the daemon's services without the billing one."""
    return [spec for spec in build_services(cfg, deps) if spec.name != "billing"]


async def test_billing_stopped_while_synthesis_goes_on_is_red_and_names_what_is_missing(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    config = write_config(tmp_path, redis_url, pg_url, monitor={"liveness_grace_s": 0.0})
    cfg = load_config(config)
    async with open_daemon(cfg, redis_url, pg_url, services=no_billing) as d:
        _, token = await add_user(pg_url, "bob", "plus")
        await _synthesize(d, token, "doc-1", TEXTS)
        await wait_until(
            lambda: len(events_of(cfg.events_path, "synthesis_complete")) == 4,
            what="four syntheses logged",
        )
        # One event vanishes from the billing queue (what a Redis that lost its data does).
        entries = await redis_call(redis_url, "XRANGE", Keys.BILLING, "-", "+")
        assert len(entries) == 4
        lost_entry, fields = entries[0]
        lost_job = json.loads(fields[b"event"])["event_id"]
        assert await redis_call(redis_url, "XDEL", Keys.BILLING, lost_entry) == 1
        result = await run_report(config)
    out = result.stdout.decode()
    assert result.returncode == 2, out + result.stderr.decode()
    assert "RED  (exit 2)" in out
    assert "liveness             FAILED" in out
    assert "waiting            3" in out and "delta              1" in out
    assert "missing job_ids (neither billed nor waiting):" in out
    (line,) = [ln for ln in out.splitlines() if lost_job in ln and "lost: in neither" in ln]
    assert "kokoro" in line
    assert await pg_val(pg_url, "SELECT count(*) FROM usage_log") == 0


async def test_dead_letters_make_it_amber_and_missing_events_are_named_with_the_reason(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    config = write_config(tmp_path, redis_url, pg_url)
    cfg = load_config(config)
    from tests.ops_support import BillingGate

    gate = BillingGate()
    async with open_daemon(cfg, redis_url, pg_url, billing_fault=gate) as d:
        user_id, token = await add_user(pg_url, "carol", "plus")
        gate.close()
        await _synthesize(d, token, "doc-c", TEXTS[:2])
        await wait_until(lambda: gate.holding, what="billing to hold the batch")
        await pg_val(pg_url, "DELETE FROM subscriptions WHERE user_id = $1 RETURNING 1", user_id)
        gate.open()
        await wait_until(
            lambda: redis_call(redis_url, "LLEN", Keys.BILLING_DEAD), what="dead letters"
        )
        await wait_until(
            lambda: events_of(cfg.events_path, "billing_processed"), what="the batch logged"
        )
        result = await run_report(config, "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1, result.stdout.decode() + result.stderr.decode()
    assert report["grade"] == "amber"
    assert report["dead_letters"][Keys.BILLING_DEAD] == 2
    missing = report["reconciliation"]["missing_job_ids"]
    assert {m["job_id"] for m in missing} == {
        e.job_id for e in events_of(cfg.events_path, "synthesis_complete")
    }
    assert all(m["reason"].startswith("dead-lettered: ") for m in missing)
    assert all("no subscription" in m["reason"] for m in missing)
    assert report["liveness"]["ok"] is True  # billing ran; it dead-lettered


async def test_a_bad_configuration_is_red_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[monitor]\ndelta_red = 0\n")
    result = await run_report(config)
    assert result.returncode == 2
    assert result.stderr.decode().strip() == "report: monitor.delta_red: must be >= 1, got 0"


def test_the_log_is_read_across_every_rotated_file_oldest_first(tmp_path: Path) -> None:
    from daemon.ops.events import rotation_names
    from daemon.ops.report import read_log

    path = tmp_path / "events.jsonl"

    def line(event: Event) -> str:
        record = {"ts": "2026-01-01T00:00:00.000Z", "event": event.kind, **event.fields()}
        return json.dumps(record) + "\n"

    path.with_name("events.jsonl.2").write_text(line(synthesis_event("a", billed=True)))
    path.with_name("events.jsonl.1").write_text(
        line(BillingProcessed(events_count=1, users_count=1, duration_ms=2.0, text_length=5))
    )
    path.write_text(
        line(synthesis_event("b", billed=True))
        + "not json\n"
        + line(synthesis_event("c", billed=False))
        + line(Error(service="events", message="3 events dropped", context={"dropped": 3}))
    )
    scan = read_log(rotation_names(path, 5))
    assert [p.name for p in scan.files] == ["events.jsonl.2", "events.jsonl.1", "events.jsonl"]
    assert list(scan.synthesized) == ["a", "b"]  # c queued nothing to bill
    assert scan.unbilled_syntheses == 1 and scan.bad_lines == 1
    assert len(scan.batches) == 1 and scan.dropped[0][1] == 3
