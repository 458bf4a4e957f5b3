"""What the gateway tells a client while Postgres is down or restarting.

tools/chaos (scenario ``postgres``) saw a few requests answered ``internal error`` — the
wording of a bug — while Postgres was starting up again: asyncpg's "the database system is
starting up" and "terminating connection due to administrator command" were not recognised as an
outage. The client retries either way; the message should say what is going on.
"""

from __future__ import annotations

import asyncpg
import pytest

from daemon.stores.pg import is_pg_unavailable

OUTAGE = [
    asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.CrashShutdownError("terminating connection due to crash of another"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed mid-operation"),
    asyncpg.exceptions.ConnectionFailureError("connection failure"),
    ConnectionRefusedError(111, "Connect call failed"),
    asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
    # a pooled connection the server terminated, used before asyncpg saw it close
    asyncpg.exceptions.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    ),
]
NOT_OUTAGE = [
    asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
    asyncpg.exceptions.UniqueViolationError("duplicate key"),
    asyncpg.exceptions.UndefinedTableError("relation does not exist"),
    ValueError("a bug"),
    asyncpg.exceptions.InternalClientError("some other client-side inconsistency"),
]


@pytest.mark.parametrize("exc", OUTAGE, ids=lambda e: type(e).__name__)
def test_an_unreachable_or_restarting_postgres_is_an_outage(exc: BaseException) -> None:
    assert is_pg_unavailable(exc)
    assert is_pg_unavailable(ExceptionGroup("wrapped", [exc]))


@pytest.mark.parametrize("exc", NOT_OUTAGE, ids=lambda e: type(e).__name__)
def test_other_errors_are_not(exc: BaseException) -> None:
    assert not is_pg_unavailable(exc)
