"""Frame ordering on one connection, without a network: the queue and its hold."""

from __future__ import annotations

from daemon.gateway.connection import Connection


def _drain(conn: Connection) -> list[str]:
    frames = []
    while True:
        try:
            frames.append(conn._receive.receive_nowait())
        except Exception:
            return frames


def test_a_request_reply_precedes_notifications_that_arrive_while_it_is_produced() -> None:
    conn = Connection(user_id=1, ws=None, queue_size=16)  # type: ignore[arg-type]
    conn.hold()
    conn.notify("processing")  # published by a worker's pull while the request was in Redis
    conn.push("queued")  # the request's own reply
    conn.release()
    conn.notify("cached")
    assert _drain(conn) == ["queued", "processing", "cached"]


def test_a_full_queue_closes_the_connection_as_too_slow() -> None:
    conn = Connection(user_id=1, ws=None, queue_size=2)  # type: ignore[arg-type]
    for text in ("a", "b", "c"):
        conn.push(text)
    assert conn.close_code == 1013
    assert conn.scope.cancel_called
