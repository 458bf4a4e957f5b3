"""Contracts as data: Redis key names, and the jobs, results and billing events that cross Redis.

docs/workers.md pins the worker keys and job/result JSON; everything else here (audio, in-flight,
waiter, billing keys) is internal and may change with the code. The events log's contract, one
class per kind of event (docs/metrics.md), is ``daemon.contracts.events``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

import attrs

__all__ = [
    "MODELS",
    "BillingEvent",
    "ContractError",
    "Job",
    "Keys",
    "ModelInfo",
    "Result",
    "audio_content_type",
    "billing_event_fields",
    "token_hash",
    "usage_amount",
]


class ContractError(ValueError):
    """A message in Redis does not follow its contract (a poison message)."""


class Keys:
    """Every Redis key and channel the daemon and its workers use, in one place."""

    # Pinned by docs/workers.md (workers rely on these).
    JOBS = "tts:jobs"
    RESULTS = "tts:results"

    @staticmethod
    def queue(model: str) -> str:
        return f"tts:queue:{model}"

    @staticmethod
    def processing(model: str) -> str:
        return f"tts:processing:{model}"

    @staticmethod
    def dlq(model: str) -> str:
        return f"tts:dlq:{model}"

    @staticmethod
    def leases(model: str) -> str:
        return f"tts:leases:{model}"

    WORKERS = "tts:workers"  # worker id → registry entry JSON (renew.lua)

    # Fair scheduling (docs/workers.md, "Scheduling"): the order in which queued jobs are pulled.
    @staticmethod
    def fair(model: str) -> str:
        return f"tts:fair:{model}"  # sorted set by member "user|rank|position|job_id"

    @staticmethod
    def fair_users(model: str) -> str:
        return f"tts:fair:users:{model}"  # user → virtual start time

    @staticmethod
    def fair_state(model: str) -> str:
        return f"tts:fair:state:{model}"  # virtual time, weights, reading positions

    @staticmethod
    def pull_keys(model: str) -> list[str]:
        """``pull.lua``'s KEYS, in order."""
        return [
            Keys.queue(model),
            Keys.processing(model),
            Keys.JOBS,
            Keys.fair(model),
            Keys.fair_users(model),
            Keys.fair_state(model),
        ]

    @staticmethod
    def pull_args() -> list[str]:
        """``pull.lua``'s ARGV: the prefixes of the picked job's waiters set and of its
        listeners' channels (the job is chosen inside the script, docs/workers.md)."""
        return [Keys.WAITERS_PREFIX, Keys.NOTIFY_PREFIX]

    # Internal. Every key a Lua script touches is computed here and passed in KEYS (the prefixes
    # reach a script in ARGV only where it picks the variant itself: pull.lua, tts_notify).
    # A list: the worker's result JSON as it came (the base64 audio inside it), the audio string
    # again if claim.lua had to split it out, and last a JSON note of where the audio is, its
    # content type and duration (finalize.lua); TTL hot.audio_ttl_s
    AUDIO_PREFIX = "tts:audio:"
    INFLIGHT_PREFIX = "tts:inflight:"  # variant → job id of the job that will produce it
    WAITERS_PREFIX = "tts:waiters:"  # variant → set of "user|block_idx|conn_id|document_id"
    NOTIFY_PREFIX = "tts:notify:"  # pub/sub channel per user: status frames as JSON
    RETRIES = "tts:retries"  # job id → visibility timeouts so far
    RATE_PREFIX = "tts:rate:"  # user → token bucket (hash: tokens, ts) of blocks requested

    RESULTS_DEAD = "tts:results:dead"  # results refused at the boundary, with the reason
    HOT_CONSUMERS = "tts:hot:consumers"  # set of hot consumer ids
    HOT_ALIVE_PREFIX = "tts:hot:alive:"  # consumer id → heartbeat key with a TTL
    HOT_CLAIMED_PREFIX = "tts:hot:claimed:"  # consumer id → results it took, not yet finalized
    # (a set of tokens; each result sits in its own list, tts:hot:item:{token}, which finalize.lua
    # renames to the audio key: the bytes are never copied. Tokens are numbers the consumer picks,
    # unique to its run: daemon/hot/consumer.py ItemTokens)
    HOT_ITEM_PREFIX = "tts:hot:item:"
    HOT_LANDING_PREFIX = "tts:hot:landing:"  # consumer id → list BLMOVE drops a result into

    # The entitlements mirror and holds (docs/billing.md, "Holds and the entitlements mirror").
    ENT_PREFIX = "tts:ent:"  # user → hash: allowances, usage, rollover, purchased, version
    HOLDS_PREFIX = "tts:holds:"  # user → hash: job id → "type|amount|since|state", sum:{type}
    TOKEN_PREFIX = "tts:token:"  # SHA-256 of a token (hex) → user id
    MIRROR_READY = "tts:mirror:ready"  # set once a full rebuild from Postgres finished
    CONTROL = "tts:control"  # pub/sub: control messages to every gateway (revoke)

    BILLING = "tts:billing"  # stream of billing events; entries deleted once billed
    BILLING_GROUP = "billing"
    BILLING_DEAD = "tts:billing:dead"  # malformed billing events, with the reason

    # Hashes of audio finalized and not yet in the durable store (docs/tts-flow.md, "persist");
    # entries deleted once persisted. The audio key has no TTL until then.
    PERSIST = "tts:persist"
    PERSIST_GROUP = "persist"

    @staticmethod
    def audio(variant_hash: str) -> str:
        return Keys.AUDIO_PREFIX + variant_hash

    @staticmethod
    def inflight(variant_hash: str) -> str:
        return Keys.INFLIGHT_PREFIX + variant_hash

    @staticmethod
    def waiters(variant_hash: str) -> str:
        return Keys.WAITERS_PREFIX + variant_hash

    @staticmethod
    def rate(user_id: int) -> str:
        return f"{Keys.RATE_PREFIX}{user_id}"

    @staticmethod
    def ent(user_id: int) -> str:
        return f"{Keys.ENT_PREFIX}{user_id}"

    @staticmethod
    def holds(user_id: int) -> str:
        return f"{Keys.HOLDS_PREFIX}{user_id}"

    @staticmethod
    def token(token_hash: bytes) -> str:
        return Keys.TOKEN_PREFIX + token_hash.hex()

    @staticmethod
    def notify(user_id: int) -> str:
        return f"{Keys.NOTIFY_PREFIX}{user_id}"

    @staticmethod
    def hot_claimed(consumer_id: str) -> str:
        return Keys.HOT_CLAIMED_PREFIX + consumer_id

    @staticmethod
    def hot_alive(consumer_id: str) -> str:
        return Keys.HOT_ALIVE_PREFIX + consumer_id

    @staticmethod
    def hot_landing(consumer_id: str) -> str:
        return Keys.HOT_LANDING_PREFIX + consumer_id

    @staticmethod
    def hot_item(token: str) -> str:
        return Keys.HOT_ITEM_PREFIX + token


