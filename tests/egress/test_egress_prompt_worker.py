"""`PromptWorker` against a real Redis: freed slots start the next job without waiting for the
poll interval, each job runs exactly once across competing workers, and retries still work."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq import Retry, create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.worker import func
from redis.exceptions import ResponseError

from protege_relay.embedded_redis import EmbeddedRedis, free_port
from services.egress.prompt_worker import EndWrite, JobState, JobStateKeys, PromptWorker
from services.egress.results import claim_state_keys
from shared import keys, lua
from shared.lua import LuaScript
from shared.replication import ScriptCall
from tests.support.sentinel import DataNode
from tests.support.wait import eventually

QUEUE = "test:prompt"
IDLE_POLL_S = 5.0  # far longer than the whole test may take: only the wake-up can start jobs


async def queue_empty(pool: ArqRedis, timeout_s: float = 5) -> None:
    async def empty() -> bool:
        return not await pool.zcard(QUEUE)

    await eventually(empty, timeout_s, "jobs still queued")


@pytest.fixture
async def pool(redis_server: EmbeddedRedis) -> AsyncIterator[ArqRedis]:
    arq_pool = await create_pool(RedisSettings.from_dsn(redis_server.url))
    yield arq_pool
    await arq_pool.aclose()


class Workers:
    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.runs: list[tuple[str, int]] = []  # (label, job_try) per run, in start order
        self.states: dict[str, JobState | None] = {}  # ctx["job_state"] per label
        self.running: list[tuple[PromptWorker, asyncio.Task[None]]] = []
        self.concurrent = self.peak = 0

    async def job(
        self, ctx: dict[str, Any], label: str, retries: int = 0, hold_s: float = 0.0, fail: bool = False
    ) -> None:
        self.runs.append((label, ctx["job_try"]))
        self.states[label] = ctx.get("job_state")
        self.concurrent += 1
        self.peak = max(self.peak, self.concurrent)
        try:
            await asyncio.sleep(hold_s)
        finally:
            self.concurrent -= 1
        if fail:
            raise ValueError("job raised")
        if ctx["job_try"] <= retries:
            raise Retry(defer=0.05)

    def start(
        self,
        max_jobs: int,
        poll_delay_s: float = IDLE_POLL_S,
        max_tries: int = 5,
        job_state: JobStateKeys | None = None,
    ) -> PromptWorker:
        worker = PromptWorker(
            functions=[func(self.job, name="job")],
            redis_settings=RedisSettings.from_dsn(self.redis_url),
            queue_name=QUEUE,
            max_jobs=max_jobs,
            poll_delay=poll_delay_s,
            handle_signals=False,
            keep_result=0,
            max_tries=max_tries,
            job_state=job_state,
        )
        self.running.append((worker, asyncio.ensure_future(worker.async_run())))
        return worker

    async def stop(self) -> None:
        for worker, task in self.running:
            with contextlib.suppress(asyncio.CancelledError):  # arq's close cancels running jobs
                await worker.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def workers(redis_server: EmbeddedRedis) -> AsyncIterator[Workers]:
    running = Workers(redis_server.url)
    yield running
    await running.stop()


async def enqueue(pool: ArqRedis, count: int, **kwargs: Any) -> None:
    for index in range(count):
        assert await pool.enqueue_job("job", f"j{index}", _job_id=f"j{index}", _queue_name=QUEUE, **kwargs)


async def test_a_finished_job_starts_the_next_without_waiting_for_the_poll(pool: ArqRedis, workers: Workers) -> None:
    await enqueue(pool, 40, hold_s=0.005)
    started = time.monotonic()
    workers.start(max_jobs=2)
    await eventually(lambda: len(workers.runs) == 40, 10, lambda: f"only {len(workers.runs)} of 40 jobs ran")
    await eventually(lambda: workers.running[0][0].jobs_complete == 40, 5, "jobs not completed")
    # stock arq would need 20 polls of IDLE_POLL_S here (2 jobs per poll)
    assert time.monotonic() - started < IDLE_POLL_S
    assert sorted(label for label, _ in workers.runs) == sorted(f"j{index}" for index in range(40))
    await queue_empty(pool)  # jobs_complete counts before arq's finish_job removes the entry


async def test_never_more_than_max_jobs_at_once(pool: ArqRedis, workers: Workers) -> None:
    await enqueue(pool, 12, hold_s=0.05)
    worker = workers.start(max_jobs=3, poll_delay_s=0.01)
    await eventually(lambda: worker.jobs_complete == 12, 10, "jobs not completed")
    assert workers.peak == 3


async def test_competing_workers_run_each_job_exactly_once(pool: ArqRedis, workers: Workers) -> None:
    await enqueue(pool, 60, hold_s=0.002)
    first, second = workers.start(max_jobs=4, poll_delay_s=0.01), workers.start(max_jobs=4, poll_delay_s=0.01)
    await eventually(
        lambda: first.jobs_complete + second.jobs_complete == 60,
        20,
        f"{first.jobs_complete} + {second.jobs_complete} of 60 completed",
    )
    labels = [label for label, _ in workers.runs]
    assert len(labels) == 60 and len(set(labels)) == 60
    assert first.jobs_complete > 0 and second.jobs_complete > 0


async def test_jobs_behind_many_held_by_other_workers_are_still_claimed(pool: ArqRedis, workers: Workers) -> None:
    """The claim reads due ids in growing pages: 25 jobs held elsewhere fill the first pages."""
    await enqueue(pool, 30)
    for index in range(25):
        await pool.psetex(f"arq:in-progress:j{index}", 60_000, b"1")
    worker = workers.start(max_jobs=2, poll_delay_s=0.05)
    await eventually(lambda: worker.jobs_complete == 5, 5, lambda: f"ran {workers.runs}")
    assert sorted(label for label, _ in workers.runs) == sorted(f"j{index}" for index in range(25, 30))


async def test_each_job_gets_its_own_state_read_with_its_claim(pool: ArqRedis, workers: Workers) -> None:
    """The egress's job state (published marker, per-recipient record) named from job ids whose
    stream part holds `:`, `%` and Lua pattern characters, as a gateway may send them."""
    persona = "pk7abc"
    streams = {"plain": "s1", "published": "a:b%1.c", "recorded": "x-(y)*[z]+?^$%%", "foreign": "s4"}
    await pool.set(keys.egress_result_published(persona, streams["published"]), "sent")
    async with pool.pipeline(transaction=False) as pipe:  # (hset's stub is not awaitable)
        pipe.hset(keys.egress_delivered(persona, streams["recorded"]), mapping={"a@b.test": "{}", "c@d.test": "x"})
        await pipe.execute()
    await pool.set(keys.egress_result_published(persona, streams["plain"] + "x"), "sent")  # a neighbour's
    for label, stream in streams.items():
        job_id = keys.egress_job_id(persona, stream) if label != "foreign" else f"other:{stream}"
        assert await pool.enqueue_job("job", label, _job_id=job_id, _queue_name=QUEUE)
    worker = workers.start(max_jobs=2, poll_delay_s=0.05, job_state=claim_state_keys())
    await eventually(lambda: worker.jobs_complete == 4, 5, "jobs not completed")
    assert workers.states == {
        "plain": JobState(False, {}),
        "published": JobState(True, {}),
        "recorded": JobState(False, {b"a@b.test": b"{}", b"c@d.test": b"x"}),
        "foreign": JobState(False, {}),  # a job id of another layout reads nothing
    }


async def test_without_job_state_no_state_is_read(pool: ArqRedis, workers: Workers) -> None:
    await enqueue(pool, 1)
    worker = workers.start(max_jobs=1, poll_delay_s=0.05)
    await eventually(lambda: worker.jobs_complete == 1, 5, "job not completed")
    assert workers.states == {"j0": None}


# test-only scripts (the relay's own live in shared/lua.py): a write that leaves its marker, one that fails
MARK = LuaScript.of("redis.call('SET', KEYS[1], ARGV[1]) return 7")
REFUSE = LuaScript.of("return redis.error_reply('refused')")


async def run_end_write_jobs(
    redis_url: str,
    pool: ArqRedis,
    writes_by_try: dict[int, list[ScriptCall]],
    flush_scripts: bool = False,
    before_return: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> tuple[list[int], list[Any]]:
    """One job that hands the worker `writes_by_try[job_try]` as end writes (marker: KEYS[1]);
    the tries it ran and the replies its `on_reply` got, once the queue is empty."""
    tries: list[int] = []
    replies: list[Any] = []

    async def job(ctx: dict[str, Any]) -> None:
        tries.append(ctx["job_try"])
        for call in writes_by_try.get(ctx["job_try"], []):
            ctx["end_writes"].append(EndWrite(call, call.keys[0], 0.05, replies.append))
        if flush_scripts:
            await pool.script_flush()
        if before_return is not None:
            await before_return(ctx)

    worker = PromptWorker(
        functions=[func(job, name="job")],
        redis_settings=RedisSettings.from_dsn(redis_url),
        queue_name=QUEUE,
        poll_delay=0.02,
        handle_signals=False,
        keep_result=0,
    )
    task = asyncio.ensure_future(worker.async_run())
    try:
        assert await pool.enqueue_job("job", _job_id="end", _queue_name=QUEUE)
        await eventually(lambda: worker.jobs_complete >= len(tries) > 0 and bool(replies), 5, "job not completed")
        await queue_empty(pool)
        assert not await pool.exists("arq:in-progress:end", "arq:retry:end", "arq:job:end")
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await worker.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return tries, replies


async def test_an_end_write_goes_out_with_the_finish_and_its_reply_is_handed_back(
    redis_server: EmbeddedRedis, pool: ArqRedis
) -> None:
    tries, replies = await run_end_write_jobs(redis_server.url, pool, {1: [ScriptCall(MARK, ["marker:a"], ["v"])]})
    assert tries == [1] and replies == [7]
    assert await pool.get("marker:a") == b"v"


async def test_a_failed_end_write_requeues_the_job_instead_of_finishing_it(
    redis_server: EmbeddedRedis, pool: ArqRedis
) -> None:
    tries, replies = await run_end_write_jobs(
        redis_server.url,
        pool,
        {1: [ScriptCall(REFUSE, ["marker:b"], [])], 2: [ScriptCall(MARK, ["marker:b"], ["second"])]},
    )
    assert tries == [1, 2]
    assert isinstance(replies[0], ResponseError) and "refused" in str(replies[0]) and replies[1:] == [7]
    assert await pool.get("marker:b") == b"second"


@pytest.mark.own_redis  # REPLICAOF: the server is demoted for a moment
async def test_an_end_write_refused_by_a_demoted_primary_is_sent_again_not_the_job(
    redis_server: EmbeddedRedis, pool: ArqRedis
) -> None:
    """READONLY (a failover under way) for the end write: the worker retries write and finish
    until the node takes writes again; re-queueing would run the job, i.e. send the mail, twice."""
    admin = aioredis.Redis.from_url(redis_server.url)

    async def writable_again() -> None:
        await asyncio.sleep(0.6)  # a few of the worker's finish retries (every FINISH_RETRY_S)
        await admin.execute_command("REPLICAOF", "NO", "ONE")

    async def demote(ctx: dict[str, Any]) -> None:
        await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # nobody there: read-only
        background.append(asyncio.ensure_future(writable_again()))

    background: list[asyncio.Task[None]] = []
    try:
        tries, replies = await run_end_write_jobs(
            redis_server.url, pool, {1: [ScriptCall(MARK, ["marker:r"], ["v"])]}, before_return=demote
        )
    finally:
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        await asyncio.gather(*background, return_exceptions=True)
        await admin.aclose()
    assert tries == [1] and replies == [7]
    assert await pool.get("marker:r") == b"v"


async def test_an_end_write_whose_script_redis_lost_is_loaded_and_sent_again(
    redis_server: EmbeddedRedis, pool: ArqRedis
) -> None:
    tries, replies = await run_end_write_jobs(
        redis_server.url, pool, {1: [ScriptCall(MARK, ["marker:c"], ["v"])]}, flush_scripts=True
    )
    assert tries == [1] and replies == [7]  # once, after SCRIPT LOAD of both scripts
    assert await pool.get("marker:c") == b"v"


COUNT = LuaScript.of("redis.call('INCR', KEYS[1]) return 7")  # how often it ran; its marker is its count
MARK_LATE = LuaScript.of("redis.call('SET', KEYS[1], ARGV[1]) return 8")  # never loaded before the job ends


async def test_a_finish_sent_after_a_write_redis_lost_the_script_of_is_sent_again_with_it(
    redis_server: EmbeddedRedis, pool: ArqRedis
) -> None:
    """NOSCRIPT in the middle of the end pipeline: the first write runs, the second's script is
    missing, and the finish after it runs but finds the second marker missing (-1, nothing
    changed). The second write and the finish are sent again, in order: the job finishes on its
    first try. Sending again only the refused write would leave the finish's -1 standing and run
    the job (send the mail) a second time; the write before the refused one is not sent again."""

    async def lose_one_script(ctx: dict[str, Any]) -> None:
        await pool.script_flush()
        for script in (COUNT, lua.FINISH_AND_CLAIM):
            await pool.script_load(script.source)

    writes = [ScriptCall(COUNT, ["marker:count"], []), ScriptCall(MARK_LATE, ["marker:late"], ["v"])]
    tries, replies = await run_end_write_jobs(
        redis_server.url, pool, {1: writes, 2: writes}, before_return=lose_one_script
    )
    assert tries == [1] and replies == [7, 8]
    assert await pool.get("marker:count") == b"1" and await pool.get("marker:late") == b"v"


async def test_retried_job_runs_again_and_completes(pool: ArqRedis, workers: Workers) -> None:
    await enqueue(pool, 1, retries=2)
    worker = workers.start(max_jobs=2, poll_delay_s=0.05)  # a deferred retry is due only after its defer
    await eventually(lambda: worker.jobs_complete == 1, 5, "retried job did not complete")
    assert workers.runs == [("j0", 1), ("j0", 2), ("j0", 3)] and worker.jobs_retried == 2


async def test_idle_worker_notices_a_new_job_within_the_poll_delay(pool: ArqRedis, workers: Workers) -> None:
    poll_delay_s = 0.1
    worker = workers.start(max_jobs=2, poll_delay_s=poll_delay_s)
    await enqueue(pool, 1)
    await eventually(lambda: worker.jobs_complete == 1, 5, "warm-up job not run")

    def completed(count: int) -> Callable[[], bool]:
        return lambda: worker.jobs_complete >= count

    latencies = []
    for index in range(1, 6):
        started = time.monotonic()
        assert await pool.enqueue_job("job", f"late{index}", _job_id=f"late{index}", _queue_name=QUEUE)
        await eventually(completed(index + 1), 5, "new job not picked up")
        latencies.append(time.monotonic() - started)
    assert max(latencies) < poll_delay_s + 0.4, latencies


async def test_deferred_job_is_not_claimed_before_it_is_due(pool: ArqRedis, workers: Workers) -> None:
    defer_s = 0.5
    enqueued = time.monotonic()
    assert await pool.enqueue_job("job", "later", _job_id="later", _queue_name=QUEUE, _defer_by=defer_s)
    await enqueue(pool, 1)
    worker = workers.start(max_jobs=2, poll_delay_s=0.02)
    await eventually(lambda: worker.jobs_complete == 2, 5, "deferred job never ran")
    ran_after_s = time.monotonic() - enqueued
    assert [label for label, _ in workers.runs] == ["j0", "later"] and ran_after_s >= defer_s - 0.05


async def test_failing_expired_and_exhausted_jobs_end_and_leave_the_queue(
    pool: ArqRedis, workers: Workers, redis_server: EmbeddedRedis
) -> None:
    assert await pool.enqueue_job("job", "boom", _job_id="boom", _queue_name=QUEUE, fail=True)
    assert await pool.enqueue_job("job", "tired", _job_id="tired", _queue_name=QUEUE, _job_try=3)
    assert await pool.enqueue_job("job", "gone", _job_id="gone", _queue_name=QUEUE)
    await pool.delete("arq:job:gone")  # the job key expired while queued
    worker = workers.start(max_jobs=2, max_tries=2)
    await queue_empty(pool)
    assert workers.runs == [("boom", 1)] and worker.jobs_failed == 3
    assert await pool.keys("arq:in-progress:*") == [] and await pool.keys("arq:retry:*") == []


async def test_shutdown_hands_a_running_job_back_to_the_queue(pool: ArqRedis, workers: Workers) -> None:
    assert await pool.enqueue_job("job", "long", _job_id="long", _queue_name=QUEUE, hold_s=30)
    worker = workers.start(max_jobs=2)
    await eventually(lambda: workers.concurrent == 1, 5, "job not started")
    await worker.close()
    assert await pool.zcard(QUEUE) == 1 and not await pool.exists("arq:in-progress:long")
    workers.start(max_jobs=2, poll_delay_s=0.02)
    await eventually(lambda: len(workers.runs) == 2, 5, "job not run again")
    assert workers.runs == [("long", 1), ("long", 2)]


async def test_redis_going_away_ends_neither_the_loop_nor_the_running_job(tmp_path: Path) -> None:
    """A failover (docs/HA.md) makes polls fail for seconds. The loop polls on: ending it would
    cancel every running delivery, and the egress service's restart of the loop once died on
    exactly that cancellation, leaving the egress idle for good (the failover test's missing
    outbound results). The running job finishes (its end reaches Redis once it is back) and a
    job queued afterwards runs."""
    node = DataNode("redis", tmp_path / "redis").start()
    url = f"redis://127.0.0.1:{node.port}/0"
    workers = Workers(url)
    arq_pool = await create_pool(RedisSettings.from_dsn(url))
    try:
        assert await arq_pool.enqueue_job("job", "long", _job_id="long", _queue_name=QUEUE, hold_s=2.0)
        worker = workers.start(max_jobs=2, poll_delay_s=0.02)
        await eventually(lambda: workers.concurrent == 1, 5, "job not started")
        await asyncio.to_thread(node.stop)  # SIGTERM: Redis writes its AOF, so nothing is lost
        await eventually(lambda: worker._redis_down, 5, "no poll met the outage")
        await asyncio.to_thread(node.start)

        assert await arq_pool.enqueue_job("job", "after", _job_id="after", _queue_name=QUEUE)
        await eventually(
            lambda: ("after", 1) in workers.runs, 15, lambda: f"no job ran after Redis came back: {workers.runs}"
        )
        await eventually(lambda: workers.concurrent == 0, 15, "the running job never ended")
        await queue_empty(arq_pool, 15)
        assert worker.main_task is not None and not worker.main_task.done()
        assert workers.runs == [("long", 1), ("after", 1)]  # each once: the long job was not cancelled
    finally:
        await workers.stop()
        await arq_pool.aclose()
        node.stop()


def test_unsupported_settings_are_refused() -> None:
    async def job(ctx: dict[str, Any]) -> None:
        return None

    with pytest.raises(ValueError, match="keep_result"):
        PromptWorker(functions=[func(job, name="job")], queue_name=QUEUE, handle_signals=False, keep_result=60)
