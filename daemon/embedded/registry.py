"""Who uses the embedded servers of one ``data.dir``: the first process in starts them, the last
one out stops them (pids in ``run/embedded.json`` under a file lock)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from daemon.embedded.postgres import EmbeddedPostgres
from daemon.embedded.process import EmbeddedError, _pid_alive
from daemon.embedded.redis import EmbeddedRedis

__all__ = ["EmbeddedServers"]


class EmbeddedServers:
    """The embedded servers of one ``data.dir``, shared by every process that enters.

    ``with EmbeddedServers(dir, redis=True, postgres=True) as servers:`` starts what is not
    running, and on exit stops both if no other live process still uses them.
    """

    def __init__(self, data_dir: Path, *, redis: bool = True, postgres: bool = True) -> None:
        self.data_dir = data_dir
        secrets_dir = data_dir / "secrets"
        self.redis = EmbeddedRedis(data_dir / "redis", secrets_dir) if redis else None
        self.postgres = EmbeddedPostgres(data_dir / "postgres" / "data", secrets_dir)
        if not postgres:
            self.postgres = None
        self._run_dir = data_dir / "run"
        self._entered = False

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[int]]:
        self._run_dir.mkdir(parents=True, exist_ok=True)
        with open(self._run_dir / "embedded.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self._run_dir / "embedded.json"
            try:
                pids = [int(p) for p in json.loads(path.read_text())["pids"]]
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                pids = []
            # Dead pids (SIGKILLed users) are pruned; our own may appear once per enter.
            pids = [p for p in pids if p == os.getpid() or _pid_alive(p)]
            yield pids
            path.write_text(json.dumps({"pids": pids}))

    def __enter__(self) -> EmbeddedServers:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._locked() as pids:
            try:
                for server in (self.redis, self.postgres):
                    if server is not None:
                        server.start()
            except BaseException:
                if not pids:
                    self._stop_all()
                raise
            pids.append(os.getpid())
        self._entered = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._entered:
            return
        self._entered = False
        with self._locked() as pids:
            if os.getpid() in pids:
                pids.remove(os.getpid())
            if not pids:
                self._stop_all()

    def _stop_all(self) -> None:
        errors = []
        for server in (self.redis, self.postgres):
            if server is None:
                continue
            try:
                server.stop()
            except (EmbeddedError, OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{type(server).__name__}: {exc}")
        if errors:
            raise EmbeddedError("; ".join(errors))

    @staticmethod
    def remove(data_dir: Path) -> None:
        """Delete an embedded data directory (tests): the servers must be stopped."""
        shutil.rmtree(data_dir, ignore_errors=True)
