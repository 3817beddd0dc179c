"""Durable enqueue of one accepted message: the step behind `250 2.0.0 queued as ...`.

DESIGN.md "Inbound: accepted means durable": every recipient persona's inbox entry and byte
counter are written in ONE MULTI/EXEC, and the caller answers 250 only after EXEC returned.
Either all entries exist or none do; a Redis error or timeout reaches the caller as
`EnqueueFailed`, which it answers with 451 so the sender retries. (A timeout after Redis did
commit can make the retry a duplicate; the gateway sees a new queue id, which is the usual
at-least-once trade of SMTP itself.)
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.payloads import InboxEntry

QUEUE_ID_RANDOM_BYTES = 15
ENQUEUE_TIMEOUT_S = 10.0
INBOX_ENTRY_FIELD = b"m"


class EnqueueFailed(Exception):
    """Redis did not confirm the transaction; nothing may be reported as accepted."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One inbox entry to write, for the persona its recipient routes to."""

    persona_key: str
    entry: InboxEntry


def new_queue_id() -> str:
    """`q` + lowercase base32 of 120 random bits: 25 chars, so `<queue_id>.<n>` stays short."""
    return "q" + base64.b32encode(secrets.token_bytes(QUEUE_ID_RANDOM_BYTES)).decode("ascii").lower()


async def enqueue(redis: aioredis.Redis, deliveries: list[Delivery]) -> None:
    """XADD every entry and INCRBY each inbox's byte count in one transaction."""
    try:
        await asyncio.wait_for(_transaction(redis, deliveries), timeout=ENQUEUE_TIMEOUT_S)
    except (RedisError, OSError, TimeoutError) as exc:
        raise EnqueueFailed(type(exc).__name__) from exc


async def _transaction(redis: aioredis.Redis, deliveries: list[Delivery]) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        for delivery in deliveries:
            pipe.xadd(keys.inbox(delivery.persona_key), {INBOX_ENTRY_FIELD: delivery.entry.pack()})
            pipe.incrby(keys.inbox_bytes(delivery.persona_key), len(delivery.entry.data))
        replies = await pipe.execute(raise_on_error=True)
    if len(replies) != 2 * len(deliveries) or any(reply is None for reply in replies):
        raise EnqueueFailed("transaction not confirmed")
