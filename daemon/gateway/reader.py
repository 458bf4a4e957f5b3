"""``GET /reader``: a page a person can use — paste a text, hear it read aloud (docs/protocol.md).

The page is a client of the public protocol and nothing more: the user pastes a token, the page
splits the text into sentence blocks within the protocol's limits, asks for them over the
WebSocket, plays them in order as they arrive ``cached``, and a click on a later block sends
``cursor_moved`` and plays from there. Plain HTML, CSS and JavaScript from
``daemon/gateway/static/`` (package data): no framework, nothing loaded from elsewhere, so it
works offline.

Routes (GET/HEAD, on the gateway's HTTP port):

- ``/reader`` — the page;
- ``/reader/config`` — what the page needs to know: the WebSocket port and path, the models and
  their voices, and the protocol's limits;
- ``/reader/static/NAME`` — the page's script and style.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from typing import Any

from daemon.gateway import protocol

__all__ = ["Reader", "reader_config"]

# The page's own files: nothing else of static/ is served under /reader.
_FILES = {
    "reader.html": "text/html; charset=utf-8",
    "reader.js": "text/javascript; charset=utf-8",
    "reader.css": "text/css; charset=utf-8",
}


def reader_config(
    *, ws_port: int, tls: bool, ws_path: str, models: dict[str, dict[str, Any]], voices: Any
) -> dict[str, Any]:
    """The JSON of ``/reader/config``: where the WebSocket is, the catalog, the limits."""
    return {
        "ws_port": ws_port,
        "ws_path": ws_path,
        "tls": tls,
        "models": {
            name: {
                "default_voice": info["default_voice"],
                "voices": sorted(voices.get(name, ())),
            }
            for name, info in sorted(models.items())
        },
        "limits": {"max_text": protocol.MAX_TEXT, "max_blocks": protocol.MAX_BLOCKS},
    }


class Reader:
    """Serves the reader's routes; ``config()`` is the page's configuration (see above)."""

    def __init__(self, config: Callable[[], dict[str, Any]]) -> None:
        self.config = config
        self._files: dict[str, tuple[bytes, str]] = {}

    async def __call__(self, path: str) -> tuple[bytes, str] | None:
        """(body, content type) for a reader path; ``None`` for any other path."""
        if path in ("/reader", "/reader/"):
            return self._file("reader.html")
        if path == "/reader/config":
            return json.dumps(self.config(), separators=(",", ":")).encode(), "application/json"
        prefix = "/reader/static/"
        if path.startswith(prefix) and path[len(prefix) :] in _FILES:
            return self._file(path[len(prefix) :])
        return None

    def _file(self, name: str) -> tuple[bytes, str]:
        cached = self._files.get(name)
        if cached is None:
            node = resources.files("daemon.gateway") / "static" / name
            cached = self._files[name] = (node.read_bytes(), _FILES[name])
        return cached
