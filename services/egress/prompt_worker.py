"""An arq `Worker` that starts the next job the moment one finishes, with one Redis round trip
between two jobs instead of arq's three to six.

Stock arq (0.26-0.28) starts jobs only at its next poll: with `max_jobs` short jobs running,
`start_jobs` stops and the freed slots wait out `poll_delay`, so a worker delivers at most
`max_jobs / poll_delay` messages per second however fast the MX answers. Per job it then
reads the due ids, claims the job (WATCH / EXISTS / ZSCORE / MULTI-PSETEX-EXEC), fetches it
(GET, INCR try) and finishes it (MULTI-DEL-ZREM-EXEC), each a round trip. Measured on a loaded
2-core machine, 2000 jobs of 5 ms with `max_jobs=50`: stock arq drains 428 jobs/s at its default
`poll_delay` 0.5 s, 761 at 0.05 s, 935 at 0.01 s; this worker 2576 (at 0.5 s). Tuning arq does not
close the gap, so the relay keeps this worker, in this one module, pinned by the tests below.

Here one Lua script does all of that between two jobs: it finishes the job that just ended
(removes it from the queue, or re-queues it with its retry delay), reads the due ids, and for
up to the free slots claims each job not in progress anywhere (its in-progress key, with a
TTL), fetches it and counts the try, exactly the keys and values arq writes. The worker runs
the script when a job ends and every `poll_delay` (which is now only how soon a job queued
while idle, or a deferred retry that fell due, is noticed). A job is started by at most one
worker (the script is atomic); a worker that dies leaves the in-progress key to expire, after
which another worker runs the job again with the next try, as with arq. Unlike arq, a poll that
cannot reach Redis (a failover) does not end the loop: it polls on, and the running jobs are
not cancelled mid-delivery.

With `job_state`, the same script also reads each claimed job's own state (one key tested for
existence, one hash), named from the job id, and the job finds it in `ctx["job_state"]`: the
egress job's "already published?" and per-recipient record, read in the claim's round trip
instead of one more before the job starts. Read atomically with the claim, it is what the job
would have read first thing: only the worker holding the claim runs that job id.

A job may also hand the worker its last write (`ctx["end_writes"]`, a list of `EndWrite`): the
worker sends it in the same pipeline as the finish script, before it, so the two cost one round
trip (the egress publishes its result this way). The finish script counts the job as done only
if the write's marker key exists afterwards; if the write failed, the script changes nothing and
the job is re-queued after the write's own retry delay, as if it had raised `Retry` there.

The jobs run as arq would run them for this service's configuration (one function,
`keep_result=0`, no cron jobs, aborts or hooks: refused otherwise): `ctx` carries `job_id`,
`job_try`, `enqueue_time` and `score`; `Retry(defer)` re-queues; a cancelled job (shutdown)
is handed back at once; any other exception, the job timeout, `max_tries` exceeded or an
undecodable or expired job ends the job as failed. `tests/egress/test_egress_prompt_worker.py` pins
this against arq's own enqueueing side, and `tests/egress/test_prompt_worker_arq_layout.py` against
arq's job status, dedupe, in-progress claims and try count (a stock arq `Worker` on the same
queue), so a change of arq's layout fails there; the service refuses an untested arq at start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from arq.connections import create_pool
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import deserialize_job_raw
from arq.utils import ms_to_datetime, timestamp_ms
from arq.worker import Retry, Worker
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from shared import lua
from shared.logs import get_logger, log
from shared.replication import FAILOVER_ERRORS, NO_ACK, ScriptCall, as_failover_error, script_replies

logger = get_logger(__name__)

RETRY_KEY_TTL_S = 88400  # as arq
FINISH_RETRY_S = 0.2


@dataclass(frozen=True, slots=True)
class JobStateKeys:
    """Which keys of a claimed job the claim script reads: `pattern` is a Lua pattern (anchored,
    with captures) matching the job id, `exists` and `hash` are `string.gsub` replacements
    (`%1`, `%2`, ... for the captures) naming a key tested with EXISTS and a hash read with
    HGETALL. A job id the pattern does not match gets (False, {})."""

    pattern: str
    exists: str
    hash: str


@dataclass(frozen=True, slots=True)
class JobState:
    exists: bool
    hash: dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    job_id: str
    score: int
    raw: bytes | None  # None: the job key expired
    job_try: int
    state: JobState | None = None  # read with the claim when the worker has `job_state`


@dataclass(frozen=True, slots=True)
class EndWrite:
    """A job's last write, sent by the worker just before the finish script in one pipeline.

    `call` must be idempotent (a failover resends it); `marker` is a key it leaves behind when it
    took effect: the job counts as done only if it exists. `on_reply` gets the call's reply, or
    the exception it failed with (then the job is re-queued after `retry_defer_s`), once the
    finish went through."""

    call: ScriptCall
    marker: str
    retry_defer_s: float
    on_reply: Callable[[Any], None]


@dataclass(frozen=True, slots=True)
class Ending:
    """How a run ended, for the next script: `done` removes the job, else it is re-queued."""

    done: bool
    defer_ms: int = 0
    writes: tuple[EndWrite, ...] = ()  # sent with the finish (a done ending only)


DONE = Ending(done=True)


class PromptWorker(Worker):
    def __init__(
        self,
        *args: Any,
        job_state: JobStateKeys | None = None,
        failover_wait_s: float = NO_ACK.failover_wait_s,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._job_state = job_state
        self._failover_wait_s = failover_wait_s  # redis.failoverWaitMs: how long a job's end is retried
        unsupported = [
            name
            for name, used in (
                ("burst", self.burst),
                ("cron_jobs", self.cron_jobs),
                ("allow_abort_jobs", self.allow_abort_jobs),
                ("keep_result", self.keep_result_s > 0 or self.keep_result_forever),
                ("job hooks", self.on_job_start or self.on_job_end or self.after_job_end),
                ("retry_jobs=False", not self.retry_jobs),
            )
            if used
        ]
        if unsupported or len(self.functions) != 1:
            raise ValueError(f"PromptWorker runs exactly one function without {', '.join(unsupported)}")
        self._script: AsyncScript | None = None
        self._reserved = 0  # slots asked for by a script in flight
        self._redis_down = False  # the last poll failed on a connection error (logged once)

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await create_pool(
                self.redis_settings,
                job_deserializer=self.job_deserializer,
                job_serializer=self.job_serializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
        self._script = lua.FINISH_AND_CLAIM.on(self.pool)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        while True:
            await self._poll_iteration()
            await asyncio.sleep(self.poll_delay_s)

    async def _poll_iteration(self) -> None:
        try:
            if self._free_slots():
                await self._finish_and_claim(None, DONE)
            await self.heart_beat()
        except FAILOVER_ERRORS as exc:
            # Redis unreachable (a failover, docs/HA.md): poll again, as the jobs running now
            # retry their own Redis calls. Ending the loop would cancel them mid-delivery.
            if not self._redis_down:
                log(logger, logging.WARNING, "redis unavailable; polling on", error=type(exc).__name__)
            self._redis_down = True
        else:
            if self._redis_down:
                log(logger, logging.INFO, "redis available again")
            self._redis_down = False
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # as arq: an error outside the job function ends the worker loop

    def _free_slots(self) -> int:
        if not self.allow_pick_jobs:
            return 0
        return max(0, self.max_jobs - self.job_counter - self._reserved)

    async def _finish_and_claim(self, finished: str | None, ending: Ending) -> bool:
        """Finish `finished` (with its end writes) and start what could be claimed; False when
        an end write failed, and then nothing was changed."""
        assert self._script is not None, "main() registers the script"
        wanted = self._free_slots()
        self._reserved += wanted
        try:
            keys = [self.queue_name, abort_jobs_ss]
            args = [
                timestamp_ms(),
                wanted,
                self.queue_read_limit,
                int(self.in_progress_timeout_s * 1000),
                finished or "",
                "done" if ending.done else "requeue",
                ending.defer_ms,
                in_progress_key_prefix,
                job_key_prefix,
                retry_key_prefix,
                RETRY_KEY_TTL_S,
                *(
                    (self._job_state.pattern, self._job_state.exists, self._job_state.hash)
                    if self._job_state is not None
                    else ("", "", "")
                ),
            ]
            if ending.writes:
                reply = await self._write_and_finish(ending.writes, keys, args)
            else:
                reply = await self._script(keys=keys, args=args)
        except ResponseError as exc:
            failover = as_failover_error(exc)
            if failover is exc:
                raise
            raise failover from exc
        finally:
            self._reserved -= wanted
        if reply == -1:
            return False
        for index in range(0, len(reply), 6):
            job_id, score, raw, job_try, exists, flat = reply[index : index + 6]
            state = None
            if self._job_state is not None:
                state = JobState(bool(exists), dict(zip(flat[::2], flat[1::2], strict=True)))
            self._start(ClaimedJob(job_id.decode(), int(float(score)), raw or None, int(job_try), state))
        return True

    async def _write_and_finish(self, writes: Sequence[EndWrite], keys: list[Any], args: list[Any]) -> Any:
        """The writes then the finish script (guarded by the writes' markers), one round trip;
        the finish script's reply. A missing script (Redis restarted or failed over) is loaded
        and the calls from the first one refused on are sent again, in order (`script_replies`):
        a finish that ran after a refused write found its marker missing and changed nothing.
        Each write's reply is that of its last run. A write refused by a demoted
        primary (READONLY) raises like a lost connection, so the whole pipeline goes to the new
        primary rather than the job being re-queued and sent again."""
        finish = ScriptCall(lua.FINISH_AND_CLAIM, keys, [*args, *(write.marker for write in writes)])
        sent = await script_replies(self.pool, [*(write.call for write in writes), finish], in_order=True)
        *written, reply = sent.replies
        for each in sent.replies:
            failed = as_failover_error(each) if isinstance(each, ResponseError) else each
            if isinstance(failed, FAILOVER_ERRORS):
                raise failed  # retried whole (the writes are idempotent), as `run_scripts` would
        if isinstance(reply, Exception):
            raise reply
        for write, written_reply in zip(writes, written, strict=True):
            write.on_reply(written_reply)
        return reply

    def _start(self, job: ClaimedJob) -> None:
        self.job_counter += 1
        self.tasks[job.job_id] = self.loop.create_task(self._run(job))

    async def _run(self, job: ClaimedJob) -> None:
        writes: list[EndWrite] = []
        try:
            ending = await self._execute(job, writes)
        except asyncio.CancelledError:  # shutdown (handle_sig): hand the job back at once, as arq does
            self.jobs_retried += 1
            ending = Ending(done=False)
        if ending.done and writes:
            ending = replace(ending, writes=tuple(writes))
        self.job_counter -= 1
        await asyncio.shield(self._finish_through_failover(job, ending))

    async def _finish_through_failover(self, job: ClaimedJob, ending: Ending) -> None:
        """Record the job's end, sent again to the new primary after a failover (docs/HA.md):
        otherwise the job would wait out its in-progress key and run once more. Finishing is
        idempotent; jobs claimed by a reply that was lost run after their in-progress key expires.
        A failed end write turns the ending into a re-queue after the write's retry delay."""
        deadline = time.monotonic() + self._failover_wait_s
        while True:
            try:
                if await self._finish_and_claim(job.job_id, ending):
                    return
                self.jobs_retried += 1
                defer_s = max(write.retry_defer_s for write in ending.writes)
                ending = Ending(done=False, defer_ms=_defer_ms(job, defer_s))
                continue
            except FAILOVER_ERRORS:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(FINISH_RETRY_S)

    def handle_sig(self, signum: Any) -> None:
        self.allow_pick_jobs = False  # jobs ending from here on claim nothing new
        super().handle_sig(signum)

    async def _execute(self, job: ClaimedJob, writes: list[EndWrite]) -> Ending:
        if job.raw is None:
            return self._failed(job, "job expired")
        try:
            function_name, args, kwargs, enqueue_job_try, enqueue_time_ms = deserialize_job_raw(
                job.raw, deserializer=self.job_deserializer
            )
            function = self.functions[function_name]
        except Exception:
            return self._failed(job, "undecodable job or unknown function")
        job_try = job.job_try
        if enqueue_job_try and enqueue_job_try > job_try:  # enqueued with `_job_try`
            job_try = enqueue_job_try
            await self.pool.setex(retry_key_prefix + job.job_id, RETRY_KEY_TTL_S, str(job_try))
        max_tries = self.max_tries if function.max_tries is None else function.max_tries
        if job_try > max_tries:
            return self._failed(job, f"max {max_tries} tries exceeded")
        timeout_s = self.job_timeout_s if function.timeout_s is None else function.timeout_s
        ctx = {
            **self.ctx,
            "job_id": job.job_id,
            "job_try": job_try,
            "enqueue_time": ms_to_datetime(enqueue_time_ms),
            "score": job.score,
        }
        if job.state is not None:
            ctx["job_state"] = job.state
        ctx["end_writes"] = writes
        try:
            async with asyncio.timeout(timeout_s):
                await function.coroutine(ctx, *args, **kwargs)
        except Retry as retry:
            self.jobs_retried += 1
            return Ending(done=False, defer_ms=_defer_ms(job, retry.defer_score / 1000) if retry.defer_score else 0)
        except TimeoutError:
            return self._failed(job, f"job timed out after {timeout_s}s")
        except Exception:
            logger.exception("job failed", extra={"job_id": job.job_id})
            self.jobs_failed += 1
            return DONE
        self.jobs_complete += 1
        return DONE

    def _failed(self, job: ClaimedJob, reason: str) -> Ending:
        log(logger, logging.WARNING, "job failed without running", job_id=job.job_id, reason=reason)
        self.jobs_failed += 1
        return DONE


def _defer_ms(job: ClaimedJob, defer_s: float) -> int:
    """The score increment that makes a re-queued job due `defer_s` from now (as arq's Retry)."""
    return round(defer_s * 1000) + (timestamp_ms() - job.score)
