"""tools/stress.py at a tiny scale: both architectures run, complete and reconcile.

The thresholds (split within 1.5× of idle, inline starving) belong to the stress run itself
(`make stress`, docs/stress.md), not to a timed test on a shared machine: this checks that the
tool works and that its result has the shape of docs/stress.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Two architectures, each capped at --max-load-s 60 plus start and drain: the subprocess timeout
# below, not the suite's default per-test cap, is what should end a stuck run.
pytestmark = [pytest.mark.xdist_group("stress"), pytest.mark.timeout(300)]

RUN_FIELDS = {
    "idle_ack_ms": {"p50", "p99"},
    "ack_ms": {"p50", "p95", "p99", "max"},
    "audio_ms": {"p50", "p99"},
    "pool_wait_ms": {"p50", "p99", "max"},
}
SCALARS = (
    "pool_timeouts",
    "requests",
    "blocks",
    "errors",
    "events_billed",
    "billing_events_per_s",
    "billing_drain_s",
    "reconciliation_delta",
    "rss_mb_max",
)


def test_small_compare_completes_with_the_spec_shape(tmp_path: Path) -> None:
    out = tmp_path / "stress.json"
    plot = tmp_path / "stress.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "stress.py"),
            "--compare",
            "--users",
            "2",
            "--workers",
            "1",
            "--blocks",
            "4",
            "--buffer",
            "2",
            "--idle-probes",
            "5",
            "--probe-hz",
            "20",
            "--playback-speed",
            "50",
            "--worker-batch",
            "4",
            "--worker-latency-ms",
            "20",
            "--worker-jitter-ms",
            "5",
            "--seek-every-s",
            "0.3",
            "--txn-delay-ms",
            "5",
            "--max-load-s",
            "60",
            "--json",
            str(out),
            "--plot",
            str(plot),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"split", "inline"}
    assert result["params"]["users"] == 2 and result["params"]["workers"] == 1
    for arch, run in result["runs"].items():
        for field, keys in RUN_FIELDS.items():
            assert set(run[field]) >= keys, (arch, field)
            assert all(isinstance(run[field][k], int | float) for k in keys)
        for field in SCALARS:
            assert isinstance(run[field], int | float), (arch, field)
        # Both runs did the work and closed their books.
        assert run["verified"] == {
            "all_blocks_terminal": True,
            "billing_drained": True,
            "billed_equals_requested": True,
            "reconciliation_zero": True,
        }, arch
        assert run["blocks"] >= 2 * 4 + 5
        assert run["events_billed"] == run["blocks"] - run["blocks_evicted"]
        assert run["reconciliation_delta"] == 0
        assert run["idle_ack_ms"]["p50"] > 0 and run["ack_ms"]["p50"] > 0
        # the load's acks, split by request shape: the probe's and the listeners' together
        assert run["probe_ack_ms"]["p50"] > 0 and run["listener_ack_ms"]["p50"] > 0
        assert run["probe_ack_p99_over_idle"] > 0
        assert run["rss_mb_max"] > 10
    assert set(result["targets"]) == {"split_ack_p99_within_1.5x_idle", "inline_starves"}
    assert plot.stat().st_size > 10_000
    assert "split" in proc.stdout and "inline" in proc.stdout


def test_noisy_neighbour_scenario_runs_its_three_runs(tmp_path: Path) -> None:
    """``--scenario noisy`` (docs/stress.md): quiet, fair and FIFO, each reporting the readers'
    audio latency; the flood drains in both flooded runs."""
    out = tmp_path / "noisy.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "stress.py"), "--scenario", "noisy",
         "--duration-s", "2", "--flood", "32", "--readers", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.exists(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"quiet", "fair", "fifo"}
    for mode, run in result["runs"].items():
        assert run["reader_audio_ms"]["n"] > 0, (mode, run)
        assert (run["flood_drain_s"] is None) == (mode == "quiet"), (mode, run)
    assert set(result["p99_over_quiet"]) == {"fair", "fifo"}


def test_bench_pull_measures_the_fair_pull_against_fifo(tmp_path: Path) -> None:
    out = tmp_path / "pull.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_pull.py"), "--pulls", "50", "--users", "1",
         "5", "--jobs", "120", "--growth", "120", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert [r["users"] for r in figures["by_users"]] == [1, 5]
    for row in figures["by_users"] + figures["by_size"]:
        assert row["fair_pulls_per_s"] > 0 and row["fifo_pulls_per_s"] > 0
