"""What the dashboard shows, and the grading the dashboard and ``tools/report.sh`` share.

:class:`OpsStats` is fed in-process: the events log calls :meth:`OpsStats.on_event` with every
event, typed by ``daemon.contracts.events`` (a listener: cheap, never blocking — it runs inside
``emit`` on the hot path), and the monitor service calls :meth:`OpsStats.sample` every
``monitor.sample_s`` to record a point of each time series (latency quantiles from the Prometheus
histograms, rates, queue depth). Everything is held in bounded deques sized from
``monitor.window_s``.

Exact figures come from the events themselves (finalize time per result, duration and size per
billing batch); request-path latencies (ack, request-pool wait) are estimated from the histograms'
bucket counts over a sliding span, the way Prometheus' ``histogram_quantile`` does it.

Grades: ``green`` / ``amber`` / ``red``, from :func:`assess` — the one place where the thresholds
of ``[monitor]`` turn figures into colours (docs/metrics.md lists them).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from daemon.config import MonitorConfig
from daemon.contracts.events import (
    BillingProcessed,
    Error,
    Event,
    ServiceRestarted,
    SynthesisComplete,
)
from daemon.ops.metrics import Metrics

__all__ = [
    "GRADES",
    "Finding",
    "OpsStats",
    "Reconciliation",
    "assess",
    "grade_delta",
    "histogram_buckets",
    "histogram_quantile",
    "percentile",
    "worst",
]

GRADES = ("green", "amber", "red")
# Span of one time-series point's quantiles and rates, and of the "now" figures on the page.
SERIES_SPAN_S = 10.0
CURRENT_SPAN_S = 60.0
MAX_RECENT = 50  # errors and restarts kept for the page
MAX_QUANTILE_SAMPLES = 5000  # finalize times a quantile is computed from, at most (the newest)


# -- grading ---------------------------------------------------------------------------------


@attrs.frozen
class Finding:
    """One observation that sets the colour: ``level`` is a grade, ``what`` says why."""

    level: str
    what: str

    def as_dict(self) -> dict[str, str]:
        return {"level": self.level, "what": self.what}


def worst(levels: Iterable[str]) -> str:
    """The worst grade of ``levels`` (``green`` when empty)."""
    rank = max((GRADES.index(level) for level in levels), default=0)
    return GRADES[rank]


def grade_delta(delta: int | None, cfg: MonitorConfig) -> str:
    if delta is None or delta < cfg.delta_amber:
        return "green"
    return "red" if delta >= cfg.delta_red else "amber"


def grade_lag(lag_s: float | None, cfg: MonitorConfig) -> str:
    if lag_s is None or lag_s < cfg.lag_amber_s:
        return "green"
    return "red" if lag_s >= cfg.lag_red_s else "amber"


def liveness_failed(
    synthesis_ts: Sequence[float], billing_ts: Sequence[float], now: float, cfg: MonitorConfig
) -> bool:
    """docs/metrics.md: synthesis seen in the last window but no ``billing_processed``.

    ``synthesis_ts``/``billing_ts``: unix times of the events (any order). A synthesis younger
    than ``liveness_grace_s`` does not count yet: billing has not had its turn.
    """
    start = now - cfg.liveness_window_s
    synthesized = any(start <= t <= now - cfg.liveness_grace_s for t in synthesis_ts)
    billed = any(t >= start for t in billing_ts)
    return synthesized and not billed


def assess(
    cfg: MonitorConfig,
    *,
    delta: int | None,
    missing_sample: Sequence[str] = (),
    reconciliation_complete: bool = True,
    liveness_failed: bool,
    lag_s: float | None,
    depth: int | None,
    dead_letters: Mapping[str, int],
    restarts: Mapping[str, int],
    events_dropped: int = 0,
) -> list[Finding]:
    """Turn the figures into findings (empty or all green: healthy). Shared by the dashboard
    and ``tools/report.sh`` so that both colour the same figures the same way."""
    out: list[Finding] = []
    if liveness_failed:
        out.append(
            Finding(
                "red",
                f"liveness: synthesis in the last {cfg.liveness_window_s:g} s "
                "but no billing_processed",
            )
        )
    level = grade_delta(delta, cfg)
    if level != "green":
        names = ", ".join(missing_sample[:5]) + (" …" if len(missing_sample) > 5 else "")
        out.append(
            Finding(level, f"reconciliation delta {delta}: neither billed nor waiting ({names})")
        )
    if not reconciliation_complete:
        out.append(Finding("amber", "reconciliation incomplete (bounded scan did not finish)"))
    level = grade_lag(lag_s, cfg)
    if level != "green":
        out.append(
            Finding(level, f"oldest billing event has waited {lag_s:.0f} s (queue depth {depth})")
        )
    for queue, n in sorted(dead_letters.items()):
        if n:
            out.append(Finding("amber", f"{n} entries in dead-letter {queue}"))
    for service, n in sorted(restarts.items()):
        if n:
            out.append(Finding("amber", f"service {service} restarted {n}×"))
    if events_dropped:
        out.append(Finding("amber", f"{events_dropped} events dropped by the events log"))
    return out


# -- quantiles -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by linear interpolation; ``None`` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def histogram_buckets(histogram: Any) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of an unlabelled ``prometheus_client`` histogram, through
    its public ``collect()``."""
    out = []
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                out.append((float(sample.labels["le"]), sample.value))
    out.sort()
    return out


