"""Per-subject fixed-window rate limits kept in Redis, so they hold across replicas.

Each (kind, subject — usually a client IP) has one counter per minute window. The first hit
over the limit sets a deny key for `rateLimits.denyWindowMs`; while it exists the subject is
refused whatever the count.
Counter and deny key are separate keys (they are not hash-tagged together), so the check is a
non-transactional pipeline: two concurrent hits may both pass at the boundary, which is an
acceptable imprecision for a flood limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from shared import keys

WINDOW_MS = 60_000
COUNTER_TTL_MS = 2 * WINDOW_MS

Clock = Callable[[], float]
"""Seconds since the epoch (`time.time`): what the minute windows are cut from. Services take one
so that tests can hold a window still instead of waiting for a minute boundary."""


class RateKind(StrEnum):
    SMTP_CONNECTION = "smtp_conn"
    SMTP_MESSAGE = "smtp_msg"
    WS_AUTH = "ws_auth"
    SMTP_BYTES = "smtp_bytes"  # bytes accepted per client IP per hour (ingress admission)


@dataclass(frozen=True, slots=True)
class RateLimit:
    kind: RateKind
    per_minute: int
    deny_window_ms: int
    clock: Clock = time.time


async def allow(redis: aioredis.Redis, limit: RateLimit, subject: str, *, now_ms: int | None = None) -> bool:
    """Count one hit for `subject`; False if it is over the limit or inside a deny window.

    Raises redis errors: the caller decides whether to fail open or refuse.
    """
    async with redis.pipeline(transaction=False) as pipe:
        count(pipe, limit, subject, now_ms=now_ms)
        replies = await pipe.execute()
    return await judge(redis, limit, subject, replies)


def count(pipe: Pipeline, limit: RateLimit, subject: str, *, now_ms: int | None = None) -> None:
    """Queue one hit on `pipe` (its first three replies are for `judge`), so that the count can
    share a round trip with the step it guards."""
    now_ms = int(limit.clock() * 1000) if now_ms is None else now_ms
    counter_key = keys.rate_counter(limit.kind, subject, now_ms // WINDOW_MS)
    pipe.exists(keys.deny(limit.kind, subject))
    pipe.incr(counter_key)
    pipe.pexpire(counter_key, COUNTER_TTL_MS)


async def judge(redis: aioredis.Redis, limit: RateLimit, subject: str, replies: list[Any]) -> bool:
    """The verdict on the first three `replies` queued by `count`; sets the deny key when over."""
    denied, hits = replies[0], replies[1]
    if denied:
        return False
    if int(hits) > limit.per_minute:
        await redis.set(keys.deny(limit.kind, subject), b"1", px=limit.deny_window_ms)
        return False
    return True
