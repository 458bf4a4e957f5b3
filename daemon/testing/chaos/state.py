"""A chaos run's state: servers, daemon slots, workers, users, records — shared by its parts
(fleet, faults, verdict), each a class of its own module that :class:`tools.chaos.run.Chaos`
combines."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from daemon.embedded import EmbeddedPostgres, EmbeddedRedis
from daemon.testing.chaos.audio import AudioChaos
from daemon.testing.chaos.clients import ChaosUser, ClientStats, TextSource
from daemon.testing.chaos.clock import WriteClock
from daemon.testing.chaos.params import Params


@attrs.define(eq=False)
class DaemonSlot:
    name: str
    ws_port: int
    http_port: int
    config: Path
    events: Path
    log: Path
    proc: trio.Process | None = None
    starts: int = 0
    ops_port: int = 0  # /healthz (docs/operations.md: the operations listener)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/v1/ws"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


@attrs.define
class FaultRecord:
    kind: str
    target: str
    at_s: float  # since the load started
    lifted_s: float  # the fault was lifted (server back, daemon restarted, injection off)
    recover_s: float | None = None  # fault → every daemon healthy and a probe answered
    heal_s: float | None = None  # lifted → the same: the daemon's own healing time
    detail: dict[str, Any] = attrs.Factory(dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "at_s": round(self.at_s, 3),
            "lifted_s": round(self.lifted_s, 3),
            "recover_s": None if self.recover_s is None else round(self.recover_s, 3),
            "heal_s": None if self.heal_s is None else round(self.heal_s, 3),
            **self.detail,
        }


class ChaosState:
    """Everything a run holds; the parts below add behaviour only."""

    def __init__(
        self,
        p: Params,
        work: Path,
        say: Callable[[str], None],
        *,
        redis: EmbeddedRedis | None = None,
        postgres: EmbeddedPostgres | None = None,
        pg_url: str | None = None,
    ) -> None:
        """``redis``/``postgres``: servers to use (tests share one pair between runs); by default
        the run starts its own under ``work``. ``pg_url``: a database on ``postgres`` to use."""
        self.p = p
        self.work = work
        self.say = say
        self.rng = random.Random(p.seed)
        self.own_servers = redis is None
        secrets_dir = work / "secrets"
        self.redis = redis or EmbeddedRedis(work / "redis", secrets_dir, appendfsync=p.appendfsync)
        self.postgres = postgres or EmbeddedPostgres(work / "postgres" / "data", secrets_dir)
        self._pg_url = pg_url
        self.faults_file = work / "faults.spec"
        self.slots: list[DaemonSlot] = []
        self.workers: list[trio.Process] = []
        self.worker_log = work / "workers.log"
        self.started_pids: list[int] = []
        self.users: list[ChaosUser] = []
        self.probe_user: ChaosUser | None = None
        self.stats = ClientStats()
        self.records: list[FaultRecord] = []
        self.sigterm_exits: list[dict[str, Any]] = []
        self.worker_exits: list[int] = []
        self.clock: WriteClock | None = None
        self.redis_losses: list[dict[str, Any]] = []
        self.load_t0 = 0.0
        self.texts = TextSource(p.seed)
        self.baseline_s: float | None = None
        self.clients_drain_s = 0.0
        self.clients_drained = False
        self.pipeline_quiet = False
        self.pipeline_drain_s = 0.0
        self._killed_workers: set[trio.Process] = set()
        self._held_at_kill: list[str] = []
        self._hostile_refused = 0  # results of the hostile worker that must be dead letters
        self._fsync_log = work / "aof-fsync.log"
        self._fsync_shim: Path | None = None
        self.audio = AudioChaos(work)

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def pg_url(self) -> str:
        return self._pg_url or self.postgres.url

    def _all_users(self) -> list[ChaosUser]:
        return [*self.users, *([self.probe_user] if self.probe_user is not None else [])]

    def _t(self) -> float:
        return trio.current_time() - self.load_t0
