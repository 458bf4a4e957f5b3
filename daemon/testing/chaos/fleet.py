"""The processes of a run: its Redis and Postgres, the daemons (configured, started, killed,
stopped with SIGTERM) and the ``tts-worker`` processes, kept at strength like a process manager."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from typing import Any

import trio

from daemon.embedded import read_secret
from daemon.embedded.process import _free_port
from daemon.testing.chaos.clients import http_get
from daemon.testing.chaos.hostcrash import fsync_shim
from daemon.testing.chaos.params import HOLDS_TTL_S, SIGTERM_DEADLINE_S
from daemon.testing.chaos.state import ChaosState, DaemonSlot
from daemon.testing.stores import in_thread, redis_cmd


class Fleet(ChaosState):
    """Start, stop and kill what the run is made of."""

    async def start_servers(self) -> None:
        if self.own_servers:
            await in_thread(self.redis.start)
            await in_thread(self.postgres.start)
        else:
            self.redis.appendfsync = self.p.appendfsync
            await in_thread(redis_cmd, self.redis_url, "CONFIG", "SET", "appendfsync",
                            self.p.appendfsync)  # fmt: skip

    async def stop_servers(self) -> None:
        if self.own_servers:
            with contextlib.suppress(Exception):
                await in_thread(self.redis.stop)
            with contextlib.suppress(Exception):
                await in_thread(self.postgres.stop)

    def _write_configs(self) -> None:
        data = self.work / "data"
        (self.work / "secrets").mkdir(parents=True, exist_ok=True)
        secret = self.work / "secrets" / "variant_hmac.key"
        read_secret(secret, nbytes=32)  # one key for every daemon: one variant, one job
        self.faults_file.write_text("")
        p = self.p
        for i in range(p.n_daemons):
            d = self.work / f"daemon-{i}"
            d.mkdir(parents=True, exist_ok=True)
            slot = DaemonSlot(
                f"daemon-{i}", _free_port(), _free_port(), d / "daemon.toml",
                d / "events.jsonl", d / "daemon.log",
            )  # fmt: skip
            slot.ops_port = _free_port()
            slot.config.write_text(
                f"""
