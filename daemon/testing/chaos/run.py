"""One chaos run from start to verdict: servers, daemons, workers, users, the fault schedule,
the drain and the reconciliation."""

from __future__ import annotations

import os
import random
from typing import Any

import trio

from daemon.testing.chaos.clients import ChaosUser
from daemon.testing.chaos.clock import WriteClock
from daemon.testing.chaos.faults import Faults
from daemon.testing.chaos.state import FaultRecord
from daemon.testing.chaos.verdict import Verdict
from daemon.testing.stores import in_thread
from daemon.testing.stores import setup_database as _setup_database


class Chaos(Faults, Verdict):
    """One chaos run: servers, daemons, workers, users, the fault schedule, the reconciliation."""

    async def run(self) -> dict[str, Any]:
        p = self.p
        await self.start_servers()
        await in_thread(self.audio.set_up)
        try:
            if "redis_crash" in p.kinds:
                await in_thread(self._arm_fsync_log)
            return await self._run_started()
        finally:
            with trio.CancelScope(shield=True):
                await self.cleanup()
                await self.stop_servers()
                await in_thread(self.audio.tear_down)

    async def _run_started(self) -> dict[str, Any]:
        p = self.p
        names = [f"chaos-{i}" for i in range(p.users)] + ["chaos-probe"]
        tag = f"{os.getpid()}-{self.rng.randrange(1 << 30)}"
        accounts = await in_thread(_setup_database, self.pg_url, [f"{n}-{tag}" for n in names])
        self._write_configs()
        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(self.start_daemon, slot)
        for _ in range(p.workers):
            await self.start_worker()
        urls = [s.ws_url for s in self.slots]
        for i, ((user_id, token), name) in enumerate(zip(accounts, names, strict=True)):
            user = ChaosUser(
                name, user_id, token, f"doc-{name}", urls, i % len(urls), p, self.stats,
                self.texts, random.Random(p.seed * 1000 + i), probe_only=name == "chaos-probe",
            )  # fmt: skip
            if user.probe_only:
                self.probe_user = user
            else:
                self.users.append(user)
        assert self.probe_user is not None
        self.say(
            f"{p.scenario}: {len(self.slots)} daemon(s), {p.workers} worker process(es), "
            f"{p.users} users, faults {', '.join(p.kinds)}"
        )
        async with trio.open_nursery() as nursery:
            try:
                if any(k.startswith("redis") for k in p.kinds):
                    self.clock = WriteClock(self.redis_url)
                    nursery.start_soon(trio.to_thread.run_sync, self.clock.run)
                nursery.start_soon(self._keep_workers)
                async with trio.open_nursery() as clients:
                    self.load_t0 = trio.current_time()
                    for user in (*self.users, self.probe_user):
                        clients.start_soon(user.run)
                    baseline = FaultRecord("baseline", "-", 0.0, 0.0)
                    await self.wait_recovered(baseline)
                    self.baseline_s = baseline.recover_s
                    # The load's clock starts once every daemon has answered a probe.
                    self.load_t0 = trio.current_time()
                    await self.schedule()
                    self.say(f"load over at {self._t():.1f} s; draining clients")
                    for user in (*self.users, self.probe_user):
                        user.drain()
                    drain_t0 = trio.current_time()
                    with trio.move_on_after(p.drain_timeout_s) as drain_scope:
                        while not all(u.done() for u in self._all_users()):  # noqa: ASYNC110
                            await trio.sleep(0.1)
                    self.clients_drain_s = trio.current_time() - drain_t0
                    self.clients_drained = not drain_scope.cancelled_caught
                    clients.cancel_scope.cancel()
            finally:
                # the clock is a thread: it stops when told, whatever ended the run
                if self.clock is not None:
                    self.clock.stop()
                nursery.cancel_scope.cancel()
        self.pipeline_quiet, self.pipeline_drain_s = await self._wait_quiescent()
        for slot in self.slots:
            if slot.alive:
                await self.sigterm_daemon(slot)
        return await self.reconcile()