@attrs.frozen
class ModelInfo:
    name: str
    usage_type: str
    usage_multiplier: float
    default_voice: str


# The models docs/billing.md defines. Postgres holds them too (seeded by the migration) with their
# voices; this copy lets Redis-only code (workers, hot path) name them without a database.
MODELS: dict[str, ModelInfo] = {
    "kokoro": ModelInfo("kokoro", "server_kokoro", 1.0, "af_heart"),
    "premium": ModelInfo("premium", "premium_voice", 2.0, "ava"),
}


def token_hash(token: str) -> bytes:
    """What Postgres and the Redis token mirror keep of an API token: its SHA-256."""
    return hashlib.sha256(token.encode()).digest()


# audio/<subtype>, optionally with parameters (audio/ogg; codecs=opus); ASCII tokens only, so
# nothing but a media type can reach a Content-Type header.
_TOKEN = r"[A-Za-z0-9!#$&^_.+-]"
_PARAM = rf"[ \t]*;[ \t]*{_TOKEN}{{1,64}}=(?:{_TOKEN}{{1,128}}|\"[ !#-~]{{0,128}}\")"
_CONTENT_TYPE = re.compile(rf"audio/{_TOKEN}{{1,127}}(?:{_PARAM})*")


def audio_content_type(value: object) -> str | None:
    """``value`` if it is an ``audio/*`` media type this daemon serves, else ``None``."""
    if isinstance(value, str) and len(value) <= 255 and _CONTENT_TYPE.fullmatch(value):
        return value
    return None


