"""The dashboard's arithmetic and the grading shared with tools/report.sh. Pure: no servers."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from daemon.config import MonitorConfig
from daemon.contracts.events import BillingProcessed
from daemon.ops.metrics import Metrics
from daemon.ops.stats import (
    OpsStats,
    assess,
    grade_delta,
    histogram_buckets,
    histogram_quantile,
    liveness_failed,
    percentile,
    worst,
)
from tests.ops_support import synthesis_event


def test_histogram_quantile_interpolates_like_prometheus_between_two_snapshots() -> None:
    h = Histogram("h", "h", buckets=(0.01, 0.1, 1.0), registry=CollectorRegistry())
    for _ in range(100):
        h.observe(5.0)  # before the window: must not count
    before = histogram_buckets(h)
    for v in [0.005] * 50 + [0.05] * 40 + [0.5] * 10:
        h.observe(v)
    now = histogram_buckets(h)
    # 100 observations in the window: p50 is the top of the first bucket, p95 half-way into
    # the third (rank 95 of 100: 5 of the 10 in (0.1, 1.0]).
    assert histogram_quantile(0.5, now, before) == pytest.approx(0.01)
    assert histogram_quantile(0.95, now, before) == pytest.approx(0.1 + 0.9 * 0.5)
    assert histogram_quantile(0.5, now, now) is None  # nothing between a snapshot and itself
    # Without a baseline every observation counts: the +Inf bucket reports the largest bound.
    assert histogram_quantile(0.99, now, None) == pytest.approx(1.0)


def test_histogram_quantile_is_close_to_the_exact_percentile() -> None:
    rng = random.Random(7)
    values = [rng.uniform(0.001, 0.02) for _ in range(2000)]
    h = Histogram("h2", "h", buckets=[i / 1000 for i in range(1, 26)], registry=CollectorRegistry())
    for v in values:
        h.observe(v)
    estimate = histogram_quantile(0.95, histogram_buckets(h), None)
    exact = percentile(values, 0.95)
    assert estimate is not None and exact is not None
    assert abs(estimate - exact) < 0.001  # within one bucket width


def test_percentile() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert percentile(list(range(101)), 0.95) == pytest.approx(95.0)


@pytest.mark.parametrize(
    ("delta", "grade"), [(None, "green"), (0, "green"), (1, "amber"), (9, "amber"), (10, "red")]
)
def test_delta_turns_amber_then_red_on_the_thresholds(delta: int | None, grade: str) -> None:
    assert grade_delta(delta, MonitorConfig(delta_amber=1, delta_red=10)) == grade


def test_liveness_needs_synthesis_in_the_window_older_than_the_grace_and_no_billing() -> None:
    cfg = MonitorConfig(liveness_window_s=120.0, liveness_grace_s=5.0)
    now = 10_000.0
    assert liveness_failed([now - 30], [], now, cfg)
    assert not liveness_failed([now - 30], [now - 10], now, cfg)  # billing happened
    assert not liveness_failed([now - 2], [], now, cfg)  # within the grace period
    assert not liveness_failed([now - 500], [], now, cfg)  # nothing synthesized lately
    assert liveness_failed([now - 30], [now - 500], now, cfg)  # billed, but long ago


def test_assess_names_every_problem_and_the_worst_grade_wins() -> None:
    cfg = MonitorConfig()
    quiet = assess(
        cfg,
        delta=0,
        liveness_failed=False,
        lag_s=0.5,
        depth=1,
        dead_letters={"tts:billing:dead": 0},
        restarts={},
    )
    assert quiet == [] and worst(f.level for f in quiet) == "green"
    findings = assess(
        cfg,
        delta=2,
        missing_sample=["a" * 32, "b" * 32],
        liveness_failed=True,
        lag_s=45.0,
        depth=100,
        dead_letters={"tts:billing:dead": 2, "tts:dlq:kokoro": 0},
        restarts={"billing": 3},
        events_dropped=5,
    )
    levels = {f.what.split(":")[0].split(" ")[0]: f.level for f in findings}
    assert worst(f.level for f in findings) == "red"
    assert levels["liveness"] == "red"
    text = " | ".join(f.what for f in findings)
    assert "delta 2" in text and "a" * 32 in text
    assert "45 s" in text and "tts:billing:dead" in text and "billing restarted 3" in text
    assert "tts:dlq:kokoro" not in text  # empty lists are not findings


def test_stats_follow_the_events_and_bound_what_they_track() -> None:
    clock = [1000.0]
    stats = OpsStats(
        MonitorConfig(max_tracked=100, window_s=60.0, sample_s=1.0),
        Metrics(),
        clock=lambda: clock[0],
    )
    for i in range(150):
        stats.on_event(synthesis_event(f"j{i}", finalize_ms=2.0, billed=True))
    stats.on_event(synthesis_event("free", billed=False))
    assert stats.synthesized == 151
    assert len(stats.pending) == 100 and stats.untracked == 50
    assert "j149" in stats.pending and "j0" not in stats.pending and "free" not in stats.pending
    stats.on_event(
        BillingProcessed(events_count=5, billed=4, duration_ms=12.5, users_count=1, text_length=50)
    )
    stats.confirm_billed(["j149", "j148"])
    assert "j149" not in stats.pending
    clock[0] += 61.0
    assert stats.candidates() == []  # aged out of the window
    stats.sample(depth=3, connections=1)
    snap = stats.snapshot()
    assert snap["billing"]["events_billed"] == 4 and snap["billing"]["batches"] == 1
    assert snap["series"]["queue_depth"] == [3]
    assert snap["batches"]["t"] == []  # the batch is older than the window now
