"""Configuration: one frozen object loaded from TOML and validated at load.

Every key has a default, so an empty file (or no file) works. A bad value raises
:class:`ConfigError` whose message is one line naming the key; the CLI prints it and exits 2.

Each section is its own frozen class so that a service receives only the section it needs: the
hot consumer gets :class:`HotConfig` and :class:`RedisConfig`, never anything naming Postgres.
"""

from __future__ import annotations

import ssl
import tomllib
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "AudioConfig",
    "BillingConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeadLettersConfig",
    "GatewayConfig",
    "HoldsConfig",
    "HotConfig",
    "LogConfig",
    "ModelsConfig",
    "MonitorConfig",
    "OpsConfig",
    "PlansConfig",
    "PostgresConfig",
    "RedisConfig",
    "SupervisorConfig",
    "WorkersConfig",
    "config_path",
    "load_config",
]


class ConfigError(Exception):
    """A configuration value is wrong. ``str()`` is one line that names the key."""


@attrs.frozen
class DataConfig:
    dir: Path = Path("var")


@attrs.frozen
class GatewayConfig:
    host: str = "127.0.0.1"
    ws_port: int = 8765
    http_port: int = 8080
    tls_cert: str = ""
    tls_key: str = ""
    max_message_bytes: int = 65536
    # Blocks a user may request per minute (all their connections, all daemons sharing Redis).
    rate_limit_blocks_per_min: int = 1200
    # Frames buffered for one client before it is considered too slow and closed (1013).
    send_queue_frames: int = 512
    # Open WebSocket connections the gateway accepts at once (more get HTTP 503 at the handshake).
    max_connections: int = 2000
    # On shutdown, open connections get this long to receive what is in flight before close.
    close_grace_s: float = 2.0
    # The variant-hash HMAC key; "" → generated once under data.dir/secrets.
    variant_secret_path: str = ""
    # Open connections one user may hold (more get HTTP 429 at the handshake).
    max_connections_per_user: int = 50
    # Blocks one connection may wait for at once (a synthesize beyond it gets rate_limited).
    max_pending_blocks: int = 4096
    # Statuses from Redis queued for routing to connections; when full, more are dropped and
    # the open waits re-read from Redis (every block still gets its terminal status).
    notify_buffer: int = 4096
    # Frames one connection may send per second (a token bucket holding as many); beyond it the
    # connection is closed with 1008 (policy violation).
    max_frames_per_s: int = 50
    # Handshakes with an unknown token one client address may make per minute (the rest get
    # HTTP 429 without a look-up).
    auth_failures_per_min: int = 30

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server TLS context when both ``tls_cert`` and ``tls_key`` are set, else ``None``."""
        if not (self.tls_cert and self.tls_key):
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx


@attrs.frozen
class RedisConfig:
    url: str = ""
    # Connections in the shared command pool (blocking readers have their own connection each).
    max_connections: int = 64
    pool_timeout_s: float = 5.0
    # Deadline for one ordinary command round trip, enforced on the Trio side.
    command_timeout_s: float = 10.0
    # Server-side timeout of blocking reads (BLMOVE/XREADGROUP); loops re-issue them.
    block_s: float = 1.0


@attrs.frozen
class PostgresConfig:
    url: str = ""
    request_pool_size: int = 30
    billing_pool_size: int = 2
    # How long the request path waits for a pool connection before giving up on a request.
    acquire_timeout_s: float = 5.0
    command_timeout_s: float = 30.0


@attrs.frozen
class HotConfig:
    concurrency: int = 40
    audio_ttl_s: int = 300
    # Results taken from tts:results per read (drain-on-wake).
    read_batch: int = 64
    # Results finalized per Redis round trip (one finalize.lua call) under a burst.
    finalize_batch: int = 32
    # A consumer whose heartbeat is older than this is dead; its claimed results are requeued.
    consumer_ttl_s: float = 10.0
    heartbeat_s: float = 2.0


@attrs.frozen
class AudioConfig:
    """The durable audio store behind the Redis cache, and its persister (docs/operations.md)."""

    # false: audio lives in Redis only, for hot.audio_ttl_s (no store, no persister).
    enabled: bool = True
    # "" → data.dir/audio. Several daemons may share one directory.
    dir: str = ""
    # Size cap of the store; least recently used audio is evicted beyond it. 0: no cap.
    max_bytes: int = 10 * 1024**3
    # Audio read within this many days is never evicted (0: nothing is pinned).
    pin_days: float = 7.0
    # Audio objects the persister writes per batch (one fsync of each directory per batch).
    persist_batch: int = 64
    # Worker threads doing the store's file I/O at once.
    io_threads: int = 4
    # A persist entry pending this long on another (dead) daemon is taken over.
    claim_idle_s: float = 30.0
    # The store's size and object count are re-measured this often (other daemons write too).
    scan_interval_s: float = 60.0


@attrs.frozen
class ModelsConfig:
    """Per-model settings that are not in Postgres' catalog."""

    # Model revision, part of every variant hash: bump it to retire the audio of a bad model
    # build (new requests synthesize again; `tts-daemon audio purge` removes the old audio).
    # A table of model → revision string; a model not listed has revision "" (the hashes of
    # earlier versions, so existing audio stays valid).
    revision: dict[str, str] = attrs.Factory(dict)


