"""``GET /dashboard``: one page that refreshes itself, its data, and the files it needs.

Everything the page loads comes from this package (``daemon/gateway/static/``): its script and
style, and the vendored chart library (uPlot, MIT — see ``static/VENDOR.md``). No CDN and no
network at run time: the machine may be offline.

Routes (all GET/HEAD, on the HTTP port next to ``/healthz`` and ``/metrics``):

- ``/dashboard`` — the page;
- ``/dashboard/data`` — the JSON it polls every two seconds (:meth:`Dashboard.data`: the
  statistics, plus the services, pools and connections the daemon's :class:`Health` reads);
- ``/dashboard/static/NAME`` — a file of ``static/`` (names are checked; no paths).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

from daemon.ops.health import Health

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
    """Serves the dashboard's routes; :meth:`data` builds the page's JSON."""

    def __init__(self, health: Health) -> None:
        self.health = health
        self._files: dict[str, tuple[bytes, str]] = {}

    async def data(self) -> dict[str, Any]:
        """The JSON ``/dashboard`` polls: the statistics, plus the services and pools now."""
        health = self.health
        data = health.stats.snapshot()
        data["instance"] = health.instance_id
        data["services"] = health.services()
        data["pools"] = health.pools()
        data["connections"] = health.connections()
        data["events"] = {"written": health.events.written, "dropped": health.events.dropped}
        data["audio"] = await health.audio()
        data["holds"] = health.holds()
        data["workers"] = await health.workers()
        data["queues"] = await health.queue_stats()
        return data

    async def __call__(self, path: str) -> tuple[bytes, str] | None:
        """(body, content type) for a dashboard path; ``None`` for any other path. A failure is
        logged (at most once a minute) and raised: the HTTP layer answers 500."""
        try:
            return await self._route(path)
        except Exception as exc:
            self.health.log_failure("dashboard failed", exc)
            raise

    async def _route(self, path: str) -> tuple[bytes, str] | None:
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
