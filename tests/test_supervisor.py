"""The restart policy, on Trio's virtual clock (``autojump_clock``): exact timing, no waiting.

Capped exponential backoff with jitter, 1 s → 60 s, reset after a healthy stretch; a non-critical
service (billing) restarts forever while its siblings keep running; a critical one escalates.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.config import SupervisorConfig
from daemon.ops.events import EventLog
from daemon.ops.metrics import Metrics
from daemon.runtime.backoff import Backoff
from daemon.runtime.supervisor import ServiceEscalation, ServiceSpec, Supervisor

pytestmark = pytest.mark.timeout(30)


class Boom(RuntimeError):
    pass


def make_supervisor(tmp_path: Path, **cfg: Any) -> tuple[Supervisor, list[Any]]:
    events = EventLog(tmp_path / "events.jsonl")
    records: list[Any] = []
    events.add_listener(records.append)
    return Supervisor(SupervisorConfig(**cfg), events, Metrics()), records


def restarts(records: list[Any], service: str = "svc") -> list[Any]:
    return [r for r in records if r.kind == "service_restarted" and r.service == service]


class Flaky:
    """A service whose n-th start runs for ``run_for[n]`` seconds after started(), then fails."""

    def __init__(self, run_for: list[float]) -> None:
        self.run_for = run_for
        self.starts: list[float] = []

    async def __call__(self, *, task_status: trio.TaskStatus[None]) -> None:
        self.starts.append(trio.current_time())
        n = len(self.starts) - 1
        task_status.started()
        await trio.sleep(self.run_for[n] if n < len(self.run_for) else 0.0)
        raise Boom(f"start {n} failed")


def test_backoff_doubles_from_min_to_cap_with_jitter_and_never_leaves_the_bounds() -> None:
    for seed in range(50):
        b = Backoff(min_s=1.0, max_s=60.0, rng=random.Random(seed))
        delays = [b.next_delay(0.0) for _ in range(12)]
        assert all(1.0 <= d <= 60.0 for d in delays), delays
        for attempt, d in enumerate(delays):
            base = min(60.0, 2.0**attempt)
            assert max(1.0, base * 0.75) <= d <= min(60.0, base * 1.25), (attempt, d)
    # jitter: at the same attempt, different daemons wait different times (also at the cap)
    firsts = {round(Backoff(rng=random.Random(s)).next_delay(0.0), 6) for s in range(20)}
    capped = set()
    for s in range(20):
        b = Backoff(rng=random.Random(s))
        for _ in range(10):
            last = b.next_delay(0.0)
        capped.add(round(last, 6))
    assert len(firsts) > 5 and len(capped) > 10  # (about half the first delays are clamped to 1 s)
    assert all(45.0 <= c <= 60.0 for c in capped)


def test_backoff_resets_after_a_healthy_run() -> None:
    b = Backoff(min_s=1.0, max_s=60.0, healthy_after_s=30.0, jitter=0.0)
    assert [b.next_delay(0.0) for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert b.next_delay(29.9) == 16.0
    assert b.next_delay(30.0) == 1.0
    assert b.next_delay(0.0) == 2.0


async def test_failing_service_is_restarted_with_growing_delays_and_events(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sup, records = make_supervisor(tmp_path, backoff_min_s=1.0, backoff_max_s=60.0)
    flaky = Flaky([0.0] * 10)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.supervise, ServiceSpec("svc", flaky, critical=False))
        while len(flaky.starts) < 10:
            await trio.sleep(1)
        sup.stopping.set()
    gaps = [b - a for a, b in zip(flaky.starts, flaky.starts[1:], strict=False)]
    for attempt, gap in enumerate(gaps):
        base = min(60.0, 2.0**attempt)
        assert max(1.0, 0.75 * base) <= gap <= min(60.0, 1.25 * base) + 1e-6, (attempt, gaps)
    assert gaps[-1] >= 45.0  # capped at 60 s (with jitter), reached by the 7th restart
    events = restarts(records)
    assert [e.attempt for e in events[:9]] == list(range(1, 10))
    assert [e.backoff_s for e in events[:9]] == pytest.approx(gaps, abs=0.002)
    assert all(e.reason == f"Boom: start {i} failed" for i, e in enumerate(events[:9]))
    errors = [r for r in records if r.kind == "error" and r.service == "svc"]
    assert len(errors) >= 9
    assert sup.metrics.service_restarts.labels("svc")._value.get() >= 9


async def test_backoff_resets_after_a_healthy_stretch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sup, records = make_supervisor(
        tmp_path, backoff_min_s=1.0, backoff_max_s=60.0, healthy_after_s=30.0
    )
    # fails at once four times (delays ~1, 2, 4, 8 s), then runs 31 s, then fails at once again
    flaky = Flaky([0.0, 0.0, 0.0, 0.0, 31.0, 0.0, 0.0])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.supervise, ServiceSpec("svc", flaky, critical=False))
        while len(flaky.starts) < 7:
            await trio.sleep(0.5)
        sup.stopping.set()
    delays = [e.backoff_s for e in restarts(records)]
    assert 6.0 <= delays[3] <= 10.0  # the fourth consecutive failure waited ~8 s
    assert 1.0 <= delays[4] <= 1.25  # after the 31 s healthy run: back to ~1 s
    assert 1.5 <= delays[5] <= 2.5


async def test_non_critical_service_restarts_forever_while_siblings_keep_running(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sup, records = make_supervisor(
        tmp_path, backoff_min_s=1.0, backoff_max_s=60.0, intensity=2, intensity_window_s=600.0
    )
    sibling_ticks = 0

    async def sibling(*, task_status: trio.TaskStatus[None]) -> None:
        nonlocal sibling_ticks
        task_status.started()
        while True:
            await trio.sleep(1)
            sibling_ticks += 1

    flaky = Flaky([0.0] * 100)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.supervise, ServiceSpec("hot", sibling))
        await nursery.start(
            sup.supervise, ServiceSpec("billing", flaky, critical=False, fail_start_up=False)
        )
        await trio.sleep(600)
        assert sup.state("hot") == "running"
        assert sup.state("billing") in ("restarting", "starting", "running")
        sup.stopping.set()
        nursery.cancel_scope.cancel()
    # far past the intensity limit (2 in 600 s), and never escalated
    assert len(flaky.starts) >= 12
    assert sibling_ticks >= 599
    assert restarts(records, "hot") == []
    assert sup.states["hot"].restarts == 0


async def test_critical_service_escalates_past_the_intensity(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sup, _ = make_supervisor(
        tmp_path, backoff_min_s=1.0, backoff_max_s=60.0, intensity=3, intensity_window_s=600.0
    )
    flaky = Flaky([0.0] * 10)
    with pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.supervise, ServiceSpec("svc", flaky))
    assert info.group_contains(ServiceEscalation, match="svc failed 4 times")
    assert len(flaky.starts) == 4
    assert sup.state("svc") == "failed"


async def test_non_critical_service_that_cannot_start_does_not_block_start_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sup, records = make_supervisor(tmp_path)
    attempts = 0

    async def broken(*, task_status: trio.TaskStatus[None]) -> None:
        nonlocal attempts
        attempts += 1
        raise Boom("cannot connect")

    async with trio.open_nursery() as nursery:
        with trio.fail_after(1):  # start-up returns at once, not after a backoff
            await nursery.start(
                functools.partial(sup.supervise),
                ServiceSpec("billing", broken, critical=False, fail_start_up=False),
            )
        await trio.sleep(10)
        sup.stopping.set()
    assert attempts >= 3
    assert restarts(records, "billing")[0].reason == "Boom: cannot connect"


async def test_a_service_handle_is_what_its_current_start_reported_and_none_between_starts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Health and metrics read ``Supervisor.handle``: each start's own handle while it runs,
    nothing while the service waits to be restarted, nothing once it stopped."""
    sup, _ = make_supervisor(tmp_path, backoff_min_s=10.0, backoff_max_s=10.0)
    handles: list[object] = []
    fail = trio.Event()

    async def service(*, task_status: trio.TaskStatus[object]) -> None:
        handle = object()
        handles.append(handle)
        task_status.started(handle)
        await fail.wait()
        raise Boom("down")

    assert sup.handle("svc") is None  # not supervised here (yet)
    async with trio.open_nursery() as nursery:
        first = await nursery.start(
            sup.supervise, ServiceSpec("svc", service, critical=False, fail_start_up=False)
        )
        assert first is handles[0] and sup.handle("svc") is handles[0]
        fail.set()
        await trio.sleep(1)  # failed, waiting out its 5..10 s backoff
        assert sup.state("svc") == "restarting" and sup.handle("svc") is None
        fail = trio.Event()
        await trio.sleep(10)  # restarted: a fresh handle
        assert sup.state("svc") == "running" and len(handles) == 2
        assert sup.handle("svc") is handles[1]
        sup.stopping.set()
        nursery.cancel_scope.cancel()
    assert sup.state("svc") == "stopped" and sup.handle("svc") is None


def test_a_service_spec_names_a_stage_the_daemon_has() -> None:
    async def run(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()

    assert ServiceSpec("x", run).stage == "consumers"
    with pytest.raises(ValueError, match="stage"):
        ServiceSpec("x", run, stage="front")
