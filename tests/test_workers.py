"""The worker side of docs/workers.md on a real Redis: the atomic pull, the worker loop and its
adapters, ``tts-worker`` as a real process, the simulated adapter, and the visibility scanner —
including workers that die or stall holding a job."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_asyncio

from daemon.config import WorkersConfig
from daemon.contracts import Job, Keys, Result
from daemon.stores.redis import RedisStore, open_redis
from daemon.testing.client import WsClient
from daemon.testing.config import make_config
from daemon.testing.stores import add_user
from daemon.testing.waiting import wait_until
from daemon.testing.worker import pull, pull_n, r, settle, stage_job
from daemon.workers.audio import wav_header_ok
from daemon.workers.simulated import SimulatedAdapter
from daemon.workers.worker import Synthesized, run_worker
from tests.helpers import Events, usage_rows, usage_rows_at_least

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    async with trio_asyncio.open_loop(), open_redis(redis_url) as s:
        yield s


async def results(redis_url: str) -> list[Result]:
    raw = await r(redis_url, "LRANGE", Keys.RESULTS, 0, -1)
    return [Result.from_json(x) for x in reversed(raw)]  # oldest first


# -- the pull ------------------------------------------------------------------------------------


async def test_pull_takes_the_oldest_job_and_holds_it_in_one_step(redis_url: str) -> None:
    late = await stage_job(redis_url, "late", score=3000.0)
    early = await stage_job(redis_url, "early", score=1000.0)
    middle = await stage_job(redis_url, "middle", score=2000.0)
    gone = await stage_job(redis_url, "evicted meanwhile", score=500.0)
    await r(redis_url, "HDEL", Keys.JOBS, gone.job_id)  # its queue entry is stale
    before = time.time()

    first = await pull(redis_url)
    assert first == early
    held = await r(redis_url, "ZRANGE", Keys.processing("kokoro"), 0, -1)
    assert [h.decode() for h in held] == [early.job_id]
    assert (
        float(await r(redis_url, "ZSCORE", Keys.processing("kokoro"), early.job_id)) >= before - 1
    )
    assert await r(redis_url, "ZSCORE", Keys.queue("kokoro"), early.job_id) is None
    assert [await pull(redis_url), await pull(redis_url)] == [middle, late]
    assert await pull(redis_url) is None
    assert await pull(redis_url, "premium") is None
    held = await r(redis_url, "ZRANGE", Keys.processing("kokoro"), 0, -1)
    assert sorted(h.decode() for h in held) == sorted(j.job_id for j in (early, middle, late))


# -- the worker loop -----------------------------------------------------------------------------


class Recording:
    """An adapter that answers from a table: bytes, an exception, or anything else."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.seen: list[str] = []

    async def synthesize(self, job: Job) -> Any:
        self.seen.append(job.text)
        answer = self.answers[job.text]
        if isinstance(answer, Exception):
            raise answer
        return answer


async def run_until_done(
    store: RedisStore, adapter: Any, redis_url: str, n: int, models: Sequence[str] = ("kokoro",)
) -> list[Result]:
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_worker(
                store, adapter, models=models, worker_id="w-test", task_status=task_status
            )
        )
        out = await wait_until(lambda: _n_results(redis_url, n), what=f"{n} results", timeout_s=20)
        nursery.cancel_scope.cancel()
    return out


async def _n_results(redis_url: str, n: int) -> list[Result] | None:
    got = await results(redis_url)
    return got if len(got) >= n else None


async def test_worker_runs_the_adapter_and_hands_back_each_result(
    store: RedisStore, redis_url: str
) -> None:
    ok = await stage_job(redis_url, "fine", score=1.0)
    broken = await stage_job(redis_url, "raises", score=2.0)
    odd = await stage_job(redis_url, "returns junk", score=3.0)
    silent = await stage_job(redis_url, "   ", score=4.0)
    adapter = Recording(
        {
            "fine": Synthesized(b"\x00\x01audio", 1234, "audio/ogg"),
            "raises": RuntimeError("CUDA out of memory"),
            "returns junk": "not a Synthesized",
            "   ": Synthesized(b"", 0),
        }
    )
    got = await run_until_done(store, adapter, redis_url, 4)
    by_job = {res.job_id: res for res in got}
    assert base64.b64decode(by_job[ok.job_id].audio_base64 or "") == b"\x00\x01audio"
    assert by_job[ok.job_id].duration_ms == 1234
    assert by_job[ok.job_id].content_type == "audio/ogg"
    assert by_job[ok.job_id].text_length == 4 and by_job[ok.job_id].worker_id == "w-test"
    assert "CUDA out of memory" in (by_job[broken.job_id].error or "")
    assert "not a valid Synthesized" in (by_job[odd.job_id].error or "")
    assert by_job[silent.job_id].audio_base64 == "" and by_job[silent.job_id].error is None
    assert await r(redis_url, "ZCARD", Keys.processing("kokoro")) == 0
    # the field names docs/workers.md gives, exactly
    raw = json.loads((await r(redis_url, "LRANGE", Keys.RESULTS, -1, -1))[0])
    assert set(raw) == {
        "job_id", "variant_hash", "model", "voice", "user_id", "document_id", "block_idx",
        "text_length", "usage_multiplier", "worker_id", "queue_wait_ms", "processing_time_ms",
        "audio_base64", "duration_ms", "content_type",
    }  # fmt: skip


