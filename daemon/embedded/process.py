"""Helpers shared by the embedded servers: ports, pids, waiting for readiness."""

from __future__ import annotations

import socket
import time

import psutil

START_TIMEOUT_S = 30.0


class EmbeddedError(RuntimeError):
    """An embedded server could not be started or reached."""


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
