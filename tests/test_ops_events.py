"""The events log on its own: line format, size rotation, drops, listeners. No servers needed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import trio

from daemon.ops.events import EventLog, Throttle

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def _run_and_close(log: EventLog, emit) -> None:  # type: ignore[no-untyped-def]
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await emit()
        log.close()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_lines_are_json_with_ts_and_event_first(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log" / "events.jsonl")

    async def emit() -> None:
        log.emit("billing_processed", events_count=3, users_count=1, duration_ms=1.5, text_length=9)
        log.error("billing", "something broke", entry_id=b"1-0")

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
            log.emit("synthesis_complete", seq=i, job_id=f"{i:032x}", pad="x" * 40)
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
    seen: list[dict] = []
    log.add_listener(seen.append)
    # No writer yet and no checkpoint: emit must return at once however full the buffer is.
    for i in range(25):
        log.emit("tick", seq=i)
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
    assert len([r for r in seen if r["event"] == "tick"]) == 25
    assert seen[-1]["event"] == "error"


async def test_a_failing_listener_is_reported_once_and_never_breaks_emit(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)

    def broken(record: dict) -> None:
        raise KeyError("boom")

    log.add_listener(broken)

    async def emit() -> None:
        for i in range(3):
            log.emit("tick", seq=i)

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
    log.emit("daemon_stopped", instance="x")
    assert _lines(path)[-1]["event"] == "daemon_stopped"


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
