"""Frame ordering and routing on one connection, without a network: the queue, its hold, and
which notifications a connection takes."""

from __future__ import annotations

import trio

from daemon.gateway.connection import Connection


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


def test_a_request_reply_precedes_notifications_that_arrive_while_it_is_produced() -> None:
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
