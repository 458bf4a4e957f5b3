"""Which synthesis engine a worker runs: the one place that turns an engine name into adapters.

``simulated`` (a hum whose length follows the text, with a dialled-in speed: stress runs and
tests) and ``espeak`` (real speech from eSpeak NG on the CPU). Used by ``tts-worker --engine`` and
by the daemon's in-process workers (``workers.engine``); anything else plugs in with ``tts-worker
--adapter`` (docs/workers.md).
"""

from __future__ import annotations

from typing import Any

from daemon.config import WorkersConfig

__all__ = ["ENGINES", "make_adapters"]

ENGINES = ("simulated", "espeak")


def make_adapters(engine: str, cfg: WorkersConfig, count: int) -> list[Any]:
    """``count`` adapters of ``engine``, one per worker loop. Raises ValueError for an unknown
    engine, and :class:`~daemon.workers.espeak.EspeakError` if eSpeak NG is not installed."""
    if engine == "simulated":
        from daemon.workers.simulated import SimulatedAdapter

        return [SimulatedAdapter(cfg) for _ in range(count)]
    if engine == "espeak":
        from daemon.workers.espeak import EspeakAdapter, check_available

        check_available()
        return [EspeakAdapter() for _ in range(count)]
    raise ValueError(f"unknown engine {engine!r} (one of {', '.join(ENGINES)})")
