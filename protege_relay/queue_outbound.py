"""Outbound delivery jobs in the egress queue, as `protege-relay queue` lists, retries and
cancels them.

The queue is arq's layout under `keys.EGRESS_QUEUE` (see services/egress/prompt_worker.py): a
sorted set of job ids scored by when each may run next, the job (`deliver` and a packed
`OutboundJob`) under arq's job key, the tries started so far under its retry key, and an
in-progress key while a worker runs it. A job is changed only while no worker holds it, and
atomically with that check (one Lua script), so an operator never races a delivery:
- retry: the job's score becomes now; the worker polls the queue every 0.1 s when idle.
- cancel: the job is claimed exactly as a worker claims it (its in-progress key, with a TTL),
  the persona's `failed` result is published through the egress's own `ResultStore` (the same
  once-only script, so a crashed cancel that left the job behind makes its next run a no-op),
  and only then is the job removed. If publishing fails the claim is released and the job
  stays queued.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import DeserializationError, deserialize_job_raw

from services.egress.results import ResultStore
from shared import keys, lua
from shared.backlog import as_text, int_or_none
from shared.codes import DeliveryError
from shared.config import RelayConfig
from shared.payloads import DeliveryResult, OutboundJob
from shared.redis import connect, credentials

PAGE = 100
CANCEL_CLAIM_TTL_MS = 60_000  # a cancel that dies midway leaves the job to run (as a no-op) after this


class JobNotQueued(Exception):
    """No such job in the egress queue (already delivered, failed or cancelled)."""


class JobRunning(Exception):
    """A worker is delivering the job right now."""


@dataclasses.dataclass(frozen=True)
class OutboundItem:
    job_id: str
    persona: str
    recipient: str
    attempts: int
    next_attempt_s: float  # 0 when due now or running
    last_error: str | None
    running: bool


def decode_job(raw: bytes | None) -> OutboundJob | None:
    if raw is None:
        return None
    try:
        _, args, _, _, _ = deserialize_job_raw(raw)
        return OutboundJob.unpack(args[0])
    except (DeserializationError, IndexError, TypeError, ValueError):
        return None


def persona_of_job_id(job_id: str) -> str:
    """`keys.egress_job_id` is `deliver:<persona>:<stream id>`: the persona without the payload."""
    parts = job_id.split(":", 2)
    return parts[1] if len(parts) == 3 else ""


def list_outbound(client: redis.Redis, persona: str | None, now_ms: int) -> list[OutboundItem]:
    """Every job in the queue, soonest first (a page of jobs at a time)."""
    items: list[OutboundItem] = []
    offset = 0
    while True:
        page = cast(
            list[tuple[bytes, float]],
            client.zrange(keys.EGRESS_QUEUE, offset, offset + PAGE - 1, withscores=True),
        )
        offset += PAGE
        wanted = [(as_text(raw), score) for raw, score in page]
        if persona is not None:
            wanted = [(job_id, score) for job_id, score in wanted if persona_of_job_id(job_id) == persona]
        items += _describe(client, wanted, now_ms)
        if len(page) < PAGE:
            return items


def _describe(client: redis.Redis, page: list[tuple[str, float]], now_ms: int) -> list[OutboundItem]:
    if not page:
        return []
    pipe = client.pipeline(transaction=False)
    for job_id, _ in page:
        pipe.get(job_key_prefix + job_id)
        pipe.get(retry_key_prefix + job_id)
        pipe.exists(in_progress_key_prefix + job_id)
    replies = pipe.execute()
    jobs = [decode_job(replies[index]) for index in range(0, len(replies), 3)]
    pipe = client.pipeline(transaction=False)
    for job in jobs:
        pipe.get(keys.egress_last_error(job.persona_key, job.stream_id) if job else "-")
    errors = pipe.execute()
    items = []
    for index, ((job_id, score), job, error) in enumerate(zip(page, jobs, errors, strict=True)):
        running = bool(replies[index * 3 + 2])
        items.append(
            OutboundItem(
                job_id=job_id,
                persona=job.persona_key if job else persona_of_job_id(job_id),
                recipient=", ".join(job.rcpt_to) if job else "?",
                attempts=int_or_none(replies[index * 3 + 1]) or 0,
                next_attempt_s=0.0 if running else round(max(0.0, score - now_ms) / 1000, 3),
                last_error=as_text(error) if error is not None else None,
                running=running,
            )
        )
    return items


def retry_now(client: redis.Redis, job_id: str) -> None:
    """Make a waiting job due now; raises JobNotQueued / JobRunning."""
    reply = as_text(
        cast(
            bytes,
            lua.QUEUE_RETRY_NOW.on(client)(
                keys=[keys.EGRESS_QUEUE], args=[job_id, in_progress_key_prefix, int(time.time() * 1000)]
            ),
        )
    )
    _raise_for(reply, job_id)


def _raise_for(reply: str, job_id: str) -> None:
    if reply == "missing":
        raise JobNotQueued(job_id)
    if reply == "running":
        raise JobRunning(job_id)


async def cancel(config: RelayConfig, redis_url: str | None, job_id: str) -> DeliveryResult | None:
    """Remove a waiting job and publish its `failed` result; returns the result (None when the
    job could not be decoded, so no persona can be told). Raises JobNotQueued / JobRunning.
    `redis_url` None: the primary the sentinels name (`redis.sentinels`)."""
    client = (
        connect(config)
        if redis_url is None
        else aioredis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5, **credentials(config))
    )
    retention_s = config.queue.retentionSeconds
    try:
        reply: Any = await lua.QUEUE_CLAIM.on(client)(
            keys=[keys.EGRESS_QUEUE],
            args=[job_id, in_progress_key_prefix, CANCEL_CLAIM_TTL_MS, job_key_prefix, retry_key_prefix],
        )
        if not isinstance(reply, list):
            _raise_for(as_text(reply), job_id)
        _, raw_job, tries = reply
        job = decode_job(raw_job)
        result = None
        try:
            if job is not None:
                result = await _publish_cancelled(client, job, int_or_none(tries) or 0, retention_s)
        except BaseException:
            await client.delete(in_progress_key_prefix + job_id)  # leave the job as it was
            raise
        async with client.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.EGRESS_QUEUE, job_id)
            pipe.delete(job_key_prefix + job_id, retry_key_prefix + job_id, in_progress_key_prefix + job_id)
            if job is not None:
                pipe.delete(keys.egress_last_error(job.persona_key, job.stream_id))
            await pipe.execute()
        return result
    finally:
        await client.aclose()


async def _publish_cancelled(client: aioredis.Redis, job: OutboundJob, tries: int, retention_s: int) -> DeliveryResult:
    store = ResultStore(client, retention_s=retention_s)
    prior = await store.prior_state(job.persona_key, job.stream_id)
    unsent = [
        recipient
        for recipient in job.rcpt_to
        if not (recipient in prior.final_outcomes and prior.final_outcomes[recipient].sent)
    ]
    result = DeliveryResult(
        stream_id=job.stream_id,
        status="failed",
        error=DeliveryError.CANCELLED_BY_OPERATOR,
        recipient=next(iter(unsent or job.rcpt_to), None),
        permanent=True,
        attempts=tries,
    )
    await store.publish(job.persona_key, result)
    return result
