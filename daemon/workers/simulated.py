"""The simulated GPU worker: real WAV audio, with a speed that can be dialled in.

Synthesis takes ``latency_ms + len(text) / chars_per_s`` plus up to ``jitter_ms``; with
``batch > 1`` it pulls that many jobs and finishes them together, the way a GPU finishes a batch —
the bursts of results that the split design exists for.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import trio

from daemon.config import WorkersConfig
from daemon.contracts import Job
from daemon.workers.audio import duration_ms_for, wav_bytes
from daemon.workers.worker import Synthesized

__all__ = ["SimulatedAdapter"]


class SimulatedAdapter:
    def __init__(self, cfg: WorkersConfig, *, seed: int | None = None) -> None:
        self.cfg = cfg
        self.batch_size = cfg.batch
        self._rng = random.Random(seed)

    def _delay_s(self, chars: int) -> float:
        c = self.cfg
        jitter = self._rng.random() * c.jitter_ms
        return (c.latency_ms + jitter) / 1000.0 + chars / c.chars_per_s

    def _audio(self, job: Job) -> Synthesized:
        duration = duration_ms_for(job.text, self.cfg.speech_chars_per_s)
        if duration == 0:
            return Synthesized(b"", 0, "audio/wav")
        return Synthesized(wav_bytes(duration, self.cfg.sample_rate), duration, "audio/wav")

    async def synthesize(self, job: Job) -> Synthesized:
        await trio.sleep(self._delay_s(len(job.text)))
        return self._audio(job)

    async def synthesize_batch(self, jobs: Sequence[Job]) -> list[Synthesized | Exception]:
        await trio.sleep(self._delay_s(sum(len(j.text) for j in jobs)))
        return [self._audio(j) for j in jobs]
