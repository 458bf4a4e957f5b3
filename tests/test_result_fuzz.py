"""Hypothesis against the hot path's boundary: arbitrary and near-valid worker results pushed to a
live daemon (docs/workers.md, "What a result must be").

The daemon runs once, in a thread of its own (real Redis and Postgres; no simulated workers), for
the whole test; each example is a fresh ``trio.run`` that asks for a few blocks, pulls their jobs
and answers each with a list of generated results — valid ones, near-valid ones (one field
replaced by any JSON value, NaN and ±Infinity included, or removed), forged payers and lengths,
other jobs' ids, bad base64, odd content types, non-JSON bytes, duplicates — then acts as an
honest worker for whatever comes back to the queue. The invariant:

- the daemon stays healthy (no service restarted);
- every block asked for reaches a terminal status;
- a block that failed can be asked for again and gets audio;
- every ``usage_log`` row is one of the jobs the daemon created, billed to its creator for
  exactly its text.

The number of examples is ``TTS_FUZZ_EXAMPLES`` (default 50, about 300 results: CI);
``tools/fuzz_results.sh`` runs it with thousands of results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from daemon.contracts import Job, Keys
from daemon.testing.client import WsClient
from daemon.testing.config import make_config
from daemon.testing.stores import pg_fetch
from daemon.testing.worker import pull, push, r, result_json
from tests.test_gateway_fuzz import DaemonThread, add_user_sync

pytestmark = pytest.mark.timeout(900)

EXAMPLES = int(os.environ.get("TTS_FUZZ_EXAMPLES", "50"))

FIELDS = [
    "job_id",
    "variant_hash",
    "worker_id",
    "user_id",
    "text_length",
    "usage_multiplier",
    "model",
    "voice",
    "queue_wait_ms",
    "processing_time_ms",
    "audio_base64",
    "duration_ms",
    "content_type",
    "error",
]

json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)

content_types = st.sampled_from(
    ["audio/ogg", "audio/wav", "text/html", "audio/", "AUDIO/OGG", "audio/ogg\r\nX: 1", ""]
) | st.text(max_size=20)


@st.composite
def a_result(draw: st.DrawFn) -> dict[str, Any]:
    """How one result for a job deviates from a valid one."""
    kind = draw(
        st.sampled_from(
            ["valid", "valid", "replace", "replace", "drop", "forge", "garbage", "truncate",
             "b64", "ctype", "big_numbers", "empty_audio", "error", "other_job"]
        )
    )  # fmt: skip
    plan: dict[str, Any] = {"kind": kind}
    if kind == "replace":
        plan["field"] = draw(st.sampled_from(FIELDS))
        plan["value"] = draw(json_value)
    elif kind == "drop":
        plan["field"] = draw(st.sampled_from(FIELDS))
    elif kind == "forge":
        plan["text_length"] = draw(st.integers(min_value=-5, max_value=10**9))
        plan["usage_multiplier"] = draw(st.floats(min_value=0, max_value=1e6))
    elif kind == "garbage":
        plan["raw"] = draw(st.binary(max_size=200))
    elif kind == "truncate":
        plan["at"] = draw(st.integers(min_value=0, max_value=400))
    elif kind == "b64":
        plan["audio_base64"] = draw(
            st.sampled_from(["!!!!", "QUJD", "QUJ", "data:audio/ogg;base64,QUJD", "QU JD", "-_-_"])
            | st.text(max_size=12)
        )
    elif kind == "ctype":
        plan["content_type"] = draw(content_types)
    elif kind == "big_numbers":
        plan["duration_ms"] = draw(
            st.sampled_from([float("nan"), float("inf"), -1, 2**31, 10**20, 1e308, 0.5])
        )
    elif kind == "error":
        plan["error"] = draw(st.text(max_size=50))
    return plan


def render(plan: dict[str, Any], job: Job, other: Job | None, forged_user: int) -> bytes:
    kind = plan["kind"]
    if kind == "garbage":
        return plan["raw"]
    data = json.loads(result_json(job, audio=b"fuzz" + job.job_id.encode()))
    if kind == "replace":
        data[plan["field"]] = plan["value"]
    elif kind == "drop":
        data.pop(plan["field"], None)
    elif kind == "forge":
        data.update(user_id=forged_user, text_length=plan["text_length"])
        data.update(usage_multiplier=plan["usage_multiplier"], model="premium", voice="ava")
    elif kind in ("b64", "ctype", "big_numbers"):
        data.update({k: v for k, v in plan.items() if k != "kind"})
    elif kind == "empty_audio":
        data["audio_base64"] = ""
    elif kind == "error":
        data = json.loads(result_json(job, error=plan["error"]))
    elif kind == "other_job" and other is not None:
        data["job_id"] = other.job_id
    text = json.dumps(data)  # NaN and Infinity as Python writes them
    if kind == "truncate":
        return text.encode()[: plan["at"]]
    return text.encode()


class Ledger:
    """Every job the examples saw, with its creator and text: what usage_log may hold."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[int, str]] = {}
        self.results = 0


