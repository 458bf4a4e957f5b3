"""``tts-daemon``: run, migrate, user add, user revoke, credit, report, audio purge,
dead-letters (docs/operations.md).

Exit status: 0 success; 1 a failure at run time (its reason on stderr); 2 a bad command line or
configuration value (one line naming the key). ``report`` has its own: 0 green, 1 amber, 2 red
(or the report could not be made).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio
import trio_asyncio

from daemon.config import DEFAULT_CONFIG, Config, ConfigError, config_path, load_config
from daemon.ops.events import describe
from daemon.runtime.faults import FaultInjector, FaultSpecError
from daemon.runtime.faults import from_env as faults_from_env

if TYPE_CHECKING:
    from daemon.runtime.daemon import Daemon

__all__ = ["main", "resolve_servers", "serve_until_signalled"]


def _fail(message: str, status: int = 1) -> int:
    print(f"tts-daemon: {message}", file=sys.stderr)
    return status


@contextlib.contextmanager
def resolve_servers(
    cfg: Config, *, redis: bool = True, postgres: bool = True
) -> Iterator[tuple[str, str]]:
    """(redis_url, postgres_url): the configured ones, or embedded servers under ``data.dir``
    (shared with a daemon already running there; stopped by whoever leaves them last)."""
    need_redis = redis and not cfg.redis.url
    need_pg = postgres and not cfg.postgres.url
    if not (need_redis or need_pg):
        yield cfg.redis.url, cfg.postgres.url
        return
    from daemon.embedded import EmbeddedServers

    with EmbeddedServers(cfg.data.dir, redis=need_redis, postgres=need_pg) as servers:
        redis_url = servers.redis.url if servers.redis is not None else cfg.redis.url
        pg_url = servers.postgres.url if servers.postgres is not None else cfg.postgres.url
        yield redis_url, pg_url


# -- run ---------------------------------------------------------------------------------------


async def serve_until_signalled(daemon: Daemon, *, name: str = "tts-daemon") -> None:
    """Run ``daemon`` until SIGINT/SIGTERM (a graceful stop; a second signal forces it), printing
    one "serving ws://… and http://… (operations: http://…; events: …)" line once it accepts
    connections."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                count = 0
                async for signum in signals:
                    count += 1
                    if count == 1:
                        signame = signal.Signals(signum).name
                        print(f"{name}: {signame}: shutting down (again to force)", flush=True)
                        daemon.request_stop()
                    else:
                        daemon.abort()

            nursery.start_soon(watch_signals)
            await nursery.start(daemon.run)
            print(
                f"{name}: serving {daemon.addresses.ws_url} and {daemon.addresses.http_url}"
                f" (operations: {daemon.addresses.ops_url}; events: {daemon.cfg.events_path})",
                flush=True,
            )
            await daemon.stopped.wait()
            nursery.cancel_scope.cancel()


async def _run(cfg: Config, redis_url: str, pg_url: str, faults: FaultInjector | None) -> None:
    from daemon.runtime.daemon import Daemon

    if faults is None:
        daemon = Daemon(cfg, redis_url, pg_url)
    else:
        # Only when TTS_DAEMON_FAULTS is set (the chaos tool, tests): see daemon/runtime/faults.py.
        daemon = Daemon(cfg, redis_url, pg_url, billing_fault=faults, persist_fault=faults)
    await serve_until_signalled(daemon)


def cmd_run(cfg: Config) -> int:
    try:
        faults = faults_from_env()
    except FaultSpecError as exc:
        return _fail(str(exc), 2)
    if faults is not None:
        print(f"tts-daemon: fault injection ON ({faults.describe()})", file=sys.stderr, flush=True)
    with resolve_servers(cfg) as (redis_url, pg_url):
        trio.run(_run, cfg, redis_url, pg_url, faults)
    print("tts-daemon: stopped", flush=True)
    return 0


# -- admin commands ----------------------------------------------------------------------------


async def _with_db(pg_url: str, fn, *args):  # type: ignore[no-untyped-def]
    from daemon.stores.pg import open_pg_pool

    try:
        async with trio_asyncio.open_loop(), open_pg_pool(pg_url, size=1, min_size=1) as db:
            await db.migrate()
            return await fn(db, *args)
    except BaseExceptionGroup as group:
        # The loop's nursery wraps the one error there is; callers handle it by its type.
        raise _single(group) from None


async def _with_stores(redis_url: str, pg_url: str, fn, *args):  # type: ignore[no-untyped-def]
    """``fn(db, store, *args)`` with Postgres and Redis: the admin commands that change what a
    user may do write Postgres (the ledger) and then Redis's mirror of it."""
    from daemon.stores.pg import open_pg_pool
    from daemon.stores.redis import open_redis

    try:
        async with (
            trio_asyncio.open_loop(),
            open_pg_pool(pg_url, size=1, min_size=1) as db,
            open_redis(redis_url, max_connections=4) as store,
        ):
            await db.migrate()
            return await fn(db, store, *args)
    except BaseExceptionGroup as group:
        raise _single(group) from None