def histogram_quantile(
    q: float, now: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]] | None
) -> float | None:
    """The ``q`` quantile of the observations between two bucket snapshots, interpolated
    linearly inside the bucket it falls in (Prometheus' ``histogram_quantile``). ``None`` when
    no observation fell between them. A quantile in the ``+Inf`` bucket is reported as the
    largest finite bound."""
    counts = [c - (before[i][1] if before else 0.0) for i, (_, c) in enumerate(now)]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for (bound, _), count in zip(now, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            in_bucket = count - prev_count
            if in_bucket <= 0:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / in_bucket
        prev_bound, prev_count = bound, count
    return prev_bound


# -- the live reconciliation's state ---------------------------------------------------------


@attrs.define
class Reconciliation:
    """The last live reconciliation round (see daemon/ops/monitor.py)."""

    delta: int | None = None  # None: not computed yet
    missing: list[tuple[str, str]] = attrs.Factory(list)  # (job_id, reason), first 50
    waiting: int = 0
    billed: int = 0
    tracked: int = 0
    untracked: int = 0  # fell out of the bounded set before they were confirmed billed
    complete: bool = True
    checked_at: float | None = None
    took_s: float = 0.0
    lag_s: float | None = None
    depth: int | None = None
    dead_letters: dict[str, int] = attrs.Factory(dict)


# -- the statistics --------------------------------------------------------------------------


class OpsStats:
    """Bounded in-memory statistics for the dashboard. Not thread-safe: Trio only."""

    def __init__(
        self,
        cfg: MonitorConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock
        self.started_at = clock()
        points = max(2, math.ceil(cfg.window_s / cfg.sample_s) + 1)
        span_points = max(2, math.ceil(CURRENT_SPAN_S / cfg.sample_s) + 2)
        # (unix ts, finalize_ms) of recent syntheses; bounded by count as well as by age.
        self.finalize: deque[tuple[float, float]] = deque(maxlen=50_000)
        # (unix ts, events_count, duration_ms, users_count, text_length, billed) per batch.
        self.batches: deque[tuple[float, int, float, int, int, int]] = deque(maxlen=5_000)
        self.errors: deque[dict[str, Any]] = deque(maxlen=MAX_RECENT)
        self.restarts: deque[dict[str, Any]] = deque(maxlen=MAX_RECENT)
        self.synthesized = 0  # synthesis_complete events
        self.billed_events = 0  # events billed (billing_processed.billed, else events_count)
        self.batch_count = 0
        self.error_count = 0
        self.last_synthesis_ts: float | None = None
        self.last_billing_ts: float | None = None
        # Syntheses whose billing event was queued, not yet confirmed billed: job_id → (ts, ms).
        self.pending: dict[str, tuple[float, float]] = {}
        self.untracked = 0
        self.reconciliation = Reconciliation()
        # Time series: one tuple of figures per sample.
        self.series: deque[tuple[float | None, ...]] = deque(maxlen=points)
        self._hist: deque[tuple[float, list[tuple[float, float]], list[tuple[float, float]]]] = (
            deque(maxlen=span_points)
        )
        self._counts: deque[tuple[float, int, int]] = deque(maxlen=span_points)

    # -- the listener (hot path: O(1), no I/O) -------------------------------------------------

    def on_event(self, event: Event) -> None:
        now = self.clock()
        if isinstance(event, SynthesisComplete):
            self.synthesized += 1
            self.last_synthesis_ts = now
            self.finalize.append((now, event.finalize_ms))
            if event.billed:
                self._track(event.job_id, now, event.finalize_ms)
        elif isinstance(event, BillingProcessed):
            self.batch_count += 1
            self.billed_events += event.billed
            self.last_billing_ts = now
            self.batches.append(
                (
                    now,
                    event.events_count,
                    event.duration_ms,
                    event.users_count,
                    event.text_length,
                    event.billed,
                )
            )
        elif isinstance(event, Error):
            self.error_count += 1
            self.metrics.errors.labels(event.service).inc()
            dropped = event.context.get("dropped")
            if event.service == "events" and isinstance(dropped, int) and dropped:
                self.metrics.events_dropped.inc(dropped)
            self.errors.append(
                {"ts": now, "service": event.service, "message": event.message[:300]}
            )
        elif isinstance(event, ServiceRestarted):
            self.restarts.append(
                {
                    "ts": now,
                    "service": event.service,
                    "attempt": event.attempt,
                    "backoff_s": event.backoff_s,
                    "reason": event.reason[:300],
                }
            )

    def _track(self, job_id: str, ts: float, finalize_ms: float) -> None:
        self.pending[job_id] = (ts, finalize_ms)
        if len(self.pending) > self.cfg.max_tracked:
            # Drop the oldest (dicts keep insertion order): the live view is bounded; the
            # report (tools/report.sh) stays exact.
            del self.pending[next(iter(self.pending))]
            self.untracked += 1

    # -- the live reconciliation's bookkeeping ------------------------------------------------

    def candidates(self) -> list[tuple[str, float, float]]:
        """(job_id, ts, finalize_ms) still to be confirmed billed, within the window. Older
        ones leave the live view (they were reported while they were in it)."""
        cutoff = self.clock() - self.cfg.window_s
        while self.pending:
            job_id, (ts, _) = next(iter(self.pending.items()))
            if ts >= cutoff:
                break
            del self.pending[job_id]
        return [(job_id, ts, ms) for job_id, (ts, ms) in self.pending.items()]

    def confirm_billed(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self.pending.pop(job_id, None)

    # -- sampling -------------------------------------------------------------------------------

    def sample(self, *, depth: int | None, connections: int) -> None:
        """Record one point of every time series (called every ``monitor.sample_s``)."""
        now = self.clock()
        ack = histogram_buckets(self.metrics.ack_seconds)
        wait = histogram_buckets(self.metrics.request_pool_wait_seconds)
        self._hist.append((now, ack, wait))
        self._counts.append((now, self.synthesized, self.billed_events))
        span_ago = self._at_or_before(now - SERIES_SPAN_S)
        ack_before = span_ago[1] if span_ago else None
        wait_before = span_ago[2] if span_ago else None
        fin = self._finalize_since(now - SERIES_SPAN_S)
        rates = self._rates(SERIES_SPAN_S)
        self.series.append(
            (
                round(now, 3),
                _ms(histogram_quantile(0.5, ack, ack_before)),
                _ms(histogram_quantile(0.95, ack, ack_before)),
                _ms(histogram_quantile(0.95, wait, wait_before)),
                round_ms(percentile(fin, 0.5)),
                round_ms(percentile(fin, 0.95)),
                round_ms(rates[0]),
                round_ms(rates[1]),
                depth,
                connections,
            )
        )

    SERIES_FIELDS = (
        "t",
        "ack_p50_ms",
        "ack_p95_ms",
        "pool_wait_p95_ms",
        "finalize_p50_ms",
        "finalize_p95_ms",
        "results_per_s",
        "billed_per_s",
        "queue_depth",
        "connections",
    )

    def _at_or_before(
        self, t: float
    ) -> tuple[float, list[tuple[float, float]], list[tuple[float, float]]] | None:
        # None when the history is shorter than the span: then the span holds every observation
        # since the daemon started, which is what a baseline of "nothing" gives.
        found = None
        for item in self._hist:
            if item[0] <= t:
                found = item
            else:
                break
        return found

    def _finalize_since(self, t: float) -> list[float]:
        # The newest MAX_QUANTILE_SAMPLES at most: the sort that follows runs in the event loop
        # the hot path shares, so its cost is bounded whatever the result rate.
        out = []
        for ts, ms in reversed(self.finalize):
            if ts < t or len(out) >= MAX_QUANTILE_SAMPLES:
                break
            out.append(ms)
        return out

    def _rates(self, span_s: float) -> tuple[float | None, float | None]:
        if len(self._counts) < 2:
            return None, None
        now, synth, billed = self._counts[-1]
        start = self._counts[0]
        for item in self._counts:
            if item[0] >= now - span_s:
                break
            start = item
        dt = now - start[0]
        if dt <= 0:
            return None, None
        return (synth - start[1]) / dt, (billed - start[2]) / dt

    # -- the page's data ------------------------------------------------------------------------

    def liveness_failed(self, now: float) -> bool:
        synth = [self.last_synthesis_ts] if self.last_synthesis_ts is not None else []
        # The oldest synthesis still in the window matters too: one older than the grace
        # period counts even if newer ones keep arriving.
        start = now - self.cfg.liveness_window_s
        for ts, _ in self.finalize:
            if ts >= start:
                synth.append(ts)
                break
        billing = [self.last_billing_ts] if self.last_billing_ts is not None else []
        return liveness_failed(synth, billing, now, self.cfg)

    def recent_restarts(self, now: float) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.restarts:
            if r["ts"] >= now - self.cfg.liveness_window_s:
                out[r["service"]] = out.get(r["service"], 0) + 1
        return out

    def snapshot(self) -> dict[str, Any]:
        """Everything the dashboard draws, as JSON-able data."""
        now = self.clock()
        cfg = self.cfg
        rec = self.reconciliation
        current = self._hist[-1] if self._hist else None
        before = self._at_or_before(now - CURRENT_SPAN_S)
        ack_q = wait_q = (None, None)
        if current is not None:
            ack_q = tuple(  # type: ignore[assignment]
                _ms(histogram_quantile(q, current[1], before[1] if before else None))
                for q in (0.5, 0.95)
            )
            wait_q = tuple(  # type: ignore[assignment]
                _ms(histogram_quantile(q, current[2], before[2] if before else None))
                for q in (0.5, 0.95)
            )
        fin = self._finalize_since(now - CURRENT_SPAN_S)
        rates = self._rates(SERIES_SPAN_S)
        window_batches = [b for b in self.batches if b[0] >= now - cfg.window_s]
        durations = [b[2] for b in window_batches]
        live_failed = self.liveness_failed(now)
        restarts = self.recent_restarts(now)
        findings = assess(
            cfg,
            delta=rec.delta,
            missing_sample=[j for j, _ in rec.missing],
            reconciliation_complete=rec.complete,
            liveness_failed=live_failed,
            lag_s=rec.lag_s,
            depth=rec.depth,
            dead_letters=rec.dead_letters,
            restarts=restarts,
        )
        series_cols: dict[str, list[Any]] = {name: [] for name in self.SERIES_FIELDS}
        for point in self.series:
            for name, value in zip(self.SERIES_FIELDS, point, strict=True):
                series_cols[name].append(value)
        return {
            "now": round(now, 3),
            "started_at": round(self.started_at, 3),
            "grade": worst(f.level for f in findings),
            "findings": [f.as_dict() for f in findings],
            "thresholds": {
                "delta_amber": cfg.delta_amber,
                "delta_red": cfg.delta_red,
                "lag_amber_s": cfg.lag_amber_s,
                "lag_red_s": cfg.lag_red_s,
                "liveness_window_s": cfg.liveness_window_s,
                "window_s": cfg.window_s,
            },
            "request": {
                "ack_ms": {"p50": ack_q[0], "p95": ack_q[1]},
                "pool_wait_ms": {"p50": wait_q[0], "p95": wait_q[1]},
            },
            "hot": {
                "finalize_ms": {
                    "p50": round_ms(percentile(fin, 0.5)),
                    "p95": round_ms(percentile(fin, 0.95)),
                },
                "results_per_s": round_ms(rates[0]),
                "results_total": self.synthesized,
            },
            "billing": {
                "events_billed": self.billed_events,
                "batches": self.batch_count,
                "batch_ms": {
                    "p50": round_ms(percentile(durations, 0.5)),
                    "p95": round_ms(percentile(durations, 0.95)),
                    "max": round_ms(max(durations)) if durations else None,
                },
                "billed_per_s": round_ms(rates[1]),
                "queue_depth": rec.depth,
                "oldest_age_s": round_ms(rec.lag_s),
                "last_batch_age_s": round_ms(now - self.last_billing_ts)
                if self.last_billing_ts is not None
                else None,
                "liveness": "red" if live_failed else "green",
            },
            "reconciliation": {
                "delta": rec.delta,
                "grade": grade_delta(rec.delta, cfg),
                "missing": [{"job_id": j, "reason": r} for j, r in rec.missing],
                "waiting": rec.waiting,
                "tracked": rec.tracked,
                "untracked": self.untracked,
                "complete": rec.complete,
                "checked_at": rec.checked_at,
                "took_ms": round_ms(rec.took_s * 1000),
            },
            "dead_letters": dict(rec.dead_letters),
            "series": series_cols,
            "batches": {
                "t": [round(b[0], 3) for b in window_batches],
                "duration_ms": [round(b[2], 3) for b in window_batches],
                "events": [b[1] for b in window_batches],
            },
            "errors": list(self.errors)[-20:],
            "restarts": list(self.restarts)[-20:],
            "error_count": self.error_count,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def round_ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
