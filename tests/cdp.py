"""A headless Chromium driven over the Chrome DevTools Protocol, for the dashboard's tests.

Debian's ``chromium`` (``.ci/run`` installs it when missing), started with a fresh profile and
``--remote-debugging-port=0``; the port it picked is read from ``DevToolsActivePort`` in the
profile, and the page is driven over its WebSocket with trio-websocket. Console errors, uncaught
exceptions and log entries of level ``error`` are collected as they arrive.

If no Chromium is found: under CI (``CI=true``, as ``.ci/run`` runs) the tests fail loudly unless
``TTS_SKIP_BROWSER_TESTS=1`` says to skip; elsewhere they skip, saying why.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

__all__ = ["Page", "find_chromium", "launch"]

SKIP_ENV = "TTS_SKIP_BROWSER_TESTS"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
]


class CdpError(RuntimeError):
    pass


def find_chromium() -> str:
    """The Chromium to drive: ``$TTS_CHROMIUM``, else ``chromium`` on PATH. Fails the test when
    there is none, unless ``TTS_SKIP_BROWSER_TESTS=1`` (then it skips, saying so)."""
    for candidate in (os.environ.get("TTS_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"no Chromium, and {SKIP_ENV}=1: browser test skipped on request")
    if os.environ.get("CI", "").lower() not in ("true", "1"):
        # A newcomer's `make test` needs only Python and a C compiler; CI (.ci/run) installs
        # Chromium, and there a missing browser is a failure, not a skip.
        pytest.skip("no Chromium: install Debian's chromium to run the dashboard browser test")
    pytest.fail(
        "no Chromium found: the dashboard is tested in a real headless browser. Install Debian's"
        " chromium (`apt-get install -y chromium`; .ci/run does it), point TTS_CHROMIUM at one,"
        f" or set {SKIP_ENV}=1 to skip this test explicitly."
    )


class Page:
    """One page target: commands with replies, and the events the browser sends."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._next_id = 0
        self._replies: dict[int, list[Any]] = {}
        self.events: list[dict[str, Any]] = []

    async def reader(self) -> None:
        while True:
            message = json.loads(await self.ws.get_message())
            if "id" in message:
                slot = self._replies.get(message["id"])
                if slot is not None:
                    slot[1] = message
                    slot[0].set()
            else:
                self.events.append(message)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        slot: list[Any] = [trio.Event(), None]
        self._replies[self._next_id] = slot
        await self.ws.send_message(
            json.dumps({"id": self._next_id, "method": method, "params": params})
        )
        with trio.fail_after(30):
            await slot[0].wait()
        del self._replies[self._next_id]
        reply = slot[1]
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        loaded = len([e for e in self.events if e.get("method") == "Page.loadEventFired"])
        await self.send("Page.navigate", url=url)
        with trio.fail_after(30):
            while (
                len([e for e in self.events if e.get("method") == "Page.loadEventFired"]) <= loaded
            ):
                await trio.sleep(0.05)

    def errors(self) -> list[str]:
        """Everything the page reported as an error: console.error, uncaught exceptions,
        failed loads and CSP violations (Log entries of level error)."""
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                out.append(f"exception: {details.get('exception', {}).get('description', details)}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = [a.get("value", a.get("description")) for a in params.get("args", [])]
                out.append(f"console.{params['type']}: {args}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                out.append(f"log: {entry.get('text')} {entry.get('url', '')}")
        return out

    async def screenshot(self, path: Path) -> None:
        """A PNG of the whole page (beyond the viewport)."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = await self.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )
        path.write_bytes(base64.b64decode(shot["data"]))


@contextlib.asynccontextmanager
async def launch(profile: Path, *, width: int = 1280, height: int = 1000) -> AsyncIterator[Page]:
    """Start Chromium with a fresh profile under ``profile``; yield its page, stop it after."""
    exe = find_chromium()
    profile.mkdir(parents=True, exist_ok=True)
    args = [exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
    proc = await trio.lowlevel.open_process(
        [*args, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        port = await _devtools_port(profile, proc)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            with trio.fail_after(20):
                while True:
                    targets = (await http.get("/json/list")).json()
                    pages = [t for t in targets if t.get("type") == "page"]
                    if pages:
                        break
                    await trio.sleep(0.1)
        async with (
            open_websocket_url(pages[0]["webSocketDebuggerUrl"], max_message_size=64 << 20) as ws,
            trio.open_nursery() as nursery,
        ):
            page = Page(ws)
            nursery.start_soon(page.reader)
            for domain in ("Page", "Runtime", "Log"):
                await page.send(f"{domain}.enable")
            yield page
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _devtools_port(profile: Path, proc: trio.Process) -> int:
    port_file = profile / "DevToolsActivePort"
    with trio.fail_after(30):
        while True:
            if proc.returncode is not None:
                raise CdpError(f"chromium exited at start with status {proc.returncode}")
            try:
                first = port_file.read_text().splitlines()[0]
                return int(first)
            except (FileNotFoundError, IndexError, ValueError):
                await trio.sleep(0.05)
