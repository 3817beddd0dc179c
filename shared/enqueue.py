"""Durable, idempotent enqueue of one message into persona inboxes: the step behind `250 2.0.0 queued as ...`
(ingress), in shared/ because any service that puts mail into an inbox must write it the same way.

DESIGN.md "Inbound: accepted means durable": a persona's inbox entries and byte counter are
written atomically (one Lua script, which Redis runs as one transaction and logs to the AOF as
one MULTI/EXEC), and the caller answers 250 only after the script returned. A Redis error or
timeout reaches the caller as `EnqueueFailed`, which it answers with 451 so the sender retries.

Idempotent, because a 451 does not prove that nothing was written: Redis may commit and the
reply be lost (Redis killed right after, a network cut). The retry must then be answered with
the first queue id, not stored again under a new one, or the gateway would get one message
under two stream ids. So each persona's script also sets `keys.accepted(pk, digest)` = queue id,
with a TTL of `ACCEPTED_TTL_S`; the digest covers what the sender sends again unchanged on a
retry (MAIL FROM, the RCPT list as written, the message bytes), nothing of ours (queue id, time,
`Received:` header) and nothing of the connection (client IP or port: a retry may come from
another host of the same sending cluster). The script checks that key first: if it exists, its
queue id is the answer and nothing is written. Scripts run one at a time, so two concurrent
submissions of one message cannot both write.

The marker protects a message only while it is undelivered: it is named (field `d`) in the
persona's last entry of the message, and the tunnel deletes it when it removes that entry after
the gateway has the message (shared/inbox_entries.py). An identical message sent again after
delivery (a monitor repeating an alert, a user re-sending) is then a new message, delivered
again; `ACCEPTED_TTL_S` only bounds how long a marker of an undelivered message protects it.

Bodies larger than one chunk are written apart from their entry (`keys.inbox_body`), in the
same script, so that the tunnel can stream them (shared/inbox_entries.py).

The same script wakes the tunnel node that owns the persona (the wake-up rule of `shared/lua.py`,
also when the message was accepted before: the first attempt may have committed without waking
anyone). So the common one-persona message costs one round trip here, and the wake-up is sent
before the 250 rather than after it.

Redis Cluster: the script touches only the persona's keys (accepted, inbox, inbox_bytes, owner, bodies),
which share the `{pk}` hash tag, so each call is one slot; PUBLISH names a channel, not a key. A
message for several personas is one call per persona: the first persona's call decides the queue
id (ours, or the one it had stored), and the others are written with it, pipelined in one more
round trip. If one persona's write fails after another committed, the answer is 451 and the retry
completes the rest under the same queue id: every persona ends up with exactly one copy, each
stream id `<queue_id>.<n>` as on the first attempt.

High availability (docs/HA.md): with `redis.minReplicasToAck`, WAIT follows the script in the
same pipeline (still one round trip) and the caller answers 250 only if enough replicas
confirmed; a connection error or READONLY during a failover sends the script again to the new
primary, which idempotence makes safe (`shared.replication`).

A 451 for a write that did happen (no replica confirmed it in time, or the reply was lost) is
the one case where "protected only while undelivered" is not enough: the entry may be
delivered before the sender retries, and the retry would then be a second message. So before
answering 451, `keep_markers` keeps the marker for `ACCEPTED_TTL_S` whatever happens to the
entry (`lua.KEEP_MARKER`), and with `redis.minReplicasToAck` the tunnel leaves a delivered
message's marker behind for `DELIVERED_MARKER_TTL_S`, marked delivered, in case that keeping
comes a moment after the delivery.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import OutOfMemoryError, RedisError

from shared import inbox_entries, keys, lua
from shared.logs import get_logger, log
from shared.payloads import InboxEntry
from shared.replication import NO_ACK, ReplicaAck, ScriptCall, run_scripts
from shared.wakeup import Wakeup, WakeupKind

logger = get_logger(__name__)

QUEUE_ID_RANDOM_BYTES = 15
ACCEPTED_TTL_S = 24 * 3600
KEEP_TIMEOUT_S = 2.0  # keeping the markers after a failed enqueue, before the 451 goes out
# How long a delivered message's marker lingers (marked delivered) with `redis.minReplicasToAck`:
# longer than an enqueue can take to fail (`redis.failoverWaitMs`, at most 15 s, + KEEP_TIMEOUT_S)
# with room for a stalled event loop, short enough that the extra keys stay few (delivery rate x this).
DELIVERED_MARKER_TTL_S = 60
# `lua.ENQUEUE` writes these field names
assert (inbox_entries.ENTRY_FIELD, inbox_entries.BODY_SIZE_FIELD, inbox_entries.DIGEST_FIELD) == (b"m", b"s", b"d")


class EnqueueFailed(Exception):
    """Redis did not confirm the write; nothing may be reported as accepted.

    `out_of_memory`: Redis refused the write because it is at `maxmemory` (`noeviction`), so
    the caller answers "insufficient storage" (452 4.3.1) rather than a generic 451."""

    def __init__(self, reason: str, *, out_of_memory: bool = False) -> None:
        super().__init__(reason)
        self.out_of_memory = out_of_memory


def is_out_of_memory(exc: BaseException) -> bool:
    """Redis' OOM refusal, raised directly or, from inside a script, wrapped in its error text."""
    return isinstance(exc, OutOfMemoryError) or "OOM command not allowed" in str(exc)


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
AlsoQueue = Callable[[Pipeline], object]  # more commands for the first script's round trip


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


