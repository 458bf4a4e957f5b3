"""``tts-daemon report`` (and ``tools/report.sh``): the health report of the billing pipeline
(docs/metrics.md).

Reads the events log (every rotated file), Redis and Postgres, prints what an operator or a
monitoring agent needs, and exits 0 (green), 1 (amber: look soon) or 2 (red: act now — or the
report could not be made). docs/operations.md says what to do for each finding.

- ``billing_processed``: batches, events and characters billed, batch time p50/p95/max,
  throughput while busy and over the period the log covers.
- The reconciliation delta, exact: every ``job_id`` the log has as synthesized (and queued for
  billing), looked up in ``usage_log`` and in the ``tts:billing`` stream in the order
  ``daemon/ops/reconcile.py`` explains, so a daemon billing while the report runs cannot fool
  it. The missing ones are named, with the reason when the billing dead-letter list has them.
- Liveness: synthesis in the last ``monitor.liveness_window_s`` but no ``billing_processed`` → red.
- The billing queue: depth and the age of the oldest waiting event (``monitor.lag_*``).
- Holds (docs/billing.md): open holds per user, the oldest one's age (older than
  ``holds.ttl_s`` → amber), and per user what the Redis mirror has as settled this period
  against what Postgres has billed (a difference once billing is idle → amber).
- Dead-letter lists, restarts and errors from the log, and ``/healthz`` of a daemon running with
  this configuration (its operations listener), when one answers.

Works beside a running daemon and alone: servers are resolved as the CLI does (configured URLs,
else the embedded servers under ``data.dir``, shared with a daemon that runs them or started for
the report and stopped after it). Read-only: it changes nothing anywhere.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import trio
import trio_asyncio

from daemon.config import DEFAULT_CONFIG, Config, ConfigError, config_path, load_config
from daemon.contracts import MODELS, Keys
from daemon.contracts.events import (
    BillingProcessed,
    Error,
    Event,
    ServiceRestarted,
    SynthesisComplete,
)
from daemon.ops.events import ReadTally, describe, read_files, rotation_names, utc_iso
from daemon.ops.reconcile import (
    billed_among,
    dead_letter_counts,
    dead_lettered_events,
    oldest_waiting_age_s,
    reconcile,
    scan_billing_stream,
)
from daemon.ops.stats import Finding, assess, liveness_failed, percentile, round_ms, worst

__all__ = ["LogScan", "add_arguments", "main", "read_log", "run"]

EXIT = {"green": 0, "amber": 1, "red": 2}


# -- the events log --------------------------------------------------------------------------


@attrs.define
class LogScan:
    """What the report takes from the events log."""

    files: list[Path] = attrs.Factory(list)
    lines: int = 0
    bad_lines: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    # job_id → (ts, user_id, model, text_length) of syntheses whose billing event was queued
    synthesized: dict[str, tuple[float, Any, Any, Any]] = attrs.Factory(dict)
    unbilled_syntheses: int = 0  # synthesis_complete with billed=false (nothing to bill)
    # (ts, events_count, duration_ms, users_count, text_length, billed, duplicates, dead)
    batches: list[tuple[float, int, float, int, int, int, int, int]] = attrs.Factory(list)
    restarts: list[dict[str, Any]] = attrs.Factory(list)
    errors: list[dict[str, Any]] = attrs.Factory(list)
    dropped: list[tuple[float, int]] = attrs.Factory(list)


def read_log(paths: Iterable[Path], *, since: float | None = None) -> LogScan:
    """Read events log files in the order given (oldest first: ``rotation_names``); names that
    do not exist are skipped. ``since``: ignore events older than this unix time."""
    scan = LogScan()
    tally = ReadTally(files=scan.files)
    for event in read_files(paths, tally=tally):
        ts = event.ts
        assert ts is not None  # the reader skips lines without one
        if since is not None and ts < since:
            continue
        scan.first_ts = ts if scan.first_ts is None else min(scan.first_ts, ts)
        scan.last_ts = ts if scan.last_ts is None else max(scan.last_ts, ts)
        _take(scan, event, ts)
    scan.lines, scan.bad_lines = tally.lines, tally.bad_lines
    return scan


def _take(scan: LogScan, e: Event, ts: float) -> None:
    if isinstance(e, SynthesisComplete):
        if e.billed:
            scan.synthesized[e.job_id] = (ts, e.user_id, e.model, e.text_length)
        else:
            scan.unbilled_syntheses += 1
    elif isinstance(e, BillingProcessed):
        scan.batches.append(
            (
                ts,
                e.events_count,
                e.duration_ms,
                e.users_count,
                e.text_length,
                e.billed,
                e.duplicates,
                e.dead_lettered,
            )
        )
    elif isinstance(e, ServiceRestarted):
        scan.restarts.append(
            {"ts": ts, "service": e.service, "attempt": e.attempt, "reason": e.reason}
        )
    elif isinstance(e, Error):
        scan.errors.append({"ts": ts, "service": e.service, "message": e.message})
        dropped = e.context.get("dropped")
        if e.service == "events" and isinstance(dropped, int) and dropped:
            scan.dropped.append((ts, dropped))


# -- Redis and Postgres ----------------------------------------------------------------------


async def _servers_part(cfg: Config, redis_url: str, pg_url: str, ids: list[str]) -> dict[str, Any]:
    from daemon.stores.pg import open_pg_pool
    from daemon.stores.redis import open_redis

    out: dict[str, Any] = {}
    async with (
        trio_asyncio.open_loop(),
        open_redis(redis_url, max_connections=2, command_timeout_s=30.0) as store,
        open_pg_pool(pg_url, size=1, min_size=1, command_timeout_s=120.0) as db,
    ):
        with trio.fail_after(15):
            await store.execute("PING")
        out["schema"] = bool(await db.fetchval("SELECT to_regclass('usage_log') IS NOT NULL"))

        async def billed(chunk: Iterable[str]) -> set[str]:
            return await billed_among(db, chunk) if out["schema"] else set()

        async def waiting(chunk: Any) -> tuple[set[str], int, bool]:
            return await scan_billing_stream(store, chunk)

        out["result"] = await reconcile(ids, billed=billed, waiting=waiting)
        out["dead_events"] = await dead_lettered_events(store) if out["result"].missing else {}
        out["lag_s"], _ = await oldest_waiting_age_s(store)
        out["depth"] = int(await store.execute("XLEN", Keys.BILLING))
        models = set(cfg.workers.models) | set(MODELS)
        out["dead_letters"] = await dead_letter_counts(store, models)
        out["holds"] = await holds_part(store, db) if out["schema"] else {}
    return out


async def holds_part(store: Any, db: Any, *, max_users: int = 10_000) -> dict[str, Any]:
    """Open holds and, per user, the mirror's settled usage against Postgres's billed usage
    (this period): {"users": {user_id: {...}}, "open", "oldest_s", "oldest_state"}."""
    now = time.time()
    holders = await store.holders()
    held = await store.holds_of(holders[:max_users])
    mirrored = (await store.users_with(Keys.ENT_PREFIX))[:max_users]
    users: dict[int, dict[str, Any]] = {}
    oldest, oldest_state = 0.0, ""
    for user_id, h in held.items():
        for _type, _amount, since, state in h["jobs"].values():
            if now - since > oldest:
                oldest, oldest_state = now - since, state
        users[user_id] = {"holds": h["count"], "held": h["sum"]}
    rows = await db.fetch(
        "SELECT user_id, server_kokoro_characters AS k, premium_voice_characters AS p"
        " FROM usage_periods WHERE period_start = tts_period_start()"
        " AND user_id = ANY ($1::bigint[])",
        mirrored,
    )
    billed = {r["user_id"]: (int(r["k"]), int(r["p"])) for r in rows}
    for user_id in mirrored:
        ent = await store.execute(
            "HMGET", Keys.ent(user_id), "kokoro_used", "premium_used", "period_end"
        )
        if ent[2] is not None and float(ent[2]) <= now:
            settled = (0, 0)  # the mirror's period ended: it counts nothing of this one
        else:
            settled = (int(ent[0] or 0), int(ent[1] or 0))
        b = billed.get(user_id, (0, 0))
        if settled != b or user_id in users:
            users.setdefault(user_id, {"holds": 0, "held": {}})
            users[user_id]["settled"] = {"server_kokoro": settled[0], "premium_voice": settled[1]}
            users[user_id]["billed"] = {"server_kokoro": b[0], "premium_voice": b[1]}
    return {
        "open": sum(u["holds"] for u in users.values()),
        "oldest_s": round(oldest, 3),
        "oldest_state": oldest_state,
        "users": {str(k): v for k, v in sorted(users.items())},
        "mismatched": sorted(
            str(k) for k, v in users.items() if "settled" in v and v["settled"] != v["billed"]
        ),
    }


def _healthz(cfg: Config) -> dict[str, Any] | None:
    """/healthz of a daemon running with this configuration, if one answers on its port."""
    ops = cfg.ops
    if not ops.port:
        return None
    host = "127.0.0.1" if ops.host in ("0.0.0.0", "::", "") else ops.host
    url = f"http://{host}:{ops.port}/healthz"
    context: ssl.SSLContext | None = None
    try:
        with urllib.request.urlopen(url, timeout=2.0, context=context) as response:
            return {"url": url, "status": response.status, "body": json.loads(response.read())}
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = None
        return {"url": url, "status": exc.code, "body": body}
    except (OSError, ValueError) as exc:
        return {"url": url, "status": None, "error": str(exc)}


# -- the report ------------------------------------------------------------------------------


def build_report(
    cfg: Config,
    scan: LogScan,
    servers: dict[str, Any],
    health: dict[str, Any] | None,
    *,
    now: float,
    log_paths: Sequence[Path],
) -> dict[str, Any]:
    m = cfg.monitor
    result = servers["result"]
    batches = scan.batches
    durations = [b[2] for b in batches]
    events_billed = sum(b[5] for b in batches)
    busy_s = sum(durations) / 1000
    period_s = (scan.last_ts - scan.first_ts) if scan.first_ts and scan.last_ts else 0.0
    recent = now - m.window_s
    restarts_recent: dict[str, int] = {}
    restarts_all: dict[str, int] = {}
    for r in scan.restarts:
        service = str(r.get("service"))
        restarts_all[service] = restarts_all.get(service, 0) + 1
        if r["ts"] >= recent:
            restarts_recent[service] = restarts_recent.get(service, 0) + 1
    dropped_recent = sum(n for ts, n in scan.dropped if ts >= recent)
    missing = sorted(result.missing, key=lambda j: scan.synthesized[j][0])
    dead = servers.get("dead_events", {})
    live_failed = liveness_failed(
        [v[0] for v in scan.synthesized.values()], [b[0] for b in batches], now, m
    )
    findings = assess(
        m,
        delta=len(result.missing),
        missing_sample=missing,
        reconciliation_complete=result.complete,
        liveness_failed=live_failed,
        lag_s=servers["lag_s"],
        depth=servers["depth"],
        dead_letters=servers["dead_letters"],
        restarts=restarts_recent,
        events_dropped=dropped_recent,
    )
    if not scan.files:
        findings.append(
            Finding("amber", f"no events log at {log_paths[0]}: the reconciliation covers nothing")
        )
    if not servers["schema"]:
        findings.append(Finding("amber", "Postgres has no usage_log table (not migrated?)"))
    holds = servers.get("holds") or {}
    if holds.get("open"):
        ttl = cfg.holds.billing_ttl_s if holds.get("oldest_state") == "b" else cfg.holds.ttl_s
        if holds["oldest_s"] > ttl:
            findings.append(
                Finding(
                    "amber",
                    f"a usage hold is {holds['oldest_s']:.0f} s old, older than its TTL"
                    f" ({ttl:g} s): its job or its bill is stuck (docs/billing.md)",
                )
            )
    if holds.get("mismatched") and not servers["depth"]:
        findings.append(
            Finding(
                "amber",
                f"the Redis mirror's settled usage differs from Postgres for users"
                f" {', '.join(holds['mismatched'][:10])} with billing idle (docs/billing.md)",
            )
        )
    if health is not None and health.get("status") not in (None, 200):
        findings.append(
            Finding("red", f"daemon unhealthy: {health['url']} answered {health['status']}")
        )
    return {
        "generated_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "grade": worst(f.level for f in findings),
        "findings": [f.as_dict() for f in findings],
        "log": {
            "files": [str(p) for p in scan.files],
            "lines": scan.lines,
            "bad_lines": scan.bad_lines,
            "from": _iso(scan.first_ts),
            "to": _iso(scan.last_ts),
        },
        "billing_processed": {
            "batches": len(batches),
            "events": sum(b[1] for b in batches),
            "events_billed": events_billed,
            "duplicates": sum(b[6] for b in batches),
            "dead_lettered": sum(b[7] for b in batches),
            "characters": sum(b[4] for b in batches),
            "batch_ms": {
                "p50": round_ms(percentile(durations, 0.5)),
                "p95": round_ms(percentile(durations, 0.95)),
                "max": round_ms(max(durations)) if durations else None,
            },
            "events_per_s_busy": round_ms(events_billed / busy_s) if busy_s > 0 else None,
            "events_per_s_period": round_ms(events_billed / period_s) if period_s > 0 else None,
            "last_batch_age_s": round_ms(now - batches[-1][0]) if batches else None,
        },
        "queue": {"depth": servers["depth"], "oldest_waiting_s": round_ms(servers["lag_s"])},
        "holds": servers.get("holds") or {},
        "reconciliation": {
            "synthesized": len(scan.synthesized),
            "billed": len(result.billed),
            "waiting": len(result.waiting),
            "missing": len(result.missing),
            "complete": result.complete,
            "missing_job_ids": [
                {
                    "job_id": j,
                    "ts": _iso(scan.synthesized[j][0]),
                    "user_id": scan.synthesized[j][1],
                    "model": scan.synthesized[j][2],
                    "text_length": scan.synthesized[j][3],
                    "reason": f"dead-lettered: {dead[j]}" if j in dead else "lost: in neither",
                }
                for j in missing
            ],
        },
        "liveness": {
            "ok": not live_failed,
            "window_s": m.liveness_window_s,
            "last_synthesis_age_s": round_ms(now - max(v[0] for v in scan.synthesized.values()))
            if scan.synthesized
            else None,
        },
        "dead_letters": servers["dead_letters"],
        "restarts": {"total": restarts_all, "recent": restarts_recent},
        "errors": {"total": len(scan.errors), "last": scan.errors[-5:]},
        "events_dropped": sum(n for _, n in scan.dropped),
        "daemon": health,
    }


def _iso(ts: float | None) -> str | None:
    return None if ts is None else utc_iso(ts)


def _n(value: Any) -> str:
    return "–" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def render(report: dict[str, Any], *, max_missing: int = 50) -> str:
    """The report as text for a person (or a mail from cron)."""
    b = report["billing_processed"]
    q = report["queue"]
    rec = report["reconciliation"]
    live = report["liveness"]
    log = report["log"]
    lines = [f"tts-daemon billing report — {report['generated_at']}"]
    files = log["files"]
    lines.append(
        f"events log: {', '.join(files) if files else 'none found'} · {log['lines']:,} lines"
        f" from {log['from'] or '–'} to {log['to'] or '–'}"
        + (f" · {log['bad_lines']} unreadable" if log["bad_lines"] else "")
    )
    lines += [
        "",
        "billing_processed",
        f"  batches            {_n(b['batches'])}",
        f"  events billed      {_n(b['events_billed'])}   (duplicates {_n(b['duplicates'])},"
        f" dead-lettered {_n(b['dead_lettered'])})",
        f"  characters billed  {_n(b['characters'])}",
        f"  batch time         p50 {_n(b['batch_ms']['p50'])} ms · p95 {_n(b['batch_ms']['p95'])}"
        f" ms · max {_n(b['batch_ms']['max'])} ms",
        f"  throughput         {_n(b['events_per_s_busy'])} events/s while busy ·"
        f" {_n(b['events_per_s_period'])} events/s over the period",
        f"  last batch         {_age(b['last_batch_age_s'])}",
        "",
        f"billing queue        depth {_n(q['depth'])} · oldest waiting"
        f" {'–' if q['oldest_waiting_s'] is None else _age(q['oldest_waiting_s'])}",
        "",
        "reconciliation (exact, by job_id)",
        f"  synthesized        {_n(rec['synthesized'])}",
        f"  billed             {_n(rec['billed'])}",
        f"  waiting            {_n(rec['waiting'])}",
        f"  delta              {_n(rec['missing'])}   (neither billed nor waiting)",
        "",
        "holds                "
        + (
            f"{_n(report['holds'].get('open'))} open · oldest"
            f" {_age(report['holds'].get('oldest_s')) if report['holds'].get('open') else '–'}"
            f" · settled ≠ billed for {len(report['holds'].get('mismatched', []))} users"
        ),
        "",
        f"liveness             {'ok' if live['ok'] else 'FAILED'} (window {live['window_s']:g} s;"
        f" last synthesis {_age(live['last_synthesis_age_s'])})",
        "dead letters         "
        + " · ".join(f"{k} {v}" for k, v in sorted(report["dead_letters"].items())),
        "restarts             "
        + (
            ", ".join(
                f"{k} {v} (recent {report['restarts']['recent'].get(k, 0)})"
                for k, v in sorted(report["restarts"]["total"].items())
            )
            or "none"
        ),
        f"errors               {report['errors']['total']}"
        + (f" · events dropped {report['events_dropped']}" if report["events_dropped"] else ""),
    ]
    for e in report["errors"]["last"]:
        lines.append(f"  {_iso(e['ts'])}  {e['service']}: {str(e['message'])[:160]}")
    d = report["daemon"]
    if d is None:
        lines.append("daemon               not probed (ops.port is 0)")
    elif d.get("status") is None:
        lines.append(f"daemon               not reachable at {d['url']} (not running here?)")
    else:
        lines.append(f"daemon               {d['url']} answered {d['status']}")
    lines.append("")
    lines.append(f"{report['grade'].upper()}  (exit {EXIT[report['grade']]})")
    for f in report["findings"]:
        lines.append(f"  [{f['level']}] {f['what']}")
    if rec["missing_job_ids"]:
        lines.append("")
        lines.append("missing job_ids (neither billed nor waiting):")
        for item in rec["missing_job_ids"][:max_missing]:
            lines.append(
                f"  {item['job_id']}  user {item['user_id']}  {item['model']}"
                f"  {item['text_length']} chars  {item['ts']}  {item['reason']}"
            )
        if len(rec["missing_job_ids"]) > max_missing:
            lines.append(f"  … and {len(rec['missing_job_ids']) - max_missing} more (--json)")
    return "\n".join(lines)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


# -- entry point -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The report's options (``tts-daemon report`` and ``python -m daemon.ops.report``)."""
    p.add_argument(
        "--config", metavar="PATH", help=f"TOML configuration (default {DEFAULT_CONFIG})"
    )
    p.add_argument(
        "--events",
        metavar="PATH",
        action="append",
        default=[],
        help="another daemon's events log to include (repeatable; rotated files are read too)",
    )
    p.add_argument(
        "--since-s",
        type=float,
        metavar="N",
        help="only the events of the last N seconds (default: everything the log holds)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--max-missing", type=int, default=50, metavar="N", help="job_ids to list")
    return p


