"""The eSpeak NG engine (daemon/workers/espeak.py, docs/workers.md): real speech whose audio
depends on the words, a duration counted from the samples, every catalog voice mapped, an unknown
voice answered with an error result, cancellation that neither blocks nor breaks the adapter, and
``tts-worker --engine espeak`` as a real process."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
import uuid
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio_asyncio
import trio_parallel

from daemon.contracts import Job, Keys, Result
from daemon.stores.redis import RedisStore, open_redis
from daemon.testing.stores import pg_fetch
from daemon.testing.waiting import wait_until
from daemon.testing.worker import r, stage_job
from daemon.workers.espeak import VOICES, EspeakAdapter
from daemon.workers.worker import Synthesized, run_worker

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent


def _job(text: str, voice: str = "af_heart", model: str = "kokoro") -> Job:
    return Job(
        uuid.uuid4().hex, uuid.uuid4().hex, model, voice, text, 1, "doc", 0, 1.0, time.time()
    )


def _wav(audio: bytes) -> tuple[int, int, int, int]:
    """(channels, sample width, rate, frames) of a WAV, read by the standard library."""
    with wave.open(io.BytesIO(audio)) as w:
        return w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()


@pytest.fixture
async def adapter() -> EspeakAdapter:
    return EspeakAdapter()


async def test_two_texts_of_equal_length_sound_different(adapter: EspeakAdapter) -> None:
    a_text, b_text = "The cat sat on the mat.", "A dog ran in the parks."
    assert len(a_text) == len(b_text)
    a = await adapter.synthesize(_job(a_text))
    b = await adapter.synthesize(_job(b_text))
    for out in (a, b):
        assert out.content_type == "audio/wav"
        channels, width, rate, frames = _wav(out.audio)
        assert (channels, width, rate) == (1, 2, 22050)  # 16-bit mono at the engine's rate
        assert out.duration_ms == round(frames * 1000 / rate)
        assert 500 < out.duration_ms < 5000
    assert a.audio[44:] != b.audio[44:]
    # Not a length function: the simulated hum of the same length would be byte-identical.
    assert a.audio[44:1044] != b.audio[44:1044]


async def test_duration_grows_with_the_text(adapter: EspeakAdapter) -> None:
    sentence = "Reading a paragraph aloud takes longer than reading a word."
    durations = []
    for text in ("Word.", sentence, " ".join([sentence] * 4)):
        out = await adapter.synthesize(_job(text))
        assert out.duration_ms == round(_wav(out.audio)[3] * 1000 / 22050)
        durations.append(out.duration_ms)
    assert durations[0] < durations[1] < durations[2]
    assert durations[2] > 3 * durations[1]
    # Nothing to say: no audio, and the block is answered "skipped" (docs/workers.md).
    empty = await adapter.synthesize(_job("   "))
    assert empty == Synthesized(b"", 0, "audio/wav")


async def test_every_catalog_voice_has_an_espeak_voice_of_its_own(pg_url: str) -> None:
    rows = await pg_fetch(pg_url, "SELECT model, name FROM voices ORDER BY model, name")
    catalog = {(row["model"], row["name"]) for row in rows}
    assert catalog and {name for _, name in catalog} <= set(VOICES)
    assert len(set(VOICES.values())) == len(VOICES)  # no two catalog voices sound alike
    adapter = EspeakAdapter()
    text = "Every voice reads this."
    heard = {}
    for model, name in sorted(catalog):
        out = await adapter.synthesize(_job(text, voice=name, model=model))
        assert out.duration_ms > 300, name
        heard[name] = out.audio
    assert heard["af_heart"] != heard["am_adam"] != heard["bm_george"]


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    async with trio_asyncio.open_loop(), open_redis(redis_url) as s:
        yield s


async def _results(redis_url: str, n: int) -> list[Result] | None:
    raw = await r(redis_url, "LRANGE", Keys.RESULTS, 0, -1)
    got = [Result.from_json(x) for x in reversed(raw)]
    return got if len(got) >= n else None


async def test_an_unknown_voice_is_an_error_result_and_the_worker_goes_on(
    store: RedisStore, redis_url: str
) -> None:
    bad = await stage_job(redis_url, "Nobody speaks like this.", voice="robot_9000", score=1.0)
    good = await stage_job(redis_url, "Then a voice that exists.", score=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_worker(
                store, EspeakAdapter(), models=["kokoro"], worker_id="w-espeak",
                task_status=task_status,
            )
        )  # fmt: skip
        first, second = await wait_until(
            lambda: _results(redis_url, 2), what="both results", timeout_s=60
        )
        nursery.cancel_scope.cancel()
    assert first.job_id == bad.job_id and first.audio_base64 is None
    assert first.error is not None and "robot_9000" in first.error
    assert second.job_id == good.job_id and second.error is None
    audio = base64.b64decode(second.audio_base64 or "")
    assert second.duration_ms == round(_wav(audio)[3] * 1000 / 22050) > 500
    assert await r(redis_url, "ZCARD", Keys.processing("kokoro")) == 0


async def test_a_cancelled_synthesis_neither_blocks_nor_breaks_the_adapter() -> None:
    adapter = EspeakAdapter(max_audio_s=3600)
    await adapter.synthesize(_job("Warm up."))  # the worker process is up
    # About a quarter of an hour of speech: far longer to synthesize than we wait.
    long_text = "This block goes on and on, and nobody will hear the end of it. " * 220
    t0 = trio.current_time()
    with trio.move_on_after(0.2) as scope:
        await adapter.synthesize(_job(long_text))
    assert scope.cancelled_caught  # the call gave up at once, it did not run to its end
    assert trio.current_time() - t0 < 10
    # The process synthesizing it was killed, not left running in the pool...
    assert trio_parallel.default_context_statistics().running_workers == 0
    # ...and the next block is synthesized as usual (in a fresh process).
    out = await adapter.synthesize(_job("Still speaking after a cancelled block."))
    assert out.duration_ms > 1000 and _wav(out.audio)[3] > 22050


async def test_tts_worker_speaks_with_the_espeak_engine(redis_url: str) -> None:
    job = await stage_job(redis_url, "Hello from a worker process.")
    exe = str(Path(sys.executable).parent / "tts-worker")
    with subprocess.Popen(
        [exe, "--redis-url", redis_url, "--engine", "espeak", "--concurrency", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    ) as proc:
        try:
            (res,) = await wait_until(
                lambda: _results(redis_url, 1), what="the result", timeout_s=60
            )
            proc.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(lambda: proc.wait(timeout=30))
        finally:
            if proc.poll() is None:
                proc.kill()
        out, err = proc.communicate()
    assert code == 0, err
    assert "2 worker(s)" in out
    assert res.job_id == job.job_id and res.error is None and res.content_type == "audio/wav"
    channels, width, rate, frames = _wav(base64.b64decode(res.audio_base64 or ""))
    assert (channels, width, rate) == (1, 2, 22050)
    assert res.duration_ms == round(frames * 1000 / rate) > 1000