async def load_script(redis: aioredis.Redis) -> None:
    """SCRIPT LOAD at start, so the first message does not pay for a NOSCRIPT reply."""
    await redis.script_load(lua.ENQUEUE.source)


async def enqueue(
    redis: aioredis.Redis,
    digest: str,
    queue_id: str,
    deliveries_for: DeliveriesFor,
    ack: ReplicaAck = NO_ACK,
    *,
    also: AlsoQueue | None = None,
) -> Enqueued:
    """Write `deliveries_for(queue_id)` once per digest; returns the queue id to answer with.

    `deliveries_for` builds the entries for a queue id (the trace header and attestations name
    it), so a retry whose first persona was already stored is rebuilt with the stored id.
    `also` queues bookkeeping commands (the ingress' per-IP byte count) into the first
    script's round trip, pipelined, not transactional: their replies are not checked.
    With `ack.replicas`, each write is confirmed by that many replicas (WAIT) before this
    returns; a failover meanwhile is followed (`shared.replication`: the script is idempotent).
    """
    deadline = time.monotonic() + ack.failover_wait_s
    tried: dict[str, str] = {}  # persona -> queue id, for each script call that may have run
    try:
        async with asyncio.timeout(ack.failover_wait_s):
            return await _enqueue(redis, digest, queue_id, deliveries_for, ack, also, deadline, tried)
    except (RedisError, OSError, TimeoutError) as exc:
        out_of_memory = is_out_of_memory(exc)
        if tried and not out_of_memory:
            await keep_markers(redis, digest, tried)
        raise EnqueueFailed(type(exc).__name__, out_of_memory=out_of_memory) from exc


async def keep_markers(redis: aioredis.Redis, digest: str, tried: dict[str, str]) -> None:
    """Before a 451 for a write that may have happened: keep its markers past delivery.

    The typical case is `NotReplicated`: the script ran on the primary, only no replica
    confirmed it in time. The entry stays there, and once a replica catches up the tunnel
    delivers it; without this the marker would go with the entry, and the sender's retry
    (it was told 451) would be stored and delivered again under a new queue id. Kept, the
    retry is answered with the stored queue id. `lua.KEEP_MARKER` never creates a marker, so
    when nothing was written (or the write went down with a dead primary) the retry is stored
    as usual. Best effort, bounded by `KEEP_TIMEOUT_S`: when Redis cannot be reached at all
    the outcome stays unknown, as for any lost reply (docs/HA.md)."""
    try:
        async with asyncio.timeout(KEEP_TIMEOUT_S):
            keep = lua.KEEP_MARKER.on(redis)
            async with redis.pipeline(transaction=False) as pipe:
                for persona_key, queue_id in tried.items():
                    await keep(keys=[keys.accepted(persona_key, digest)], args=[queue_id, ACCEPTED_TTL_S], client=pipe)
                kept = await pipe.execute()
    except (RedisError, OSError, TimeoutError) as exc:
        log(logger, logging.WARNING, "451 after a possible write; marker not kept", error=type(exc).__name__)
        return
    for (persona_key, queue_id), was_kept in zip(tried.items(), kept, strict=True):
        if was_kept:
            log(logger, logging.INFO, "451 after a possible write; marker kept", queue_id=queue_id, persona=persona_key)