DESCRIPTION = "Health report of the billing pipeline: exit 0 green, 1 amber, 2 red."


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="tts-daemon report", description=DESCRIPTION))


def run(args: argparse.Namespace) -> int:
    """Make the report for parsed ``args``, print it; the exit status (0, 1 or 2)."""
    try:
        cfg = load_config(config_path(args.config))
    except ConfigError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    now = time.time()
    log_paths = [cfg.events_path, *(Path(p) for p in args.events)]
    # Every name a rotation may use, whether it exists now or not: a rotation between listing
    # and opening must not hide a file (missing ones are skipped when opened).
    files = [f for p in log_paths for f in rotation_names(p, cfg.log.backups)]
    scan = read_log(files, since=None if args.since_s is None else now - args.since_s)
    from daemon.cli import resolve_servers

    try:
        with resolve_servers(cfg) as (redis_url, pg_url):
            servers = trio.run(_servers_part, cfg, redis_url, pg_url, list(scan.synthesized))
    except Exception as exc:
        print(f"report: RED — cannot read Redis/Postgres: {describe(exc)}", file=sys.stderr)
        return 2
    report = build_report(cfg, scan, servers, _healthz(cfg), now=time.time(), log_paths=log_paths)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(render(report, max_missing=args.max_missing))
    return EXIT[report["grade"]]


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
