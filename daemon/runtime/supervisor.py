"""Supervision: each service runs in a nursery of its own, restarted by policy, from one place.

A service is ``async def run(*, task_status)``; it calls ``task_status.started()`` once its
resources are really up. :meth:`Supervisor.supervise` runs it, and when it fails (or returns while
the daemon is not stopping) logs an ``error`` event, waits a capped, jittered exponential backoff
(reset after a healthy stretch), logs ``service_restarted`` and starts it again with fresh
resources. A *critical* service (gateway, hot path) that fails more than ``intensity`` times in
``intensity_window_s`` escalates: the daemon stops rather than limp. The billing service is not
critical: it keeps being restarted (backoff capped at ``backoff_max_s``) while the rest serves.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from daemon.config import SupervisorConfig
from daemon.contracts.events import Error, ServiceRestarted
from daemon.ops.events import EventLog, describe
from daemon.ops.metrics import Metrics
from daemon.runtime.backoff import Backoff, IntensityWindow

__all__ = ["STAGES", "ServiceEscalation", "ServiceSpec", "ServiceState", "Supervisor"]

ServiceRun = Callable[..., Awaitable[Any]]

# The daemon's nurseries, outermost first: services start in this order and stop in reverse —
# the gateway first, then the simulated workers, then the consumers (docs/tts-flow.md).
STAGES = ("consumers", "workers", "gateway")


class ServiceEscalation(Exception):
    """A critical service failed too often: the daemon gives up."""


@attrs.frozen
class ServiceSpec:
    """One supervised service. ``run(*, task_status)`` calls ``task_status.started(handle)``
    once its resources are up; the handle (its pool, reader, state…) is what health and metrics
    read, through :meth:`Supervisor.handle`, while that start of the service runs."""

    name: str
    run: ServiceRun  # async def run(*, task_status) -> None
    critical: bool = True
    # A service that fails before its first start: critical ones fail the daemon's start-up;
    # the others count it as a crash and keep retrying while the daemon starts without them.
    fail_start_up: bool = True
    # The daemon's nursery it runs in (STAGES); its stop signal is bound into ``run``.
    stage: str = attrs.field(default="consumers", validator=attrs.validators.in_(STAGES))


@attrs.define
class ServiceState:
    name: str
    state: str = "starting"  # starting | running | restarting | stopped | failed
    restarts: int = 0
    last_error: str | None = None
    since: float = 0.0
    # What the running start of the service handed to started(); None while it is not running.
    handle: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "restarts": self.restarts,
            "last_error": self.last_error,
        }


@attrs.define
class Supervisor:
    cfg: SupervisorConfig
    events: EventLog
    metrics: Metrics
    stopping: trio.Event = attrs.Factory(trio.Event)
    states: dict[str, ServiceState] = attrs.Factory(dict)

    def state(self, name: str) -> str:
        s = self.states.get(name)
        return s.state if s else "stopped"

    def handle(self, name: str) -> Any:
        """The handle the service ``name`` reported at its current start; None while it is not
        running (starting, restarting, stopped, or not supervised here)."""
        s = self.states.get(name)
        return s.handle if s else None

    async def supervise(
        self, spec: ServiceSpec, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``spec`` until it returns while stopping (or is cancelled), restarting it on
        failure. ``started()`` with what the service's first start reported."""
        st = self.states[spec.name] = ServiceState(spec.name, since=trio.current_time())
        backoff = Backoff(
            min_s=self.cfg.backoff_min_s,
            max_s=self.cfg.backoff_max_s,
            healthy_after_s=self.cfg.healthy_after_s,
        )
        window = IntensityWindow(limit=self.cfg.intensity, window_s=self.cfg.intensity_window_s)
        reported = False
        try:
            while True:
                st.state = "starting"
                running_since: float | None = None
                try:
                    try:
                        async with trio.open_nursery() as nursery:
                            value = await nursery.start(spec.run)
                            running_since = trio.current_time()
                            st.state, st.since, st.handle = "running", running_since, value
                            if not reported:
                                reported = True
                                task_status.started(value)
                    finally:
                        st.handle = None
                    if self.stopping.is_set():
                        return
                    reason = "service returned while the daemon was running"
                except Exception as exc:
                    if self.stopping.is_set():
                        # Failing while shutting down: say so, do not restart.
                        self.events.emit(
                            Error(
                                service=spec.name,
                                message=f"failed during shutdown: {describe(exc)}",
                            )
                        )
                        return
                    if not reported and spec.fail_start_up:
                        st.state = "failed"
                        raise
                    reason = describe(exc)
                    print(f"tts-daemon: service {spec.name} failed:", file=sys.stderr)
                    traceback.print_exception(exc, file=sys.stderr)
                now = trio.current_time()
                st.last_error = reason
                self.events.emit(Error(service=spec.name, message=f"service failed: {reason}"))
                window.record(now)
                if spec.critical and window.exceeded():
                    st.state = "failed"
                    raise ServiceEscalation(
                        f"{spec.name} failed {self.cfg.intensity + 1} times within "
                        f"{self.cfg.intensity_window_s:g} s; last: {reason}"
                    )
                # The healthy stretch counts from started(): a service that keeps failing at
                # start-up never resets its backoff, however slowly it fails.
                delay = backoff.next_delay(0.0 if running_since is None else now - running_since)
                st.restarts += 1
                st.state = "restarting"
                self.events.emit(
                    ServiceRestarted(
                        service=spec.name,
                        attempt=st.restarts,
                        backoff_s=round(delay, 3),
                        reason=reason,
                    )
                )
                self.metrics.service_restarts.labels(spec.name).inc()
                if not reported:
                    # Let the daemon finish starting; this service catches up when it can.
                    reported = True
                    task_status.started(None)
                with trio.move_on_after(delay):
                    await self.stopping.wait()
                if self.stopping.is_set():
                    return
        finally:
            if st.state != "failed":
                st.state = "stopped"