async def _enqueue(
    redis: aioredis.Redis,
    digest: str,
    queue_id: str,
    deliveries_for: DeliveriesFor,
    ack: ReplicaAck,
    also: AlsoQueue | None,
    deadline: float,
    tried: dict[str, str],
) -> Enqueued:
    deliveries = deliveries_for(queue_id)
    by_persona = _group(deliveries)
    first_persona, *other_personas = by_persona
    first_call = _script_call(digest, queue_id, by_persona[first_persona])
    tried[first_persona] = queue_id
    (reply,) = await run_scripts(redis, [first_call], ack, deadline_s=deadline - time.monotonic(), also=also)
    stored = _text(reply)
    if stored is None:
        written = len(by_persona[first_persona])
    else:
        written = 0
        if stored != queue_id:
            queue_id = tried[first_persona] = stored
            by_persona = _group(deliveries_for(queue_id))
    if other_personas:
        calls = [_script_call(digest, queue_id, by_persona[persona_key]) for persona_key in other_personas]
        tried.update((persona_key, queue_id) for persona_key in other_personas)
        replies = await run_scripts(redis, calls, ack, deadline_s=deadline - time.monotonic())
        for persona_key, reply in zip(other_personas, replies, strict=True):
            stored = _text(reply)
            if stored is None:
                written += len(by_persona[persona_key])
            elif stored != queue_id:  # only if the first persona's marker expired before this one's
                log(
                    logger,
                    logging.WARNING,
                    "retry stored under two queue ids",
                    queue_id=queue_id,
                    stored_queue_id=stored,
                    persona=persona_key,
                )
    return Enqueued(queue_id, written)


def _group(deliveries: list[Delivery]) -> dict[str, list[Delivery]]:
    """Deliveries per persona, personas in recipient order."""
    by_persona: dict[str, list[Delivery]] = {}
    for delivery in deliveries:
        by_persona.setdefault(delivery.persona_key, []).append(delivery)
    return by_persona


def _script_call(digest: str, queue_id: str, deliveries: list[Delivery]) -> ScriptCall:
    persona_key = deliveries[0].persona_key
    script_keys = [
        keys.accepted(persona_key, digest),
        keys.inbox(persona_key),
        keys.inbox_bytes(persona_key),
        keys.owner(persona_key),
    ]
    per_entry: list[Any] = []
    for position, delivery in enumerate(deliveries, start=1):
        packed, body = inbox_entries.stored_form(delivery.entry)
        if body:
            script_keys.append(keys.inbox_body(persona_key, delivery.entry.stream_id))
        # The marker goes with the persona's last entry: entries leave in order, so when that
        # one is delivered, the whole message is.
        per_entry += [packed, body, digest if position == len(deliveries) else ""]
    args: list[Any] = [
        queue_id,
        ACCEPTED_TTL_S,
        sum(len(delivery.entry.data) for delivery in deliveries),
        Wakeup(WakeupKind.INBOX, persona_key).encode(),
        *per_entry,
    ]
    return ScriptCall(lua.ENQUEUE, script_keys, args)


def _text(reply: object) -> str | None:
    if reply is None:
        return None
    return bytes(reply).decode("ascii") if isinstance(reply, bytes | bytearray) else str(reply)
