"""Token authentication at the WebSocket handshake (docs/protocol.md): where the token is, and
whether it could be one. The look-up itself is one Redis round trip (the token mirror)."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

__all__ = ["plausible_token", "token_from_request"]

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
