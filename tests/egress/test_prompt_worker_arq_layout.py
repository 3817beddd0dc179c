"""`PromptWorker` writes arq's private Redis layout itself (its Lua script claims, finishes and
re-queues jobs with arq's keys). These tests fail if arq's layout changes under it: arq's own
client side (`enqueue_job`, `Job.status`) must read what PromptWorker writes, and a stock arq
`Worker` sharing the queue must agree with it on in-progress claims and on the try count."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq import Retry, create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.jobs import Job, JobStatus
from arq.worker import Worker, func

from protege_relay.embedded_redis import EmbeddedRedis
from services.egress.prompt_worker import PromptWorker
from tests.support.wait import eventually

QUEUE = "test:layout"
STOCK_POLL_S = 0.05
PROMPT_POLL_S = 0.05


class Jobs:
    """The one job function both workers run: records (worker kind, label, try); a job may wait
    for its label's release, and ask to be retried on its first try."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, str, int]] = []
        self.releases: dict[str, asyncio.Event] = {}

    def release(self, label: str) -> None:
        self.releases.setdefault(label, asyncio.Event()).set()

    def function(self, kind: str) -> Any:
        async def job(ctx: dict[str, Any], label: str, hold: bool = False, retry_first: bool = False) -> None:
            self.runs.append((kind, label, ctx["job_try"]))
            if hold:
                await self.releases.setdefault(label, asyncio.Event()).wait()
            if retry_first and ctx["job_try"] == 1:
                raise Retry(defer=0.05)

        return func(job, name="job")

    def ran(self, label: str) -> list[tuple[str, int]]:
        return [(kind, job_try) for kind, name, job_try in self.runs if name == label]


class Fleet:
    def __init__(self, redis_url: str, jobs: Jobs) -> None:
        self.settings = RedisSettings.from_dsn(redis_url)
        self.jobs = jobs
        self.running: list[tuple[Worker, asyncio.Task[None]]] = []

    def start(self, kind: str) -> Worker:
        worker_class = PromptWorker if kind == "prompt" else Worker
        worker = worker_class(
            functions=[self.jobs.function(kind)],
            redis_settings=self.settings,
            queue_name=QUEUE,
            max_jobs=4,
            poll_delay=PROMPT_POLL_S if kind == "prompt" else STOCK_POLL_S,
            handle_signals=False,
            keep_result=0,
            max_tries=5,
        )
        self.running.append((worker, asyncio.ensure_future(worker.async_run())))
        return worker

    async def stop(self, worker: Worker) -> None:
        for index, (running, task) in enumerate(self.running):
            if running is worker:
                with contextlib.suppress(asyncio.CancelledError):
                    await worker.close()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                del self.running[index]
                return

    async def stop_all(self) -> None:
        for worker, _ in list(self.running):
            await self.stop(worker)


@pytest.fixture
async def pool(redis_server: EmbeddedRedis) -> AsyncIterator[ArqRedis]:
    arq_pool = await create_pool(RedisSettings.from_dsn(redis_server.url))
    yield arq_pool
    await arq_pool.aclose()


@pytest.fixture
def jobs() -> Jobs:
    return Jobs()


@pytest.fixture
async def fleet(redis_server: EmbeddedRedis, jobs: Jobs) -> AsyncIterator[Fleet]:
    running = Fleet(redis_server.url, jobs)
    yield running
    for label in list(jobs.releases):
        jobs.release(label)
    await running.stop_all()


async def enqueue(pool: ArqRedis, label: str, **kwargs: Any) -> Job | None:
    return await pool.enqueue_job("job", label, _job_id=label, _queue_name=QUEUE, **kwargs)


async def status(pool: ArqRedis, label: str) -> JobStatus:
    return await Job(label, pool, _queue_name=QUEUE).status()


async def test_arq_reads_the_job_states_prompt_worker_writes(pool: ArqRedis, fleet: Fleet, jobs: Jobs) -> None:
    assert await enqueue(pool, "a", hold=True) is not None
    assert await status(pool, "a") == JobStatus.queued
    fleet.start("prompt")
    await eventually(lambda: jobs.ran("a"), 10, "job not started")
    assert await status(pool, "a") == JobStatus.in_progress  # PromptWorker's in-progress key, as arq names it
    assert await enqueue(pool, "a") is None  # arq's dedupe sees the job PromptWorker holds
    jobs.release("a")

    async def gone() -> bool:
        return await status(pool, "a") == JobStatus.not_found

    await eventually(gone, 10, "finished job still visible to arq")
    assert await pool.keys("arq:*a") == []  # job, in-progress and retry keys all gone (keep_result=0)
    assert await enqueue(pool, "a") is not None  # a finished id is accepted again, as after arq's own worker
    assert jobs.ran("a") == [("prompt", 1)]


@pytest.mark.parametrize(("holder", "other"), [("prompt", "stock"), ("stock", "prompt")])
async def test_a_job_one_worker_holds_is_never_started_by_the_other(
    pool: ArqRedis, fleet: Fleet, jobs: Jobs, holder: str, other: str
) -> None:
    assert await enqueue(pool, "held", hold=True) is not None
    fleet.start(holder)
    await eventually(lambda: jobs.ran("held"), 10, "held job not started")
    fleet.start(other)
    # A later job the other worker does run: by then it has looked at the queue, "held" first.
    assert await enqueue(pool, "later") is not None
    await eventually(lambda: jobs.ran("later"), 10, "later job not run")
    assert jobs.ran("held") == [(holder, 1)]
    jobs.release("held")

    async def finished() -> bool:
        return await status(pool, "held") == JobStatus.not_found

    await eventually(finished, 10, "held job not finished")
    assert jobs.ran("held") == [(holder, 1)]
    print(f"runs: {jobs.runs}")


@pytest.mark.parametrize(("first", "second"), [("prompt", "stock"), ("stock", "prompt")])
async def test_a_retry_counted_by_one_is_continued_by_the_other(
    pool: ArqRedis, fleet: Fleet, jobs: Jobs, first: str, second: str
) -> None:
    worker = fleet.start(first)
    assert await enqueue(pool, "retried", retry_first=True, _defer_by=0) is not None
    await eventually(lambda: jobs.ran("retried"), 10, "first try not run")

    async def requeued() -> bool:
        return await status(pool, "retried") in (JobStatus.deferred, JobStatus.queued)

    await eventually(requeued, 10, "retried job not back in the queue")
    await fleet.stop(worker)
    fleet.start(second)

    async def done() -> bool:
        return await status(pool, "retried") == JobStatus.not_found

    await eventually(done, 10, "second try not finished")
    assert jobs.ran("retried") == [(first, 1), (second, 2)]  # the try count lives in arq's retry key
