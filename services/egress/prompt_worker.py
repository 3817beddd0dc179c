"""An arq `Worker` that starts the next job as soon as one finishes, and claims a job in one
Redis round trip.

Stock arq (0.26-0.28) starts jobs only at its next poll: with `max_jobs` short jobs running,
`start_jobs` stops and the freed slots wait out `poll_delay`, so a worker delivers at most
`max_jobs / poll_delay` messages per second however fast the MX answers. Here a finishing job
wakes the poll loop, and `poll_delay` is only the idle interval (how soon a newly queued job is
noticed). Claiming a job (not running anywhere, due, then mark it in progress) is one Lua
script instead of arq's WATCH / EXISTS / ZSCORE / MULTI-PSETEX-EXEC (plus UNWATCH for a job
that is skipped); jobs this worker is running itself are skipped without asking Redis. The
claim has the same effect and atomicity as arq's: a job is started by at most one worker.

Overrides `main` and `start_jobs`, which arq documents as neither public nor private; the
egress tests exercise both (delivery, retries, duplicate ids, killed workers, drain).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from arq.connections import create_pool
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.commands.core import AsyncScript

# KEYS: in-progress key, queue; ARGV: job id, now (ms), in-progress TTL (ms).
# Returns the job's score when claimed, else false (running elsewhere, finished, or deferred).
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('PSETEX', KEYS[1], ARGV[3], '1')
return score
"""


class PromptWorker(Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.burst:
            raise ValueError("PromptWorker does not support burst mode")
        self._slot_freed = asyncio.Event()
        self._claim: AsyncScript | None = None

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await create_pool(
                self.redis_settings,
                job_deserializer=self.job_deserializer,
                job_serializer=self.job_serializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
        self._claim = self.pool.register_script(_CLAIM)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        while True:
            self._slot_freed.clear()  # before polling: a job ending meanwhile polls again at once
            await self._poll_iteration()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_delay_s):
                    await self._slot_freed.wait()

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._slot_freed.set()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        for job_id_bytes in job_ids:
            job_id = job_id_bytes.decode()
            running = self.tasks.get(job_id)
            if running is not None and not running.done():
                continue  # ours, still in its queue entry until it finishes
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            assert self._claim is not None, "main() registers the claim script"
            try:
                score = await self._claim(
                    keys=[in_progress_key_prefix + job_id, self.queue_name],
                    args=[job_id, timestamp_ms(), int(self.in_progress_timeout_s * 1000)],
                )
            except BaseException:
                self.job_counter -= 1
                self.sem.release()
                raise
            if not score:
                self.job_counter -= 1
                self.sem.release()
                continue
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task
