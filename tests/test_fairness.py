"""Fair scheduling (docs/workers.md, "Scheduling"): one user's flood never starves another reader,
shares follow characters and plan weights, and a user's reading position goes first.

The first tests drive the shipped scripts (``enqueue.lua``, ``pull.lua``, ``evict.lua``,
``requeue.lua``) on a real Redis, exactly as the gateway and workers call them, so that each pull's
choice can be checked one by one. The last ones run whole daemons with a worker the test drives.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable

import pytest
import redis
import trio

from daemon.contracts import Job, Keys
from daemon.runtime.daemon import open_daemon
from daemon.stores.redis import SCRIPTS, enqueue_call, enqueue_reply
from daemon.testing.client import WsClient
from daemon.testing.config import make_config
from daemon.testing.stores import add_user, mirror_unlimited, redis_call
from daemon.testing.worker import ManualWorker
from tests.ops_support import scrape

MODEL = "kokoro"


class Scheduler:
    """The gateway's enqueue and a worker's pull, eviction and requeue, as the daemon runs them."""

    def __init__(self, url: str) -> None:
        self.r = redis.Redis.from_url(url)
        self.scripts = {name: self.r.register_script(SCRIPTS[name]) for name in SCRIPTS}
        self.jobs: dict[str, Job] = {}

    def enqueue(
        self,
        user: int,
        doc: str,
        blocks: Iterable[tuple[int, str]],
        *,
        weight: float = 1.0,
        conn: str = "c1",
    ) -> list[str]:
        rows = []
        for idx, text in blocks:
            job = Job(
                job_id=uuid.uuid4().hex,
                variant_hash=f"{user}-{doc}-{idx}-{text}",
                model=MODEL,
                voice="af_heart",
                text=text,
                user_id=user,
                document_id=doc,
                block_idx=idx,
                usage_multiplier=1.0,
                enqueued_at=0.0,
            )
            self.jobs[job.job_id] = job
            rows.append((idx, job.variant_hash, job.job_id, len(text), job.to_json()))
        mirror_unlimited(self.r, user)  # the user's entitlements in Redis: no limit here
        keys, args = enqueue_call(
            user_id=user,
            conn_id=conn,
            document_id=doc,
            model=MODEL,
            now=1.0,
            rate_limit=100_000,
            usage_type="server_kokoro",
            blocks=rows,
            weight=weight,
        )
        head, statuses = enqueue_reply(self.scripts["enqueue"](keys, args))
        assert head == "ok"
        return statuses  # type: ignore[return-value]

    def pull(self) -> Job | None:
        raw = self.scripts["pull"](Keys.pull_keys(MODEL), Keys.pull_args())
        return None if raw is None else Job.from_json(raw)

    def pull_batch(self, n: int = 16) -> list[Job]:
        batch = []
        while len(batch) < n and (job := self.pull()) is not None:
            batch.append(job)
        return batch

    def drain(self) -> list[Job]:
        out = []
        while (job := self.pull()) is not None:
            out.append(job)
        return out

    def evict(
        self,
        user: int,
        doc: str,
        blocks: Iterable[tuple[int, str]],
        *,
        conn: str = "c1",
        mode: str = "all",
        cursor: int = -1,
    ) -> list[int]:
        """``evict.lua``: a connection closed (mode all), or cursor_moved (queued, cursor)."""
        rows = [(doc, idx, f"{user}-{doc}-{idx}-{text}") for idx, text in blocks]
        args: list = [user, conn, mode, len(rows)]
        keys: list = [Keys.JOBS, Keys.RETRIES]
        for doc_, idx, variant_hash in rows:
            args += [doc_, idx]
            keys += [
                Keys.inflight(variant_hash),
                Keys.waiters(variant_hash),
                Keys.queue(MODEL),
                Keys.fair(MODEL),
                Keys.fair_state(MODEL),
            ]
        args.append(cursor)
        evicted, _dropped = self.scripts["evict"](keys, args)
        return evicted


@pytest.fixture
def sched(redis_url: str) -> Iterable[Scheduler]:
    s = Scheduler(redis_url)
    yield s
    s.r.close()


def flood(sched: Scheduler, user: int, n: int, text: str = "x" * 40, doc: str = "flood") -> None:
    """``n`` blocks in requests of 16, as a reader asking ahead would send them."""
    for start in range(0, n, 16):
        sched.enqueue(user, doc, [(i, f"{text} {i}") for i in range(start, min(n, start + 16))])


def chars_by_user(jobs: Iterable[Job]) -> Counter[int]:
    out: Counter[int] = Counter()
    for job in jobs:
        out[job.user_id] += len(job.text)
    return out


def test_a_single_block_is_pulled_in_the_first_batch_while_another_user_has_640_queued(
    sched: Scheduler,
) -> None:
    flood(sched, user=1, n=640)
    sched.enqueue(2, "article", [(0, "Just one sentence, please.")])
    batches = [sched.pull_batch(16) for _ in range(3)]
    firsts = [i for i, batch in enumerate(batches) for job in batch if job.user_id == 2]
    assert firsts == [0], "the second reader's block comes in the first batch, not after 640"
    # The flood itself still goes in reading order.
    flood_idx = [job.block_idx for batch in batches for job in batch if job.user_id == 1]
    assert flood_idx == sorted(flood_idx) == list(range(len(flood_idx)))


def test_two_users_flooding_at_once_each_get_half_the_characters(sched: Scheduler) -> None:
    # User 1's blocks are four times as long: fairness counts characters, not jobs.
    for start in range(0, 320, 16):
        sched.enqueue(1, "long", [(i, "L" * 200) for i in range(start, start + 16)][:16])
        sched.enqueue(2, "short", [(i, "s" * 50 + str(i)) for i in range(start, start + 16)])
    pulled = [sched.pull() for _ in range(200)]
    shares = chars_by_user(j for j in pulled if j is not None)
    total = sum(shares.values())
    for user in (1, 2):
        assert abs(shares[user] / total - 0.5) <= 0.05, shares


def test_a_weighted_plan_gets_its_share(sched: Scheduler) -> None:
    for start in range(0, 480, 16):
        sched.enqueue(
            1, "a", [(i, f"premium reader {i:04d}") for i in range(start, start + 16)], weight=2
        )
        sched.enqueue(2, "b", [(i, f"free reader ab {i:04d}") for i in range(start, start + 16)])
    pulled = [sched.pull() for _ in range(300)]
    shares = chars_by_user(j for j in pulled if j is not None)
    share_1 = shares[1] / sum(shares.values())
    assert abs(share_1 - 2 / 3) <= 2 / 3 * 0.10, shares


def test_a_user_who_was_idle_gets_no_credit_for_it(sched: Scheduler) -> None:
    """Start-time fair queuing: a newcomer starts at the current virtual time, so it shares from
    now on rather than taking everything until it has 'caught up' with a long-running user."""
    flood(sched, user=1, n=400)
    first = [sched.pull() for _ in range(200)]
    assert {j.user_id for j in first if j} == {1}
    flood(sched, user=2, n=200, doc="late")
    after = [sched.pull() for _ in range(100)]
    shares = chars_by_user(j for j in after if j is not None)
    assert abs(shares[2] / sum(shares.values()) - 0.5) <= 0.05, shares


def test_asking_ahead_keeps_the_reading_order(sched: Scheduler) -> None:
    sched.enqueue(1, "book", [(i, f"Sentence {i}.") for i in range(16)])
    assert [j.block_idx for j in sched.pull_batch(4)] == [0, 1, 2, 3]
    sched.enqueue(1, "book", [(i, f"Sentence {i}.") for i in range(16, 32)])
    assert [j.block_idx for j in sched.drain()] == list(range(4, 32))


def test_a_seek_is_served_before_the_old_read_ahead(sched: Scheduler) -> None:
    """Two tabs read one book; one of them seeks to block 20 (cursor_moved evicts its own queued
    blocks, then it asks from there): the blocks from the new position on come first, and the old
    read-ahead left behind it last."""
    book = [(i, f"Sentence {i}.") for i in range(32)]
    sched.enqueue(1, "book", book, conn="tab1")
    sched.enqueue(1, "book", book[:12], conn="tab2")
    assert [j.block_idx for j in sched.pull_batch(4)] == [0, 1, 2, 3]
    # tab2's blocks 4..11 are shared with tab1's jobs: tab2 stops waiting, the jobs stay.
    assert len(sched.evict(1, "book", book[4:12], conn="tab2", mode="queued", cursor=20)) == 8
    # The seek's blocks are tab1's jobs too (same text): tab2 joins them.
    assert sched.enqueue(1, "book", book[20:24], conn="tab2") == ["queued"] * 4
    order = [j.block_idx for j in sched.drain()]
    assert order == [*range(20, 32), *range(4, 20)]


def test_the_newest_document_goes_first_within_a_user(sched: Scheduler) -> None:
    sched.enqueue(1, "old", [(i, f"Old {i}.") for i in range(10)])
    sched.enqueue(1, "new", [(i, f"New {i}.") for i in range(5, 8)])
    order = [(j.document_id, j.block_idx) for j in sched.drain()]
    assert order == [("new", 5), ("new", 6), ("new", 7)] + [("old", i) for i in range(10)]


def test_evicted_blocks_leave_the_schedule_and_never_stall_a_pull(sched: Scheduler) -> None:
    blocks = [(i, f"Evicted {i}.") for i in range(300)]
    for start in range(0, 300, 16):
        sched.enqueue(1, "gone", blocks[start : start + 16])
    sched.enqueue(2, "kept", [(0, "Still wanted.")])
    evicted = sched.evict(1, "gone", blocks)
    assert len(evicted) == 300
    job = sched.pull()
    assert job is not None and job.user_id == 2
    assert sched.pull() is None
    assert sched.r.zcard(Keys.fair(MODEL)) == 0
    assert sched.r.zcard(Keys.fair_users(MODEL)) == 0


def test_a_requeued_job_goes_ahead_of_its_users_other_jobs(sched: Scheduler) -> None:
    sched.enqueue(1, "doc", [(i, f"Block {i}.") for i in range(6)])
    held = sched.pull()
    assert held is not None and held.block_idx == 0
    keys = [
        Keys.processing(MODEL),
        Keys.queue(MODEL),
        Keys.JOBS,
        Keys.RETRIES,
        Keys.dlq(MODEL),
        Keys.RESULTS,
        Keys.leases(MODEL),
        Keys.fair(MODEL),
        Keys.fair_users(MODEL),
        Keys.fair_state(MODEL),
        Keys.waiters(held.variant_hash),
    ]
    # The worker holding it vanished: the scanner's timeout (0 s here) puts it back.
    assert sched.scripts["requeue"](keys, [0, 5, 100, Keys.NOTIFY_PREFIX, held.job_id]) == [1, 0]
    order = [j.block_idx for j in sched.drain()]
    assert order == [0, 1, 2, 3, 4, 5]


def test_jobs_queued_without_the_schedule_are_still_pulled(sched: Scheduler) -> None:
    """Jobs an older daemon queued (only in ``tts:queue:{model}``) go in enqueue order."""
    job = Job(uuid.uuid4().hex, "h", MODEL, "af_heart", "Legacy.", 1, "d", 0, 1.0, 5.0)
    sched.r.hset(Keys.JOBS, job.job_id, job.to_json())
    sched.r.zadd(Keys.queue(MODEL), {job.job_id: 5.0})
    pulled = sched.pull()
    assert pulled is not None and pulled.job_id == job.job_id


def test_the_schedule_keeps_no_state_for_finished_documents(sched: Scheduler) -> None:
    flood(sched, user=1, n=48, doc="one")
    flood(sched, user=2, n=48, doc="two")
    sched.enqueue(1, "three", [(0, "Third.")])
    assert len(sched.drain()) == 97
    state = {k.decode() for k in sched.r.hkeys(Keys.fair_state(MODEL))}
    assert not [k for k in state if k.startswith("d:")], state
    assert sched.r.zcard(Keys.fair(MODEL)) == 0


# -- whole daemons -----------------------------------------------------------------------------


def _ws(d) -> str:
    assert d.addresses is not None
    return d.addresses.ws_url


async def _finish_batch(worker: ManualWorker, size: int = 16) -> list[Job]:
    """One GPU batch: pull up to ``size`` jobs, then push every result."""
    batch = []
    while len(batch) < size and (job := await worker.pull()) is not None:
        batch.append(job)
    for job in batch:
        await worker.finish(job)
    return batch


async def _flood(client: WsClient, text: str, n: int) -> None:
    for start in range(0, n, 16):
        await client.synthesize("doc", {i: text.format(i) for i in range(start, start + 16)})


async def _batches(worker: ManualWorker, n: int, done: list[Job]) -> None:
    for _ in range(n):
        done.extend(await _finish_batch(worker))


def _queued(n: int):
    return lambda frames: sum(f.get("status") == "queued" for f in frames) >= n


@pytest.mark.slow
async def test_a_reader_is_cached_within_three_batches_while_another_user_has_640_queued(
    tmp_path, redis_url: str, pg_url: str
) -> None:
    cfg = make_config(tmp_path, workers={"simulated": 0})
    _, flooder = await add_user(pg_url, "flooder", "unlimited")
    _, reader = await add_user(pg_url, "reader", "unlimited")
    async with open_daemon(cfg, redis_url, pg_url) as daemon:
        url = _ws(daemon)
        async with WsClient.connect(url, flooder) as a, WsClient.connect(url, reader) as b:
            for start in range(0, 640, 16):
                await a.synthesize(
                    "flood", {i: f"Flooding sentence number {i}." for i in range(start, start + 16)}
                )
            await a.until(_queued(640), timeout_s=60)
            await b.synthesize("article", ["The one block this reader needs."])
            await b.until(_queued(1))
            # What an autoscaler of workers reads: the queue, its age and the users waiting.
            metrics = await scrape(daemon.addresses.ops_url)
            label = (("model", MODEL),)
            assert metrics[("tts_queue_depth", label)] == 641
            assert metrics[("tts_queue_users_waiting", label)] == 2
            assert metrics[("tts_queue_oldest_age_seconds", label)] > 0
            worker = ManualWorker(redis_url)
            for _ in range(3):
                batch = await _finish_batch(worker)
                if any(job.document_id == "article" for job in batch):
                    break
            else:
                pytest.fail("the reader's block was not in the first three batches")
            await b.until(lambda fs: any(f.get("status") == "cached" for f in fs))
            assert await redis_call(redis_url, "ZCARD", Keys.queue(MODEL)) >= 640 - 3 * 16


@pytest.mark.slow
async def test_two_daemons_and_two_workers_keep_the_shares_fair(
    tmp_path, redis_url: str, pg_url: str
) -> None:
    _, one = await add_user(pg_url, "one", "unlimited")
    _, two = await add_user(pg_url, "two", "unlimited")
    configs = [make_config(tmp_path / name, workers={"simulated": 0}) for name in "ab"]
    async with (
        open_daemon(configs[0], redis_url, pg_url) as da,
        open_daemon(configs[1], redis_url, pg_url) as db,
        WsClient.connect(_ws(da), one) as a,
        WsClient.connect(_ws(db), two) as b,
    ):
        # Both flood at once through different daemons; user two's blocks are longer.
        flooders = [(a, "One, a short block {}."), (b, "Two, three times as long a block, {}.")]
        async with trio.open_nursery() as nursery:
            for client, text in flooders:
                nursery.start_soon(_flood, client, text, 320)
        await a.until(_queued(320), timeout_s=60)
        await b.until(_queued(320), timeout_s=60)
        workers = [ManualWorker(redis_url), ManualWorker(redis_url)]
        done: list[Job] = []
        async with trio.open_nursery() as nursery:
            for worker in workers:
                nursery.start_soon(_batches, worker, 6, done)
    shares = chars_by_user(done)
    total = sum(shares.values())
    assert len(done) == 12 * 16
    for user_share in shares.values():
        assert abs(user_share / total - 0.5) <= 0.05, shares
