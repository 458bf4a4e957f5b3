"""Pure parts of the gateway: the rate bucket, notification routing, the HMAC key file."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.gateway.connection import Connection
from daemon.gateway.protocol import ProtocolError, Synthesize, parse_frame
from daemon.gateway.ratelimit import RateLimiter
from daemon.hashing import VariantHasher, load_or_create_key


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


def _conn(queue_size: int = 8) -> Connection:
    return Connection(1, ws=None, queue_size=queue_size)  # type: ignore[arg-type]


def _sent(conn: Connection) -> list[str]:
    out = []
    while True:
        try:
            out.append(conn._receive.receive_nowait())
        except trio.WouldBlock:
            return out


def test_routing_delivers_only_waited_blocks_and_one_terminal_each() -> None:
    conn = _conn()
    key = ("doc", 0, "h0")
    conn.notify(key, "processing", "not waited for")
    conn.pending[key] = ("kokoro", "af_heart")
    conn.notify(key, "processing", "p")
    conn.notify(key, "cached", "c")
    conn.notify(key, "cached", "c again")  # a second terminal (resync and pub/sub both)
    conn.notify(("doc", 0, "other-variant"), "cached", "another variant of block 0")
    assert _sent(conn) == ["p", "c"]
    assert conn.pending == {}


def test_held_notifications_follow_the_replies_and_the_waits_at_release() -> None:
    conn = _conn()
    kept, dropped = ("doc", 1, "h1"), ("doc", 2, "h2")
    conn.pending[kept] = conn.pending[dropped] = ("kokoro", "af_heart")
    conn.hold()
    conn.notify(kept, "cached", "cached 1")
    conn.notify(dropped, "cached", "cached 2")
    conn.push("queued 1")  # the request's own replies are not held
    conn.push("queued 2")
    del conn.pending[dropped]  # e.g. the request failed: nothing may follow for it
    conn.release()
    assert _sent(conn) == ["queued 1", "queued 2", "cached 1"]


def test_a_full_queue_closes_the_connection_as_too_slow() -> None:
    conn = _conn(queue_size=2)
    for text in ("a", "b", "c"):
        conn.push(text)
    assert conn.close_code == 1013
    assert conn.scope.cancel_called


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