class MirrorNotWritten(Exception):
    """Postgres changed, Redis's mirror could not be: the daemon's mirror service copies it at
    its next full rebuild (or the command is run again)."""


async def _mirror(db, store, user_id: int) -> None:  # type: ignore[no-untyped-def]
    from daemon.stores.mirror import aio_mirror_users

    try:
        with trio.fail_after(30):
            await db.run(aio_mirror_users, store, [user_id])
    except Exception as exc:
        raise MirrorNotWritten(describe(exc)) from None


def _single(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def cmd_migrate(cfg: Config) -> int:
    from daemon.stores.pg import open_pg_pool

    async def go(pg_url: str) -> list[str]:
        async with trio_asyncio.open_loop(), open_pg_pool(pg_url, size=1, min_size=1) as db:
            return await db.migrate()

    with resolve_servers(cfg, redis=False) as (_, pg_url):
        applied = trio.run(go, pg_url)
    print("applied: " + ", ".join(applied) if applied else "schema up to date")
    return 0


def cmd_user_add(cfg: Config, name: str, plan: str) -> int:
    import asyncpg

    async def add(db, store, name: str, plan: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
        user_id, token = await db.add_user(name, plan)
        try:
            await _mirror(db, store, user_id)
        except MirrorNotWritten as exc:
            print(user_id)
            print(token)
            raise MirrorNotWritten(
                f"user {user_id} created, but Redis could not be told ({exc}); the token works"
                " once the daemon rebuilds its mirror"
            ) from None
        return user_id, token

    with resolve_servers(cfg) as (redis_url, pg_url):
        try:
            user_id, token = trio.run(_with_stores, redis_url, pg_url, add, name, plan)
        except MirrorNotWritten as exc:
            return _fail(str(exc), 1)
        except ValueError as exc:
            return _fail(str(exc), 2)
        except asyncpg.UniqueViolationError:
            return _fail(f"a user named {name!r} already exists", 1)
        except asyncpg.CheckViolationError:
            return _fail("--name: must be 1..128 characters", 2)
    print(user_id)
    print(token)
    return 0


def cmd_credit(cfg: Config, user: str, voice_chars: int) -> int:
    from daemon.stores.pg import UnknownUser

    async def credit(db, store, user: str, n: int) -> dict:  # type: ignore[no-untyped-def]
        out = await db.credit(user, n)
        try:
            await _mirror(db, store, out["user_id"])
        except MirrorNotWritten as exc:
            print(json.dumps(out, default=str))
            raise MirrorNotWritten(
                f"credit recorded, but Redis could not be told ({exc}); it counts once the"
                " daemon rebuilds its mirror or billing next writes this user"
            ) from None
        return out

    with resolve_servers(cfg) as (redis_url, pg_url):
        try:
            out = trio.run(_with_stores, redis_url, pg_url, credit, user, voice_chars)
        except UnknownUser as exc:
            return _fail(str(exc), 1)
        except MirrorNotWritten as exc:
            return _fail(str(exc), 1)
    print(json.dumps(out, default=str))
    return 0


def cmd_audio_purge(cfg: Config, model: str, before_text: str | None) -> int:
    from daemon.audio.purge import parse_before, purge_audio
    from daemon.audio.store import FileAudioStore
    from daemon.contracts import MODELS
    from daemon.stores.redis import open_redis

    if model not in MODELS:
        return _fail(f"--model: unknown model {model!r} (known: {', '.join(MODELS)})", 2)
    try:
        before = parse_before(before_text) if before_text is not None else None
    except ValueError as exc:
        return _fail(str(exc), 2)

    async def go(redis_url: str) -> dict[str, int]:
        store = FileAudioStore(cfg.audio_dir) if cfg.audio.enabled else None
        async with trio_asyncio.open_loop(), open_redis(redis_url, max_connections=2) as redis:
            result = await purge_audio(redis, store, model=model, before=before)
        return result.as_dict()

    with resolve_servers(cfg, postgres=False) as (redis_url, _):
        try:
            out = trio.run(go, redis_url)
        except BaseExceptionGroup as group:
            raise _single(group) from None
    print(json.dumps({"model": model, "before": before_text, "purged": out}))
    return 0


def cmd_user_revoke(cfg: Config, user: str) -> int:
    from daemon.stores.mirror import aio_revoke
    from daemon.stores.pg import UnknownUser

    async def revoke(db, store, user: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
        with trio.fail_after(30):
            return await db.run(aio_revoke, store, user)

    with resolve_servers(cfg) as (redis_url, pg_url):
        try:
            user_id, n = trio.run(_with_stores, redis_url, pg_url, revoke, user)
        except UnknownUser as exc:
            return _fail(str(exc), 1)
    print(json.dumps({"user_id": user_id, "tokens_revoked": n}))
    return 0


def cmd_dead_letters(cfg: Config, args: argparse.Namespace) -> int:
    from daemon.ops import deadletters
    from daemon.stores.redis import open_redis

    if args.action == "replay" and args.kind not in (None, "billing"):
        return _fail(
            "dead-letters replay: only billing dead letters are replayed (--kind billing)", 2
        )

    async def go(redis_url: str) -> int:
        async with trio_asyncio.open_loop(), open_redis(redis_url) as store:
            if args.action == "list":
                for entry in await deadletters.list_entries(
                    store, args.kind, limit=args.limit, full=args.full
                ):
                    print(json.dumps(entry, ensure_ascii=False, default=str))
                counts = await deadletters.count(store, args.kind)
                print(json.dumps({"total": counts}), file=sys.stderr)
            elif args.action == "replay":
                replayed, skipped = await deadletters.replay_billing(store, limit=args.limit)
                print(f"replayed {replayed}, skipped {skipped}")
            else:
                n = await deadletters.drop(store, args.kind, older_than_s=args.older_than_s)
                print(f"dropped {n}")
        return 0

    with resolve_servers(cfg, postgres=False) as (redis_url, _):
        try:
            return trio.run(go, redis_url)
        except BaseExceptionGroup as group:
            raise _single(group) from None


def cmd_report(args: argparse.Namespace) -> int:
    """The report's own exit status: 0 green, 1 amber, 2 red — or 2 when it cannot be made."""
    from daemon.ops import report

    try:
        return report.run(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:
        print(f"report: RED — the report could not be made: {describe(exc)}", file=sys.stderr)
        return 2


# -- entry point -------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tts-daemon", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            metavar="PATH",
            help=f"TOML configuration (default: {DEFAULT_CONFIG} if present, else defaults)",
        )
        return p

    with_config(sub.add_parser("run", help="run the daemon (SIGINT/SIGTERM stop it gracefully)"))
    with_config(sub.add_parser("migrate", help="apply the Postgres schema"))
    user = sub.add_parser("user", help="manage users")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = with_config(
        user_sub.add_parser("add", help="create a user; prints the id, then an API token")
    )
    add.add_argument("--name", required=True)
    add.add_argument("--plan", required=True, help="free, basic, plus or unlimited")
    revoke = with_config(
        user_sub.add_parser(
            "revoke", help="revoke every token of a user and close their open connections"
        )
    )
    revoke.add_argument("--user", required=True, help="user id or name")
    credit = with_config(
        sub.add_parser("credit", help="add purchased premium-voice characters to a user")
    )
    credit.add_argument("--user", required=True, help="user id or name")
    credit.add_argument("--voice-chars", required=True, type=_positive_int, metavar="N")
    audio = sub.add_parser("audio", help="the durable audio store")
    audio_sub = audio.add_subparsers(dest="audio_command", required=True, metavar="ACTION")
    purge = with_config(
        audio_sub.add_parser(
            "purge", help="remove a model's audio from Redis and the store (after a revision bump)"
        )
    )
    purge.add_argument("--model", required=True)
    purge.add_argument(
        "--before", metavar="DATE", help="only audio made before this ISO date/time (UTC)"
    )

    dead = sub.add_parser("dead-letters", help="inspect, replay or drop dead letters")
    dead_sub = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("list", "print the newest entries (JSON lines; counts on stderr)"),
        ("replay", "put billing dead letters back on the billing stream (idempotent)"),
        ("drop", "delete dead letters"),
    ):
        a = with_config(dead_sub.add_parser(action, help=text))
        a.add_argument("--kind", choices=("results", "billing", "jobs"), help="default: all")
        if action in ("list", "replay"):
            a.add_argument("--limit", type=_positive_int, default=100, metavar="N")
        if action == "list":
            a.add_argument("--full", action="store_true", help="whole raw payloads")
        if action == "drop":
            a.add_argument("--older-than-s", type=float, metavar="S", help="only older entries")
    from daemon.ops import report

    report.add_arguments(
        sub.add_parser(
            "report", help="health report of the billing pipeline", description=report.DESCRIPTION
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return cmd_report(args)
    try:
        cfg = load_config(config_path(args.config))
    except ConfigError as exc:
        return _fail(str(exc), 2)
    try:
        if args.command == "run":
            return cmd_run(cfg)
        if args.command == "migrate":
            return cmd_migrate(cfg)
        if args.command == "user" and args.user_command == "revoke":
            return cmd_user_revoke(cfg, args.user)
        if args.command == "user":
            return cmd_user_add(cfg, args.name, args.plan)
        if args.command == "audio":
            return cmd_audio_purge(cfg, args.model, args.before)

        if args.command == "dead-letters":
            return cmd_dead_letters(cfg, args)
        return cmd_credit(cfg, args.user, args.voice_chars)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:
        return _fail(describe(exc))
