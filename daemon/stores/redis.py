"""Redis access: the one place that speaks redis-py's asyncio client, through trio-asyncio.

Pattern (see docs/bridge.md): each unit of work is a plain asyncio coroutine, called from Trio with
exactly one ``aio_as_trio`` crossing, under a Trio deadline. Clients have ``socket_timeout=None``
(redis-py's own timeout path can swallow a cancel on Python 3.11), blocking reads use a connection
of their own with a short server-side timeout, and nothing blocking is cancelled except at shutdown
— and then only reads whose items survive it (BLMOVE into a claimed list, XREADGROUP).

Every multi-key change is a Lua script (``lua/``), so a crash never leaves half of one behind.
"""

from __future__ import annotations

import binascii
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources
from typing import Any

import attrs
import redis.asyncio as aioredis
import trio
import trio_asyncio
from redis.exceptions import NoScriptError, ResponseError

from daemon.contracts import ContractError, Keys, audio_content_type

__all__ = [
    "ENT_FIELDS",
    "BillingEntry",
    "ClaimedResult",
    "DeadLetter",
    "FinalizeArgs",
    "PersistEntry",
    "RedisStore",
    "enqueue_call",
    "enqueue_reply",
    "is_redis_unavailable",
    "mirror_call",
    "open_redis",
]

CLOSE_TIMEOUT_S = 5.0

_SCRIPT_NAMES = (
    "enqueue",
    "pull",
    "push_result",
    "claim",
    "finalize",
    "recover",
    "stale",
    "requeue",
    "renew",
    "evict",
    "promote",
    "mirror",
    "holds",
    "reap",
    "trim_dead",
    "replay_billing",
)


def _load_scripts() -> dict[str, str]:
    lua = resources.files("daemon.stores") / "lua"
    common = (lua / "common.lua").read_text()
    return {name: common + "\n" + (lua / f"{name}.lua").read_text() for name in _SCRIPT_NAMES}


SCRIPTS = _load_scripts()


def is_redis_unavailable(exc: BaseException) -> bool:
    """True for the errors that mean "Redis is down or restarting": worth a retry with backoff.

    A group made only of such errors counts too: a call made inside a nursery (the gateway's
    notification listener) reports its failure wrapped in one."""
    from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

    if isinstance(exc, BaseExceptionGroup):
        return all(is_redis_unavailable(e) for e in exc.exceptions)
    if isinstance(exc, ConnectionError | TimeoutError | BusyLoadingError | OSError):
        return True
    # A restarted server may answer with LOADING or MASTERDOWN as a ResponseError subclass.
    return isinstance(exc, ResponseError) and str(exc).startswith(("LOADING", "MASTERDOWN"))


def _make_client(url: str, *, max_connections: int, pool_timeout_s: float) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout_s,
        socket_timeout=None,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        retry_on_timeout=False,
    )
    return aioredis.Redis(connection_pool=pool)


# claim.lua checks the base64 of long audio at both ends (this many characters each) and all of
# short audio; strict decoding when a listener fetches it catches the rest (docs/workers.md).
CLAIM_B64_SAMPLE = 256
CLAIM_B64_FULL = 4096

# Defaults of the dead-letter bounds (docs/configuration.md, dead_letters.*).
DEAD_LETTER_CAP = 10000
DEAD_LETTER_RAW_BYTES = 64 * 1024


@attrs.frozen
class ClaimedResult:
    """A result the hot consumer claimed; its bytes stay in Redis (``claim.lua``)."""

    token: str  # its name: tts:hot:item:{token}
    meta: bytes  # the result JSON with audio_base64 = "" (empty when it is not JSON)
    audio_len: int  # characters of audio_base64; -1 when it has none (or not a string)
    loc: str  # where the audio is in the item: "r:s:e" (1-based, in the raw result) or "i:2"
    problem: str  # "" or why the result cannot be read
    job: bytes = b""  # the JSON of the job the result names, as the daemon wrote it ("" none)


@attrs.frozen
class FinalizeArgs:
    """Everything ``finalize.lua`` needs for one claimed result of a job the daemon has.

    ``kind``: audio | skipped | error | reject (refused at the boundary: dead-lettered with
    ``note``, and the job fails with ``error``)."""

    token: str
    job_id: str
    job_json: bytes  # as claim.lua read it: finalize.lua checks the job is still this one
    variant_hash: str  # the job's
    kind: str
    model: str  # the job's
    voice: str
    meta: bytes = b""  # ClaimedResult.meta and .loc: finalize.lua checks the item is this result
    loc: str = ""
    content_type: str = ""
    duration_ms: int = 0
    billing_event: str = ""
    error: str = ""  # what the listeners hear (error, reject)
    note: str = ""  # the dead-letter note (reject): JSON with reason, worker_id, job_id


@attrs.frozen
class DeadLetter:
    """A claimed result to move to ``tts:results:dead`` with its note (JSON: reason, worker_id,
    job_id), or with ``discard`` to drop as a duplicate (a valid result for no job we have)."""

    token: str
    note: str
    discard: bool = False


@attrs.frozen
class BillingEntry:
    """One stream entry of the billing queue: its id, and the raw event (None if unreadable)."""

    entry_id: bytes
    raw: bytes | None


@attrs.frozen
class PersistEntry:
    """One entry of the persist stream: its id and the variant hash (None if unreadable)."""

    entry_id: bytes
    variant_hash: str | None


