"""Pure parts of the gateway: the rate bucket, frame validation, the HMAC key file."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from daemon.gateway.hashing import VariantHasher, load_or_create_key
from daemon.gateway.protocol import ProtocolError, Synthesize, parse_frame
from daemon.gateway.ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_bucket_refills_at_the_limit_per_minute() -> None:
    clock = FakeClock()
    rate = RateLimiter(60, clock=clock)  # one block a second
    assert rate.retry_after_s(1, 60) is None
    rate.consume(1, 60)
    assert rate.retry_after_s(1, 1) == pytest.approx(1.0)
    assert rate.retry_after_s(2, 60) is None  # per user
    clock.now += 10
    assert rate.retry_after_s(1, 10) is None
    assert rate.retry_after_s(1, 11) == pytest.approx(1.0)
    clock.now += 3600  # refills up to the limit, not beyond
    assert rate.retry_after_s(1, 60) is None
    assert rate.retry_after_s(1, 61) == float("inf")
    rate.forget(1)
    assert rate.retry_after_s(1, 60) is None


@pytest.mark.parametrize(
    ("frame", "prefix"),
    [
        ('{"type":"synthesize","document_id":"\\udc00","model":"kokoro"}', "document_id:"),
        ('{"type":"synthesize","document_id":"d","model":"kokoro","voice":"\\t"}', "voice:"),
        ('{"type":"synthesize","document_id":"d","model":"' + "m" * 65 + '"}', "model:"),
        ('{"type":"\\ud800"}', "type: unknown message type '\\ud800'"),
    ],
)
def test_strings_that_cannot_travel_are_refused(frame: str, prefix: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_frame(frame)
    assert err.value.code == "bad_request"
    assert err.value.message.startswith(prefix)
    err.value.message.encode("utf-8")  # the error itself is sendable


def test_a_valid_frame_parses() -> None:
    req = parse_frame(
        '{"type":"synthesize","document_id":"d|1","model":"kokoro",'
        '"blocks":[{"idx":3,"text":"Hi\\nthere"}],"future_field":{"x":[1]}}'
    )
    assert isinstance(req, Synthesize)
    assert req.document_id == "d|1" and req.voice is None
    assert [(b.idx, b.text) for b in req.blocks] == [(3, "Hi\nthere")]


def test_variant_key_is_created_once_even_by_racing_processes(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "variant_hmac.key"
    keys: list[bytes] = []
    errors: list[Any] = []

    def load() -> None:
        try:
            keys.append(load_or_create_key(path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(keys)) == 1 and len(keys[0]) >= 32
    assert (path.stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert load_or_create_key(path) == keys[0]
    assert list(path.parent.iterdir()) == [path]  # no temporary files left behind
    a, b = VariantHasher(keys[0]), VariantHasher(b"x" * 32)
    assert a("t", "kokoro", "af_heart") != b("t", "kokoro", "af_heart")
    assert a("ab", "c", "v") != a("a", "bc", "v")


def test_a_truncated_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("short\n")
    with pytest.raises(ValueError, match="too short"):
        load_or_create_key(path)