class Batching:
    batch_size = 4

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.batches: list[list[str]] = []

    async def synthesize_batch(self, jobs: Sequence[Job]) -> list[Synthesized | Exception]:
        self.batches.append([j.text for j in jobs])
        if self.fail:
            raise RuntimeError("the whole batch fell over")
        return [
            Synthesized(j.text.encode(), 10) if "bad" not in j.text else ValueError("one bad")
            for j in jobs
        ]


async def test_a_batch_adapter_gets_batches_and_each_job_its_own_result(
    store: RedisStore, redis_url: str
) -> None:
    texts = ["a", "b", "bad c", "d", "e"]
    for i, t in enumerate(texts):
        await stage_job(redis_url, t, score=float(i))
    adapter = Batching()
    got = await run_until_done(store, adapter, redis_url, len(texts))
    assert adapter.batches[0] == ["a", "b", "bad c", "d"]
    assert sorted(t for batch in adapter.batches for t in batch) == sorted(texts)
    errors = [res for res in got if res.error]
    assert len(errors) == 1 and "one bad" in (errors[0].error or "")


async def test_a_failing_batch_tells_every_job_of_it(store: RedisStore, redis_url: str) -> None:
    for i in range(3):
        await stage_job(redis_url, f"job {i}", score=float(i))
    got = await run_until_done(store, Batching(fail=True), redis_url, 3)
    assert all("the whole batch fell over" in (res.error or "") for res in got)


# -- the simulated adapter -------------------------------------------------------------------------


def _job(text: str) -> Job:
    return Job("j", "h", "kokoro", "af_heart", text, 1, "d", 0, 1.0, 0.0)


async def test_simulated_adapter_takes_latency_plus_characters_at_its_speed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cfg = WorkersConfig(latency_ms=100.0, chars_per_s=1000.0, jitter_ms=50.0)
    adapter = SimulatedAdapter(cfg, seed=7)
    for chars in (1, 500, 2000):
        t0 = trio.current_time()
        out = await adapter.synthesize(_job("x" * chars))
        took = trio.current_time() - t0
        assert 0.1 + chars / 1000 <= took <= 0.15 + chars / 1000
        assert wav_header_ok(out.audio) and out.content_type == "audio/wav"
    # a batch finishes together: one latency, all the characters
    t0 = trio.current_time()
    outs = await adapter.synthesize_batch([_job("y" * 250)] * 4)
    assert 1.1 <= trio.current_time() - t0 <= 1.15
    assert len(outs) == 4


async def test_simulated_audio_is_real_wav_whose_length_follows_the_text(
    autojump_clock: trio.testing.MockClock,
) -> None:
    adapter = SimulatedAdapter(WorkersConfig(speech_chars_per_s=15.0, sample_rate=8000))
    short = await adapter.synthesize(_job("Hi there, you."))  # 14 chars → 933 ms
    longer = await adapter.synthesize(_job("x" * 150))  # 10 s
    empty = await adapter.synthesize(_job("   "))
    assert wav_header_ok(short.audio) and wav_header_ok(longer.audio)
    assert short.duration_ms == 933 and longer.duration_ms == 10_000
    assert len(longer.audio) - 44 == 8000 * 2 * 10  # 16-bit mono PCM, 10 s
    assert empty.audio == b"" and empty.duration_ms == 0


# -- tts-worker as a process -----------------------------------------------------------------------


def _worker_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _tts_worker(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "tts-worker"), *args]