def enqueue_call(
    *,
    user_id: int,
    conn_id: str,
    document_id: str,
    model: str,
    now: float,
    rate_limit: int,
    usage_type: str,
    blocks: Sequence[tuple[int, str, str, int, str]],
    weight: float = 1.0,
) -> tuple[list[Any], list[Any]]:
    """KEYS and ARGV of ``enqueue.lua``. ``blocks``: (idx, variant_hash, job_id, cost,
    job_json); ``cost`` is what the block's hold takes of ``usage_type``; ``weight``: the user's
    share in fair scheduling (its plan's weight)."""
    args: list[Any] = [
        user_id,
        conn_id,
        document_id,
        repr(now),
        rate_limit,
        usage_type,
        len(blocks),
    ]
    keys: list[Any] = [
        Keys.rate(user_id),
        Keys.JOBS,
        Keys.queue(model),
        Keys.processing(model),
        Keys.fair(model),
        Keys.fair_users(model),
        Keys.fair_state(model),
        Keys.ent(user_id),
        Keys.holds(user_id),
    ]
    for block in blocks:
        args.extend(block)
        variant_hash = block[1]
        keys += [Keys.audio(variant_hash), Keys.inflight(variant_hash), Keys.waiters(variant_hash)]
    args.append(repr(float(weight)))
    return keys, args


def enqueue_reply(reply: Any) -> tuple[str, list[str] | int]:
    """``enqueue.lua``'s reply: ("ok", [status per block]) — each one of cached, queued,
    processing, limit —, ("rate_limited", milliseconds until the user's bucket holds enough;
    -1 never), or ("no_mirror", 0): the user's entitlements are not in Redis (nothing done)."""
    head = reply[0].decode()
    if head == "rate_limited":
        return head, int(reply[1])
    if head == "no_mirror":
        return head, 0
    return head, [s.decode() for s in reply[1:]]


# The fields of a mirror row (``tts_entitlements``), in ``mirror.lua``'s ARGV order after the
# version.
ENT_FIELDS = (
    "kokoro_allow",
    "kokoro_used",
    "premium_allow",
    "premium_used",
    "rollover",
    "purchased",
    "period_end",
)


def mirror_call(
    user_id: int, ent: dict[str, Any] | None, settle: Sequence[str] = ()
) -> tuple[str, list[Any], list[Any]]:
    """One ``mirror.lua`` call: write ``ent`` (a ``tts_entitlements`` row; None: settle only)
    and settle the holds of ``settle`` (event ids = job ids)."""
    if ent is None:
        args: list[Any] = ["", *([0] * len(ENT_FIELDS))]
    else:
        args = [int(ent["version"]), *(int(ent[f]) for f in ENT_FIELDS)]
    args.extend(settle)
    return "mirror", [Keys.ent(user_id), Keys.holds(user_id)], args


