"""Token authentication at the WebSocket handshake (docs/protocol.md)."""

from __future__ import annotations

import re
from collections import OrderedDict
from urllib.parse import parse_qs, urlsplit

import trio

from daemon.stores.pg import PgPool

__all__ = ["TokenCache", "plausible_token", "token_from_request"]

# Tokens are "tts_" + 43 URL-safe characters (``user add``); allow some room for other issuers.
_TOKEN = re.compile(r"[A-Za-z0-9_\-.~+/=]{8,256}")


def plausible_token(token: str) -> bool:
    """Could this be a token at all? Junk is refused without a database query."""
    return _TOKEN.fullmatch(token) is not None


def token_from_request(headers: list[tuple[bytes, bytes]], path: str) -> str | None:
    """The bearer token: the ``Authorization: Bearer`` header, else ``?token=`` (browsers)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    query = parse_qs(urlsplit(path).query)
    tokens = query.get("token")
    if tokens and tokens[0]:
        return tokens[0]
    return None


class TokenCache:
    """Token → (user id, name), from Postgres, remembered for ``ttl_s`` (bounded LRU).

    Only hits are cached, so a new token works at once and a bad one costs a query every time.
    """

    def __init__(self, db: PgPool, *, ttl_s: float = 60.0, max_entries: int = 10000) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, tuple[int, str]]] = OrderedDict()

    async def lookup(self, token: str) -> tuple[tuple[int, str] | None, float]:
        """(user, seconds waited for a pool connection); user is None for an unknown token."""
        now = trio.current_time()
        hit = self._entries.get(token)
        if hit is not None and hit[0] > now:
            self._entries.move_to_end(token)
            return hit[1], 0.0
        user, waited = await self.db.lookup_token(token)
        if user is not None:
            self._entries[token] = (now + self.ttl_s, user)
            self._entries.move_to_end(token)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return user, waited
