"""The eSpeak NG engine: real speech on a CPU, no GPU and no system package (docs/workers.md).

``libespeak-ng`` and its voice data come from the ``espeakng-loader`` wheel (eSpeak NG is
GPL-3.0: a separate, dynamically loaded dependency that pip installs, not part of this repository
— docs/workers.md says how that relates to this project's licence). It is driven through its C API
with ctypes, in the same process for every block: no subprocess per block.

The library keeps global state (one voice, one synthesis at a time per process), so blocks are
synthesized in worker processes (``trio_parallel``), one per adapter instance: ``tts-worker
--concurrency N`` runs N of them, each initialising the library once. Synthesis runs off the event
loop; a cancelled job kills its process (a fresh one replaces it at the next job), so a
cancellation never waits for a long block. Output: 16-bit mono PCM WAV at the engine's rate
(22,050 Hz), with ``duration_ms`` counted from the samples.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from typing import Any

import trio
import trio_parallel

from daemon.contracts import Job
from daemon.workers.audio import wav_from_pcm
from daemon.workers.worker import Synthesized

__all__ = ["VOICES", "EspeakAdapter", "EspeakError", "UnknownVoice", "check_available", "render"]

# The catalog's voices (daemon/migrations) → eSpeak NG voice and variant (docs/workers.md keeps
# the same table). Kokoro's names say accent and sex: a/b = American/British, f/m.
VOICES: Mapping[str, str] = {
    "af_heart": "en-us+f3",
    "af_bella": "en-us+f2",
    "af_nicole": "en-us+f4",
    "am_adam": "en-us+m3",
    "am_michael": "en-us+m1",
    "bf_emma": "en+f3",
    "bm_george": "en+m3",
    "ava": "en-us+f5",
    "andrew": "en-us+m7",
    "emma": "en-gb-x-rp+f2",
    "brian": "en-gb-x-rp+m2",
}

# A block longer than this (in audio) is refused: a guard on memory, far above the protocol's
# longest block (2,000 characters are about two minutes).
MAX_AUDIO_S = 600.0

# espeak_AUDIO_OUTPUT, options and flags (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_EE_OK = 0
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class EspeakError(RuntimeError):
    """The library failed (cannot load or initialise, refused a voice or a text)."""


class UnknownVoice(LookupError):
    """A job's voice has no eSpeak voice in :data:`VOICES`."""


def check_available() -> None:
    """Raise :class:`EspeakError` if the wheel's library or voice data cannot be found (a
    command line or config can then say so at once rather than at the first job)."""
    try:
        import espeakng_loader

        lib, data = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    except (ImportError, RuntimeError) as exc:
        raise EspeakError(
            f"eSpeak NG is not installed (pip install espeakng-loader): {exc}"
        ) from None
    if not os.path.isfile(lib):
        raise EspeakError(f"eSpeak NG library not found at {lib}")
    if not os.path.isdir(data):
        raise EspeakError(f"eSpeak NG voice data not found at {data}")


class _Engine:
    """The library in this process: initialised once, one synthesis at a time."""

    def __init__(self) -> None:
        import espeakng_loader

        check_available()
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        data = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed ({rate}) with data at {data.decode()}")
        self.lib = lib
        self.sample_rate = rate
        self._chunks: list[bytes] = []
        self._samples = 0
        self._max_samples = 0
        self._callback = _CALLBACK(self._on_audio)  # kept: the library holds only a pointer
        lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None

    def _on_audio(self, wav: Any, n: int, _events: Any) -> int:
        if n > 0 and wav:
            self._samples += n
            if self._samples > self._max_samples:
                return 1  # abort: the block is too long
            self._chunks.append(ctypes.string_at(wav, n * 2))
        return 0

    def render(self, text: str, voice: str, max_s: float) -> tuple[bytes, int]:
        """16-bit mono PCM (little-endian) and its sample count."""
        if voice != self._voice:
            self._voice = None
            err = self.lib.espeak_SetVoiceByName(voice.encode())
            if err != _EE_OK:
                raise EspeakError(f"eSpeak NG has no voice {voice!r} (error {err})")
            self._voice = voice
        data = text.replace("\0", " ").encode("utf-8")
        self._chunks, self._samples = [], 0
        self._max_samples = int(max_s * self.sample_rate)
        try:
            err = self.lib.espeak_Synth(
                data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
            self.lib.espeak_Synchronize()
            if err != _EE_OK:
                raise EspeakError(f"espeak_Synth failed (error {err})")
            if self._samples > self._max_samples:
                raise EspeakError(f"the audio would be longer than {max_s:g} s")
            return b"".join(self._chunks), self._samples
        finally:
            self._chunks = []


_engine: _Engine | None = None


def render(text: str, voice: str, max_s: float = MAX_AUDIO_S) -> tuple[bytes, int, int]:
    """Synthesize ``text`` with an eSpeak voice in *this* process: (WAV, samples, sample rate).

    What the worker processes run; the first call initialises the library (once per process).
    """
    global _engine
    if _engine is None:
        _engine = _Engine()
    pcm, samples = _engine.render(text, voice, max_s)
    return wav_from_pcm(pcm, _engine.sample_rate), samples, _engine.sample_rate


class EspeakAdapter:
    """A ``tts-worker`` adapter (docs/workers.md): one block at a time, in a process of its own.

    ``voices`` maps the catalog's voice names to eSpeak voices; a job whose voice is not there
    fails (an ``error`` result: the listener may ask again with another voice).
    """

    def __init__(
        self, *, voices: Mapping[str, str] = VOICES, max_audio_s: float = MAX_AUDIO_S
    ) -> None:
        self.voices = dict(voices)
        self.max_audio_s = max_audio_s
        # One synthesis at a time for this adapter: N adapters, N processes at most.
        self._limiter: trio.CapacityLimiter | None = None

    async def synthesize(self, job: Job) -> Synthesized:
        voice = self.voices.get(job.voice)
        if voice is None:
            raise UnknownVoice(f"no eSpeak voice for {job.model} voice {job.voice!r}")
        if not job.text.strip():
            return Synthesized(b"", 0, "audio/wav")
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(1)
        wav, samples, rate = await trio_parallel.run_sync(
            render, job.text, voice, self.max_audio_s, kill_on_cancel=True, limiter=self._limiter
        )
        if samples == 0:
            return Synthesized(b"", 0, "audio/wav")
        return Synthesized(wav, duration_ms=round(samples * 1000 / rate), content_type="audio/wav")