@attrs.frozen
class BillingConfig:
    # Events per batch (drain-on-wake: up to this many). The default is 200 (docs/configuration.md);
    # larger batches amortize each transaction's fixed cost: conf/daemon.toml ships 2000
    # (docs/billing.md, tools/bench_billing.py).
    max_batch: int = 200
    # A pending event idle this long (its consumer died) is claimed by another consumer.
    claim_idle_s: float = 30.0
    # Stand-in for slow storage: added inside each billing transaction (stress/bench only).
    txn_delay_ms: float = 0.0
    # Users whose events share one transaction (locked in user-id order).
    users_per_txn: int = 250


@attrs.frozen
class WorkersConfig:
    # Workers run inside the daemon (dev, demo, tests), each with the engine below.
    simulated: int = 0
    # "simulated" (a hum, speed dialled in below: stress runs and tests) or "espeak" (real speech
    # from eSpeak NG on the CPU): daemon/workers/engines.py, docs/workers.md.
    engine: str = "simulated"
    models: tuple[str, ...] = ("kokoro", "premium")
    # Simulated synthesis speed: characters per second, plus a fixed latency and a jitter.
    chars_per_s: float = 2000.0
    latency_ms: float = 20.0
    jitter_ms: float = 10.0
    # Jobs a simulated worker pulls and finishes together, like a GPU batch (bursty results).
    batch: int = 1
    # Simulated audio: sample rate of the 16-bit mono WAV and speaking rate (chars per second).
    sample_rate: int = (
        6000  # 16-bit mono: 12 KB/s, about 60 KB for five seconds (docs/benchmarks.md)
    )
    speech_chars_per_s: float = 15.0
    # A job held by a worker that does not renew a lease (one that predates leases) goes back
    # to the queue after this long; a renewed lease keeps a job as long as its worker lives.
    visibility_timeout_s: float = 30.0
    # The lease the daemon's own (simulated) workers take on a job, renewed every third of it.
    lease_s: float = 10.0
    max_retries: int = 3
    scan_interval_s: float = 1.0
    # A worker result whose audio decodes to more bytes than this is refused (docs/workers.md).
    max_audio_bytes: int = 16 * 1024 * 1024


@attrs.frozen
class DeadLettersConfig:
    """Bounds of every dead-letter list (tts:results:dead, tts:billing:dead, tts:dlq:{model}),
    each on its own (docs/operations.md, "Dead letters")."""

    max_entries: int = 10000
    max_age_s: float = 7 * 86400.0
    # A dead-lettered result keeps at most this much of what the worker sent (its audio, mostly).
    max_raw_bytes: int = 64 * 1024


