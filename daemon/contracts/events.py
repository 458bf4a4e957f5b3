"""The events log's contract (docs/metrics.md): one attrs class per kind of event.

A producer builds an event and hands it to ``EventLog.emit``; the log stamps ``ts`` and writes
``{"ts": …, "event": KIND, field: value, …}`` as one JSON line. The one reader
(``daemon.ops.events.read_events``) turns lines back into these classes, so that the dashboard, the
report, the chaos and stress tools and the tests read the log the same way.

The on-disk names are the contract: outside programs rely on them, so a field is renamed never,
and a new field of an existing kind gets a default (older lines lack it). A line of a kind this
version does not know — from a newer daemon — or of a known kind whose fields do not check, is
read as :class:`GenericEvent`, with every field kept.

Adding a kind: a ``@event("kind")`` class below (keyword-only fields; ``None`` defaults are left
out of the line when ``None``), listed in ``__all__`` and in docs/metrics.md.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin

import attrs

__all__ = [
    "EVENT_KINDS",
    "AudioEvicted",
    "AudioPersistClaimed",
    "AudioPersisted",
    "BillingClaimed",
    "BillingProcessed",
    "ConnectionsRevoked",
    "DaemonStarted",
    "DaemonStopped",
    "Error",
    "Event",
    "GenericEvent",
    "HoldsExpired",
    "MirrorRebuilt",
    "Recovered",
    "ResultDuplicate",
    "ResultGone",
    "ResultsRecovered",
    "ServiceRestarted",
    "SynthesisComplete",
    "event_from_record",
]

# Keys of the line that are not an event's fields.
_ENVELOPE = frozenset({"ts", "event"})


@attrs.frozen(kw_only=True)
class Event:
    """What every event has: ``ts``, the unix time the log stamped (``None`` until emitted)."""

    KIND: ClassVar[str] = ""
    # (field name, the types a value read back may have or None: any, omitted when None)
    _SCHEMA: ClassVar[tuple[tuple[str, tuple[type, ...] | None, bool], ...]] = ()

    ts: float | None = attrs.field(default=None, eq=False)

    @property
    def kind(self) -> str:
        return self.KIND

    def fields(self) -> dict[str, Any]:
        """The event's fields as the line carries them (without ``ts`` and ``event``)."""
        out: dict[str, Any] = {}
        for name, _, omit_none in self._SCHEMA:
            value = getattr(self, name)
            if value is None and omit_none:
                continue
            out[name] = value
        return out

    def get(self, name: str, default: Any = None) -> Any:
        """A field by its on-disk name, for code that handles any kind (``GenericEvent`` too)."""
        return self.fields().get(name, default)


EVENT_KINDS: dict[str, type[Event]] = {}
E = TypeVar("E", bound=type[Event])


def _accepts(annotation: Any) -> tuple[type, ...] | None:
    """The JSON value types a field annotated ``annotation`` may hold; None: anything."""
    if annotation is Any:
        return None
    if get_origin(annotation) in (Union, types.UnionType):
        parts = [_accepts(a) for a in get_args(annotation)]
        if any(p is None for p in parts):
            return None
        return tuple(t for p in parts for t in p or ())
    if annotation is type(None):
        return (type(None),)
    if annotation is float:
        return (int, float)
    if annotation in (str, int, bool):
        return (annotation,)
    origin = get_origin(annotation) or annotation
    return (origin,) if isinstance(origin, type) else None


def event(kind: str) -> Callable[[E], E]:
    """Register an event class under ``kind`` (its ``"event"`` value on disk)."""

    def register(cls: E) -> E:
        if kind in EVENT_KINDS:
            raise ValueError(f"event kind {kind!r} registered twice")
        attrs.resolve_types(cls)
        schema = []
        for f in attrs.fields(cls):
            if f.name == "ts" or f.metadata.get("rest"):
                continue
            schema.append((f.name, _accepts(f.type), f.default is None))
        cls.KIND = kind
        cls._SCHEMA = tuple(schema)
        EVENT_KINDS[kind] = cls
        return cls

    return register


# -- the pinned events (docs/metrics.md) -------------------------------------------------------


@event("synthesis_complete")
@attrs.frozen(kw_only=True)
class SynthesisComplete(Event):
    """One per result the hot path finalized with audio (its billing event queued with it)."""

    job_id: str
    variant_hash: str
    user_id: int
    model: str
    voice: str
    text_length: int
    queue_wait_ms: float
    worker_ms: float
    finalize_ms: float
    cache_store_ms: float
    notify_ms: float
    status: str = "audio"
    notified: int = 0
    billed: bool = True
    group: int = 1


def _events_count(self: BillingProcessed) -> int:
    return self.events_count


@event("billing_processed")
@attrs.frozen(kw_only=True)
class BillingProcessed(Event):
    """One per billing batch, after its transactions committed and it was acknowledged."""

    events_count: int
    users_count: int
    duration_ms: float
    text_length: int
    billed: int = attrs.field(default=attrs.Factory(_events_count, takes_self=True))
    duplicates: int = 0
    dead_lettered: int = 0


