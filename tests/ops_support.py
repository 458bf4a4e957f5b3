"""Helpers for the operations tests: the events log, /metrics, config files, billing gates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from daemon.contracts.events import Event, SynthesisComplete
from daemon.ops.events import read_events as read_log
from daemon.testing import config as harness_config

__all__ = [
    "BillingGate",
    "events_of",
    "log_records",
    "read_events",
    "scrape",
    "synthesis_event",
    "write_config",
]


def read_events(path: Path) -> list[Event]:
    """Every event in an events log file (and its rotations), oldest first, typed."""
    return list(read_log(path, backups=10))


def events_of(path: Path, kind: str) -> list[Any]:
    """The events of one ``kind`` (``"synthesis_complete"``…) in the log, typed."""
    return [e for e in read_events(path) if e.kind == kind]


def synthesis_event(job_id: str, **changes: Any) -> SynthesisComplete:
    """A ``synthesis_complete`` as the hot path would log it, for feeding statistics."""
    fields: dict[str, Any] = {
        "job_id": job_id,
        "variant_hash": "v" * 64,
        "user_id": 1,
        "model": "kokoro",
        "voice": "af_heart",
        "text_length": 10,
        "queue_wait_ms": 1.0,
        "worker_ms": 1.0,
        "finalize_ms": 1.0,
        "cache_store_ms": 1.0,
        "notify_ms": 1.0,
    }
    return SynthesisComplete(**(fields | changes))


def log_records(path: Path) -> list[dict[str, Any]]:
    """Every line of the live log file as parsed JSON: the on-disk format itself."""
    return [json.loads(line) for line in path.read_text().splitlines()]


async def scrape(http_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed with prometheus_client's own parser: {(sample, labels): value}."""
    async with httpx.AsyncClient(base_url=http_url) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def write_config(tmp_path: Path, redis_url: str, pg_url: str, **sections: dict[str, Any]) -> Path:
    """A TOML configuration on the test's servers (as an operator would write it)."""
    base: dict[str, dict[str, Any]] = {
        "redis": {"url": redis_url},
        "postgres": {"url": pg_url},
        "log": {"events_path": str(tmp_path / "log" / "events.jsonl")},
        "monitor": {"sample_s": 0.2, "interval_s": 0.3},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return harness_config.write_config(tmp_path / "daemon.toml", tmp_path, **base)


class BillingGate:
    """A ``billing_fault`` that holds each batch before it is billed while the gate is closed:
    the batch's events stay pending in the stream (read, not acknowledged) until it opens."""

    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()
        self.holding = 0

    def close(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()

    def open(self) -> None:
        self._open.set()

    async def __call__(self, point: str) -> None:
        if point == "billing.before_batch" and not self._open.is_set():
            self.holding += 1
            try:
                await self._open.wait()
            finally:
                self.holding -= 1
