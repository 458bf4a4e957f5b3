"""The configuration builder: a daemon's configuration for a test or a tool, one way.

Sections are plain dicts merged over a base (key by key, a section at a time), then validated by
the daemon's own ``config_from_dict`` (docs/configuration.md). ``quick=True`` (the default) adds
the short loops tests want (blocking reads, heartbeats, backoff, close grace); tools that measure
pass ``quick=False`` and get the production defaults plus what they override. The same sections
can be written as a TOML file, for a daemon started as its own process.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from daemon.config import Config, config_from_dict

__all__ = ["QUICK", "config_dict", "make_config", "write_config"]

# Short loops, so a test of a restart or a stop does not wait for production intervals.
QUICK: dict[str, dict[str, Any]] = {
    "gateway": {"close_grace_s": 1.0},
    "redis": {"block_s": 0.2},
    "workers": {"simulated": 2, "latency_ms": 5.0, "jitter_ms": 2.0, "scan_interval_s": 0.2},
    "hot": {"heartbeat_s": 0.5, "consumer_ttl_s": 3.0},
    "billing": {"claim_idle_s": 5.0},
    "supervisor": {"backoff_min_s": 0.05, "backoff_max_s": 0.5, "shutdown_timeout_s": 5.0},
    "holds": {"check_s": 0.2, "reap_interval_s": 0.5},
}


def _merge(base: dict[str, dict[str, Any]], sections: dict[str, dict[str, Any]]) -> None:
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)


def config_dict(
    root: Path, *, quick: bool = True, **sections: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The configuration as parsed TOML: data under ``root/data``, ephemeral ports (0), the
    :data:`QUICK` loops if ``quick``, then ``sections`` (``gateway={"max_connections": 3}``)."""
    base: dict[str, dict[str, Any]] = {
        "data": {"dir": str(Path(root) / "data")},
        "gateway": {"ws_port": 0, "http_port": 0},
        "ops": {"port": 0},
    }
    if quick:
        _merge(base, copy.deepcopy(QUICK))
    _merge(base, sections)
    return base


def make_config(root: Path, *, quick: bool = True, **sections: dict[str, Any]) -> Config:
    """A validated :class:`~daemon.config.Config` (see :func:`config_dict`)."""
    return config_from_dict(config_dict(root, quick=quick, **sections))


def write_config(path: Path, root: Path, *, quick: bool = True, **sections: dict[str, Any]) -> Path:
    """Write :func:`config_dict` as a TOML file at ``path`` (validated first); returns ``path``."""
    raw = config_dict(root, quick=quick, **sections)
    config_from_dict(raw)  # a bad value fails here, naming the key, not in the daemon's process
    lines = []
    for name, values in raw.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")  # strings, numbers, booleans: TOML too
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