@event("error")
@attrs.frozen(kw_only=True)
class Error(Event):
    """A failure a person should see. ``context``: any further fields, written beside
    ``service`` and ``message`` in the line (a key of theirs is never overwritten)."""

    service: str
    message: str
    context: Mapping[str, Any] = attrs.field(factory=dict, metadata={"rest": True})

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"service": self.service, "message": self.message}
        for key, value in self.context.items():
            if key not in out and key not in _ENVELOPE:
                out[key] = value
        return out


@event("service_restarted")
@attrs.frozen(kw_only=True)
class ServiceRestarted(Event):
    """The supervisor restarted a service (after the ``error`` that says what failed)."""

    service: str
    attempt: int
    backoff_s: float
    reason: str


# -- the others (not pinned: may change) --------------------------------------------------------


@event("daemon_started")
@attrs.frozen(kw_only=True)
class DaemonStarted(Event):
    instance: str
    ws_url: str
    http_url: str
    migrations_applied: list[str] = attrs.field(factory=list)
    ops_url: str | None = None


@event("mirror_rebuilt")
@attrs.frozen(kw_only=True)
class MirrorRebuilt(Event):
    """Every user's entitlements and tokens copied from Postgres into Redis (docs/billing.md)."""

    service: str
    users: int


@event("holds_expired")
@attrs.frozen(kw_only=True)
class HoldsExpired(Event):
    """Usage holds of vanished jobs (or of bills that never came) released by the reaper;
    ``users``: holds expired per user id."""

    service: str
    holds: int
    characters: int
    users: dict[str, int] = attrs.field(factory=dict)


@event("connections_revoked")
@attrs.frozen(kw_only=True)
class ConnectionsRevoked(Event):
    """A revoked user's open connections were closed (``tts-daemon user revoke``)."""

    service: str
    user_id: int


@event("daemon_stopped")
@attrs.frozen(kw_only=True)
class DaemonStopped(Event):
    instance: str


@event("recovered")
@attrs.frozen(kw_only=True)
class Recovered(Event):
    """An outage ended: ``down_s`` and ``failures`` for a dependency, ``what`` for a monitor
    alarm (liveness, billing lag)."""

    service: str
    down_s: float | None = None
    failures: int | None = None
    what: str | None = None


@event("result_duplicate")
@attrs.frozen(kw_only=True)
class ResultDuplicate(Event):
    """A second result for a job already finalized: not finalized again, not billed."""

    service: str
    job_id: str
    variant_hash: str
    worker_id: str


@event("result_gone")
@attrs.frozen(kw_only=True)
class ResultGone(Event):
    """A claimed result no longer there (finalized already, or given back by recovery)."""

    service: str
    job_id: str
    variant_hash: str
    worker_id: str


@event("results_recovered")
@attrs.frozen(kw_only=True)
class ResultsRecovered(Event):
    """Claimed results of a dead hot consumer given back."""

    service: str
    count: int
    consumer: str


@event("billing_claimed")
@attrs.frozen(kw_only=True)
class BillingClaimed(Event):
    """Pending billing events of a dead billing consumer taken over."""

    service: str
    count: int


@event("audio_persisted")
@attrs.frozen(kw_only=True)
class AudioPersisted(Event):
    """One persister batch done (docs/tts-flow.md, "The third path: persist")."""

    service: str
    entries: int
    written: int
    existing: int
    missing: int
    damaged: int


@event("audio_persist_claimed")
@attrs.frozen(kw_only=True)
class AudioPersistClaimed(Event):
    """Persist entries of a dead daemon taken over."""

    service: str
    count: int


@event("audio_evicted")
@attrs.frozen(kw_only=True)
class AudioEvicted(Event):
    """Audio evicted from the durable store by its size cap."""

    service: str
    count: int
    freed_bytes: int
    remaining_bytes: int
    pinned: int


# -- anything else ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class GenericEvent(Event):
    """An event of a kind this version does not know (a newer daemon's), or whose fields do not
    match its class: every field kept as it came."""

    kind: str  # type: ignore[assignment]  # an instance field here, a class constant elsewhere
    data: Mapping[str, Any] = attrs.field(factory=dict)

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k not in _ENVELOPE}


def event_from_record(kind: str, record: Mapping[str, Any], *, ts: float | None) -> Event:
    """The event a parsed line holds (its ``ts`` already parsed); never raises."""
    cls = EVENT_KINDS.get(kind)
    if cls is None:
        return GenericEvent(kind=kind, data=dict(record), ts=ts)
    kwargs: dict[str, Any] = {}
    for name, accepts, _ in cls._SCHEMA:
        if name not in record:
            continue
        value = record[name]
        if accepts is not None and (
            not isinstance(value, accepts) or (isinstance(value, bool) and bool not in accepts)
        ):
            return GenericEvent(kind=kind, data=dict(record), ts=ts)
        kwargs[name] = value
    rest = [f.name for f in attrs.fields(cls) if f.metadata.get("rest")]
    if rest:  # the fields the class does not name (an error's context)
        kwargs[rest[0]] = {
            k: v for k, v in record.items() if k not in _ENVELOPE and k not in kwargs
        }
    try:
        return cls(ts=ts, **kwargs)
    except TypeError:  # a field without a default is missing
        return GenericEvent(kind=kind, data=dict(record), ts=ts)
