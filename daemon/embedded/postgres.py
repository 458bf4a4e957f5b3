"""The embedded PostgreSQL 16 cluster (from ``pgserver``) under ``data.dir/postgres``."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import tempfile
import warnings
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

__all__ = ["SYSTEM_USER", "EmbeddedPostgres", "ensure_system_user"]

SYSTEM_USER = "pgserver"
# Machine-wide, not under data.dir: every process on the machine that may create the user takes it.
_USER_LOCK = Path(tempfile.gettempdir()) / "tts-daemon-useradd.lock"


def ensure_system_user(name: str) -> int:
    """The uid of system user ``name``, created with ``useradd`` if it does not exist.

    Run as root only. Creation happens once, under a machine-wide file lock: two processes
    (two pytest-xdist workers on a fresh machine) that both saw the user missing and both ran
    ``useradd`` gave it two uids in turn, and the loser's ``initdb`` ran as a uid that was gone
    existed ("could not look up effective user ID 1001").
    """
    import pwd

    with open(_USER_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            pass
        done = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise EmbeddedError(f"useradd {name} failed: {done.stderr.strip()}")
        return pwd.getpwnam(name).pw_uid


def _pgserver_bin() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset (CI, root)
        from pgserver._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


class EmbeddedPostgres:
    """A PostgreSQL 16 cluster under ``root``, password auth, listening on 127.0.0.1."""

    def __init__(self, root: Path, secrets_dir: Path, *, system_user: str = SYSTEM_USER) -> None:
        self.root = root
        self.secrets_dir = secrets_dir
        self.port_file = root.parent / "postgres.port"
        self.log_file = root.parent / "postgres.log"
        # As root, postgres must run as an unprivileged user, created on first use.
        self.system_user = system_user if os.geteuid() == 0 else None

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
            from pgserver.utils import ensure_prefix_permissions

        ensure_system_user(self.system_user)
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