async def one_example(
    url: str,
    token: str,
    user_id: int,
    forged_user: int,
    redis_url: str,
    n: int,
    plans: list[list[dict[str, Any]]],
    ledger: Ledger,
) -> None:
    texts = [f"Fuzz example {n} block {i}: {len(plans[i])} results." for i in range(len(plans))]
    async with WsClient.connect(url, token) as client:
        doc = f"fuzz-{n}"
        await client.synthesize(doc, texts)
        jobs = await _pull(redis_url, len(texts), ledger, user_id)
        by_idx = {j.block_idx: j for j in jobs}
        for idx, job_plans in enumerate(plans):
            job = by_idx[idx]
            other = by_idx.get((idx + 1) % len(plans))
            for plan in job_plans:
                await push(redis_url, job, render(plan, job, other, forged_user))
                ledger.results += 1
        # Now an honest worker: whatever comes back to the queue (a job whose results could not
        # be tied to it is requeued once its hold times out) gets a valid result.
        await _answer_until(client, doc, len(texts), redis_url, ledger, user_id)
        failed = [i for i, f in client.terminal(doc).items() if f["status"] == "error"]
        assert all(client.terminal(doc)[i]["recoverable"] for i in failed)
        if failed:
            again = f"again-{n}"
            await client.synthesize(again, {i: texts[i] for i in failed})
            await _answer_until(client, again, len(failed), redis_url, ledger, user_id)
            statuses = {f["status"] for f in client.terminal(again).values()}
            assert statuses == {"cached"}, client.terminal(again)


async def _pull(redis_url: str, n: int, ledger: Ledger, user_id: int) -> list[Job]:
    jobs: list[Job] = []
    with trio.fail_after(30):
        while len(jobs) < n:
            job = await pull(redis_url)
            if job is None:
                await trio.sleep(0.01)
                continue
            jobs.append(job)
            ledger.jobs[job.job_id] = (user_id, job.text)
    return jobs


async def _answer_until(
    client: WsClient, doc: str, n: int, redis_url: str, ledger: Ledger, user_id: int
) -> None:
    with trio.fail_after(60):
        while len(client.terminal(doc)) < n:
            job = await pull(redis_url)
            if job is not None:
                ledger.jobs[job.job_id] = (user_id, job.text)
                await push(redis_url, job, result_json(job))
                ledger.results += 1
            with trio.move_on_after(0.05):
                await client.receive(timeout_s=1)


def test_arbitrary_worker_results_never_break_the_hot_path(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    cfg = make_config(
        tmp_path,
        gateway={"rate_limit_blocks_per_min": 1_000_000},
        workers={"simulated": 0, "visibility_timeout_s": 0.5, "scan_interval_s": 0.1},
    )
    runner = DaemonThread(cfg, redis_url, pg_url)
    daemon = runner.start()
    ledger = Ledger()
    try:
        token = add_user_sync(pg_url, "fuzz-creator", "unlimited")
        add_user_sync(pg_url, "fuzz-other", "plus")
        ids = trio.run(_user_ids, pg_url)
        assert daemon.addresses is not None
        url = daemon.addresses.ws_url
        counter = iter(range(10**9))

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(plans=st.lists(st.lists(a_result(), min_size=1, max_size=3), min_size=1, max_size=4))
        def example(plans: list[list[dict[str, Any]]]) -> None:
            trio.run(
                one_example,
                url,
                token,
                ids["fuzz-creator"],
                ids["fuzz-other"],
                redis_url,
                next(counter),
                plans,
                ledger,
            )

        example()
        trio.run(_check_bills, pg_url, redis_url, ledger)
        # The services results reach never restarted (the monitor or billing may, on a machine
        # too busy for their Postgres deadlines: nothing to do with results).
        states = daemon.supervisor.states
        assert daemon.supervisor.state("hot") == "running"
        assert {n: states[n].restarts for n in ("hot", "gateway", "scanner")} == {
            "hot": 0,
            "gateway": 0,
            "scanner": 0,
        }, {n: st.as_dict() for n, st in states.items()}
    finally:
        runner.stop()
    print(f"fuzz: {EXAMPLES} examples, {ledger.results} results, {len(ledger.jobs)} jobs")


async def _user_ids(pg_url: str) -> dict[str, int]:
    rows = await pg_fetch(pg_url, "SELECT id, name FROM users")
    return {row["name"]: row["id"] for row in rows}


async def _check_bills(pg_url: str, redis_url: str, ledger: Ledger) -> None:
    with trio.fail_after(60):
        while int(await r(redis_url, "XLEN", Keys.BILLING)):
            await trio.sleep(0.1)
    rows = await pg_fetch(pg_url, "SELECT event_id, user_id, usage_type, amount FROM usage_log")
    assert rows, "nothing was billed"
    for row in rows:
        assert row["event_id"] in ledger.jobs, row
        creator, text = ledger.jobs[row["event_id"]]
        assert row["user_id"] == creator, row
        assert row["usage_type"] == "server_kokoro" and row["amount"] == len(text), row
