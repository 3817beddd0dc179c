"""An arq `Worker` that starts the next job as soon as one finishes, and finds and claims due
jobs in one Redis round trip.

Stock arq (0.26-0.28) starts jobs only at its next poll: with `max_jobs` short jobs running,
`start_jobs` stops and the freed slots wait out `poll_delay`, so a worker delivers at most
`max_jobs / poll_delay` messages per second however fast the MX answers. Here a finishing job
wakes the poll loop, and `poll_delay` is only the idle interval (how soon a newly queued job,
or a deferred retry that fell due, is noticed).

Each poll is one Lua script: read the due job ids (oldest first, at most `queue_read_limit`)
and claim up to the free slots among those not in progress anywhere, setting their
in-progress keys. arq instead reads the ids, then per id WATCH / EXISTS / ZSCORE /
MULTI-PSETEX-EXEC (and UNWATCH for each id that is running already, e.g. this worker's own
jobs, which stay queued until they finish). The effect and atomicity are the same: a job is
started by at most one worker. Running a claimed job is arq's own `run_job`.

Overrides `main`, `_poll_iteration` and `_release_sem_dec_counter_on_complete`, which arq does
not document as public: `tests/test_egress_prompt_worker.py` and the egress tests (delivery,
retries, duplicate ids, killed workers, drain) pin the behaviour to the installed arq.
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

# KEYS: queue. ARGV: now (ms), most jobs to claim, most queue entries to look at, in-progress key
# prefix, in-progress TTL (ms). Claims due jobs not in progress anywhere, oldest first, and
# returns [id, score, id, score, ...]. The in-progress keys are not declared (their names come
# from the queue), as with arq's own keys: a single Redis, not a cluster.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[3])
local claimed = {}
local wanted = tonumber(ARGV[2]) * 2
for i = 1, #due, 2 do
  local in_progress = ARGV[4] .. due[i]
  if redis.call('EXISTS', in_progress) == 0 then
    redis.call('PSETEX', in_progress, ARGV[5], '1')
    claimed[#claimed + 1] = due[i]
    claimed[#claimed + 1] = due[i + 1]
    if #claimed >= wanted then break end
  end
end
return claimed
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
        self.job_counter -= 1  # arq's semaphore is left alone: only its start_jobs used it
        self._slot_freed.set()

    async def _poll_iteration(self) -> None:
        """arq's `_poll_iteration` with the read of due job ids and the claims as one script."""
        free_slots = self.max_jobs - self.job_counter
        if self.allow_pick_jobs and free_slots > 0:
            assert self._claim is not None, "main() registers the claim script"
            claimed = await self._claim(
                keys=[self.queue_name],
                args=[timestamp_ms(), free_slots, self.queue_read_limit, in_progress_key_prefix,
                      int(self.in_progress_timeout_s * 1000)],
            )
            for index in range(0, len(claimed), 2):
                self._start(claimed[index].decode(), int(float(claimed[index + 1])))
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # as arq: an error in run_job itself ends the worker
        await self.heart_beat()

    def _start(self, job_id: str, score: int) -> None:
        self.job_counter += 1
        task = self.loop.create_task(self.run_job(job_id, score))
        task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
        self.tasks[job_id] = task
