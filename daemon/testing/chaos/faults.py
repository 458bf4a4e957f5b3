"""The faults, one method each (``fault_<kind>``), the schedule that injects them under load,
and the recovery measure: every daemon healthy and a probe block synthesized through each."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import trio

from daemon.contracts import Job, Keys
from daemon.stores.redis import SCRIPTS
from daemon.testing.chaos.fleet import Fleet
from daemon.testing.chaos.hostcrash import cut_to_last_fsync
from daemon.testing.chaos.hostile import HOSTILE_KINDS, REFUSED_KINDS, hostile_result
from daemon.testing.chaos.params import CLOCK_KEY
from daemon.testing.chaos.state import DaemonSlot, FaultRecord
from daemon.testing.client import connect
from daemon.testing.stores import in_thread, redis_cmd


class Faults(Fleet):
    """Inject faults and time the recovery from each."""

    async def probe(self, slot: DaemonSlot) -> int:
        """A fresh block through ``slot``, end to end, until one comes back ``cached``; returns
        the attempts it took."""
        assert self.probe_user is not None
        user = self.probe_user
        attempts = 0
        while True:
            attempts += 1
            with trio.move_on_after(5.0):
                try:
                    async with connect(
                        slot.ws_url, user.token, timeout_s=3.0, keep_frames=False
                    ) as client:
                        ws = client.ws
                        block = user.new_block()
                        now = trio.current_time()
                        block.requested_at = block.first_requested_at = now
                        block.requests += 1
                        # as if asked on the probe user's own connection: it asks again only
                        # if the block has no news for stall_s (or that connection is renewed)
                        block.session = user.session
                        frame = {
                            "type": "synthesize",
                            "document_id": user.doc,
                            "model": "kokoro",
                            "blocks": [{"idx": block.idx, "text": block.text}],
                        }
                        await ws.send_message(json.dumps(frame))
                        while True:
                            reply = json.loads(await ws.get_message())
                            if reply.get("type") == "error":
                                break
                            if reply.get("type") != "status" or reply["block_idx"] != block.idx:
                                continue
                            if reply["status"] == "cached":
                                user.finish(block, "cached", trio.current_time())
                                return attempts
                            if reply["status"] in ("error", "skipped"):
                                break
                except Exception:
                    # Not up yet; the block (if sent) is the probe user's to see through.
                    pass
            await trio.sleep(0.2)

    async def wait_recovered(self, record: FaultRecord) -> None:
        t_fault = self.load_t0 + record.at_s
        t_lifted = self.load_t0 + record.lifted_s
        with trio.move_on_after(self.p.recover_timeout_s):
            for slot in self.slots:
                if not slot.alive:
                    continue
                while not await self._healthy(slot):  # noqa: ASYNC110 - another process
                    await trio.sleep(0.05)
                record.detail.setdefault("healthy_s", {})[slot.name] = round(
                    trio.current_time() - t_lifted, 3
                )
                attempts = await self.probe(slot)
                record.detail.setdefault("probe_attempts", {})[slot.name] = attempts
            now = trio.current_time()
            record.recover_s = now - t_fault
            record.heal_s = now - t_lifted
        if record.recover_s is None:
            self.say(f"NOT recovered within {self.p.recover_timeout_s:g} s: {record.kind}")

    async def inject(self, kind: str) -> FaultRecord:
        fn = getattr(self, f"fault_{kind}")
        record: FaultRecord = await fn()
        self.records.append(record)
        await self.wait_recovered(record)
        self.say(
            f"{record.kind} ({record.target}) at {record.at_s:.1f} s: recovered in "
            f"{record.recover_s if record.recover_s is None else round(record.recover_s, 2)} s"
        )
        return record

    async def fault_daemon_kill(self) -> FaultRecord:
        slot = self.rng.choice([s for s in self.slots if s.alive])
        at = self._t()
        await self.kill_daemon(slot)
        down = self.rng.uniform(0, self.p.daemon_down_s)
        if len(self.slots) > 1:
            down = self.p.daemon_down_s  # the peer serves meanwhile
        await trio.sleep(down)
        lifted = self._t()
        start_s = await self.start_daemon(slot)
        detail = {"down_s": round(down, 3), "start_s": round(start_s, 3)}
        return FaultRecord("daemon_kill", slot.name, at, lifted, detail=detail)

    async def fault_daemon_sigterm(self) -> FaultRecord:
        slot = self.rng.choice([s for s in self.slots if s.alive])
        at = self._t()
        exit_info = await self.sigterm_daemon(slot)
        lifted = self._t()
        start_s = await self.start_daemon(slot)
        detail = {k: exit_info[k] for k in ("exit_code", "exit_s", "ok")}
        detail["start_s"] = round(start_s, 3)
        return FaultRecord("daemon_sigterm", slot.name, at, lifted, detail=detail)

    async def fault_billing_faults(self) -> FaultRecord:
        rate = self.p.billing_fault_rate
        at = self._t()
        await trio.Path(self.faults_file).write_text(
            f"billing.before_batch={rate / 4:g}\nbilling.after_commit={rate:g}\n"
        )
        await trio.sleep(self.p.billing_fault_s)
        await trio.Path(self.faults_file).write_text("")
        lifted = self._t()
        return FaultRecord("billing_faults", "billing", at, lifted, detail={"rate": rate})

    async def _redis_fault(self, kind: str, *, kill: bool, crash: bool = False) -> FaultRecord:
        at = self._t()
        detail: dict[str, Any] = {"appendfsync": self.p.appendfsync}
        if kill:
            await in_thread(lambda: self.redis.stop(kill=True))
        else:
            await in_thread(self.redis.stop)
        if self.clock is not None:
            await self.clock.pause()
        if crash:
            detail["aof_cut_bytes"] = await in_thread(self._cut_aof_to_last_fsync)
        await trio.sleep(self.rng.uniform(0, self.p.redis_down_s))
        lifted = self._t()
        await in_thread(self._start_redis)
        if self.clock is not None:
            survived = int(await in_thread(redis_cmd, self.redis_url, "GET", CLOCK_KEY) or 0)
            loss = self.clock.measure(survived)
            loss["kind"] = kind
            self.redis_losses.append(loss)
            detail["acked_writes_lost"] = loss["lost"]
            detail["seconds_of_writes_lost"] = loss["seconds"]
            self.clock.resume(survived)
        return FaultRecord(kind, "redis", at, lifted, detail=detail)

    async def fault_redis_restart(self) -> FaultRecord:
        return await self._redis_fault("redis_restart", kill=False)

    async def fault_redis_kill(self) -> FaultRecord:
        return await self._redis_fault("redis_kill", kill=True)

    async def fault_redis_crash(self) -> FaultRecord:
        return await self._redis_fault("redis_crash", kill=True, crash=True)

    def _cut_aof_to_last_fsync(self) -> int:
        """Emulate a host crash: the AOF loses what was written after its last fsync."""
        return cut_to_last_fsync(self.redis.root / "appendonly.aof", self._fsync_log)

    async def fault_postgres_outage(self) -> FaultRecord:
        kill = self.rng.random() < 0.5
        at = self._t()
        await in_thread(lambda: self.postgres.stop(kill=kill))
        await trio.sleep(self.p.pg_down_s)
        lifted = self._t()
        await in_thread(self.postgres.start)
        detail = {"stop": "SIGKILL" if kill else "fast", "down_s": self.p.pg_down_s}
        return FaultRecord("postgres_outage", "postgres", at, lifted, detail=detail)

    async def fault_persister_faults(self) -> FaultRecord:
        rate = self.p.persister_fault_rate
        at = self._t()
        await trio.Path(self.faults_file).write_text(
            f"persist.read={rate / 5:g}\npersist.written={rate:g}\n"
        )
        await trio.sleep(self.p.persister_fault_s)
        await trio.Path(self.faults_file).write_text("")
        lifted = self._t()
        return FaultRecord("persister_faults", "persister", at, lifted, detail={"rate": rate})

    async def fault_disk_full(self) -> FaultRecord:
        at = self._t()
        detail = await in_thread(self.audio.fill)
        if "skipped" not in detail:
            await trio.sleep(self.p.disk_full_s)
            await in_thread(self.audio.make_room)
        lifted = self._t()
        return FaultRecord("disk_full", "audio store", at, lifted, detail=detail)

    async def fault_worker_kill(self) -> FaultRecord:
        """SIGKILL a worker process while jobs are held (mid-job), start a replacement; the jobs
        it held must come back through the scanner (their lease lapses) and be billed once."""
        proc = self.rng.choice([w for w in self.workers if w.returncode is None])
        held: list[bytes] = []
        with trio.move_on_after(5.0):
            while not held:  # (with one worker process: held by the one killed)
                held = await in_thread(
                    redis_cmd, self.redis_url, "ZRANGE", "tts:processing:kokoro", 0, -1
                )
                if not held:
                    await trio.sleep(0.01)
        at = self._t()
        self._killed_workers.add(proc)
        proc.kill()
        await proc.wait()
        self.workers.remove(proc)
        lifted = self._t()
        await self.start_worker()
        self._held_at_kill.extend(j.decode() for j in held)
        detail = {"jobs_held": len(held)}
        return FaultRecord("worker_kill", f"worker {proc.pid}", at, lifted, detail=detail)

    async def fault_hostile_worker(self) -> FaultRecord:
        """For ``hostile_s``, a worker that pulls jobs like any other and answers each with a
        result that breaks the contract, or one that forges the payer and the text length. Its
        blocks must fail recoverably (the clients ask again, an honest worker synthesizes them)
        or, forged, be billed to their creator for their own text: nothing lost, nothing billed
        wrong, and its refused results are the only dead letters."""
        assert self.probe_user is not None
        at = self._t()
        sent: Counter[str] = Counter()
        deadline = trio.current_time() + self.p.hostile_s
        turn = 0
        while trio.current_time() < deadline:
            raw = await in_thread(
                redis_cmd,
                self.redis_url,
                "EVAL",
                SCRIPTS["pull"],
                6,
                *Keys.pull_keys("kokoro"),
                *Keys.pull_args(),
            )
            if raw is None:
                await trio.sleep(0.01)
                continue
            job = Job.from_json(raw)
            kind = HOSTILE_KINDS[turn % len(HOSTILE_KINDS)]
            turn += 1
            payload = hostile_result(job, kind, forged_user=self.probe_user.user_id)
            await in_thread(
                redis_cmd, self.redis_url, "EVAL", SCRIPTS["push_result"], 3, Keys.RESULTS,
                Keys.processing("kokoro"), Keys.leases("kokoro"), payload, job.job_id,
            )  # fmt: skip
            sent[kind] += 1
            if kind in REFUSED_KINDS:
                self._hostile_refused += 1
        lifted = self._t()
        return FaultRecord(
            "hostile_worker", "worker hostile", at, lifted, detail={"results": dict(sent)}
        )

    async def schedule(self) -> None:
        """Faults one after another during the load, each recovered from before the next. A
        fault is never cut short by the end of the load: the load lasts until it has healed."""
        p = self.p
        kinds = list(p.kinds)
        await trio.sleep(min(p.first_fault_s, p.load_s))
        n = 0
        at_least = p.faults or len(kinds)
        while n < at_least or self._t() < p.load_s - 1.0:
            if p.scenario == "mixed" and n >= len(kinds):
                kind = self.rng.choice(kinds)
            else:
                kind = kinds[n % len(kinds)]  # mixed: every kind once first
            n += 1
            await self.inject(kind)
            gap = self.rng.uniform(0.5, 1.5) * p.fault_gap_s
            await trio.sleep(min(gap, max(0.0, p.load_s - self._t())))
        await trio.sleep(max(0.0, p.load_s - self._t()))