@attrs.frozen
class SupervisorConfig:
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    # A service that ran this long without failing has its backoff reset.
    healthy_after_s: float = 30.0
    # More than this many restarts within the window escalates (for services that must not die).
    intensity: int = 5
    intensity_window_s: float = 60.0
    # docs/tts-flow.md: exit within 10 s of SIGTERM.
    shutdown_timeout_s: float = 8.0


@attrs.frozen
class LogConfig:
    events_path: str = ""  # "" → data.dir/log/events.jsonl
    max_bytes: int = 50 * 1024 * 1024
    backups: int = 5
    # Events buffered for the writer task; a full buffer drops (and counts) events.
    buffer: int = 10000


@attrs.frozen
class MonitorConfig:
    """The live view (dashboard, reconciliation) and the thresholds it and tools/report.sh use."""

    enabled: bool = True
    # Dashboard samples (latencies, rates, queue depth) are taken this often.
    sample_s: float = 1.0
    # The live reconciliation runs this often, on a one-connection Postgres pool of its own.
    interval_s: float = 5.0
    # The live reconciliation covers this daemon's syntheses of the last window_s; the dashboard's
    # charts show as much history.
    window_s: float = 900.0
    # Liveness: synthesis seen in the last liveness_window_s but no billing_processed → red.
    # Syntheses younger than liveness_grace_s do not count yet (billing has not had its turn).
    liveness_window_s: float = 120.0
    liveness_grace_s: float = 5.0
    # Reconciliation delta (events neither billed nor waiting): amber from, red from.
    delta_amber: int = 1
    delta_red: int = 10
    # Age of the oldest billing event still waiting: amber from, red from.
    lag_amber_s: float = 30.0
    lag_red_s: float = 300.0
    # Bounds on the live reconciliation's work per round.
    max_tracked: int = 100000
    max_scan: int = 50000


@attrs.frozen
class OpsConfig:
    """The operations listener: /metrics, /healthz, /dashboard, apart from the gateway's ports
    (docs/operations.md)."""

    host: str = "127.0.0.1"
    port: int = 8081


@attrs.frozen
class HoldsConfig:
    """Usage holds and the entitlements mirror (docs/billing.md)."""

    # A hold whose job is gone (not queued, not running) expires this long after it was placed.
    ttl_s: float = 300.0
    # A hold whose audio is done and whose billing event waits (Postgres down) expires after this.
    billing_ttl_s: float = 86400.0
    # How often the reaper looks for expired holds, and the mirror service for a lost mirror.
    check_s: float = 1.0
    reap_interval_s: float = 10.0


@attrs.frozen
class PlansConfig:
    # Fair scheduling's share per plan (docs/workers.md, "Scheduling"): a user on a plan of weight
    # 2 gets twice the synthesized characters of a weight-1 user while both have jobs waiting.
    # Plans not named here weigh 1.
    weights: dict[str, float] = attrs.field(factory=dict)

    def weight(self, plan: str | None) -> float:
        return self.weights.get(plan or "", 1.0)


