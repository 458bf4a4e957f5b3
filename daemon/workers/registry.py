"""The worker registry, read: which workers are live, per model and build (docs/workers.md).

Each worker's renewal (``renew.lua``) writes its entry in ``tts:workers``: id, version, models,
adapter, host, pid, lease and the Redis time of its last renewal. A worker is live while its last
renewal is younger than three of its leases; ``/healthz``, ``/metrics`` and the dashboard show
the live ones per model, and per version, so a fleet running a stale worker build is visible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["LIVE_LEASES", "live_workers"]

# A worker whose last renewal is older than this many of its leases is not live.
LIVE_LEASES = 3.0


def live_workers(
    entries: Mapping[str, Mapping[str, Any]], now: float, models: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per model: ``{"live": n, "versions": {version: n}}`` over the live workers serving it."""
    out: dict[str, dict[str, Any]] = {m: {"live": 0, "versions": {}} for m in models}
    for entry in entries.values():
        last, lease = entry.get("last_renewal"), entry.get("lease_s")
        if not isinstance(last, int | float) or not isinstance(lease, int | float):
            continue
        if now - last > LIVE_LEASES * lease:
            continue
        served = entry.get("models")
        version = str(entry.get("version", "unknown"))
        for model in served if isinstance(served, list) else []:
            if model in out:
                out[model]["live"] += 1
                versions = out[model]["versions"]
                versions[version] = versions.get(version, 0) + 1
    return out
