"""Simulated speech: a real, playable WAV whose length follows the text.

16-bit mono PCM at a configurable rate. The signal is a soft two-tone hum (so a person hears that
something plays), built from a precomputed one-second period so a long block costs a copy, not a
loop in Python.
"""

from __future__ import annotations

import functools
import math
import struct

__all__ = ["duration_ms_for", "wav_bytes", "wav_from_pcm", "wav_header_ok"]


def duration_ms_for(text: str, speech_chars_per_s: float) -> int:
    """How long reading ``text`` aloud takes at ``speech_chars_per_s``; at least 200 ms."""
    stripped = text.strip()
    if not stripped:
        return 0
    return max(200, int(len(stripped) / speech_chars_per_s * 1000))


@functools.lru_cache(maxsize=8)
def _one_second(sample_rate: int) -> bytes:
    samples = []
    for i in range(sample_rate):
        t = i / sample_rate
        v = 0.18 * math.sin(2 * math.pi * 220 * t) + 0.07 * math.sin(2 * math.pi * 330 * t)
        samples.append(int(v * 32767))
    return struct.pack(f"<{sample_rate}h", *samples)


def wav_bytes(duration_ms: int, sample_rate: int = 8000) -> bytes:
    """A RIFF/WAVE file of ``duration_ms`` of 16-bit mono PCM."""
    nbytes = sample_rate * duration_ms // 1000 * 2
    second = _one_second(sample_rate)
    reps, rest = divmod(nbytes, len(second))
    return wav_from_pcm(second * reps + second[:rest], sample_rate)


def wav_from_pcm(pcm: bytes, sample_rate: int) -> bytes:
    """A RIFF/WAVE file around 16-bit mono little-endian PCM samples."""
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVE"
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
    return header + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm


def wav_header_ok(data: bytes) -> bool:
    """True if ``data`` starts with a well-formed PCM WAV header whose sizes match the bytes."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE" or data[12:16] != b"fmt ":
        return False
    riff_size = struct.unpack("<I", data[4:8])[0]
    fmt_tag, channels = struct.unpack("<HH", data[20:24])
    data_size = struct.unpack("<I", data[40:44])[0]
    return (
        riff_size == len(data) - 8
        and fmt_tag == 1
        and channels >= 1
        and data[36:40] == b"data"
        and data_size == len(data) - 44
    )