async def test_tts_worker_runs_a_plugged_in_adapter_and_stops_on_sigterm(redis_url: str) -> None:
    job = await stage_job(redis_url, "Echo me.")
    with subprocess.Popen(
        _tts_worker("--redis-url", redis_url, "--adapter", "daemon.testing.worker:EchoAdapter"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_worker_env(),
        cwd=REPO,
    ) as proc:
        try:
            (res,) = await wait_until(lambda: _n_results(redis_url, 1), what="the echo")
            proc.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(lambda: proc.wait(timeout=20))
        finally:
            if proc.poll() is None:
                proc.kill()
        out, err = proc.communicate()
    assert code == 0, err
    assert "worker(s) on kokoro premium" in out
    assert res.job_id == job.job_id and res.content_type == "audio/x-echo"
    assert base64.b64decode(res.audio_base64 or "") == b"Echo me."


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "no_colon"], "module:attribute"),
        (["--adapter", "daemon.testing.worker:Nope"], "has no Nope"),
        (["--adapter", "no.such.module:X"], "cannot import"),
        (["--simulated", "--chars-per-s", "0"], "--chars-per-s must be > 0"),
    ],
)
def test_tts_worker_refuses_a_bad_command_line_with_one_clear_line(
    redis_url: str, args: list[str], message: str
) -> None:
    proc = subprocess.run(
        _tts_worker("--redis-url", redis_url, *args),
        capture_output=True,
        text=True,
        env=_worker_env(),
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2
    assert message in proc.stderr


# -- workers that die or stall, with the daemon's scanner ---------------------------------------


@pytest.fixture
async def scanned(tmp_path: Path, redis_url: str, pg_url: str) -> AsyncIterator[Any]:
    """A daemon with no simulated workers and a quick visibility scanner."""
    from daemon.runtime.daemon import open_daemon

    cfg = make_config(
        tmp_path,
        workers={
            "simulated": 0,
            "visibility_timeout_s": 1.0,
            "scan_interval_s": 0.2,
            "max_retries": 3,
        },
    )
    async with open_daemon(cfg, redis_url, pg_url) as d:
        yield d


async def test_worker_killed_after_pulling_loses_nothing_and_the_job_is_billed_once(
    scanned: Any, store: RedisStore, redis_url: str, pg_url: str
) -> None:
    events = Events(scanned)
    user_id, token = await add_user(pg_url, "nia", "plus")
    async with WsClient.connect(scanned.addresses.ws_url, token) as client:
        await client.synthesize("doc", ["Interrupted once.", "Interrupted twice."])
        # A real worker process, slow as a stuck GPU, takes both jobs...
        stuck = subprocess.Popen(
            _tts_worker(
                "--redis-url", redis_url, "--simulated", "--latency-ms", "600000",
                "--batch", "2", "--models", "kokoro", "--lease-s", "0.5",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_worker_env(),
        )  # fmt: skip
        try:
            await wait_until(lambda: _held(redis_url, 2), what="both jobs held by the worker")
            await client.until(lambda _: _all(client, "processing", 2))
            stuck.send_signal(signal.SIGKILL)  # ...and dies holding them.
            assert await trio.to_thread.run_sync(stuck.wait) == -signal.SIGKILL
        finally:
            if stuck.poll() is None:
                stuck.kill()
                stuck.wait()
        # The scanner puts them back; a healthy worker finishes them.
        async with trio.open_nursery() as nursery:
            adapter = SimulatedAdapter(WorkersConfig(latency_ms=1.0, jitter_ms=0.0))
            nursery.start_soon(
                lambda: run_worker(store, adapter, models=["kokoro"], worker_id="healthy")
            )
            await client.until(lambda _: len(client.terminal("doc")) == 2, timeout_s=30)
            rows = await wait_until(lambda: usage_rows_at_least(pg_url, 2), what="both billed")
            nursery.cancel_scope.cancel()
        sentinel = await settle(client, redis_url, pg_url)  # a second bill or frame is here now
    assert [s.count("cached") for s in client.statuses("doc").values()] == [1, 1]
    assert len(rows) == 2 and len({row["event_id"] for row in rows}) == 2
    assert len([r for r in await usage_rows(pg_url) if r["event_id"] != sentinel]) == 2
    assert scanned.metrics.registry.get_sample_value("tts_jobs_requeued_total") >= 2
    assert await r(redis_url, "HLEN", Keys.RETRIES) == 0
    assert await r(redis_url, "ZCARD", Keys.processing("kokoro")) == 0
    # the jobs' holds outlived the killed worker and were settled by their bills (docs/billing.md)
    assert await wait_until(
        lambda: _no_holds(redis_url, user_id), what="holds settled after the SIGKILL"
    )
    assert not events.named("error")


async def _held(redis_url: str, n: int) -> bool:
    return int(await r(redis_url, "ZCARD", Keys.processing("kokoro"))) == n


def _all(client: WsClient, status: str, n: int) -> bool:
    statuses = client.statuses("doc")
    return len(statuses) == n and all(status in s for s in statuses.values())


class Stalling:
    """Synthesizes, but only after ``delay_s`` — or never."""

    def __init__(self, delay_s: float | None, audio: bytes) -> None:
        self.delay_s = delay_s
        self.audio = audio
        self.pulled = trio.Event()
        self.done = trio.Event()

    async def synthesize(self, job: Job) -> Synthesized:
        self.pulled.set()
        if self.delay_s is None:
            await trio.sleep_forever()
        await trio.sleep(self.delay_s)
        self.done.set()
        return Synthesized(self.audio, 500, "audio/ogg")


async def test_worker_cancelled_mid_job_and_a_slow_one_overtaken_bill_once(
    scanned: Any, store: RedisStore, redis_url: str, pg_url: str
) -> None:
    """One worker is cancelled holding job A; another is merely slow on job B, which is requeued
    and finished by a third meanwhile — then the slow one finishes too. Each job: one cached
    frame, one usage row, and the first result's audio."""
    _, token = await add_user(pg_url, "oli", "plus")
    async with WsClient.connect(scanned.addresses.ws_url, token) as client:
        await client.synthesize("doc", ["Job A."])
        cancelled = Stalling(None, b"never")
        async with trio.open_nursery() as n1:
            n1.start_soon(
                lambda: run_worker(store, cancelled, models=["kokoro"], worker_id="c", lease_s=0.5)
            )
            await cancelled.pulled.wait()
            n1.cancel_scope.cancel()  # the worker task dies after its pull

        await client.synthesize("doc", {1: "Job B."})
        slow = Stalling(2.5, b"slow take")
        fast = Stalling(0.0, b"fast take")
        async with trio.open_nursery() as nursery:
            # A worker that predates leases: its long job is requeued after the visibility timeout.
            nursery.start_soon(
                lambda: run_worker(store, slow, models=["kokoro"], worker_id="s", lease_s=None)
            )
            await slow.pulled.wait()  # B is held by the slow worker, A waits for the scanner
            nursery.start_soon(lambda: run_worker(store, fast, models=["kokoro"], worker_id="f"))
            await client.until(lambda _: len(client.terminal("doc")) == 2, timeout_s=30)
            with trio.fail_after(20):
                await slow.done.wait()
            await wait_until(
                lambda: _n_duplicates(scanned), what="the slow result seen as a duplicate"
            )
            nursery.cancel_scope.cancel()
        rows = await wait_until(lambda: usage_rows_at_least(pg_url, 2), what="both billed")
        sentinel = await settle(client, redis_url, pg_url)  # a second bill or frame is here now
    assert [s.count("cached") for s in client.statuses("doc").values()] == [1, 1]
    billed = [r for r in await usage_rows(pg_url) if r["event_id"] != sentinel]
    assert len(billed) == 2 and len({row["event_id"] for row in rows}) == 2
    async with httpx.AsyncClient(base_url=scanned.addresses.http_url) as http:
        audio_b = await http.get(client.terminal("doc")[1]["audio_url"])
    assert audio_b.content == b"fast take"


def _n_duplicates(daemon: Any) -> bool:
    value = daemon.metrics.registry.get_sample_value(
        "tts_hot_results_total", {"outcome": "duplicate"}
    )
    return (value or 0) >= 1


async def test_a_job_that_keeps_timing_out_goes_to_the_dlq_and_its_client_hears(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    from daemon.runtime.daemon import open_daemon

    cfg = make_config(
        tmp_path,
        workers={
            "simulated": 0,
            "visibility_timeout_s": 0.3,
            "scan_interval_s": 0.1,
            "max_retries": 2,
        },
    )
    async with open_daemon(cfg, redis_url, pg_url) as daemon:
        events = Events(daemon)
        _, token = await add_user(pg_url, "pat", "plus")
        async with WsClient.connect(daemon.addresses.ws_url, token) as client:
            await client.synthesize("doc", ["Nobody will ever finish me."])
            (job,) = await pull_n(redis_url, 1)  # held, never answered
            again = await wait_until(lambda: pull(redis_url), what="requeued with a retry count")
            assert again == job
            assert int(await r(redis_url, "HGET", Keys.RETRIES, job.job_id)) == 1
            await client.until(lambda _: 0 in client.terminal("doc"), timeout_s=20)
        frame = client.terminal("doc")[0]
        assert frame["status"] == "error" and frame["recoverable"] is True
        assert "timed out 2 times" in frame["error"]
        assert client.statuses("doc")[0].count("queued") == 2  # first ask, then the requeue
        dlq = await r(redis_url, "LRANGE", Keys.dlq("kokoro"), 0, -1)
        assert [Job.from_json(x) for x in dlq] == [job]
        for key in (Keys.queue("kokoro"), Keys.processing("kokoro")):
            assert await r(redis_url, "ZSCORE", key, job.job_id) is None
        assert await r(redis_url, "HGET", Keys.JOBS, job.job_id) is None
        assert any("DLQ" in e.message for e in events.named("error", service="scanner"))
        assert await usage_rows(pg_url) == []


async def _no_holds(redis_url: str, user_id: int) -> bool:
    return not await r(redis_url, "EXISTS", Keys.holds(user_id))
