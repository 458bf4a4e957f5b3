"""``GET /dashboard``: one page that refreshes itself, its data, and the files it needs.

Everything the page loads comes from this package (``daemon/gateway/static/``): its script and
style, and the vendored chart library (uPlot, MIT — see ``static/VENDOR.md``). No CDN and no
network at run time: the machine may be offline.

Routes (all GET/HEAD, on the HTTP port next to ``/healthz`` and ``/metrics``):

- ``/dashboard`` — the page;
- ``/dashboard/data`` — the JSON it polls every two seconds (``Daemon.dashboard_data()``);
- ``/dashboard/static/NAME`` — a file of ``static/`` (names are checked; no paths).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

__all__ = ["Dashboard"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".LICENSE": "text/plain; charset=utf-8",
}


class Dashboard:
    """Serves the dashboard's routes; ``data()`` builds the page's JSON."""

    def __init__(self, data: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.data = data
        self._files: dict[str, tuple[bytes, str]] = {}

    async def __call__(self, path: str) -> tuple[bytes, str] | None:
        """(body, content type) for a dashboard path; ``None`` for any other path."""
        if path in ("/dashboard", "/dashboard/"):
            return self.file("dashboard.html")
        if path == "/dashboard/data":
            body = json.dumps(await self.data(), separators=(",", ":"), default=str)
            return body.encode(), "application/json"
        prefix = "/dashboard/static/"
        if path.startswith(prefix) and _NAME.match(path[len(prefix) :]):
            return self.file(path[len(prefix) :])
        return None

    def file(self, name: str) -> tuple[bytes, str] | None:
        """A file of ``static/`` (cached once read; misses are not cached, so requests for
        made-up names cannot grow the cache)."""
        cached = self._files.get(name)
        if cached is not None:
            return cached
        content_type = next((t for suffix, t in _TYPES.items() if name.endswith(suffix)), None)
        node = resources.files("daemon.gateway") / "static" / name
        if content_type is None or not node.is_file():
            return None
        self._files[name] = (node.read_bytes(), content_type)
        return self._files[name]