class RedisStore:
    """Trio-facing Redis operations. Each method is one crossing and one unit of work.

    ``open_redis`` builds one; ``dedicated()`` gives a store on a connection of its own for a
    consumer's blocking reads.
    """

    def __init__(self, client: aioredis.Redis, *, url: str, command_timeout_s: float) -> None:
        self._client = client
        self.url = url
        self.command_timeout_s = command_timeout_s
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}

    # -- plumbing ---------------------------------------------------------------------------

    async def _cross(
        self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None
    ) -> Any:
        with trio.fail_after(timeout_s or self.command_timeout_s):
            return await trio_asyncio.aio_as_trio(fn)(*args)

    async def _script(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return await self._cross(self._scripts[name], list(keys), list(args))

    async def _evalsha_pipeline(
        self, calls: Sequence[tuple[str, Sequence[Any], Sequence[Any]]]
    ) -> list[Any]:
        """(asyncio side) Run several scripts in one pipeline: one round trip, each script atomic.

        Replies come back in order; a script that failed is its exception, not raised (the others
        ran). redis-py's own pipelined scripts send ``SCRIPT EXISTS`` before every batch — a
        second round trip — so this sends ``EVALSHA`` directly and loads a script only when Redis
        answers ``NOSCRIPT`` (after a restart), then re-runs just those calls: a ``NOSCRIPT``
        call did not run.
        """
        replies: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(2):
            async with self._client.pipeline(transaction=False) as pipe:
                for i in pending:
                    name, keys, args = calls[i]
                    pipe.execute_command(
                        "EVALSHA", self._scripts[name].sha, len(keys), *keys, *args
                    )
                out = await pipe.execute(raise_on_error=False)
            retry = []
            for i, reply in zip(pending, out, strict=True):
                if isinstance(reply, NoScriptError) and not attempt:
                    retry.append(i)
                else:
                    replies[i] = reply
            if not retry:
                break
            for name in {calls[i][0] for i in retry}:
                await self._client.script_load(self._scripts[name].script)
            pending = retry
        return replies

    @contextlib.asynccontextmanager
    async def dedicated(self) -> AsyncIterator[RedisStore]:
        """A store with its own single connection, for blocking reads that must not share one."""
        client = aioredis.Redis.from_url(
            self.url,
            single_connection_client=True,
            socket_timeout=None,
            socket_connect_timeout=5.0,
            socket_keepalive=True,
        )
        try:
            yield RedisStore(client, url=self.url, command_timeout_s=self.command_timeout_s)
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await trio_asyncio.aio_as_trio(client.aclose)()

    async def ping_ms(self) -> float:
        """One PING through this store's client; the round trip in milliseconds."""

        async def ping() -> float:
            import time

            t0 = time.perf_counter()
            await self._client.ping()
            return (time.perf_counter() - t0) * 1000.0

        return await self._cross(ping)

    async def execute(self, *args: Any) -> Any:
        """A raw command (tools, tests, reports)."""
        return await self._cross(self._client.execute_command, *args)

    # -- gateway ----------------------------------------------------------------------------

    async def enqueue(self, **kwargs: Any) -> tuple[str, list[str] | int]:
        """``enqueue.lua`` (arguments of :func:`enqueue_call`; reply of :func:`enqueue_reply`):
        the request path's one Redis round trip, and no Postgres."""
        keys, args = enqueue_call(**kwargs)
        return enqueue_reply(await self._script("enqueue", keys, args))

    async def aio_enqueue(self, keys: list[Any], args: list[Any]) -> Any:
        """(asyncio side) ``enqueue.lua`` with the ``keys`` and ``args`` of :func:`enqueue_call`,
        for a unit of work that does more than this in one crossing (the benchmark's baseline)."""
        return await self._scripts["enqueue"](keys, args)

    async def evict(
        self,
        *,
        user_id: int,
        conn_id: str,
        blocks: Sequence[tuple[str, int, str, str]],
        only_queued: bool = True,
        cursor: int | None = None,
    ) -> list[int]:
        """Run ``evict.lua`` for one connection's waits. ``blocks``: (document_id, idx,
        variant_hash, model). With ``only_queued`` (cursor_moved) only blocks whose job is still
        queued are evicted; without (the connection closed) every wait goes. The holds of the
        jobs dropped are released (a second call; if it is lost, the holds expire).

        ``cursor`` (cursor_moved): the document's new reading position, so that its jobs other
        connections still wait for are pulled from there on (docs/workers.md, "Scheduling").

        Returns the positions (0-based, in ``blocks``) of the blocks evicted.
        """
        args: list[Any] = [user_id, conn_id, "queued" if only_queued else "all", len(blocks)]
        keys: list[Any] = [Keys.JOBS, Keys.RETRIES]
        for doc, idx, variant_hash, model in blocks:
            args += [doc, idx]
            keys += [
                Keys.inflight(variant_hash),
                Keys.waiters(variant_hash),
                Keys.queue(model),
                Keys.fair(model),
                Keys.fair_state(model),
            ]
        args.append(-1 if cursor is None else cursor)
        evicted, dropped = await self._script("evict", keys, args)
        if dropped:
            by_user: dict[int, list[str]] = {}
            for i in range(0, len(dropped), 2):
                by_user.setdefault(int(dropped[i + 1]), []).append(dropped[i].decode())
            await self.release_holds(by_user)
        return [int(i) - 1 for i in evicted]

    # -- holds and the entitlements mirror ----------------------------------------------------

    async def release_holds(self, by_user: dict[int, list[str]], *, mode: str = "release") -> int:
        """``holds.lua`` per user, in one pipeline: release the holds of these jobs (they ended
        without a bill), or with ``mode="billing"`` mark them as waiting for billing. Returns
        the number of holds changed."""
        calls = [
            ("holds", [Keys.holds(user_id)], [mode, *job_ids])
            for user_id, job_ids in by_user.items()
            if job_ids
        ]
        if not calls:
            return 0
        replies = await self._cross(self._evalsha_pipeline, calls)
        total = 0
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            total += int(reply)
        return total

    async def write_mirror(
        self, calls: Sequence[tuple[str, list[Any], list[Any]]]
    ) -> list[tuple[int, int]]:
        """Several :func:`mirror_call` calls in one pipeline (each atomic): per call (written,
        holds settled)."""
        if not calls:
            return []
        replies = await self._cross(self._evalsha_pipeline, list(calls))
        out = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            out.append((int(reply[0]), int(reply[1])))
        return out

    async def aio_write_mirror(self, calls: Sequence[tuple[str, list[Any], list[Any]]]) -> None:
        """(asyncio side) :meth:`write_mirror` inside a unit of work of the caller's."""
        for reply in await self._evalsha_pipeline(list(calls)):
            if isinstance(reply, Exception):
                raise reply

    async def reap_holds(
        self, user_id: int, *, ttl_s: float, billing_ttl_s: float
    ) -> tuple[int, int, int, float]:
        """``reap.lua`` for one user: (holds reaped, characters reaped, holds left, age of the
        oldest hold left in seconds)."""
        reaped, chars, left, oldest = await self._script(
            "reap", [Keys.holds(user_id), Keys.JOBS], [ttl_s, billing_ttl_s]
        )
        return int(reaped), int(chars), int(left), float(oldest)

    async def holders(self) -> list[int]:
        """The users with open holds (a SCAN of the holds keys: for the reaper and reports)."""
        return await self.users_with(Keys.HOLDS_PREFIX)

    async def users_with(self, prefix: str) -> list[int]:
        """The user ids of the keys ``prefix{user}`` (SCAN: never blocks Redis for long)."""

        async def scan() -> list[int]:
            out = []
            async for key in self._client.scan_iter(match=prefix + "*", count=1000):
                tail = key[len(prefix) :]
                if tail.isdigit():
                    out.append(int(tail))
            return sorted(out)

        return await self._cross(scan)

    async def holds_of(self, user_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Each user's open holds: {"count", "sum": {usage_type: chars}, "jobs": {job_id:
        (usage_type, amount, since, state)}}."""

        async def read() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for user_id in user_ids:
                    pipe.hgetall(Keys.holds(user_id))
                return await pipe.execute()

        out: dict[int, dict[str, Any]] = {}
        for user_id, flat in zip(user_ids, await self._cross(read), strict=True):
            jobs: dict[str, tuple[str, int, float, str]] = {}
            sums: dict[str, int] = {}
            for field, value in flat.items():
                name = field.decode()
                if name.startswith("sum:"):
                    sums[name[4:]] = int(value)
                elif name != "n":
                    usage_type, amount, since, state = value.decode().split("|")
                    jobs[name] = (usage_type, int(amount), float(since), state)
            out[user_id] = {"count": len(jobs), "sum": sums, "jobs": jobs}
        return out

    async def lookup_token(self, token_hash: bytes) -> tuple[int | None, str, bool]:
        """(user id or None, their plan, whether the token mirror is complete) in one round
        trip. A miss while the mirror is being rebuilt is not an answer (the caller says "try
        again"). The mirror keeps "user_id|plan" per token."""
        value, ready = await self._cross(
            self._client.mget, Keys.token(token_hash), Keys.MIRROR_READY
        )
        if not value:
            return None, "", bool(ready)
        user, _, plan = value.decode().partition("|")
        return int(user), plan, bool(ready)

    async def publish_control(self, message: dict[str, Any]) -> int:
        """A control message to every gateway on this Redis (e.g. a revoked user)."""
        return int(await self._cross(self._client.publish, Keys.CONTROL, json.dumps(message)))

    async def variant_states(self, hashes: Sequence[str]) -> list[tuple[bool, bool]]:
        """(audio cached, job in flight) for each variant: what a lost notification would have
        said (the gateway's resync after its pub/sub connection was lost)."""

        async def states() -> list[tuple[bool, bool]]:
            async with self._client.pipeline(transaction=False) as pipe:
                for h in hashes:
                    pipe.exists(Keys.audio(h))
                    pipe.exists(Keys.inflight(h))
                replies = await pipe.execute()
            return [(bool(a), bool(f)) for a, f in zip(replies[::2], replies[1::2], strict=True)]

        return await self._cross(states)

    async def get_audio(self, variant_hash: str) -> tuple[bytes, str] | None:
        """The audio bytes and content type, or None.

        The hot path stores audio without copying it (``finalize.lua``): a list whose first
        element is the worker's result JSON and whose last says where the base64 audio is in it.
        It is sliced out and decoded here, strictly, when a listener fetches it; raises
        :class:`ContractError` if it does not decode.
        """
        items = await self._cross(self._client.lrange, Keys.audio(variant_hash), 0, -1)
        return _audio_from_item(variant_hash, items) if items else None

    async def pull_job(self, model: str) -> bytes | None:
        """The atomic pull of docs/workers.md (``pull.lua``)."""
        return await self._script("pull", Keys.pull_keys(model), Keys.pull_args())

    async def push_result(self, model: str, job_id: str, result_json: str) -> None:
        await self._script("push_result", _push_keys(model), [result_json, job_id])

    async def push_results(self, results: Sequence[tuple[str, str, str | bytes]]) -> None:
        """Several ``push_result.lua`` calls, each atomic, in one pipeline (one round trip):
        ``results`` are (model, job_id, result JSON). A batch worker hands back a batch so."""
        if not results:
            return
        calls = [
            ("push_result", _push_keys(model), [result_json, job_id])
            for model, job_id, result_json in results
        ]
        replies = await self._cross(self._evalsha_pipeline, calls)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply

    async def renew(
        self,
        worker_id: str,
        entry: dict[str, Any],
        *,
        lease_s: float,
        models: Sequence[str],
        jobs: Sequence[tuple[str, str]],
    ) -> list[str]:
        """``renew.lua``: extend the leases of ``jobs`` (model, job id) and announce the worker in
        the registry. Returns the ids of jobs this worker no longer holds."""
        index = {m: i + 1 for i, m in enumerate(models)}
        keys: list[Any] = [Keys.WORKERS]
        for m in models:
            keys += [Keys.processing(m), Keys.leases(m)]
        args: list[Any] = [worker_id, json.dumps(entry), lease_s]
        for model, job_id in jobs:
            if model in index:
                args += [index[model], job_id]
        lost = await self._script("renew", keys, args)
        return [x.decode() for x in lost]

    async def workers(self) -> dict[str, dict[str, Any]]:
        """The worker registry: worker id → its entry (id, version, models, last_renewal…)."""
        raw = await self._cross(self._client.hgetall, Keys.WORKERS)
        out = {}
        for k, v in raw.items():
            try:
                entry = json.loads(v)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out[k.decode(errors="replace")] = entry
        return out

    async def forget_workers(self, worker_ids: Sequence[str]) -> None:
        if worker_ids:
            await self._cross(self._client.hdel, Keys.WORKERS, *worker_ids)

    async def queue_stats(self, models: Sequence[str]) -> dict[str, dict[str, float]]:
        """Per model: jobs waiting (``depth``), the oldest one's age in seconds
        (``oldest_age_s``, 0 when none waits) and the users they belong to (``users``), in one
        round trip. An older daemon's jobs outside the fair schedule count in depth, not users."""

        async def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.time()
            for model in models:
                pipe.zcard(Keys.queue(model))
                pipe.zrange(Keys.queue(model), 0, 0, withscores=True)
                pipe.zcard(Keys.fair_users(model))
            return await pipe.execute()

        replies = await self._cross(read)
        secs, micros = replies[0]
        now = int(secs) + int(micros) / 1e6
        out = {}
        for i, model in enumerate(models):
            depth, oldest, users = replies[1 + 3 * i : 4 + 3 * i]
            age = max(0.0, now - oldest[0][1]) if oldest else 0.0
            out[model] = {"depth": int(depth), "oldest_age_s": age, "users": int(users)}
        return out

    async def requeue_stale(
        self,
        model: str,
        *,
        visibility_timeout_s: float,
        max_retries: int,
        limit: int = 500,
        dlq_cap: int = DEAD_LETTER_CAP,
    ) -> tuple[int, int]:
        """One scan of ``model``'s held jobs (``stale.lua`` then ``requeue.lua``): jobs whose
        lease lapsed — or, without a lease, held longer than ``visibility_timeout_s`` — go back
        to the queue, or on their ``max_retries``-th time to the DLQ."""
        found = await self._script(
            "stale",
            [Keys.processing(model), Keys.leases(model), Keys.JOBS],
            [visibility_timeout_s, limit],
        )
        if not found:
            return 0, 0
        keys: list[Any] = [
            Keys.processing(model),
            Keys.queue(model),
            Keys.JOBS,
            Keys.RETRIES,
            Keys.dlq(model),
            Keys.RESULTS,
            Keys.leases(model),
            Keys.fair(model),
            Keys.fair_users(model),
            Keys.fair_state(model),
        ]
        args: list[Any] = [visibility_timeout_s, max_retries, dlq_cap, Keys.NOTIFY_PREFIX]
        for job_id, job_json in zip(found[::2], found[1::2], strict=True):
            try:
                variant_hash = str(json.loads(job_json).get("variant_hash", ""))
            except (ValueError, AttributeError):
                variant_hash = ""
            keys.append(Keys.waiters(variant_hash))
            args.append(job_id)
        requeued, dead = await self._script("requeue", keys, args)
        return int(requeued), int(dead)

    # -- hot consumer -----------------------------------------------------------------------

    async def claim_results(
        self, consumer_id: str, *, tokens: Sequence[str], block_s: float
    ) -> list[ClaimedResult]:
        """Drain-on-wake, one round trip: ``BLMOVE`` (blocks server side up to ``block_s`` only
        when nothing is waiting) pipelined with ``claim.lua``, which takes that result and up to
        ``len(tokens) - 1`` more into the consumer's claimed set, each in an item named by one of
        ``tokens`` (in order; a name in use is skipped), and parses them in Redis.

        Use on a ``dedicated()`` store: the BLMOVE holds its connection while it waits. A cancel
        loses nothing: what BLMOVE moved waits in the landing list, which recovery gives back.
        """
        keys = [
            Keys.RESULTS,
            Keys.hot_landing(consumer_id),
            Keys.hot_claimed(consumer_id),
            Keys.JOBS,
            *(Keys.hot_item(t) for t in tokens),
        ]
        args = [len(tokens), CLAIM_B64_SAMPLE, CLAIM_B64_FULL, *tokens]
        script = self._scripts["claim"]
        client = self._client

        async def take() -> Any:
            async with client.pipeline(transaction=False) as pipe:
                pipe.execute_command("BLMOVE", Keys.RESULTS, keys[1], "RIGHT", "LEFT", block_s)
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                moved, reply = await pipe.execute(raise_on_error=False)
            if isinstance(moved, Exception):
                raise moved
            if isinstance(reply, NoScriptError):  # Redis restarted: load it, claim at once
                reply = await script(keys, args)
            elif isinstance(reply, Exception):
                raise reply
            return reply

        reply = await self._cross(take, timeout_s=block_s + self.command_timeout_s)
        out = []
        for entry in reply:
            head, _, rest = entry.partition(b"\n")
            token, audio_len, loc, problem_len, job_len = head.split(b"|")
            p, j = int(problem_len), int(job_len)
            problem = rest[:p].decode(errors="replace")
            out.append(
                ClaimedResult(
                    token.decode(),
                    rest[p + j :],
                    int(audio_len),
                    loc.decode(),
                    problem,
                    rest[p : p + j],
                )
            )
        return out

    async def finalize_many(
        self,
        consumer_id: str,
        ops: Sequence[FinalizeArgs | DeadLetter],
        *,
        ttl_s: int,
        persist: bool = False,
        dead_letter_cap: int = DEAD_LETTER_CAP,
        dead_letter_raw_bytes: int = DEAD_LETTER_RAW_BYTES,
    ) -> list[tuple[str, int]]:
        """Finalize or dead-letter several claimed results with one ``finalize.lua`` call (one
        round trip). Per op: (outcome, waiters notified) — outcome ``finalized``, ``duplicate``,
        ``dead``, ``gone`` (no longer claimed: a replay after a lost reply, or recovered), or
        ``error: …`` when Redis refused a write for that op (it stays claimed; retry it).

        With ``persist``, stored audio keeps no TTL and its hash goes to ``tts:persist`` for the
        persister (which applies ``ttl_s`` once the durable store has it).
        """
        keys: list[Any] = [
            Keys.hot_claimed(consumer_id),
            Keys.BILLING,
            Keys.JOBS,
            Keys.RETRIES,
            Keys.RESULTS_DEAD,
            Keys.PERSIST,  # written only with ``persist`` (ARGV 5)
        ]
        now = round(time.time(), 3)
        args: list[Any] = [
            ttl_s,
            consumer_id,
            dead_letter_cap,
            dead_letter_raw_bytes,
            "1" if persist else "0",
            Keys.NOTIFY_PREFIX,
        ]
        for op in ops:
            base = len(keys) + 1
            keys.append(Keys.hot_item(op.token))
            if isinstance(op, DeadLetter):
                kind = "discard" if op.discard else "dead"
                args += [kind, op.token, base, "", "", "", "", "", "", "", op.note, "", ""]
                continue
            keys += [
                Keys.inflight(op.variant_hash),
                Keys.waiters(op.variant_hash),
                Keys.audio(op.variant_hash),
                Keys.processing(op.model),
                Keys.queue(op.model),
            ]
            audio_meta = ""
            if op.kind == "audio":
                audio_meta = json.dumps(
                    {
                        "loc": op.loc,
                        "content_type": op.content_type,
                        "duration_ms": op.duration_ms,
                        # for the durable store's metadata and `tts-daemon audio purge`
                        "model": op.model,
                        "at": now,
                    }
                )
            args += [
                op.kind,
                op.token,
                base,
                op.job_id,
                op.job_json,
                op.model,
                op.voice,
                audio_meta,
                op.billing_event,
                op.error,
                op.note,
                op.meta,
                op.loc,
            ]
        reply = await self._script("finalize", keys, args)
        return [(reply[i].decode(), int(reply[i + 1])) for i in range(0, len(reply), 2)]

    async def heartbeat(self, consumer_id: str, *, ttl_s: float) -> None:
        """Mark the consumer alive (and registered: re-created if Redis lost it)."""

        async def beat() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.sadd(Keys.HOT_CONSUMERS, consumer_id)
                pipe.set(Keys.hot_alive(consumer_id), b"1", px=max(1, int(ttl_s * 1000)))
                await pipe.execute()

        await self._cross(beat)

    async def recover_results(self, consumer_id: str, *, include_own: bool) -> int:
        """Give dead consumers' (and with ``include_own`` our own) claimed results back.

        The consumers and which are alive are read here (two round trips, the steady state);
        for each one to recover, its claimed set too, then ``recover.lua`` with the items' keys
        (every key through KEYS), which checks again atomically what is still to give back.
        """
        budget = 1000
        own = "1" if include_own else "0"

        async def candidates() -> list[str]:
            ids = sorted(i.decode() for i in await self._client.smembers(Keys.HOT_CONSUMERS))
            async with self._client.pipeline(transaction=False) as pipe:
                for cid in ids:
                    pipe.exists(Keys.hot_alive(cid))
                alive = await pipe.execute()
            return [
                cid
                for cid, up in zip(ids, alive, strict=True)
                if (cid == consumer_id and include_own) or (cid != consumer_id and not up)
            ]

        total = 0
        for cid in await self._cross(candidates):
            head = [
                Keys.HOT_CONSUMERS,
                Keys.RESULTS,
                Keys.hot_alive(cid),
                Keys.hot_landing(cid),
                Keys.hot_claimed(cid),
            ]
            while True:
                tokens = await self._claimed_tokens(cid)
                batch = tokens[:budget]
                keys = head + [Keys.hot_item(t) for t in batch]
                moved = int(
                    await self._script("recover", keys, [cid, consumer_id, own, budget, *batch])
                )
                if moved < 0:  # alive again: not ours to recover
                    break
                total += moved
                # Each call drops every token it was given from the set (or finds it gone), so
                # this ends; a full budget may leave more of the landing list.
                if moved < budget and len(tokens) <= len(batch):
                    break
        return total

    async def _claimed_tokens(self, consumer_id: str) -> list[str]:
        """A consumer's claimed tokens, oldest first ([] when the key is an older daemon's list)."""
        key = Keys.hot_claimed(consumer_id)

        async def read() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.type(key)
                pipe.smembers(key)
                return await pipe.execute(raise_on_error=False)

        kind, members = await self._cross(read)
        if kind not in (b"set", "set") or isinstance(members, Exception):
            return []
        tokens = [t.decode() for t in members]
        return sorted(tokens, key=lambda t: (0, int(t), "") if t.isdigit() else (1, 0, t))

    async def unregister_consumer(self, consumer_id: str) -> None:
        async def drop() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.srem(Keys.HOT_CONSUMERS, consumer_id)
                pipe.delete(Keys.hot_alive(consumer_id))
                await pipe.execute()

        await self._cross(drop)

    # -- billing queue ----------------------------------------------------------------------

    async def read_billing(
        self, consumer: str, *, count: int, block_ms: int, pending: bool = False
    ) -> list[BillingEntry]:
        """XREADGROUP: new entries (blocking up to ``block_ms``), or with ``pending`` this
        consumer's own delivered-but-unacknowledged ones. Re-creates the group (and stream) on
        NOGROUP, so a Redis that lost its data heals on the read path, not only at start-up.
        """
        client = self._client

        async def read() -> list[BillingEntry]:
            for attempt in range(2):
                try:
                    reply = await client.xreadgroup(
                        Keys.BILLING_GROUP,
                        consumer,
                        {Keys.BILLING: "0" if pending else ">"},
                        count=count,
                        block=None if pending else block_ms,
                    )
                    break
                except ResponseError as exc:
                    # Redis 7 wakes a blocked XREADGROUP with UNBLOCKED when the stream is
                    # deleted (FLUSHALL, DEL); 6.2 lets it time out and the next read says NOGROUP.
                    if str(exc).startswith("UNBLOCKED"):
                        await _ensure_billing_group(client)
                        return []
                    if "NOGROUP" not in str(exc) or attempt:
                        raise
                    await _ensure_billing_group(client)
            entries: list[BillingEntry] = []
            for _stream, items in reply or []:
                for entry_id, fields in items:
                    raw = fields.get(b"event") if fields else None
                    entries.append(BillingEntry(entry_id, raw))
            return entries

        return await self._cross(read, timeout_s=block_ms / 1000 + self.command_timeout_s)

    async def claim_stale_billing(
        self, consumer: str, *, min_idle_ms: int, count: int
    ) -> list[BillingEntry]:
        """XAUTOCLAIM entries pending longer than ``min_idle_ms`` on other (dead) consumers."""
        client = self._client

        async def claim() -> list[BillingEntry]:
            try:
                reply = await client.xautoclaim(
                    Keys.BILLING, Keys.BILLING_GROUP, consumer, min_idle_ms, "0-0", count=count
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await _ensure_billing_group(client)
                return []
            items = reply[1] if len(reply) > 1 else []
            out = []
            for item in items:
                if item is None:
                    continue
                entry_id, fields = item
                out.append(BillingEntry(entry_id, fields.get(b"event") if fields else None))
            return out

        return await self._cross(claim)

    async def ack_billing(self, entry_ids: Sequence[bytes]) -> None:
        """Acknowledge and delete billed entries, so the stream length is the backlog."""
        if not entry_ids:
            return

        async def ack() -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.xack(Keys.BILLING, Keys.BILLING_GROUP, *entry_ids)
                pipe.xdel(Keys.BILLING, *entry_ids)
                await pipe.execute()

        client = self._client
        await self._cross(ack)

    async def dead_letter_billing(
        self, entry_id: bytes, reason_json: str, *, cap: int = DEAD_LETTER_CAP
    ) -> None:
        async def move() -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.lpush(Keys.BILLING_DEAD, reason_json)
                pipe.ltrim(Keys.BILLING_DEAD, 0, cap - 1)
                pipe.xack(Keys.BILLING, Keys.BILLING_GROUP, entry_id)
                pipe.xdel(Keys.BILLING, entry_id)
                await pipe.execute()

        client = self._client
        await self._cross(move)

    # -- dead letters -----------------------------------------------------------------------

    async def trim_dead_letters(self, key: str, *, max_entries: int, max_age_s: float) -> int:
        """Bound one dead-letter list (``trim_dead.lua``); returns its length."""

        async def trim() -> int:
            t = await self._client.time()
            cutoff = t[0] + t[1] / 1e6 - max_age_s
            return int(await self._scripts["trim_dead"]([key], [cutoff, max_entries, 1000]))

        return await self._cross(trim)

    async def dead_letters(self, key: str, *, start: int = 0, stop: int = -1) -> list[bytes]:
        """Entries of a dead-letter list, newest first."""
        return list(await self._cross(self._client.lrange, key, start, stop))

    async def drop_dead_letters(self, key: str, entries: Sequence[bytes] | None = None) -> int:
        """Drop ``entries`` (each once) from a dead-letter list, or the whole list."""
        if entries is None:
            n = int(await self._cross(self._client.llen, key))
            await self._cross(self._client.delete, key)
            return n
        dropped = 0
        for entry in entries:
            dropped += int(await self._cross(self._client.lrem, key, 1, entry))
        return dropped

    async def replay_billing_dead_letter(self, entry: bytes, event_json: str) -> bool:
        """Put a billing dead letter's event back on the billing stream (once)."""
        reply = await self._script(
            "replay_billing", [Keys.BILLING_DEAD, Keys.BILLING], [entry, event_json]
        )
        return bool(reply)

    async def billing_depth(self) -> int:
        """Billing events produced and not yet billed (the primary health signal)."""
        return int(await self._cross(self._client.xlen, Keys.BILLING))

    # -- durable audio (persister, read path, purge) ----------------------------------------

    async def audio_items(self, hashes: Sequence[str]) -> list[list[bytes]]:
        """The stored audio lists of ``hashes`` as they are in Redis (empty: no such key), in
        one pipeline; :func:`audio_from_item` decodes one."""
        client = self._client

        async def read() -> list[list[bytes]]:
            async with client.pipeline(transaction=False) as pipe:
                for h in hashes:
                    pipe.lrange(Keys.audio(h), 0, -1)
                return list(await pipe.execute())

        return await self._cross(read)

    async def audio_cached(self, hashes: Sequence[str]) -> list[bool]:
        """Whether each variant's audio is in the Redis cache (one pipeline of EXISTS)."""
        client = self._client

        async def exists() -> list[bool]:
            async with client.pipeline(transaction=False) as pipe:
                for h in hashes:
                    pipe.exists(Keys.audio(h))
                return [bool(x) for x in await pipe.execute()]

        return await self._cross(exists)

    async def promote_audio(
        self,
        variant_hash: str,
        data: bytes,
        *,
        content_type: str,
        duration_ms: int,
        model: str,
        created: float,
        ttl_s: int,
    ) -> bool:
        """Put audio read from the durable store back into the cache (``promote.lua``) with
        ``ttl_s``, unless the cache has it; True if promoted."""
        note = json.dumps(
            {
                "loc": "b:1",
                "content_type": content_type,
                "duration_ms": duration_ms,
                "model": model,
                "at": created,
                "promoted": True,
            }
        )
        reply = await self._script("promote", [Keys.audio(variant_hash)], [ttl_s, data, note])
        return bool(int(reply))

    async def read_persist(
        self, consumer: str, *, count: int, block_ms: int, pending: bool = False
    ) -> list[PersistEntry]:
        """XREADGROUP on ``tts:persist``: new entries (blocking up to ``block_ms``), or with
        ``pending`` this consumer's own unacknowledged ones. Re-creates the group on NOGROUP
        (at ID 0: entries that survived are persisted, not skipped)."""
        client = self._client

        async def read() -> list[PersistEntry]:
            for attempt in range(2):
                try:
                    reply = await client.xreadgroup(
                        Keys.PERSIST_GROUP,
                        consumer,
                        {Keys.PERSIST: "0" if pending else ">"},
                        count=count,
                        block=None if pending else block_ms,
                    )
                    break
                except ResponseError as exc:
                    if str(exc).startswith("UNBLOCKED"):
                        await _ensure_group(client, Keys.PERSIST, Keys.PERSIST_GROUP)
                        return []
                    if "NOGROUP" not in str(exc) or attempt:
                        raise
                    await _ensure_group(client, Keys.PERSIST, Keys.PERSIST_GROUP)
            return [
                PersistEntry(entry_id, _persist_hash(fields))
                for _stream, items in reply or []
                for entry_id, fields in items
            ]

        return await self._cross(read, timeout_s=block_ms / 1000 + self.command_timeout_s)

    async def claim_stale_persist(
        self, consumer: str, *, min_idle_ms: int, count: int
    ) -> list[PersistEntry]:
        """XAUTOCLAIM persist entries pending longer than ``min_idle_ms`` on other consumers
        (a daemon that died mid-batch)."""
        client = self._client

        async def claim() -> list[PersistEntry]:
            try:
                reply = await client.xautoclaim(
                    Keys.PERSIST, Keys.PERSIST_GROUP, consumer, min_idle_ms, "0-0", count=count
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await _ensure_group(client, Keys.PERSIST, Keys.PERSIST_GROUP)
                return []
            items = reply[1] if len(reply) > 1 else []
            return [PersistEntry(i[0], _persist_hash(i[1])) for i in items if i is not None]

        return await self._cross(claim)

    async def ack_persisted(self, done: Sequence[tuple[bytes, str | None]], *, ttl_s: int) -> None:
        """The durable store has these (entry id, hash): give each audio key the cache's TTL
        (it had none until now), then acknowledge and delete the entries, in one transaction.
        A crash before it only redelivers entries whose audio the store already has."""
        if not done:
            return
        client = self._client

        async def ack() -> None:
            # One MULTI: an XACK without its XDEL (a crash between them, an AOF cut back) would
            # leave an entry that is never delivered again and never leaves the stream.
            async with client.pipeline(transaction=True) as pipe:
                for _entry_id, h in done:
                    if h is not None:
                        pipe.expire(Keys.audio(h), ttl_s)
                ids = [entry_id for entry_id, _ in done]
                pipe.xack(Keys.PERSIST, Keys.PERSIST_GROUP, *ids)
                pipe.xdel(Keys.PERSIST, *ids)
                await pipe.execute()

        await self._cross(ack)

    async def persist_backlog(self) -> tuple[int, float]:
        """(entries waiting to be persisted, age in seconds of the oldest; 0 when none)."""
        client = self._client

        async def backlog() -> tuple[int, float]:
            async with client.pipeline(transaction=False) as pipe:
                pipe.xlen(Keys.PERSIST)
                pipe.xrange(Keys.PERSIST, count=1)
                pipe.time()
                n, first, now = await pipe.execute()
            if not n or not first:
                return int(n), 0.0
            ms = int(first[0][0].split(b"-")[0])
            return int(n), max(0.0, now[0] + now[1] / 1e6 - ms / 1000)

        return await self._cross(backlog)

    async def purge_audio(self, *, model: str, before: float | None) -> list[str]:
        """Delete the cached audio of ``model`` finalized before ``before`` (all: None), with any
        persist entry left for it; returns the hashes. Scans the cache (a CLI operation)."""
        client = self._client
        prefix = Keys.AUDIO_PREFIX.encode()

        async def purge() -> list[str]:
            purged: list[str] = []
            async for key in client.scan_iter(match=prefix + b"*", count=1000):
                meta_raw = await client.lindex(key, -1)
                if meta_raw is None:
                    continue
                owner, at = _audio_owner(meta_raw, await client.lindex(key, 0))
                if owner != model or (before is not None and (at is None or at >= before)):
                    continue
                if await client.delete(key):
                    purged.append(key[len(prefix) :].decode())
            return purged

        return await self._cross(purge, timeout_s=3600)

    # -- notifications ----------------------------------------------------------------------

    async def listen_notifications(
        self,
        deliver: Callable[[int, bytes], None],
        *,
        ready: Callable[[], None],
        control: Callable[[bytes], None] | None = None,
    ) -> None:
        """Receive every user's status frames until cancelled; ``deliver(user_id, frame)`` is
        called for each (synchronously, so it must not block). ``ready()`` once subscribed.
        ``control(message)`` gets the messages of the control channel (revocations).

        The whole listener is one asyncio coroutine (one crossing for its lifetime); it closes its
        pub/sub connection itself when cancelled.
        """
        client = self._client
        prefix = Keys.NOTIFY_PREFIX.encode()

        async def listen() -> None:
            # Subscribe confirmations are filtered here, not by redis-py: the first one proves the
            # server has registered the subscription, so nothing published after ready() is lost.
            pubsub = client.pubsub()
            try:
                await pubsub.psubscribe(prefix + b"*")
                if control is not None:
                    await pubsub.subscribe(Keys.CONTROL)
                confirmations = 1 if control is None else 2
                while confirmations:
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg is not None and msg["type"] in ("psubscribe", "subscribe"):
                        confirmations -= 1
                ready()
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None:
                        continue
                    if msg["type"] == "message" and control is not None:
                        control(msg["data"])
                        continue
                    if msg["type"] != "pmessage":
                        continue
                    channel = msg["channel"]
                    try:
                        user_id = int(channel[len(prefix) :])
                    except ValueError:
                        continue
                    deliver(user_id, msg["data"])
            finally:
                await pubsub.aclose()

        await trio_asyncio.aio_as_trio(listen)()


def _push_keys(model: str) -> list[str]:
    return [Keys.RESULTS, Keys.processing(model), Keys.leases(model)]


def _persist_hash(fields: Any) -> str | None:
    raw = fields.get(b"h") if fields else None
    try:
        return raw.decode("ascii") if raw else None
    except UnicodeDecodeError:
        return None


def _audio_owner(meta_raw: bytes, first: bytes | None) -> tuple[str | None, float | None]:
    """(model, finalized at) of a cached audio list: from its note, or (audio cached before
    the note named them) the model from the worker's result and no time."""
    try:
        meta = json.loads(meta_raw)
        if "model" in meta:
            return str(meta["model"]), float(meta.get("at") or 0) or None
        result = json.loads(first) if first else {}
        return str(result.get("model")), None
    except (ValueError, TypeError, AttributeError):
        return None, None


def audio_meta(items: list[bytes]) -> dict[str, Any]:
    """The JSON note at the end of a cached audio list ({} if unreadable)."""
    try:
        meta = json.loads(items[-1])
    except (ValueError, IndexError, TypeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def audio_from_item(variant_hash: str, items: list[bytes]) -> tuple[bytes, str]:
    """Decode a cached audio list (see :meth:`RedisStore.get_audio`): (bytes, content type);
    raises :class:`ContractError` if it does not decode. Pure CPU: callable in a thread."""
    return _audio_from_item(variant_hash, items)


def _audio_from_item(variant_hash: str, items: list[bytes]) -> tuple[bytes, str]:
    try:
        meta = json.loads(items[-1])
        where, _, pos = meta["loc"].partition(":")
        if where == "b":  # promoted from the durable store: raw bytes
            return bytes(items[int(pos) - 1]), str(meta.get("content_type") or "")
        if where == "i":
            b64: bytes | memoryview = items[int(pos) - 1]
        else:
            start, _, end = pos.partition(":")
            b64 = memoryview(items[0])[int(start) - 1 : int(end)]
        data = binascii.a2b_base64(b64, strict_mode=True)
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error) as exc:
        raise ContractError(f"audio {variant_hash}: stored audio cannot be read: {exc}") from None
    # Only audio is served as what it says it is (anything else on this origin could be script).
    return data, audio_content_type(meta.get("content_type")) or "application/octet-stream"


async def _ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    # At 0, not $: entries of a stream that survived its group are still to be handled.
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def _ensure_billing_group(client: aioredis.Redis) -> None:
    # Start at 0, not $: if the stream survived but the group did not, its entries are unbilled.
    try:
        await client.xgroup_create(Keys.BILLING, Keys.BILLING_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@contextlib.asynccontextmanager
async def open_redis(
    url: str,
    *,
    max_connections: int = 64,
    pool_timeout_s: float = 5.0,
    command_timeout_s: float = 10.0,
) -> AsyncIterator[RedisStore]:
    """A :class:`RedisStore` on a bounded connection pool; closed (shielded) on exit.

    Must run inside ``trio_asyncio.open_loop()``. Does not connect until first use.
    """
    client = _make_client(url, max_connections=max_connections, pool_timeout_s=pool_timeout_s)
    try:
        yield RedisStore(client, url=url, command_timeout_s=command_timeout_s)
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await trio_asyncio.aio_as_trio(client.aclose)()
            await trio_asyncio.aio_as_trio(client.connection_pool.disconnect)()


def billing_block_ms(block_s: float) -> int:
    return max(1, math.ceil(block_s * 1000))
