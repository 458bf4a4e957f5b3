"""The verdict: drain, then reconcile exactly — every block a user asked for reached a terminal
status, every delivered block has exactly one ``usage_log`` row with the right amount, nothing
else is billed, the counters agree with the log, and the events log accounts for the rest."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import trio

from daemon.contracts.events import BillingProcessed, Event, ServiceRestarted, SynthesisComplete
from daemon.ops.events import read_events
from daemon.testing.chaos.fleet import Fleet
from daemon.testing.chaos.params import HOLDS_TTL_S, LOG_BACKUPS
from daemon.testing.figures import pct
from daemon.testing.stores import in_thread, pg_query


class Verdict(Fleet):
    """What the run proved."""

    async def _wait_quiescent(self) -> tuple[bool, float]:
        """Until no result, claimed result, billing event or pending entry is left in Redis."""
        t0 = trio.current_time()
        limit = self.p.claim_idle_s + self.p.consumer_ttl_s + self.p.drain_timeout_s
        with trio.move_on_after(limit):
            while True:
                state = await in_thread(self._redis_state)
                if not any(state[k] for k in ("billing_depth", "billing_pending", "results",
                                              "claimed", "persist_depth")):  # fmt: skip
                    return True, trio.current_time() - t0
                await trio.sleep(0.25)
        return False, trio.current_time() - t0

    def _redis_state(self) -> dict[str, int]:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=5.0)
        try:
            # (a set of tokens per consumer: docs/tts-flow.md; LLEN on it is WRONGTYPE)
            claimed = sum(int(client.scard(k)) for k in client.scan_iter(match="tts:hot:claimed:*"))
            try:
                pending = int(client.xpending("tts:billing", "billing")["pending"])
            except redis.ResponseError:
                pending = 0
            return {
                "persist_depth": int(client.xlen("tts:persist")),
                "billing_depth": int(client.xlen("tts:billing")),
                "billing_pending": pending,
                "results": int(client.llen("tts:results")),
                "claimed": claimed,
                "queued": int(client.zcard("tts:queue:kokoro")),
                "processing": int(client.zcard("tts:processing:kokoro")),
                "dlq": int(client.llen("tts:dlq:kokoro")),
                "billing_dead": int(client.llen("tts:billing:dead")),
                "results_dead": int(client.llen("tts:results:dead")),
                # usage holds still open (docs/billing.md): 0 once everything is billed
                "holds_open": sum(
                    int(client.hget(k, "n") or 0) for k in client.scan_iter(match="tts:holds:*")
                ),
            }
        finally:
            client.close()

    async def reconcile(self) -> dict[str, Any]:
        p = self.p
        rows = await in_thread(
            pg_query,
            self.pg_url,
            "SELECT event_id, user_id, usage_type, amount, details->>'document_id' AS doc,"
            " (details->>'block_idx')::int AS idx FROM usage_log",
        )
        users = {u.user_id for u in self._all_users()}
        rows = [r for r in rows if r["user_id"] in users]  # tests share a database server
        by_key: dict[tuple[int, str, int], list[dict[str, Any]]] = {}
        for r in rows:
            by_key.setdefault((r["user_id"], r["doc"], r["idx"]), []).append(r)
        blocks = [b for u in self._all_users() for b in u.blocks.values()]
        c = Counter[str]()
        for b in blocks:
            billed = by_key.pop(b.key, [])
            if b.status is None:
                c["undelivered"] += 1
            elif b.status == "cached":
                c["delivered"] += 1
                if not billed:
                    c["delivered_unbilled"] += 1
            else:
                c[f"terminal_{b.status}"] += 1
            if billed and b.status != "cached":
                c["billed_not_delivered"] += 1
            if len(billed) > 1:
                c["double_billed"] += 1
            for r in billed:
                if r["amount"] != len(b.text) or r["usage_type"] != "server_kokoro":
                    c["wrong_amount"] += 1
        phantom = sum(len(v) for v in by_key.values())
        counters = await in_thread(self._counters_match, sorted(users))
        state = await in_thread(self._redis_state)
        # Holds end by their bills (already drained) or expire: a daemon killed between its
        # finalize and its holds update leaves a hold the reaper takes after holds.ttl_s.
        with trio.move_on_after(HOLDS_TTL_S + 10):
            while state["holds_open"]:
                await trio.sleep(0.5)
                state = await in_thread(self._redis_state)
        events_unbilled = self._events_log_unbilled({r["event_id"] for r in rows})
        lost = c["undelivered"] + c["delivered_unbilled"] + c["terminal_error"]
        recover = [r.recover_s for r in self.records if r.recover_s is not None]
        by_kind: dict[str, list[float]] = {}
        for r in self.records:
            if r.recover_s is not None:
                by_kind.setdefault(r.kind, []).append(r.recover_s)
        injected = Counter(r.kind for r in self.records)
        billing_restarts = self._billing_injected_failures()
        redis_loss = self._loss_window()
        billed_ids = {r["event_id"] for r in rows}
        held_unbilled = [j for j in self._held_at_kill if j not in billed_ids]
        delivered_texts = [b.text for b in blocks if b.status == "cached"]
        audio = await in_thread(
            self.audio.verdict, self.work / "secrets" / "variant_hmac.key", delivered_texts
        )
        billed_once = (
            c["delivered_unbilled"] == 0 and c["double_billed"] == 0 and c["wrong_amount"] == 0
        )
        verified = {
            "every_block_terminal": c["undelivered"] == 0 and c["terminal_error"] == 0,
            "every_delivered_block_billed_once": billed_once,
            "nothing_billed_that_was_not_delivered": c["billed_not_delivered"] == 0
            and phantom == 0,
            "counters_match_usage_log": counters,
            "billing_drained": self.pipeline_quiet,
            # The hostile worker's refused results, and nothing else, are dead letters.
            "no_dead_letters": state["billing_dead"] == 0
            and state["results_dead"] == self._hostile_refused,
            "holds_reconciled_to_0": state["holds_open"] == 0,
            "events_log_reconciles": events_unbilled == 0,
            "recovered_from_every_fault": all(r.recover_s is not None for r in self.records),
            "sigterm_exit_0_within_10s": all(x["ok"] for x in self.sigterm_exits),
            "no_request_unanswered": self.stats.ack_timeouts == 0,
            "faults_injected": len(self.records) > 0 or p.load_s < p.first_fault_s,
            # Durable audio (chaos/audio.py): nothing left to persist, every delivered
            # block's audio in the store, every stored object whole.
            "persist_drained": state["persist_depth"] == 0,
            "every_delivered_block_in_store": audio["delivered_not_in_store"] == 0,
            "every_stored_object_readable": audio["unreadable_objects"] == 0,
        }
        if self._held_at_kill:
            verified["jobs_of_killed_workers_billed"] = not held_unbilled
        if redis_loss is not None:
            redis_loss["blocks_unbilled"] = c["delivered_unbilled"]
            redis_loss["blocks_double_billed"] = c["double_billed"]
            if p.appendfsync == "always":
                verified["no_acknowledged_redis_write_lost"] = redis_loss["acked_writes_lost"] == 0
            elif injected["redis_crash"]:
                # With everysec a host crash may lose up to about a second of Redis writes, by
                # design: what that cost is reported in loss_window, not counted as a failure.
                del verified["every_delivered_block_billed_once"]
                del verified["events_log_reconciles"]
                # (the lost second may hold finalized audio not yet persisted: reported only)
                del verified["every_delivered_block_in_store"]
                # a lost write may be a hold's settlement: such a hold waits for its billing
                # TTL (holds.billing_ttl_s); reported in holds_open, not a failure here
                del verified["holds_reconciled_to_0"]
                verified["wrong_amounts_none"] = c["wrong_amount"] == 0
                # …and the loss shows where a person looks: every delivered block left unbilled
                # is in the reconciliation delta of the events log (tools/report.sh). A SIGKILLed
                # daemon may lose its last log lines, so then it is at most that.
                if injected["daemon_kill"]:
                    visible = events_unbilled <= c["delivered_unbilled"]
                else:
                    visible = events_unbilled == c["delivered_unbilled"]
                verified["loss_visible_in_events_log"] = visible
                verified["loss_window_measured"] = redis_loss["clock_writes"] > 0 and len(
                    redis_loss["by_fault"]
                ) == sum(injected[k] for k in ("redis_restart", "redis_kill", "redis_crash"))
        return {
            "scenario": p.scenario,
            "faults_injected": dict(injected),
            "faults": [r.as_dict() for r in self.records],
            "blocks": len(blocks),
            "delivered": c["delivered"],
            "billed": len(rows),
            "lost": lost,
            "double_billed": c["double_billed"],
            "holds_open": state["holds_open"],
            "wrong_amount": c["wrong_amount"],
            "undelivered": c["undelivered"],
            "delivered_unbilled": c["delivered_unbilled"],
            "billed_not_delivered": c["billed_not_delivered"],
            "phantom_rows": phantom,
            "terminal_errors": c["terminal_error"],
            "recover_s": {
                "p50": pct(recover, 50),
                "max": pct(recover, 100),
                "by_kind": {
                    k: {"n": len(v), "p50": pct(v, 50), "max": pct(v, 100)}
                    for k, v in sorted(by_kind.items())
                },
            },
            "baseline_probe_s": None if self.baseline_s is None else round(self.baseline_s, 3),
            "loss_window": redis_loss,
            "billing_injected_failures": billing_restarts,
            "billing_duplicates_redelivered": self._billing_duplicates(),
            "jobs_held_by_killed_workers": len(self._held_at_kill),
            "jobs_held_by_killed_workers_unbilled": len(held_unbilled),
            "sigterm": self.sigterm_exits,
            "worker_exits": self.worker_exits,
            "clients": self.stats.as_dict(),
            "clients_drained": self.clients_drained,
            "clients_drain_s": round(self.clients_drain_s, 3),
            "pipeline_drain_s": round(self.pipeline_drain_s, 3),
            "redis_end": state,
            "audio": audio,
            "events_log_unbilled": events_unbilled,
            "daemon_starts": {s.name: s.starts for s in self.slots},
            "verified": verified,
        }

    def _counters_match(self, user_ids: list[int]) -> bool:
        """usage_periods and user_voice_stats hold what usage_log holds: nothing counted twice."""
        logged = pg_query(
            self.pg_url,
            "SELECT user_id, sum(amount)::bigint AS total, count(*)::bigint AS n FROM usage_log"
            " WHERE user_id = ANY($1::bigint[]) GROUP BY user_id",
            user_ids,
        )
        periods = pg_query(
            self.pg_url,
            "SELECT user_id, sum(server_kokoro_characters)::bigint AS total FROM usage_periods"
            " WHERE user_id = ANY($1::bigint[]) GROUP BY user_id",
            user_ids,
        )
        stats = pg_query(
            self.pg_url,
            "SELECT user_id, sum(total_characters)::bigint AS total, sum(synth_count)::bigint AS n"
            " FROM user_voice_stats WHERE user_id = ANY($1::bigint[]) GROUP BY user_id",
            user_ids,
        )
        want = {r["user_id"]: (r["total"], r["n"]) for r in logged}
        got_periods = {r["user_id"]: r["total"] for r in periods if r["total"]}
        got_stats = {r["user_id"]: (r["total"], r["n"]) for r in stats}
        return got_periods == {u: t for u, (t, _) in want.items()} and got_stats == want

    def _events(self) -> Iterator[Event]:
        """Every event of every daemon's log (rotations too), through the one reader."""
        for slot in self.slots:
            yield from read_events(slot.events, backups=LOG_BACKUPS)

    def _events_log_unbilled(self, billed_ids: set[str]) -> int:
        """Synthesized by the daemons' own account (``synthesis_complete``) but never billed.
        (A SIGKILLed daemon may lose its last log lines: this can only undercount.)"""
        users = {u.user_id for u in self._all_users()}
        synthesized = {
            ev.job_id
            for ev in self._events()
            if isinstance(ev, SynthesisComplete) and ev.billed and ev.user_id in users
        }
        return len(synthesized - billed_ids)

    def _billing_injected_failures(self) -> int:
        return sum(
            1
            for ev in self._events()
            if isinstance(ev, ServiceRestarted)
            and ev.service == "billing"
            and "InjectedFault" in ev.reason
        )

    def _billing_duplicates(self) -> int:
        """Billing events delivered again after they were billed, and recognised as such."""
        return sum(ev.duplicates for ev in self._events() if isinstance(ev, BillingProcessed))

    def _loss_window(self) -> dict[str, Any] | None:
        if not self.redis_losses:
            return None
        return {
            "appendfsync": self.p.appendfsync,
            "redis_faults": len(self.redis_losses),
            "acked_writes_lost": sum(x["lost"] for x in self.redis_losses),
            "seconds_of_writes_lost_max": max(x["seconds"] for x in self.redis_losses),
            "seconds_of_writes_lost_total": round(sum(x["seconds"] for x in self.redis_losses), 3),
            "by_fault": self.redis_losses,
            "clock_writes": self.clock.writes if self.clock else 0,
        }
