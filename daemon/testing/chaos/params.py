"""What a chaos run does: its scenarios, their faults and every knob (the command line's
options)."""

from __future__ import annotations

import attrs

FAULT_KINDS = (
    "daemon_kill",
    "daemon_sigterm",
    "billing_faults",
    "redis_restart",
    "redis_kill",
    "redis_crash",
    "postgres_outage",
    "worker_kill",
    "persister_faults",
    "disk_full",
    "hostile_worker",
)
SCENARIOS: dict[str, tuple[str, ...]] = {
    "daemon-kill": ("daemon_kill",),
    "sigterm": ("daemon_sigterm",),
    "billing": ("billing_faults",),
    "redis": ("redis_restart", "redis_kill", "redis_crash"),
    "redis-crash": ("redis_crash",),
    "postgres": ("postgres_outage",),
    "worker-kill": ("worker_kill",),
    "persister": ("persister_faults", "daemon_kill"),
    "disk-full": ("disk_full",),
    "hostile-worker": ("hostile_worker",),
    "two-daemons": ("daemon_kill",),
    "mixed": FAULT_KINDS,
}
TWO_DAEMON_SCENARIOS = ("two-daemons", "mixed")
SIGTERM_DEADLINE_S = 10.0  # docs/tts-flow.md
HOLDS_TTL_S = 5.0  # a hold whose job vanished expires this soon here (docs/billing.md)
CLOCK_KEY = "chaos:clock"
LOG_BACKUPS = 5  # [log] backups in the daemons' configuration (the default)


@attrs.frozen
class Params:
    scenario: str = "mixed"
    load_s: float = 120.0  # the load phase; faults are injected during it
    users: int = 6
    rate: float = 2.0  # new blocks a second, per user
    buffer: int = 6  # blocks a user has outstanding at most
    workers: int = 2  # tts-worker processes
    worker_concurrency: int = 2  # worker loops in each
    worker_batch: int = 4
    worker_latency_ms: float = 150.0
    worker_lease_s: float = 2.0  # tts-worker --lease-s: a killed worker's jobs return this soon
    daemons: int = 0  # 0: the scenario's own (2 for two-daemons and mixed, else 1)
    appendfsync: str = "always"
    faults: int = 0  # at least this many faults (0: each kind of the scenario once)
    first_fault_s: float = 3.0  # load time before the first fault
    fault_gap_s: float = 4.0  # mean quiet time between a recovery and the next fault
    daemon_down_s: float = 2.0  # a killed daemon stays down up to this long (two: exactly)
    redis_down_s: float = 1.0
    pg_down_s: float = 4.0
    billing_fault_s: float = 5.0  # how long the billing service is made to fail
    # Probability that a billing batch fails after its commit, before its ack (redelivered: the
    # duplicates path); a quarter of it fails batches before anything is billed.
    billing_fault_rate: float = 0.5
    persister_fault_s: float = (
        5.0  # how long the persister is made to crash (daemon/testing/chaos/audio.py)
    )
    persister_fault_rate: float = 0.5  # per batch, at persist.written (a fifth of it at .read)
    disk_full_s: float = 4.0  # how long the audio store's filesystem stays full
    hostile_s: float = 3.0  # how long the hostile worker answers the jobs it pulls
    stall_s: float = 8.0  # a client asks again for a block with no news for this long
    ack_timeout_s: float = 15.0  # a request with no reply for this long: the connection is given up
    recover_timeout_s: float = 60.0
    drain_timeout_s: float = 90.0
    seed: int = 1
    # The daemon's healing knobs (the defaults suit production; chaos wants faults to heal fast).
    visibility_timeout_s: float = 5.0
    consumer_ttl_s: float = 3.0
    claim_idle_s: float = 5.0
    backoff_max_s: float = 2.0
    request_pool_size: int = 8

    @property
    def kinds(self) -> tuple[str, ...]:
        return SCENARIOS[self.scenario]

    @property
    def n_daemons(self) -> int:
        if self.daemons:
            return self.daemons
        return 2 if self.scenario in TWO_DAEMON_SCENARIOS else 1