[data]
dir = {json.dumps(str(data))}
[gateway]
ws_port = {slot.ws_port}
http_port = {slot.http_port}
rate_limit_blocks_per_min = 1000000
max_frames_per_s = 100000
close_grace_s = 1.0
variant_secret_path = {json.dumps(str(secret))}
[ops]
port = {slot.ops_port}
[holds]
ttl_s = {HOLDS_TTL_S}
reap_interval_s = 1.0
[redis]
url = {json.dumps(self.redis_url)}
block_s = 0.5
command_timeout_s = 5.0
[postgres]
url = {json.dumps(self.pg_url)}
request_pool_size = {p.request_pool_size}
acquire_timeout_s = 3.0
command_timeout_s = 10.0
[hot]
heartbeat_s = 0.5
consumer_ttl_s = {p.consumer_ttl_s}
[billing]
claim_idle_s = {p.claim_idle_s}
[workers]
simulated = 0
visibility_timeout_s = {p.visibility_timeout_s}
scan_interval_s = 0.5
[supervisor]
backoff_min_s = 0.2
backoff_max_s = {p.backoff_max_s}
shutdown_timeout_s = 8.0
[log]
events_path = {json.dumps(str(slot.events))}
"""
                + self.audio.config_toml(p.claim_idle_s)
            )
            self.slots.append(slot)

    async def start_daemon(self, slot: DaemonSlot, *, timeout_s: float = 60.0) -> float:
        """Start ``slot``'s daemon; returns the seconds until its /healthz answered 200."""
        env = dict(os.environ, TTS_DAEMON_FAULTS=f"@{self.faults_file}", PYTHONUNBUFFERED="1")
        log_fd = os.open(slot.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            slot.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "daemon", "run", "--config", str(slot.config)],
                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, env=env, cwd=self.work,
            )  # fmt: skip
        finally:
            os.close(log_fd)
        self.started_pids.append(slot.proc.pid)
        slot.starts += 1
        t0 = trio.current_time()
        with trio.move_on_after(timeout_s):
            while slot.alive:
                if await self._healthy(slot, services=False):
                    return trio.current_time() - t0
                await trio.sleep(0.1)
        tail = slot.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{slot.name} did not start (exit {slot.proc.returncode}): {tail}")

    async def _healthy(self, slot: DaemonSlot, *, services: bool = True) -> bool:
        try:
            status, body = await http_get(slot.ops_port, "/healthz")
        except (OSError, trio.TooSlowError, ValueError, IndexError):
            return False
        if status != 200:
            return False
        if not services:
            return True
        states = {k: v.get("state") for k, v in (body or {}).get("services", {}).items()}
        return bool(states) and all(s == "running" for s in states.values())

    async def kill_daemon(self, slot: DaemonSlot) -> None:
        assert slot.proc is not None
        slot.proc.kill()
        await slot.proc.wait()

    async def sigterm_daemon(self, slot: DaemonSlot) -> dict[str, Any]:
        """SIGTERM; the exit status and time (docs/tts-flow.md: 0 within 10 s)."""
        assert slot.proc is not None
        t0 = trio.current_time()
        slot.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(SIGTERM_DEADLINE_S * 2):
            await slot.proc.wait()
        exit_s = trio.current_time() - t0
        code = slot.proc.returncode
        if code is None:  # it hung: count it, then make sure it is gone
            slot.proc.kill()
            await slot.proc.wait()
        out = {
            "daemon": slot.name,
            "exit_code": code,
            "exit_s": round(exit_s, 3),
            "ok": code == 0 and exit_s <= SIGTERM_DEADLINE_S,
        }
        self.sigterm_exits.append(out)
        return out

    async def start_worker(self) -> trio.Process:
        p = self.p
        n = len(self.started_pids)
        cmd = [
            sys.executable, "-c", "from daemon.workers.cli import main; raise SystemExit(main())",
            "--redis-url", self.redis_url, "--simulated", "--models", "kokoro",
            "--concurrency", str(p.worker_concurrency), "--batch", str(p.worker_batch),
            "--latency-ms", str(p.worker_latency_ms), "--jitter-ms", str(p.worker_latency_ms / 4),
            "--chars-per-s", "50000", "--worker-id", f"chaos-{n}",
            "--lease-s", str(p.worker_lease_s),
        ]  # fmt: skip
        log_fd = os.open(self.worker_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            proc = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, cwd=self.work
            )
        finally:
            os.close(log_fd)
        self.started_pids.append(proc.pid)
        self.workers.append(proc)
        return proc

    async def _keep_workers(self) -> None:
        """A process manager's job: a worker that exits on its own is counted and replaced."""
        while True:
            for proc in list(self.workers):
                if proc.returncode is not None and proc not in self._killed_workers:
                    self.worker_exits.append(proc.returncode)
                    self.workers.remove(proc)
                    self.say(f"worker {proc.pid} exited with {proc.returncode}: replaced")
                    await self.start_worker()
            await trio.sleep(0.2)

    async def cleanup(self) -> None:
        """Every process this run started is gone when it returns (SIGTERM, then SIGKILL)."""
        procs = [s.proc for s in self.slots if s.proc is not None] + list(self.workers)
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in procs:
            with trio.move_on_after(SIGTERM_DEADLINE_S * 1.5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    def _arm_fsync_log(self) -> None:
        """Restart Redis with the fsync recorder preloaded (see :func:`fsync_shim`)."""
        self._fsync_shim = fsync_shim(self.work / "fsync-shim")
        self.redis.stop()
        self._start_redis()

    def _start_redis(self) -> None:
        if self._fsync_shim is None:
            self.redis.start()
            return
        # EmbeddedRedis starts redis-server with this process's environment.
        old = {k: os.environ.get(k) for k in ("LD_PRELOAD", "CHAOS_FSYNC_LOG")}
        os.environ["LD_PRELOAD"] = str(self._fsync_shim)
        os.environ["CHAOS_FSYNC_LOG"] = str(self._fsync_log)
        try:
            self.redis.start()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
