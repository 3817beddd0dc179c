"""Durable, idempotent enqueue of one accepted message: the step behind `250 2.0.0 queued as ...`.

DESIGN.md "Inbound: accepted means durable": a persona's inbox entries and byte counter are
written in ONE MULTI/EXEC, and the caller answers 250 only after EXEC returned. A Redis error or
timeout reaches the caller as `EnqueueFailed`, which it answers with 451 so the sender retries.

Idempotent, because a 451 does not prove that nothing was written: Redis may commit the EXEC
and the reply be lost (Redis killed right after, a network cut). The retry must then be
answered with the first queue id, not stored again under a new one, or the gateway would get
one message under two stream ids. So each persona's transaction also sets
`keys.accepted(pk, digest)` = queue id, with a TTL of `ACCEPTED_TTL_S`; the digest covers what
the sender sends again unchanged on a retry (MAIL FROM, the RCPT list as written, the message
bytes), nothing of ours (queue id, time, `Received:` header) and nothing of the connection
(client IP or port: a retry may come from another host of the same sending cluster). The
transaction is guarded by WATCH on that key: if it exists, its queue id is the answer and
nothing is written; if another session sets it between our check and EXEC, EXEC aborts and
this attempt is a 451 (whose retry then finds the key).

Redis Cluster: a persona's keys share the `{pk}` hash tag, so each persona's WATCH+MULTI is one
slot. A message for several personas is one transaction per persona, in recipient order; the
first persona's transaction decides the queue id (ours, or the one it had stored), and the
others are written with it. If one persona's transaction fails after another committed, the
answer is 451 and the retry completes the rest under the same queue id: every persona ends up
with exactly one copy, each stream id `<queue_id>.<n>` as on the first attempt.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.logs import log
from shared.payloads import InboxEntry

logger = logging.getLogger("relay.ingress")

QUEUE_ID_RANDOM_BYTES = 15
ENQUEUE_TIMEOUT_S = 10.0
ACCEPTED_TTL_S = 24 * 3600
INBOX_ENTRY_FIELD = b"m"


class EnqueueFailed(Exception):
    """Redis did not confirm the transaction; nothing may be reported as accepted."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One inbox entry to write, for the persona its recipient routes to."""

    persona_key: str
    entry: InboxEntry


@dataclass(frozen=True, slots=True)
class Enqueued:
    """The queue id to answer with, and how many inbox entries this attempt wrote (0 when the
    whole message had been accepted before: a retry after a lost reply)."""

    queue_id: str
    entries_written: int


DeliveriesFor = Callable[[str], list[Delivery]]


def new_queue_id() -> str:
    """`q` + lowercase base32 of 120 random bits: 25 chars, so `<queue_id>.<n>` stays short."""
    return "q" + base64.b32encode(secrets.token_bytes(QUEUE_ID_RANDOM_BYTES)).decode("ascii").lower()


def message_digest(mail_from: str, rcpt_tos: list[str], content: bytes) -> str:
    """SHA-256 over the envelope and the bytes as the sender sent them, each length-prefixed so
    that no two different envelopes serialize alike."""
    digest = hashlib.sha256()
    addresses = [address.encode("utf-8", "surrogateescape") for address in (mail_from, *rcpt_tos)]
    for part in (*addresses, content):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


async def enqueue(
    redis: aioredis.Redis, digest: str, queue_id: str, deliveries_for: DeliveriesFor
) -> Enqueued:
    """Write `deliveries_for(queue_id)` once per digest; returns the queue id to answer with.

    `deliveries_for` builds the entries for a queue id (the trace header and attestations name
    it), so a retry whose first persona was already stored is rebuilt with the stored id.
    """
    try:
        return await asyncio.wait_for(_enqueue(redis, digest, queue_id, deliveries_for), ENQUEUE_TIMEOUT_S)
    except (RedisError, OSError, TimeoutError) as exc:
        raise EnqueueFailed(type(exc).__name__) from exc


async def _enqueue(redis: aioredis.Redis, digest: str, queue_id: str, deliveries_for: DeliveriesFor) -> Enqueued:
    deliveries = deliveries_for(queue_id)
    written = 0
    for position, persona_key in enumerate(dict.fromkeys(delivery.persona_key for delivery in deliveries)):
        own = [delivery for delivery in deliveries if delivery.persona_key == persona_key]
        stored = await _write_once(redis, keys.accepted(persona_key, digest), queue_id, own)
        if stored is None:
            written += len(own)
        elif stored != queue_id and position == 0:
            queue_id = stored
            deliveries = deliveries_for(queue_id)
        elif stored != queue_id:  # only if the first persona's marker expired before this one's
            log(logger, logging.WARNING, "retry stored under two queue ids",
                queue_id=queue_id, stored_queue_id=stored, persona=persona_key)
    return Enqueued(queue_id, written)


async def _write_once(
    redis: aioredis.Redis, accepted_key: str, queue_id: str, deliveries: list[Delivery]
) -> str | None:
    """None when this call wrote the entries, else the queue id stored by an earlier attempt."""
    persona_key = deliveries[0].persona_key
    async with redis.pipeline(transaction=True) as pipe:
        await pipe.watch(accepted_key)
        stored = await pipe.get(accepted_key)
        if stored is not None:
            return bytes(stored).decode("ascii")
        pipe.multi()  # type: ignore[no-untyped-call]
        for delivery in deliveries:
            pipe.xadd(keys.inbox(persona_key), {INBOX_ENTRY_FIELD: delivery.entry.pack()})
        pipe.incrby(keys.inbox_bytes(persona_key), sum(len(delivery.entry.data) for delivery in deliveries))
        pipe.set(accepted_key, queue_id.encode("ascii"), ex=ACCEPTED_TTL_S)
        replies = await pipe.execute(raise_on_error=True)  # WatchError if the key appeared meanwhile
    if len(replies) != len(deliveries) + 2 or any(reply is None for reply in replies):
        raise EnqueueFailed("transaction not confirmed")
    return None
