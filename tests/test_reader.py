"""The reader page (``GET /reader``) used as a person would, in a real headless Chromium.

The page is loaded from the daemon, a token and a text are typed in, and "Read aloud" is clicked
(a real mouse click over the DevTools protocol, so the browser lets the page play audio). Every
block must reach ``cached``; the page's audio element must load each block's WAV, which the
browser decodes to the duration the daemon served; blocks play in order; a click on a later block
sends ``cursor_moved`` and the reading goes on from there. Once with the simulated engine, once
with eSpeak NG (real speech). The routes themselves are checked over plain HTTP too.
"""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.runtime.daemon import Daemon, open_daemon
from daemon.testing.config import make_config
from daemon.testing.stores import add_user
from daemon.testing.waiting import wait_until
from tests.cdp import Page, launch

pytestmark = pytest.mark.timeout(180)

TEXT = """The reader splits a text into sentences. Each one is a block!

Blocks are asked for ahead of the one playing; each plays as soon as it is cached.
Does a click on a later block read from there? It should. That is all."""
SENTENCES = [
    "The reader splits a text into sentences.",
    "Each one is a block!",
    "Blocks are asked for ahead of the one playing; each plays as soon as it is cached.",
    "Does a click on a later block read from there?",
    "It should.",
    "That is all.",
]


async def _state(page: Page) -> dict[str, Any]:
    return await page.evaluate(
        """(() => {
            const r = window.reader, p = document.getElementById('player');
            return {
                ready: !!(r && r.ready),
                blocks: r ? r.blocks.map(b => ({idx: b.idx, text: b.text, status: b.status,
                                                url: b.url, shown: b.el.dataset.status})) : [],
                position: r ? r.position : -1,
                played: r ? r.played : [],
                loaded: r ? r.loaded : [],
                sent: r ? r.sent : [],
                received: r ? r.received : [],
                src: p.currentSrc,
                readyState: p.readyState,
                duration: p.duration,
                paused: p.paused,
                message: document.getElementById('message').textContent,
            };
        })()"""
    )


async def _until(page: Page, what: str, check: Any, timeout_s: float = 60) -> dict[str, Any]:
    async def ready() -> dict[str, Any] | None:
        state = await _state(page)
        return state if check(state) else None

    return await wait_until(ready, timeout_s=timeout_s, interval_s=0.1, what=what)