@attrs.frozen
class Config:
    data: DataConfig = DataConfig()
    gateway: GatewayConfig = GatewayConfig()
    redis: RedisConfig = RedisConfig()
    postgres: PostgresConfig = PostgresConfig()
    hot: HotConfig = HotConfig()
    billing: BillingConfig = BillingConfig()
    workers: WorkersConfig = WorkersConfig()
    dead_letters: DeadLettersConfig = DeadLettersConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    log: LogConfig = LogConfig()
    monitor: MonitorConfig = MonitorConfig()
    audio: AudioConfig = AudioConfig()
    models: ModelsConfig = ModelsConfig()

    @property
    def audio_dir(self) -> Path:
        if self.audio.dir:
            return Path(self.audio.dir)
        return self.data.dir / "audio"

    ops: OpsConfig = OpsConfig()
    holds: HoldsConfig = HoldsConfig()
    plans: PlansConfig = PlansConfig()

    @property
    def events_path(self) -> Path:
        if self.log.events_path:
            return Path(self.log.events_path)
        return self.data.dir / "log" / "events.jsonl"

    def evolve(self, **sections: dict[str, Any]) -> Config:
        """A copy with some keys changed: ``cfg.evolve(gateway={"ws_port": 0})``."""
        changes = {}
        for name, values in sections.items():
            changes[name] = attrs.evolve(getattr(self, name), **values)
        return attrs.evolve(self, **changes)


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "gateway": GatewayConfig,
    "redis": RedisConfig,
    "postgres": PostgresConfig,
    "hot": HotConfig,
    "billing": BillingConfig,
    "workers": WorkersConfig,
    "dead_letters": DeadLettersConfig,
    "supervisor": SupervisorConfig,
    "log": LogConfig,
    "monitor": MonitorConfig,
    "audio": AudioConfig,
    "models": ModelsConfig,
    "ops": OpsConfig,
    "holds": HoldsConfig,
    "plans": PlansConfig,
}

