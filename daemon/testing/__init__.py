"""The project's test harness (as ``trio.testing`` is for trio): what tests, ``tools/stress.py``
and the benchmarks use to drive a daemon from outside, one of each.

- :mod:`daemon.testing.client`: the WebSocket protocol client (docs/protocol.md), leak-free when
  the server rejects the handshake; and a raw handshake for checking HTTP statuses.
- :mod:`daemon.testing.config`: the configuration builder (a ``Config``, a dict or a TOML file).
- :mod:`daemon.testing.stores`: ``setup_database`` (migrate + users, through the public store
  API) and one-shot Redis/Postgres queries on clients of their own.
- :mod:`daemon.testing.worker`: an external GPU worker the caller drives by hand (docs/workers.md).
- :mod:`daemon.testing.waiting`: ``wait_until``, polling a condition with a ceiling.
- :mod:`daemon.testing.figures`: the one percentile definition every tool reports.
- :mod:`daemon.testing.unbatched`: billing one event per transaction, the reference the batched
  billing is checked against (and the benchmarks' baseline).

Production code never imports this package. It depends on nothing the daemon does not already
install (no pytest), so tools can use it too. The names below are importable from here directly;
the submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ManualWorker",
    "WsClient",
    "add_user",
    "config_dict",
    "connect",
    "handshake_status",
    "make_config",
    "pct",
    "pg_fetch",
    "pg_query",
    "pg_val",
    "redis_call",
    "redis_cmd",
    "setup_database",
    "summary",
    "wait_until",
    "write_config",
]

_WHERE = {
    "ManualWorker": "worker",
    "WsClient": "client",
    "add_user": "stores",
    "config_dict": "config",
    "connect": "client",
    "handshake_status": "client",
    "make_config": "config",
    "pct": "figures",
    "pg_fetch": "stores",
    "pg_query": "stores",
    "pg_val": "stores",
    "redis_call": "stores",
    "redis_cmd": "stores",
    "setup_database": "stores",
    "summary": "figures",
    "wait_until": "waiting",
    "write_config": "config",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'daemon.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(f"daemon.testing.{module}"), name)
