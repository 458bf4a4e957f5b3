"""Thousands of arbitrary and near-valid frames against a live gateway (property-based).

The daemon runs once, in a thread of its own (its own Trio run, real Redis and Postgres), for the
whole test; each Hypothesis example is a client in a fresh ``trio.run`` that opens a connection
and sends a list of frames. (pytest-trio would set async fixtures up again for every example —
a daemon per example — so the daemon is not an async fixture here.)

For every frame the answer is predicted by an oracle: the frame's size against
``max_message_bytes`` (→ close 1009), the pure validator the gateway itself uses, and the model
catalog. The client then reads exactly the predicted number of frames and checks each is well
formed and says what was predicted; a near-valid frame (one field broken) must be refused with a
message naming that field. A sentinel after each example proves nothing extra was sent, and a
valid request proves the connection still works. At the end the daemon is healthy, no service
was restarted, and a full round trip (queued → processing → cached, audio fetched) still works.

Workers are off (``workers.simulated = 0``), so no status arrives on its own: every frame on the
wire is an answer to something the example sent.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from daemon.config import Config
from daemon.gateway.protocol import (
    MAX_BLOCK_IDX,
    MAX_BLOCKS,
    MAX_DOCUMENT_ID,
    MAX_TEXT,
    CursorMoved,
    ProtocolError,
    parse_frame,
)
from daemon.runtime.daemon import Daemon, open_daemon
from daemon.testing.client import WsClient
from daemon.testing.config import make_config
from daemon.testing.stores import setup_database
from daemon.testing.worker import ManualWorker

MAX_BYTES = 4096
MODELS = {"kokoro": "af_heart", "premium": "ava"}  # model → default voice (seeded)
VOICES = {
    "kokoro": [
        "af_heart",
        "af_bella",
        "af_nicole",
        "am_adam",
        "am_michael",
        "bf_emma",
        "bm_george",
    ],
    "premium": ["ava", "andrew", "emma", "brian"],
}
STATUS_FIELDS = {"type", "document_id", "block_idx", "status", "model", "voice"}
ERROR_CODES = {"bad_request", "unknown_model", "unknown_voice", "rate_limited", "internal"}

# -- the daemon, in a thread -------------------------------------------------------------------


@attrs.define
class DaemonThread:
    cfg: Config
    redis_url: str
    pg_url: str
    daemon: Daemon | None = None
    error: BaseException | None = None
    _token: trio.lowlevel.TrioToken | None = None
    _stop: trio.Event | None = None
    _started: threading.Event = attrs.Factory(threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Daemon:
        self._thread = threading.Thread(target=self._run, name="fuzz-daemon", daemon=True)
        self._thread.start()
        if not self._started.wait(60) or self.daemon is None:
            raise RuntimeError(f"the daemon did not start: {self.error!r}")
        return self.daemon

    def _run(self) -> None:
        async def main() -> None:
            self._stop = trio.Event()
            async with open_daemon(self.cfg, self.redis_url, self.pg_url) as d:
                self.daemon = d
                self._token = trio.lowlevel.current_trio_token()
                self._started.set()
                await self._stop.wait()

        try:
            trio.run(main)
        except BaseException as exc:
            self.error = exc
            self._started.set()

    def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        assert self._thread is not None
        self._thread.join(30)
        assert not self._thread.is_alive(), "the daemon did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def fuzz_daemon(tmp_path: Path, redis_url: str, pg_url: str) -> Any:
    cfg = make_config(
        tmp_path,
        gateway={"max_message_bytes": MAX_BYTES, "rate_limit_blocks_per_min": 1_000_000},
        workers={"simulated": 0},
    )
    runner = DaemonThread(cfg, redis_url, pg_url)
    daemon = runner.start()
    try:
        yield daemon
    finally:
        runner.stop()


def add_user_sync(pg_url: str, name: str, plan: str) -> str:
    return setup_database(pg_url, [name], plan, migrate=False)[0][1]


# -- frames ------------------------------------------------------------------------------------

ANY_CHAR = st.characters(exclude_categories=())  # surrogates too: they travel as JSON escapes
TEXT_CHAR = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
IDENT_CHAR = st.characters(exclude_categories=("Cs", "Cc"))
ident = st.text(IDENT_CHAR, min_size=1, max_size=24)


@st.composite
def valid_synthesize(draw: st.DrawFn) -> dict[str, Any]:
    model = draw(st.sampled_from(sorted(MODELS)))
    idxs = draw(st.lists(st.integers(0, MAX_BLOCK_IDX), min_size=1, max_size=8, unique=True))
    frame: dict[str, Any] = {
        "type": "synthesize",
        "document_id": draw(ident),
        "model": model,
        "blocks": [
            {"idx": i, "text": draw(st.text(TEXT_CHAR, min_size=1, max_size=40))} for i in idxs
        ],
    }
    voice = draw(st.none() | st.sampled_from(VOICES[model]))
    if voice is not None or draw(st.booleans()):
        frame["voice"] = voice
    return frame


valid_cursor = st.fixed_dictionaries(
    {
        "type": st.just("cursor_moved"),
        "document_id": ident,
        "block_idx": st.integers(0, MAX_BLOCK_IDX),
    }
)

lone_surrogate = st.text(ANY_CHAR, max_size=4).map(lambda s: s + "\udc80")
not_a_string = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.lists(st.integers(), max_size=2)
)
not_an_int = st.none() | st.booleans() | st.floats() | st.text(max_size=3) | st.just([1])

BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "type": st.sampled_from(["", "synthesise", "SYNTHESIZE", "cursor-moved"]) | not_a_string,
    "document_id": st.sampled_from(["", "d" * (MAX_DOCUMENT_ID + 1), "a\x00b", "a\nb", "\x9f"])
    | not_a_string
    | lone_surrogate,
    "model": st.sampled_from(["", "nope", "Kokoro", "m" * 65, "kokoro\t"]) | not_a_string,
    "voice": st.sampled_from(["", "ghost", "AVA", "af_heart\x01"])
    | st.booleans()
    | st.integers()
    | lone_surrogate,
    "blocks": st.sampled_from([[], {}, "blocks", None])
    | st.just([{"idx": i, "text": "x"} for i in range(MAX_BLOCKS + 1)]),
    "block": st.sampled_from(["text", 3, None, [], True]),
    "idx": st.sampled_from([-1, MAX_BLOCK_IDX + 1, "1", 1.5, True, None, 10**30]),
    "text": st.sampled_from(["", "a" * (MAX_TEXT + 1), "a\x00b", 5, None, ["a"]]) | lone_surrogate,
    "block_idx": st.sampled_from([-1, MAX_BLOCK_IDX + 1, "3", None, 2.0, False]),
}


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid frame with exactly one field broken (changed or removed); and that field's path."""
    if draw(st.booleans()):
        frame = draw(valid_cursor)
        field = draw(st.sampled_from(["type", "document_id", "block_idx"]))
        if field != "type" and draw(st.booleans()):
            del frame[field]
        else:
            frame[field] = draw(BAD_VALUES[field])
        return frame, field
    frame = draw(valid_synthesize())
    blocks = frame["blocks"]
    choice = draw(
        st.sampled_from(["type", "document_id", "model", "voice", "blocks", "block", "idx", "text"])
    )
    if choice in ("block", "idx", "text"):
        i = draw(st.integers(0, len(blocks) - 1))
        path = f"blocks[{i}]" if choice == "block" else f"blocks[{i}].{choice}"
        if choice == "block":
            blocks[i] = draw(BAD_VALUES["block"])
        elif choice == "idx" and i > 0 and draw(st.booleans()):
            blocks[i]["idx"] = blocks[0]["idx"]  # a duplicate: named at its second place
        elif draw(st.booleans()):
            del blocks[i][choice]
        else:
            blocks[i][choice] = draw(BAD_VALUES[choice])
        return frame, path
    if choice in ("document_id", "model", "blocks") and draw(st.booleans()):
        del frame[choice]
    else:
        frame[choice] = draw(BAD_VALUES[choice])
    return frame, choice


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(ANY_CHAR, max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(ANY_CHAR, max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def encode(frame: Any, ascii_only: bool) -> str:
    text = json.dumps(frame, ensure_ascii=ascii_only)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only an escape can carry it
        text = json.dumps(frame, ensure_ascii=True)
    return text


@st.composite
def wire_frame(draw: st.DrawFn) -> tuple[str | bytes, str | None]:
    """(what goes on the wire, the field a near-valid frame broke or None)."""
    kind = draw(
        st.sampled_from(
            ["near"] * 6
            + ["valid", "valid", "cursor", "json", "json", "text", "binary", "deep"]
            + ["size"]
        )
    )
    ascii_only = draw(st.booleans())
    if kind == "near":
        frame, field = draw(near_valid())
        return encode(frame, ascii_only), field
    if kind == "valid":
        return encode(draw(valid_synthesize()), ascii_only), None
    if kind == "cursor":
        return encode(draw(valid_cursor), ascii_only), None
    if kind == "json":
        return encode(draw(json_values), ascii_only), None
    if kind == "text":
        return draw(st.text(TEXT_CHAR | st.just("\x00"), max_size=300)), None
    if kind == "binary":
        return draw(st.binary(max_size=300)), None
    if kind == "deep":
        depth = draw(st.integers(2, 40) | st.integers(900, 2000))  # the limit is 16
        if draw(st.booleans()):
            return "[" * depth + "]" * depth, None
        return '{"type":' * depth + "1" + "}" * depth, None
    # near the size limit, in one- or three-byte characters
    size = draw(st.integers(MAX_BYTES - 40, MAX_BYTES + 40))
    char = draw(st.sampled_from(["a", "€"]))
    prefix = '{"type":"synthesize","document_id":"big","model":"kokoro","blocks":[{"idx":0,"text":"'
    budget = size - len(prefix.encode()) - len('"}]}')
    text = char * max(1, budget // len(char.encode()))
    return prefix + text + '"}]}', None


# -- the oracle --------------------------------------------------------------------------------


@attrs.frozen
class Expect:
    kind: str  # too_big | error | evicted | statuses
    code: str = ""
    message: str = ""
    document_id: str = ""
    blocks: tuple[int, ...] = ()
    model: str = ""
    voice: str = ""


def expect(wire: str | bytes) -> Expect:
    size = len(wire) if isinstance(wire, bytes) else len(wire.encode("utf-8"))
    if size > MAX_BYTES:
        return Expect("too_big")
    try:
        req = parse_frame(wire)
    except ProtocolError as exc:
        return Expect("error", exc.code, exc.message)
    if isinstance(req, CursorMoved):
        return Expect("evicted", document_id=req.document_id)
    if req.model not in MODELS:
        return Expect("error", "unknown_model", "model:")
    voice = req.voice or MODELS[req.model]
    if voice not in VOICES[req.model]:
        return Expect("error", "unknown_voice", "voice:")
    return Expect(
        "statuses",
        document_id=req.document_id,
        blocks=tuple(b.idx for b in req.blocks),
        model=req.model,
        voice=voice,
    )


def check_well_formed(frame: Any) -> None:
    assert isinstance(frame, dict), frame
    kind = frame.get("type")
    if kind == "status":
        assert set(frame) >= STATUS_FIELDS, frame
        assert isinstance(frame["document_id"], str) and isinstance(frame["block_idx"], int)
        assert frame["status"] in {"queued", "processing", "cached", "skipped", "error"}, frame
        if frame["status"] == "cached":
            assert frame["audio_url"].startswith("/v1/audio/"), frame
        if frame["status"] == "error":
            assert isinstance(frame["error"], str) and isinstance(frame["recoverable"], bool)
        assert not {"conn", "variant_hash"} & set(frame), f"internal fields leaked: {frame}"
    elif kind == "error":
        assert set(frame) == {"type", "code", "message"}, frame
        assert frame["code"] in ERROR_CODES and isinstance(frame["message"], str), frame
        assert frame["message"], frame
    elif kind == "evicted":
        assert set(frame) == {"type", "document_id", "block_idxs"}, frame
        assert frame["block_idxs"] == sorted(frame["block_idxs"]), frame
    else:
        raise AssertionError(f"unknown frame type: {frame}")


async def check_answer(client: WsClient, wire: str | bytes, field: str | None) -> None:
    want = expect(wire)
    if want.kind == "statuses":
        got = [await client.receive(10) for _ in want.blocks]
        for frame in got:
            check_well_formed(frame)
        assert [f["type"] for f in got] == ["status"] * len(want.blocks), got
        assert [f["block_idx"] for f in got] == list(want.blocks), got
        assert {f["document_id"] for f in got} == {want.document_id}
        assert {(f["model"], f["voice"]) for f in got} == {(want.model, want.voice)}
        assert {f["status"] for f in got} <= {"queued", "cached"}, got
        return
    frame = await client.receive(10)
    check_well_formed(frame)
    if want.kind == "evicted":
        assert frame["type"] == "evicted" and frame["document_id"] == want.document_id, frame
        return
    assert frame["type"] == "error" and frame["code"] == want.code, (wire, frame)
    assert frame["message"].startswith(want.message), (frame, want)
    if field is not None:  # a near-valid frame: the message names the broken field
        assert frame["message"].startswith(f"{field}:"), (field, frame)


# -- the property ------------------------------------------------------------------------------


async def one_example(
    url: str, token: str, frames: list[tuple[str | bytes, str | None]], rude: bool
) -> int:
    """Send the frames, checking each answer; a frame over the limit closes the connection with
    1009, and the rest go on a new one. Ends with a sentinel (nothing unexpected is pending) or,
    when ``rude``, by vanishing without a close frame."""
    remaining = list(frames)
    while True:
        async with WsClient.connect(url, token) as client:
            while remaining:
                wire, field = remaining.pop(0)
                await client.ws.send_message(wire)
                if expect(wire).kind == "too_big":
                    with pytest.raises(ConnectionClosed) as closed:
                        await client.receive(10)
                    assert closed.value.reason.code == 1009
                    break
                await check_answer(client, wire, field)
            else:
                if rude:
                    await client.ws._stream.aclose()
                    return len(frames)
                sentinel = {"type": "cursor_moved", "document_id": "sentinel", "block_idx": 0}
                await client.send(sentinel)
                assert await client.receive(10) == {
                    "type": "evicted",
                    "document_id": "sentinel",
                    "block_idxs": [],
                }
                return len(frames)


async def round_trip(url: str, http_url: str, ops_url: str, token: str, redis_url: str) -> None:
    worker = ManualWorker(redis_url)
    async with WsClient.connect(url, token) as client:
        await client.synthesize("final", ["After all that, a real request."])
        assert (await client.receive())["status"] == "queued"
        job = await worker.pull_wait()
        await worker.finish(job)
        await client.until(lambda _: 0 in client.terminal("final"))
    assert client.statuses("final")[0] == ["queued", "processing", "cached"]
    async with httpx.AsyncClient(base_url=http_url) as http:
        audio = await http.get(client.terminal("final")[0]["audio_url"])
    async with httpx.AsyncClient(base_url=ops_url) as http:
        health = await http.get("/healthz")
    assert audio.status_code == 200
    assert health.status_code == 200
    services = health.json()["services"]
    assert {name: s["restarts"] for name, s in services.items()} == dict.fromkeys(services, 0)


def test_arbitrary_and_near_valid_frames_never_break_the_gateway(
    fuzz_daemon: Daemon, redis_url: str, pg_url: str
) -> None:
    token = add_user_sync(pg_url, "fuzzer", "unlimited")
    assert fuzz_daemon.addresses is not None
    url, http_url = fuzz_daemon.addresses.ws_url, fuzz_daemon.addresses.http_url
    total = {"frames": 0, "examples": 0}

    @settings(
        max_examples=110,
        phases=[Phase.explicit, Phase.generate],
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(frames=st.lists(wire_frame(), min_size=14, max_size=30), rude=st.booleans())
    def example(frames: list[tuple[str | bytes, str | None]], rude: bool) -> None:
        total["frames"] += trio.run(one_example, url, token, frames, rude)
        total["examples"] += 1

    example()
    trio.run(round_trip, url, http_url, fuzz_daemon.addresses.ops_url, token, redis_url)
    # Enough work done: at least 110 connections and 1,500 frames. Rude examples stop sending when
    # the gateway closes on them, so how many frames go out depends on timing (1,880–2,400 seen).
    assert total["examples"] >= 110 and total["frames"] >= 1500, total
    assert fuzz_daemon.supervisor.states["gateway"].restarts == 0