# Extra rules beyond the type: (predicate, what is wrong).
_POSITIVE = (lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_AT_LEAST_1 = (lambda v: v >= 1, "must be >= 1")
_PORT = (lambda v: 0 <= v <= 65535, "must be a port number 0..65535")
_RULES: dict[str, tuple[Any, str]] = {
    "gateway.ws_port": _PORT,
    "gateway.http_port": _PORT,
    "gateway.max_message_bytes": (lambda v: 256 <= v <= 16 * 1024 * 1024, "must be 256..16777216"),
    "gateway.rate_limit_blocks_per_min": _AT_LEAST_1,
    "gateway.send_queue_frames": _AT_LEAST_1,
    "gateway.max_connections": _AT_LEAST_1,
    "gateway.close_grace_s": _NON_NEGATIVE,
    "gateway.max_connections_per_user": _AT_LEAST_1,
    "gateway.max_pending_blocks": _AT_LEAST_1,
    "gateway.notify_buffer": _AT_LEAST_1,
    "gateway.max_frames_per_s": _AT_LEAST_1,
    "gateway.auth_failures_per_min": _AT_LEAST_1,
    "ops.port": _PORT,
    "holds.ttl_s": _POSITIVE,
    "holds.billing_ttl_s": _POSITIVE,
    "holds.check_s": (lambda v: 0.05 <= v <= 60, "must be 0.05..60"),
    "holds.reap_interval_s": (lambda v: 0.05 <= v <= 3600, "must be 0.05..3600"),
    "redis.max_connections": _AT_LEAST_1,
    "redis.pool_timeout_s": _POSITIVE,
    "redis.command_timeout_s": _POSITIVE,
    "redis.block_s": (lambda v: 0.01 <= v <= 30, "must be 0.01..30"),
    "postgres.request_pool_size": _AT_LEAST_1,
    "postgres.billing_pool_size": _AT_LEAST_1,
    "postgres.acquire_timeout_s": _POSITIVE,
    "postgres.command_timeout_s": _POSITIVE,
    "hot.concurrency": _AT_LEAST_1,
    "hot.audio_ttl_s": _AT_LEAST_1,
    "hot.read_batch": _AT_LEAST_1,
    "hot.finalize_batch": (lambda v: 1 <= v <= 1000, "must be 1..1000"),
    "hot.consumer_ttl_s": _POSITIVE,
    "hot.heartbeat_s": _POSITIVE,
    "billing.max_batch": _AT_LEAST_1,
    "billing.claim_idle_s": _POSITIVE,
    "billing.txn_delay_ms": _NON_NEGATIVE,
    "billing.users_per_txn": _AT_LEAST_1,
    "workers.simulated": _NON_NEGATIVE,
    "workers.engine": (lambda v: v in ("simulated", "espeak"), 'must be "simulated" or "espeak"'),
    "workers.chars_per_s": _POSITIVE,
    "workers.latency_ms": _NON_NEGATIVE,
    "workers.jitter_ms": _NON_NEGATIVE,
    "workers.batch": (lambda v: 1 <= v <= 256, "must be 1..256"),
    "workers.sample_rate": (lambda v: 4000 <= v <= 48000, "must be 4000..48000"),
    "workers.speech_chars_per_s": _POSITIVE,
    "workers.visibility_timeout_s": _POSITIVE,
    "workers.max_retries": _AT_LEAST_1,
    "workers.lease_s": (lambda v: 0.1 <= v <= 3600, "must be 0.1..3600"),
    "workers.scan_interval_s": _POSITIVE,
    "workers.max_audio_bytes": (lambda v: 1024 <= v <= 2**29, "must be 1024..536870912"),
    "dead_letters.max_entries": (lambda v: 1 <= v <= 10_000_000, "must be 1..10000000"),
    "dead_letters.max_age_s": _POSITIVE,
    "dead_letters.max_raw_bytes": (lambda v: 256 <= v <= 2**26, "must be 256..67108864"),
    "supervisor.backoff_min_s": _POSITIVE,
    "supervisor.backoff_max_s": _POSITIVE,
    "supervisor.healthy_after_s": _POSITIVE,
    "supervisor.intensity": _AT_LEAST_1,
    "supervisor.intensity_window_s": _POSITIVE,
    "supervisor.shutdown_timeout_s": _POSITIVE,
    "log.max_bytes": (lambda v: v >= 4096, "must be >= 4096"),
    "log.backups": _AT_LEAST_1,
    "log.buffer": _AT_LEAST_1,
    "monitor.sample_s": (lambda v: 0.05 <= v <= 60, "must be 0.05..60"),
    "monitor.interval_s": (lambda v: 0.1 <= v <= 3600, "must be 0.1..3600"),
    "monitor.window_s": (lambda v: 10 <= v <= 86400, "must be 10..86400"),
    "monitor.liveness_window_s": _POSITIVE,
    "monitor.liveness_grace_s": _NON_NEGATIVE,
    "monitor.delta_amber": _AT_LEAST_1,
    "monitor.delta_red": _AT_LEAST_1,
    "monitor.lag_amber_s": _POSITIVE,
    "monitor.lag_red_s": _POSITIVE,
    "monitor.max_tracked": (lambda v: 100 <= v <= 10_000_000, "must be 100..10000000"),
    "monitor.max_scan": (lambda v: 100 <= v <= 10_000_000, "must be 100..10000000"),
    "audio.max_bytes": _NON_NEGATIVE,
    "audio.pin_days": (lambda v: 0 <= v <= 3650, "must be 0..3650"),
    "audio.persist_batch": (lambda v: 1 <= v <= 1000, "must be 1..1000"),
    "audio.io_threads": (lambda v: 1 <= v <= 64, "must be 1..64"),
    "audio.claim_idle_s": _POSITIVE,
    "audio.scan_interval_s": _POSITIVE,
}

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Check ``value`` against the field's annotation (a string, thanks to __future__)."""
    if annotation == "Path":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty string (a path), got {value!r}")
        return Path(value)
    if annotation == "dict[str, float]":
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a table of numbers, got {value!r}")
        out = {}
        for name, v in value.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.01 <= v <= 1000:
                raise ConfigError(f"{key}.{name}: must be a number 0.01..1000, got {v!r}")
            out[name] = float(v)
        return out
    if annotation == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key}: must be a list of non-empty strings, got {value!r}")
        return tuple(value)
    if annotation == "dict[str, str]":
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v and len(v) <= 64
            for k, v in value.items()
        ):
            raise ConfigError(
                f"{key}: must be a table of names to non-empty strings (64 chars at most),"
                f" got {value!r}"
            )
        return dict(value)
    expected = {"int": int, "float": float, "str": str, "bool": bool}[annotation]
    # TOML distinguishes 1 from 1.0; accept an integer where a number is expected.
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{key}: must be an integer, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{key}: must be {_TYPE_NAMES[expected]}, got {value!r}")
    return value