async def _click(page: Page, selector: str) -> None:
    """A real mouse click (a user gesture: the page may then play audio)."""
    x, y = await page.evaluate(
        f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            el.scrollIntoView({{block: 'center'}});
            const r = el.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()"""
    )
    for kind in ("mousePressed", "mouseReleased"):
        await page.send(
            "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
        )


def _served_seconds(audio: bytes) -> float:
    with wave.open(io.BytesIO(audio)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return w.getnframes() / w.getframerate()


async def _decoded_seconds(page: Page, url: str) -> float:
    """What the browser's own decoder makes of the audio at ``url``."""
    return await page.evaluate(
        f"""(async () => {{
            const data = await (await fetch({json.dumps(url)})).arrayBuffer();
            const ctx = new OfflineAudioContext(1, 1, 22050);
            const buffer = await ctx.decodeAudioData(data);
            return buffer.duration;
        }})()"""
    )


@pytest.mark.parametrize("engine", ["simulated", "espeak"])
async def test_a_person_pastes_a_text_and_hears_it_read_in_order(
    tmp_path: Path, redis_url: str, pg_url: str, engine: str
) -> None:
    workers: dict[str, Any] = {"simulated": 2, "engine": engine}
    if engine == "simulated":
        workers["speech_chars_per_s"] = 30.0  # short blocks: the test hears several play
    cfg = make_config(tmp_path, workers=workers)
    async with open_daemon(cfg, redis_url, pg_url) as d, launch(tmp_path / "chromium") as page:
        assert d.addresses is not None
        _, token = await add_user(pg_url, "reader", "plus")
        await page.navigate(d.addresses.http_url + "/reader")
        await _until(page, "the page to load its configuration", lambda s: s["ready"])
        await page.evaluate(
            f"""(() => {{
                document.getElementById('token').value = {json.dumps(token)};
                document.getElementById('text').value = {json.dumps(TEXT)};
            }})()"""
        )
        await _click(page, "#read")

        # Every block reaches `cached`, and the page shows it.
        done = await _until(
            page,
            "every block cached",
            lambda s: (
                len(s["blocks"]) == len(SENTENCES)
                and all(b["status"] == "cached" and b["shown"] == "cached" for b in s["blocks"])
            ),
        )
        assert [b["text"] for b in done["blocks"]] == SENTENCES
        requested = [f for f in done["sent"] if f["type"] == "synthesize"]
        assert {b["idx"] for f in requested for b in f["blocks"]} == set(range(len(SENTENCES)))

        # The audio element loads the blocks, first the first: WAVs the browser decodes, each as
        # long as the daemon served it.
        loaded = await _until(page, "a block loaded in the player", lambda s: s["loaded"])
        assert loaded["loaded"][0]["idx"] == 0
        async with httpx.AsyncClient(base_url=d.addresses.http_url) as http:
            served = {}
            for b in done["blocks"]:
                response = await http.get(b["url"])
                assert response.status_code == 200
                assert response.headers["content-type"] == "audio/wav"
                served[b["idx"]] = _served_seconds(response.content)
        for entry in loaded["loaded"]:
            assert entry["duration"] == pytest.approx(served[entry["idx"]], abs=0.02)
        for idx, seconds in served.items():
            url = done["blocks"][idx]["url"]
            assert await _decoded_seconds(page, url) == pytest.approx(seconds, abs=0.02)
            if engine == "simulated":
                expected = max(0.2, len(SENTENCES[idx]) / 30.0)  # docs/workers.md
                assert seconds == pytest.approx(expected, abs=0.01)

        # Blocks play in order, one after the other.
        await _until(page, "two blocks played", lambda s: len(s["played"]) >= 2, timeout_s=90)

        # A click on a later block: `cursor_moved`, then the reading goes on from there.
        await _click(page, '#blocks li[data-idx="4"]')
        seeked = await _until(
            page, "the player on block 4", lambda s: 4 in [e["idx"] for e in s["loaded"]]
        )
        moves = [f for f in seeked["sent"] if f["type"] == "cursor_moved"]
        assert moves and moves[-1]["block_idx"] == 4
        assert moves[-1]["document_id"] == requested[0]["document_id"]
        await _until(page, "an `evicted` reply", lambda s: _has(s, "evicted"))
        final = await _until(
            page, "the rest read", lambda s: 5 in s["played"] and s["message"] == "Done.",
            timeout_s=90,
        )  # fmt: skip
        loaded_idx = [e["idx"] for e in final["loaded"]]
        assert set(final["played"]) <= set(loaded_idx) and loaded_idx[-2:] == [4, 5]
        for entry in final["loaded"]:
            assert entry["duration"] == pytest.approx(served[entry["idx"]], abs=0.02)
        after_seek = final["played"][final["played"].index(4) :]
        assert after_seek == [4, 5]
        assert final["played"][:2] == [0, 1]
        assert page.errors() == []


def _has(state: dict[str, Any], frame_type: str) -> bool:
    return any(f.get("type") == frame_type for f in state["received"])


async def test_the_reader_routes_serve_the_page_its_files_and_its_configuration(
    daemon: Daemon,
) -> None:
    assert daemon.addresses is not None
    async with httpx.AsyncClient(base_url=daemon.addresses.http_url) as http:
        page = await http.get("/reader")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "connect-src 'self' ws: wss:" in csp
        assert '<script src="/reader/static/reader.js"' in page.text
        for name, kind in (("reader.js", "text/javascript"), ("reader.css", "text/css")):
            response = await http.get(f"/reader/static/{name}")
            assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        # Only the reader's own files: nothing else of the package is reachable this way.
        for other in ("dashboard.js", "..%2Freader.py", "VENDOR.md"):
            assert (await http.get(f"/reader/static/{other}")).status_code == 404
        config = (await http.get("/reader/config")).json()
    assert config["ws_port"] == daemon.addresses.ws_port and config["ws_path"] == "/v1/ws"
    assert config["tls"] is False
    assert config["models"]["kokoro"]["default_voice"] == "af_heart"
    assert "af_heart" in config["models"]["kokoro"]["voices"]
    assert config["models"]["premium"]["default_voice"] == "ava"
    assert config["limits"] == {"max_text": 2000, "max_blocks": 64}
