"""The dashboard in a real headless browser (Debian's Chromium over the DevTools protocol).

One run of the daemon goes through three states and the page, loaded once, follows it on its own:
a clean run (delta 0, green), then one user's events dead-lettered (delta 1, amber), then
another's (delta 2, red with ``delta_red = 2``). At each step the page must show the delta in the
right colour and the batch chart must hold every batch the run logged; the page must never report
an error. The amber state is photographed (into docs/dashboard.png with TTS_UPDATE_SCREENSHOT=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from daemon.runtime.daemon import Daemon, open_daemon
from daemon.testing.client import WsClient
from daemon.testing.config import make_config
from daemon.testing.stores import add_user, pg_val
from daemon.testing.waiting import wait_until
from tests.cdp import Page, launch
from tests.ops_support import BillingGate, events_of

# The picture in docs/ is refreshed only on request (TTS_UPDATE_SCREENSHOT=1), so a test run
# does not rewrite a tracked file; otherwise it goes to the test's temporary directory.
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
COLOURS = {"green": "rgb(46, 125, 50)", "amber": "rgb(242, 169, 0)", "red": "rgb(198, 40, 40)"}
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.",
    "A journey of a thousand miles begins with a single step.",
    "All that glitters is not gold.",
    "The early bird catches the worm, but the second mouse gets the cheese.",
    "Fortune favours the bold.",
]


async def _synthesize(d: Daemon, token: str, doc: str, texts: list[str]) -> None:
    assert d.addresses is not None
    async with WsClient.connect(d.addresses.ws_url, token) as client:
        await client.synthesize(doc, texts)
        await client.until(lambda _: len(client.terminal(doc)) == len(texts))


async def _dead_letter_one(d: Daemon, gate: BillingGate, pg_url: str, name: str) -> str:
    """Synthesize one block for a new user whose subscription is gone by the time billing runs:
    the event is dead-lettered, neither billed nor waiting. Returns its job id."""
    user_id, token = await add_user(pg_url, name, "plus")
    gate.close()
    await _synthesize(d, token, f"doc-{name}", [f"{name} reads one last sentence."])
    await wait_until(lambda: gate.holding, what="billing to hold the batch")
    await pg_val(pg_url, "DELETE FROM subscriptions WHERE user_id = $1 RETURNING 1", user_id)
    gate.open()

    def logged() -> list[dict]:
        path = d.cfg.events_path
        return [e for e in events_of(path, "synthesis_complete") if e.user_id == user_id]

    (event,) = await wait_until(logged, what=f"{name}'s synthesis in the log")
    return event.job_id


async def _page_state(page: Page) -> dict:
    return await page.evaluate(
        """(() => {
            const d = window.dashboard;
            const tile = document.getElementById('recon-tile');
            const batches = d.charts.batches;
            return {
                updates: d.updates,
                delta: document.getElementById('recon-delta').textContent,
                grade: tile.dataset.grade,
                background: getComputedStyle(tile).backgroundColor,
                missing: [...document.querySelectorAll('#recon-missing li')]
                    .map(li => li.textContent),
                batchPoints: batches ? batches.data[0].length : -1,
                batchSizes: batches ? batches.data[2] : [],
                canvas: document.querySelectorAll('#chart-batches canvas').length,
                canvasWidth: (document.querySelector('#chart-batches canvas') || {}).width || 0,
                batchP50: document.getElementById('batch-p50').textContent,
                billed: document.getElementById('billed').textContent,
                finalizeP50: document.getElementById('finalize-p50').textContent,
                services: document.querySelectorAll('#services-body tr').length,
            };
        })()"""
    )


async def _wait_for_page(page: Page, what: str, check) -> dict:  # type: ignore[no-untyped-def]
    async def ready() -> dict | None:
        state = await _page_state(page)
        return state if check(state) else None

    return await wait_until(ready, timeout_s=30, interval_s=0.2, what=what)


async def test_dashboard_shows_the_billing_section_live_in_a_real_browser(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    screenshot = (
        DOCS_SCREENSHOT
        if os.environ.get("TTS_UPDATE_SCREENSHOT") == "1"
        else tmp_path / "dashboard.png"
    )
    cfg = make_config(
        tmp_path,
        monitor={"sample_s": 0.25, "interval_s": 0.4, "delta_amber": 1, "delta_red": 2},
        workers={"simulated": 2, "latency_ms": 30.0, "jitter_ms": 20.0},
    )
    gate = BillingGate()
    async with (
        open_daemon(cfg, redis_url, pg_url, billing_fault=gate) as d,
        launch(tmp_path / "chromium") as page,
    ):
        assert d.addresses is not None
        _, alice = await add_user(pg_url, "alice", "plus")
        for i in range(4):
            await _synthesize(d, alice, f"doc-{i}", [f"{s} ({i})" for s in SENTENCES])
        await wait_until(
            lambda: (
                d.stats.billed_events == 24
                and d.stats.reconciliation.delta == 0
                and not d.stats.pending
            ),
            what="alice's 24 events billed and reconciled",
        )
        await page.navigate(d.addresses.ops_url + "/dashboard")
        batches = len(events_of(cfg.events_path, "billing_processed"))
        green = await _wait_for_page(
            page, "a green delta", lambda s: s["delta"] == "0" and s["batchPoints"] == batches
        )
        assert green["grade"] == "green" and green["background"] == COLOURS["green"]
        assert sum(green["batchSizes"]) == 24  # every event of the run, in the chart's bars
        assert green["canvas"] >= 1 and green["canvasWidth"] > 300
        assert green["batchP50"].endswith("ms") and green["finalizeP50"].endswith("ms")
        assert green["billed"] == "24" and green["missing"] == []
        assert green["services"] >= 5

        bob_job = await _dead_letter_one(d, gate, pg_url, "bob")
        amber = await _wait_for_page(page, "an amber delta", lambda s: s["delta"] == "1")
        assert amber["grade"] == "amber" and amber["background"] == COLOURS["amber"]
        (line,) = amber["missing"]
        assert line.startswith(bob_job) and "dead-lettered" in line
        await trio.sleep(0.5)  # let the charts draw the last poll before the picture
        await page.screenshot(screenshot)

        carol_job = await _dead_letter_one(d, gate, pg_url, "carol")
        red = await _wait_for_page(page, "a red delta", lambda s: s["delta"] == "2")
        assert red["grade"] == "red" and red["background"] == COLOURS["red"]
        assert {m.split(" ")[0] for m in red["missing"]} == {bob_job, carol_job}
        assert red["batchPoints"] == len(events_of(cfg.events_path, "billing_processed"))
        assert page.errors() == []
    assert screenshot.stat().st_size > 10_000