def _build_section(name: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: must be a table, got {table!r}")
    fields = {f.name: f for f in attrs.fields(cls)}
    values = {}
    for key, value in table.items():
        dotted = f"{name}.{key}"
        if key not in fields:
            raise ConfigError(f"{dotted}: unknown key")
        value = _coerce(dotted, value, fields[key].type)
        rule = _RULES.get(dotted)
        if rule is not None and not rule[0](value):
            raise ConfigError(f"{dotted}: {rule[1]}, got {value!r}")
        values[key] = value
    return cls(**values)


def _check_cross_field(cfg: Config) -> None:
    g = cfg.gateway
    if bool(g.tls_cert) != bool(g.tls_key):
        key = "gateway.tls_key" if g.tls_cert else "gateway.tls_cert"
        raise ConfigError(f"{key}: tls_cert and tls_key must be set together")
    for key in ("tls_cert", "tls_key"):
        path = getattr(g, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"gateway.{key}: no such file: {path}")
    if g.ws_port and g.ws_port == g.http_port:
        raise ConfigError("gateway.http_port: must differ from gateway.ws_port")
    if cfg.ops.port and cfg.ops.port in (g.ws_port, g.http_port) and cfg.ops.host == g.host:
        raise ConfigError("ops.port: must differ from gateway.ws_port and gateway.http_port")
    if cfg.supervisor.backoff_max_s < cfg.supervisor.backoff_min_s:
        raise ConfigError("supervisor.backoff_max_s: must be >= supervisor.backoff_min_s")
    for url_key, url, schemes in (
        ("redis.url", cfg.redis.url, ("redis://", "rediss://", "unix://")),
        ("postgres.url", cfg.postgres.url, ("postgres://", "postgresql://")),
    ):
        if url and not url.startswith(schemes):
            raise ConfigError(f"{url_key}: must start with one of {', '.join(schemes)}")
    m = cfg.monitor
    if m.delta_red < m.delta_amber:
        raise ConfigError("monitor.delta_red: must be >= monitor.delta_amber")
    if m.lag_red_s < m.lag_amber_s:
        raise ConfigError("monitor.lag_red_s: must be >= monitor.lag_amber_s")
    if m.liveness_grace_s >= m.liveness_window_s:
        raise ConfigError("monitor.liveness_grace_s: must be < monitor.liveness_window_s")
    known = {"kokoro", "premium"}
    for model in cfg.workers.models:
        if model not in known:
            raise ConfigError(f"workers.models: unknown model {model!r}")
    for model in cfg.models.revision:
        if model not in known:
            raise ConfigError(f"models.revision: unknown model {model!r}")


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from parsed TOML."""
    sections = {}
    for name, table in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section")
        sections[name] = _build_section(name, _SECTIONS[name], table)
    cfg = Config(**sections)
    _check_cross_field(cfg)
    return cfg


DEFAULT_CONFIG = Path("conf/daemon.toml")


def config_path(given: str | Path | None) -> Path | None:
    """The configuration a command uses: ``--config`` if given, else ``conf/daemon.toml`` when it
    exists in the working directory, else ``None`` (built-in defaults)."""
    if given is not None:
        return Path(given)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_config(path: str | Path | None) -> Config:
    """Load ``path`` (TOML). ``None`` → all defaults. Raises :class:`ConfigError`."""
    if path is None:
        return config_from_dict({})
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {p}: {exc.strerror or exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p}: invalid TOML: {exc}") from None
    return config_from_dict(raw)
