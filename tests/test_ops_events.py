"""The events log on its own: line format, size rotation, drops, listeners. No servers needed."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from daemon.contracts.events import (
    BillingProcessed,
    DaemonStarted,
    DaemonStopped,
    Error,
    Event,
    GenericEvent,
    Recovered,
    ServiceRestarted,
    SynthesisComplete,
)
from daemon.ops.events import EventLog, ReadTally, Throttle, read_events
from tests.ops_support import synthesis_event

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def _run_and_close(log: EventLog, emit) -> None:  # type: ignore[no-untyped-def]
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await emit()
        log.close()


def _tick(seq: int) -> GenericEvent:
    return GenericEvent(kind="tick", data={"seq": seq})


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_lines_are_json_with_ts_and_event_first(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log" / "events.jsonl")

    async def emit() -> None:
        log.emit(BillingProcessed(events_count=3, users_count=1, duration_ms=1.5, text_length=9))
        log.emit(Error(service="billing", message="something broke", context={"entry_id": b"1-0"}))

    await _run_and_close(log, emit)
    lines = (tmp_path / "log" / "events.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        record = json.loads(line)
        assert list(record)[:2] == ["ts", "event"]
        assert TS.match(record["ts"]), record["ts"]
    error = json.loads(lines[1])
    assert error["event"] == "error"
    assert (error["service"], error["message"], error["entry_id"]) == (
        "billing",
        "something broke",
        "1-0",
    )


async def test_rotates_by_size_and_keeps_a_bounded_number_of_files(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, max_bytes=4096, backups=3)

    async def emit() -> None:
        for i in range(600):
            log.emit(
                GenericEvent(kind="padded", data={"seq": i, "job_id": f"{i:032x}", "pad": "x" * 40})
            )
            if i % 70 == 0:
                await trio.sleep(0.01)  # the writer takes batches of varying sizes

    await _run_and_close(log, emit)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["events.jsonl", "events.jsonl.1", "events.jsonl.2", "events.jsonl.3"]
    for p in log.files():
        assert 0 < p.stat().st_size <= 4096, p
    seqs = [record["seq"] for p in log.files() for record in _lines(p)]
    # Oldest file first, each line whole: the kept tail of the sequence, in order, no gaps.
    assert seqs == list(range(seqs[0], 600))
    assert seqs[0] > 0, "the oldest events should have been rotated away"
    assert log.written == 600


async def test_emit_never_blocks_and_drops_are_counted_and_logged(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, buffer=10)
    seen: list[Event] = []
    log.add_listener(seen.append)
    # No writer yet and no checkpoint: emit must return at once however full the buffer is.
    for i in range(25):
        log.emit(_tick(i))
    assert log.dropped == 15

    async def nothing() -> None:
        return None

    await _run_and_close(log, nothing)
    records = _lines(path)
    assert [r["seq"] for r in records if r["event"] == "tick"] == list(range(10))
    (report,) = [r for r in records if r["event"] == "error"]
    assert report["service"] == "events" and report["dropped"] == 15
    assert "15 events dropped" in report["message"]
    # listeners saw every event, the dropped ones and the drop report too
    assert len([e for e in seen if e.kind == "tick"]) == 25
    assert isinstance(seen[-1], Error) and seen[-1].context == {"dropped": 15}


async def test_a_failing_listener_is_reported_once_and_never_breaks_emit(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)

    def broken(event: Event) -> None:
        raise KeyError("boom")

    log.add_listener(broken)

    async def emit() -> None:
        for i in range(3):
            log.emit(_tick(i))

    await _run_and_close(log, emit)
    records = _lines(path)
    assert [r["seq"] for r in records if r["event"] == "tick"] == [0, 1, 2]
    errors = [r for r in records if r["event"] == "error"]
    assert len(errors) == 1
    assert errors[0]["service"] == "events" and "broken" in errors[0]["message"]


async def test_events_after_close_are_written_through(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)

    async def nothing() -> None:
        return None

    await _run_and_close(log, nothing)
    log.emit(DaemonStopped(instance="x"))
    assert _lines(path)[-1]["event"] == "daemon_stopped"


EVERY_KIND: list[Event] = [
    synthesis_event("j1", user_id=7, notified=2, group=3),
    BillingProcessed(events_count=4, users_count=2, duration_ms=3.5, text_length=40, billed=3),
    Error(service="monitor", message="lost", context={"job_ids": ["a"], "delta": 1}),
    ServiceRestarted(service="billing", attempt=2, backoff_s=0.4, reason="Boom"),
    DaemonStarted(instance="h-1", ws_url="ws://x", http_url="http://x", migrations_applied=["1"]),
    DaemonStopped(instance="h-1"),
    Recovered(service="hot", down_s=1.5, failures=3),
    Recovered(service="monitor", what="liveness"),
]


async def test_every_kind_reads_back_as_the_event_that_was_emitted(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    seen: list[Event] = []
    log.add_listener(seen.append)

    async def emit() -> None:
        for event in EVERY_KIND:
            log.emit(event)

    await _run_and_close(log, emit)
    back = list(read_events(path))
    assert back == EVERY_KIND == seen  # ts is not compared…
    assert [e.ts for e in back] == pytest.approx([e.ts for e in seen], abs=0.001)  # …but kept
    assert all(type(a) is type(b) for a, b in zip(back, EVERY_KIND, strict=True))
    # The on-disk names are the contract (docs/metrics.md): optional fields left out when None.
    recovered = [r for r in _lines(path) if r["event"] == "recovered"]
    assert set(recovered[0]) == {"ts", "event", "service", "down_s", "failures"}
    assert set(recovered[1]) == {"ts", "event", "service", "what"}


def test_the_reader_takes_rotations_newer_kinds_and_a_line_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"

    def line(event: str, **fields: object) -> str:
        return json.dumps({"ts": "2026-12-01T10:00:00.000Z", "event": event, **fields}) + "\n"

    path.with_name("events.jsonl.2").write_text(line("daemon_stopped", instance="old"))
    path.with_name("events.jsonl.1").write_text(
        line("quantum_flux", level=9)  # a kind from a newer daemon
        + line("synthesis_complete", job_id=5)  # a known kind whose fields do not check
        + "not json\n"
    )
    path.write_text(
        line("recovered", service="hot", down_s=2.0, failures=1, since_ms=5)  # a newer field
        + '{"ts": "2026-12-01T10:00:01.000Z", "event": "synthesis_com'  # the writer died here
    )
    tally = ReadTally()
    events = list(read_events(path, backups=3, tally=tally))
    assert [e.kind for e in events] == [
        "daemon_stopped",
        "quantum_flux",
        "synthesis_complete",
        "recovered",
    ]
    assert events[0] == DaemonStopped(instance="old")
    assert isinstance(events[1], GenericEvent) and events[1].get("level") == 9
    assert isinstance(events[2], GenericEvent) and events[2].get("job_id") == 5
    assert not isinstance(events[2], SynthesisComplete)
    assert events[3] == Recovered(service="hot", down_s=2.0, failures=1)
    assert events[0].ts == datetime(2026, 12, 1, 10, tzinfo=UTC).timestamp()
    assert (tally.lines, tally.bad_lines) == (6, 2)
    assert [p.name for p in tally.files] == ["events.jsonl.2", "events.jsonl.1", "events.jsonl"]


def test_throttle_reports_once_per_period_per_kind_and_counts_what_it_held_back() -> None:
    now = [0.0]
    throttle = Throttle(60.0, clock=lambda: now[0])
    assert throttle.due("a") == 0  # the first report goes at once
    assert throttle.due("a") is None and throttle.due("a") is None  # held back
    assert throttle.due("b") == 0  # another kind has its own period
    now[0] = 59.9
    assert throttle.due("a") is None
    now[0] = 60.0
    assert throttle.due("a") == 3  # due again, with the three held back since
    throttle.reset("a")
    assert throttle.due("a") == 0  # after a reset, at once
