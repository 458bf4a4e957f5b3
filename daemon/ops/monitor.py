"""The monitor service: the dashboard's samples and the live reconciliation.

The reconciliation itself (what the delta is, and the order that cannot be fooled by a daemon
billing meanwhile) is ``daemon/ops/reconcile.py``, shared with ``tts-daemon report``.

The monitor samples the dashboard's time series and runs the live reconciliation over this
daemon's recent syntheses, on a Postgres pool of its own, off the hot path: chunked work, and a
round that took T waits at least 9 T, so it takes about a tenth of the process at most
(docs/benchmarks.md has a measured round). Not critical: the supervisor restarts it while
everything else serves. It logs an ``error`` for newly missing events, failed liveness and billing
lag past ``monitor.lag_red_s``, and ``recovered`` when the latter two end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Sequence

import attrs
import trio

from daemon.config import MonitorConfig, PostgresConfig
from daemon.contracts.events import Error, Recovered
from daemon.ops.events import EventLog
from daemon.ops.metrics import Metrics
from daemon.ops.reconcile import (
    billed_among,
    dead_letter_counts,
    dead_lettered_events,
    oldest_waiting_age_s,
    reconcile,
    scan_billing_stream,
)
from daemon.ops.stats import OpsStats, Reconciliation, grade_lag
from daemon.runtime.outage import Outage
from daemon.stores.pg import PgPool, is_pg_unavailable, open_pg_pool
from daemon.stores.redis import RedisStore, is_redis_unavailable

__all__ = ["Monitor"]

# A round that took T waits at least DUTY × T before the next: the monitor never takes more
# than ~1/(DUTY+1) of the process, however large the backlog it has to look through.
DUTY = 9.0


def _unavailable(exc: BaseException) -> bool:
    """Redis or Postgres down or slow: wait it out (named errors only; the rest is a bug)."""
    return (
        is_redis_unavailable(exc)
        or is_pg_unavailable(exc)
        or isinstance(exc, TimeoutError | trio.TooSlowError)
    )


@attrs.define(eq=False)
class Monitor:
    """The monitor: dashboard samples and the live reconciliation. :meth:`run` is the service."""

    store: RedisStore
    pg_url: str
    pg_cfg: PostgresConfig
    cfg: MonitorConfig
    stats: OpsStats
    events: EventLog
    metrics: Metrics
    models: Sequence[str]
    connections: Callable[[], int] = lambda: 0
    # Its own connection while it has one (None through a Postgres outage): what /healthz shows.
    pool: PgPool | None = None
    rounds: int = 0
    _reported_missing: set[str] = attrs.Factory(set)
    _live_red: bool = False
    _lag_red: bool = False

    async def run(
        self,
        *,
        stopping: trio.Event,
        task_status: trio.TaskStatus[Monitor] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Sample and reconcile until ``stopping``. ``started(self)`` at once: the samples need only
        Redis, and an outage of Redis or Postgres is waited out (logged once a minute) rather
        than failing the service; any other error ends it (the supervisor restarts it)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sample_loop)
            task_status.started(self)
            await self._reconcile_loop(stopping)
            nursery.cancel_scope.cancel()

    async def _sample_loop(self) -> None:
        while True:
            depth: int | None = None
            try:
                with trio.fail_after(max(1.0, self.cfg.sample_s)):
                    depth = await self.store.billing_depth()
            except Exception as exc:
                if not _unavailable(exc):
                    raise
                # The hot path and the billing consumer report Redis outages; here a gap in the
                # depth series says it.
            if depth is not None:
                self.metrics.billing_queue_depth.set(depth)
            self.stats.sample(depth=depth, connections=self.connections())
            await trio.sleep(self.cfg.sample_s)

    async def _reconcile_loop(self, stopping: trio.Event) -> None:
        outage = Outage("monitor", self.events, max_s=30.0)
        while not stopping.is_set():
            try:
                async with open_pg_pool(
                    self.pg_url,
                    size=1,
                    min_size=1,
                    acquire_timeout_s=self.pg_cfg.acquire_timeout_s,
                    command_timeout_s=self.pg_cfg.command_timeout_s,
                ) as pool:
                    self.pool = pool
                    while not stopping.is_set():
                        with trio.fail_after(self.pg_cfg.command_timeout_s * 4):
                            rec = await self.reconcile_once(pool)
                        outage.ok()
                        with trio.move_on_after(max(self.cfg.interval_s, rec.took_s * DUTY)):
                            await stopping.wait()
            except Exception as exc:
                if not _unavailable(exc):
                    raise
                await outage.failed(exc, "Redis or Postgres")
            finally:
                self.pool = None

    async def reconcile_once(self, pool: PgPool) -> Reconciliation:
        """One live round on ``pool``: reconcile, measure the queue, update the stats and
        metrics."""
        t0 = time.perf_counter()
        candidates = self.stats.candidates()
        lag_s, offset = await oldest_waiting_age_s(self.store)
        depth = await self.store.billing_depth()
        start = "-"
        if candidates:
            # Entry ids are Redis-clock milliseconds of the XADD, which happened within the
            # result's finalize time before the event was logged; 5 s of margin for the rest.
            oldest = min(ts - ms / 1000 for _, ts, ms in candidates)
            start = str(max(0, int((oldest + offset - 5.0) * 1000)))

        async def waiting(ids: Collection[str]) -> tuple[set[str], int, bool]:
            budget = self.cfg.max_scan
            found, scanned, complete = await scan_billing_stream(
                self.store, ids, start=start, max_entries=budget
            )
            if complete and len(found) < len(ids) and start != "-" and scanned < budget:
                # Not all there after the estimated start: look before it too (a clock that
                # jumped, a log line written late) rather than call an event missing.
                rest = set(ids) - found
                early, more, complete = await scan_billing_stream(
                    self.store, rest, start="-", end=f"({start}", max_entries=budget - scanned
                )
                found |= early
                scanned += more
            return found, scanned, complete

        async def billed(ids: Iterable[str]) -> set[str]:
            return await billed_among(pool, ids)

        result = await reconcile([c[0] for c in candidates], billed=billed, waiting=waiting)
        self.stats.confirm_billed(result.billed)
        missing_reasons: list[tuple[str, str]] = []
        if result.missing:
            dead = await dead_lettered_events(self.store, limit=1000)
            ts_of = {job_id: ts for job_id, ts, _ in candidates}
            for job_id in sorted(result.missing, key=lambda j: ts_of.get(j, 0.0)):
                reason = dead.get(job_id)
                missing_reasons.append(
                    (job_id, f"dead-lettered: {reason}" if reason else "lost: in neither")
                )
        dead_letters = await dead_letter_counts(self.store, self.models)
        took = time.perf_counter() - t0
        rec = Reconciliation(
            delta=len(result.missing),
            missing=missing_reasons[:50],
            waiting=len(result.waiting),
            billed=len(result.billed),
            tracked=len(candidates),
            untracked=self.stats.untracked,
            complete=result.complete,
            checked_at=round(time.time(), 3),
            took_s=took,
            lag_s=lag_s if lag_s is not None else 0.0,
            depth=depth,
            dead_letters=dead_letters,
        )
        self.stats.reconciliation = rec
        self.rounds += 1
        self.metrics.reconciliation_delta.set(rec.delta or 0)
        self.metrics.billing_oldest_age_seconds.set(rec.lag_s or 0.0)
        self.metrics.billing_queue_depth.set(depth)
        for key, n in dead_letters.items():
            self.metrics.dead_letters.labels(key).set(n)
        self.metrics.monitor_seconds.observe(took)
        self._report(rec, missing_reasons)
        return rec

    def _report(self, rec: Reconciliation, missing: list[tuple[str, str]]) -> None:
        new = [(j, r) for j, r in missing if j not in self._reported_missing]
        if new:
            self._reported_missing.update(j for j, _ in new)
            self.events.emit(
                Error(
                    service="monitor",
                    message=f"reconciliation: {len(new)} synthesized event(s) neither billed nor "
                    f"waiting (delta {rec.delta})",
                    context={
                        "delta": rec.delta,
                        "job_ids": [j for j, _ in new[:50]],
                        "reasons": sorted({r for _, r in new})[:10],
                    },
                )
            )
        live_red = self.stats.liveness_failed(time.time())
        if live_red != self._live_red:
            self._live_red = live_red
            if live_red:
                self.events.emit(
                    Error(
                        service="monitor",
                        message=f"liveness: synthesis in the last {self.cfg.liveness_window_s:g} s"
                        " but no billing_processed",
                        context={"queue_depth": rec.depth},
                    )
                )
            else:
                self.events.emit(Recovered(service="monitor", what="liveness"))
        lag_red = grade_lag(rec.lag_s, self.cfg) == "red"
        if lag_red != self._lag_red:
            self._lag_red = lag_red
            if lag_red:
                self.events.emit(
                    Error(
                        service="monitor",
                        message=f"billing lag: the oldest waiting event is {rec.lag_s:.0f} s old",
                        context={"queue_depth": rec.depth, "lag_s": round(rec.lag_s or 0.0, 3)},
                    )
                )
            else:
                self.events.emit(Recovered(service="monitor", what="billing lag"))
