"""Fault injection for the chaos tool and tests. Off unless ``TTS_DAEMON_FAULTS`` is set.

The billing consumer calls ``await fault(point)`` at named points of each batch
(``billing.before_batch``: nothing read is billed yet; ``billing.after_commit``: the batch is
committed in Postgres but not yet acknowledged in Redis). A :class:`FaultInjector` raises
:class:`InjectedFault` there with a given probability, so the service fails exactly as it would if
Postgres or Redis failed at that instruction, and the supervisor restarts it.

``TTS_DAEMON_FAULTS`` holds a spec, or ``@PATH`` to read the spec from a file, re-read whenever the
file changes (a missing or empty file injects nothing), so that a tool can switch faults on and off
while the daemon runs::

    TTS_DAEMON_FAULTS="billing.after_commit=0.3,billing.before_batch=0.1,seed=7" tts-daemon run
    TTS_DAEMON_FAULTS=@/tmp/faults tts-daemon run     # echo billing.after_commit=1 > /tmp/faults

A spec is comma-separated ``POINT=PROBABILITY`` pairs (0..1) and an optional ``seed=N``. A spec
that does not parse stops ``tts-daemon run`` at start-up (exit status 2), like a bad config value.
Every injected fault is counted in :attr:`FaultInjector.injected` and shows in the events log as the
billing service's ``error`` and ``service_restarted`` events (reason ``InjectedFault: …``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import attrs
import trio

__all__ = [
    "ENV_VAR",
    "POINTS",
    "FaultInjector",
    "FaultPoint",
    "FaultSpecError",
    "InjectedFault",
    "from_env",
    "no_fault",
]

# What the consumers call at their fault points (tests and the chaos tool pass one that raises or
# blocks); ``no_fault`` does nothing.
FaultPoint = Callable[[str], Awaitable[None]]


async def no_fault(point: str) -> None:
    return None


ENV_VAR = "TTS_DAEMON_FAULTS"
# The points the daemon calls; a spec naming another is a typo, refused rather than ignored.
POINTS = (
    "billing.before_batch",
    "billing.after_commit",
    # the persister (daemon/audio/persister.py): a batch read, nothing written; written to the
    # durable store, not yet acknowledged
    "persist.read",
    "persist.written",
)


class InjectedFault(RuntimeError):
    """Raised at a fault point by a :class:`FaultInjector` (never by production code paths)."""


class FaultSpecError(ValueError):
    """A fault spec does not parse; ``str()`` is one line naming what is wrong."""


@attrs.frozen
class FaultSpec:
    rates: Mapping[str, float]
    seed: int | None = None


def parse_spec(text: str) -> FaultSpec:
    """``"billing.after_commit=0.3,seed=7"`` → a :class:`FaultSpec`. Blank → no faults."""
    rates: dict[str, float] = {}
    seed = None
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep:
            raise FaultSpecError(f"{ENV_VAR}: {item!r}: expected POINT=PROBABILITY")
        if name == "seed":
            try:
                seed = int(value)
            except ValueError:
                raise FaultSpecError(
                    f"{ENV_VAR}: seed: must be an integer, got {value!r}"
                ) from None
            continue
        if name not in POINTS:
            raise FaultSpecError(
                f"{ENV_VAR}: unknown fault point {name!r} (known: {', '.join(POINTS)})"
            )
        try:
            rate = float(value)
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            raise FaultSpecError(f"{ENV_VAR}: {name}: must be a probability 0..1, got {value!r}")
        rates[name] = rate
    return FaultSpec(rates, seed)


@attrs.define(eq=False)
class FaultInjector:
    """A fault point (``await injector(point)``) driven by a fixed spec or by a spec file."""

    spec: FaultSpec = FaultSpec({})
    path: Path | None = None
    injected: dict[str, int] = attrs.Factory(dict)
    _rng: random.Random = attrs.field(init=False)
    _stamp: tuple[int, int] | None = None

    def __attrs_post_init__(self) -> None:
        self._rng = random.Random(self.spec.seed)

    def describe(self) -> str:
        if self.path is not None:
            return f"from {self.path}"
        return ", ".join(f"{k}={v:g}" for k, v in self.spec.rates.items()) or "none"

    async def __call__(self, point: str) -> None:
        if self.path is not None:
            await self._reload()
        rate = self.spec.rates.get(point, 0.0)
        if rate and self._rng.random() < rate:
            self.injected[point] = self.injected.get(point, 0) + 1
            raise InjectedFault(f"injected fault at {point}")

    async def _reload(self) -> None:
        assert self.path is not None
        path = trio.Path(self.path)
        try:
            st = await path.stat()
        except FileNotFoundError:
            self.spec, self._stamp = FaultSpec({}, self.spec.seed), None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            spec = parse_spec(await path.read_text())
        except (FaultSpecError, OSError):
            # A half-written file: keep the previous spec and look again next time.
            return
        self._stamp = stamp
        self.spec = spec
        if spec.seed is not None:
            self._rng.seed(spec.seed)


def from_env(environ: Mapping[str, str] | None = None) -> FaultInjector | None:
    """The injector ``TTS_DAEMON_FAULTS`` asks for, or ``None`` (the default: no injection).

    Raises :class:`FaultSpecError` for a spec that does not parse."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not value:
        return None
    if value.startswith("@"):
        path = Path(value[1:])
        if not value[1:]:
            raise FaultSpecError(f"{ENV_VAR}: '@' needs a file path")
        return FaultInjector(path=path)
    return FaultInjector(spec=parse_spec(value))