def usage_amount(text_length: int, multiplier: float) -> int:
    """``round(text_length × usage_multiplier)``, rounding halves up (not to even)."""
    return math.floor(text_length * multiplier + 0.5)


def _loads(raw: bytes | str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ContractError(f"{what}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ContractError(f"{what}: not a JSON object")
    return data


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if name not in data:
        raise ContractError(f"{what}: missing field {name!r}")
    value = data[name]
    if isinstance(value, bool) and kind is not bool:
        raise ContractError(f"{what}: field {name!r} has the wrong type")
    if not isinstance(value, kind):
        raise ContractError(f"{what}: field {name!r} has the wrong type")
    return value


@attrs.frozen
class Job:
    """A synthesis job as workers see it (docs/workers.md)."""

    job_id: str
    variant_hash: str
    model: str
    voice: str
    text: str
    user_id: int
    document_id: str
    block_idx: int
    usage_multiplier: float
    enqueued_at: float

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Job:
        d = _loads(raw, "job")
        return cls(
            job_id=_field(d, "job_id", str, "job"),
            variant_hash=_field(d, "variant_hash", str, "job"),
            model=_field(d, "model", str, "job"),
            voice=_field(d, "voice", str, "job"),
            text=_field(d, "text", str, "job"),
            user_id=_field(d, "user_id", int, "job"),
            document_id=_field(d, "document_id", str, "job"),
            block_idx=_field(d, "block_idx", int, "job"),
            usage_multiplier=float(_field(d, "usage_multiplier", (int, float), "job")),
            enqueued_at=float(_field(d, "enqueued_at", (int, float), "job")),
        )


@attrs.frozen
class Result:
    """A worker's result (docs/workers.md): audio (base64) or an error.

    ``audio_base64`` stays encoded: the hot path stores the result as it came, and the audio is
    decoded when a listener fetches it.
    """

    job_id: str
    variant_hash: str
    model: str
    voice: str
    user_id: int
    document_id: str
    block_idx: int
    text_length: int
    usage_multiplier: float
    worker_id: str
    queue_wait_ms: float
    processing_time_ms: float
    audio_base64: str | None = None
    duration_ms: int | None = None
    content_type: str | None = None
    error: str | None = None

    @classmethod
    def for_job(
        cls,
        job: Job,
        *,
        worker_id: str,
        queue_wait_ms: float,
        processing_time_ms: float,
        audio_base64: str | None = None,
        duration_ms: int | None = None,
        content_type: str | None = None,
        error: str | None = None,
    ) -> Result:
        return cls(
            job_id=job.job_id,
            variant_hash=job.variant_hash,
            model=job.model,
            voice=job.voice,
            user_id=job.user_id,
            document_id=job.document_id,
            block_idx=job.block_idx,
            text_length=len(job.text),
            usage_multiplier=job.usage_multiplier,
            worker_id=worker_id,
            queue_wait_ms=queue_wait_ms,
            processing_time_ms=processing_time_ms,
            audio_base64=audio_base64,
            duration_ms=duration_ms,
            content_type=content_type,
            error=error,
        )

    def to_json(self) -> str:
        d = attrs.asdict(self)
        if self.error is None:
            del d["error"]
        else:
            for k in ("audio_base64", "duration_ms", "content_type"):
                del d[k]
        return json.dumps(d, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Result:
        return cls.from_dict(_loads(raw, "result"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        """Validate a parsed result (:meth:`from_json`'s checks, on a dict in hand)."""
        w = "result"
        error = d.get("error")
        if error is not None and not isinstance(error, str):
            raise ContractError("result: field 'error' has the wrong type")
        fields: dict[str, Any] = {}
        if error is None:
            fields["audio_base64"] = _field(d, "audio_base64", str, w)
            fields["duration_ms"] = int(_field(d, "duration_ms", (int, float), w))
            fields["content_type"] = _field(d, "content_type", str, w)
        return cls(
            job_id=_field(d, "job_id", str, w),
            variant_hash=_field(d, "variant_hash", str, w),
            model=_field(d, "model", str, w),
            voice=_field(d, "voice", str, w),
            user_id=_field(d, "user_id", int, w),
            document_id=_field(d, "document_id", str, w),
            block_idx=_field(d, "block_idx", int, w),
            text_length=_field(d, "text_length", int, w),
            usage_multiplier=float(_field(d, "usage_multiplier", (int, float), w)),
            worker_id=str(d.get("worker_id", "")),
            queue_wait_ms=float(d.get("queue_wait_ms") or 0.0),
            processing_time_ms=float(d.get("processing_time_ms") or 0.0),
            error=error,
            **fields,
        )


@attrs.frozen
class BillingEvent:
    """What the hot path hands to the billing queue for one finalized synthesis."""

    event_id: str  # the job id: usage_log.event_id
    user_id: int  # the user whose request created the job pays
    model: str
    voice: str
    variant_hash: str
    text_length: int
    usage_multiplier: float
    duration_ms: int
    document_id: str
    block_idx: int
    finalized_at: float

    @property
    def amount(self) -> int:
        return usage_amount(self.text_length, self.usage_multiplier)

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def for_result(cls, r: Result, *, finalized_at: float) -> BillingEvent:
        """The event of a finalized audio result (the job id is the event id)."""
        return cls(
            event_id=r.job_id,
            user_id=r.user_id,
            model=r.model,
            voice=r.voice,
            variant_hash=r.variant_hash,
            text_length=r.text_length,
            usage_multiplier=r.usage_multiplier,
            duration_ms=r.duration_ms or 0,
            document_id=r.document_id,
            block_idx=r.block_idx,
            finalized_at=finalized_at,
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> BillingEvent:
        d = billing_event_fields(raw)
        return cls(
            event_id=d["event_id"],
            user_id=d["user_id"],
            model=d["model"],
            voice=d["voice"],
            variant_hash=d["variant_hash"],
            text_length=d["text_length"],
            usage_multiplier=float(d["usage_multiplier"]),
            duration_ms=int(d["duration_ms"]),
            document_id=d["document_id"],
            block_idx=d["block_idx"],
            finalized_at=float(d["finalized_at"]),
        )


_BILLING_FIELDS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("event_id", str),
    ("user_id", int),
    ("model", str),
    ("voice", str),
    ("variant_hash", str),
    ("text_length", int),
    ("usage_multiplier", (int, float)),
    ("duration_ms", (int, float)),
    ("document_id", str),
    ("block_idx", int),
    ("finalized_at", (int, float)),
)


# The columns' ranges (migrations/0001_init.sql): bigint ids, integer lengths and durations,
# numeric(6, 3) multipliers; the amount (text_length × multiplier) then fits a bigint.
_BILLING_LIMITS: tuple[tuple[str, float], ...] = (
    ("user_id", 2**63 - 1),
    ("text_length", 2**31 - 1),
    ("block_idx", 2**31 - 1),
    ("duration_ms", 2**31 - 1),
    ("usage_multiplier", 999.999),
)


def billing_event_fields(raw: bytes | str) -> dict[str, Any]:
    """A billing event's JSON object, validated as :meth:`BillingEvent.from_json` does (every
    field present and of its type, a non-empty ``event_id``, no negative ``text_length`` or
    ``usage_multiplier``, finite numbers) without building the event: the billing consumer checks
    each event this way and sends the raw JSON on to Postgres. Raises ContractError."""
    w = "billing event"
    d = _loads(raw, w)
    for name, kind in _BILLING_FIELDS:
        value = _field(d, name, kind, w)
        # Postgres refuses NUL in text: stop it here, for this event alone (see below).
        if kind is str and "\x00" in value:
            raise ContractError(f"{w}: field {name!r} contains a NUL character")
    if not d["event_id"]:
        raise ContractError(f"{w}: empty event_id")
    if d["text_length"] < 0 or d["usage_multiplier"] < 0:
        raise ContractError(f"{w}: negative text_length or usage_multiplier")
    for name in ("usage_multiplier", "duration_ms", "finalized_at"):
        if isinstance(d[name], float) and not math.isfinite(d[name]):
            raise ContractError(f"{w}: field {name!r} is not a finite number")
    # What Python accepts and Postgres would refuse must stop here, for this event alone: a refusal
    # in Postgres fails the transaction of the user's other events too.
    for name, limit in _BILLING_LIMITS:
        if not -limit <= d[name] <= limit:
            raise ContractError(f"{w}: field {name!r} out of range (|value| <= {limit})")
    return d
