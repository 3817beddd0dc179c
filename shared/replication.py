"""Writes that count as done only when Redis says so, through a failover: the ingress enqueue
(behind `250`), the tunnel's egress job (an accepted outbound stream) and the egress result.

Replicated acknowledgements (`redis.minReplicasToAck`, docs/HA.md): Redis replicates
asynchronously, so a primary that dies a moment after confirming a write may take it along.
`WAIT n timeout` after the write, on the same connection (WAIT counts that client's writes),
blocks until n replicas confirmed it; fewer within `redis.replicaAckTimeoutMs` raises
`NotReplicated`, which callers treat like any Redis failure (451, socket closed, job retried).
The scripts and the WAIT go out in one pipeline: one round trip, as without WAIT.

Failover: a write that failed on a connection error (primary dead, sentinels still electing) or
on READONLY (a demoted primary) is sent again until `deadline_s`, each time to the primary the
sentinels name then. That is safe only because every script run here is idempotent: it checks
a marker (accepted digest, arq job key, published marker) before writing.

Every script call of the relay goes out here, as EVALSHA in a non-transactional pipeline (no
SCRIPT EXISTS first): `script_replies` is the one home of the NOSCRIPT rule, `call_scripts` and
`PipelinedScript` the plain form the tunnel uses per handshake and acknowledgement. With the
services' `shared.redis_batch.BatchingRedis` client, the pipelines of every caller in one loop
turn leave in one write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.config import RedisConfig, RelayConfig
from shared.lua import LuaScript

FAILOVER_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, ConnectionError, OSError)
RETRY_FIRST_DELAY_S = 0.05
RETRY_MAX_DELAY_S = 0.5


class NotReplicated(RedisError):
    """WAIT returned before enough replicas confirmed the write: it may not survive a failover."""

    def __init__(self, confirmed: int, required: int) -> None:
        super().__init__(f"{confirmed} of {required} replicas confirmed the write")
        self.confirmed = confirmed
        self.required = required


@dataclass(frozen=True, slots=True)
class ReplicaAck:
    """How many replicas must confirm a write and how long to wait for them; and how long the
    write is retried through an outage or failover before its caller gives up (`redis.failoverWaitMs`)."""

    replicas: int = 0
    timeout_ms: int = RedisConfig().replicaAckTimeoutMs
    failover_wait_s: float = RedisConfig().failoverWaitMs / 1000

    @classmethod
    def from_config(cls, config: RelayConfig) -> ReplicaAck:
        redis = config.redis
        return cls(redis.minReplicasToAck, redis.replicaAckTimeoutMs, redis.failoverWaitMs / 1000)


NO_ACK = ReplicaAck()


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One idempotent script run: running it twice must leave what running it once leaves."""

    script: LuaScript
    keys: list[str]
    args: list[Any]


AlsoQueue = Callable[[Pipeline], object]


async def run_scripts(
    redis: aioredis.Redis,
    calls: list[ScriptCall],
    ack: ReplicaAck,
    *,
    deadline_s: float | None = None,
    also: AlsoQueue | None = None,
) -> list[Any]:
    """The calls' replies, after `ack.replicas` replicas confirmed them (if any are required).

    Retried on failover errors until `deadline_s` (seconds from now; `ack.failover_wait_s` when
    not given); other errors, a reply that is an error and `NotReplicated` are raised. `also`
    queues bookkeeping commands after the scripts, in the same round trip; their replies are not
    checked (and they run again on a retry).
    """
    deadline = time.monotonic() + (ack.failover_wait_s if deadline_s is None else deadline_s)
    delay_s = RETRY_FIRST_DELAY_S
    while True:
        try:
            return await _run_once(redis, calls, ack, also)
        except FAILOVER_ERRORS:
            if time.monotonic() + delay_s >= deadline:
                raise
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, RETRY_MAX_DELAY_S)


def as_failover_error(exc: ResponseError) -> ResponseError:
    """`exc`, or a ReadOnlyError when it is one in disguise: Redis 6 reports a write refused
    inside a script (a demoted primary during a failover) as a generic script error whose text
    carries `-READONLY`; Redis 7 keeps the code. Either way the write must wait for the new
    primary (it is retried), not count as failed."""
    if not isinstance(exc, ReadOnlyError) and "-READONLY " in str(exc):
        return ReadOnlyError(str(exc))
    return exc


async def confirmed_read(
    redis: aioredis.Redis, command: Callable[[Pipeline], object], ack: ReplicaAck, *, is_empty: Callable[[Any], bool]
) -> Any:
    """The reply of one stream read that is also a write (XREADGROUP, XAUTOCLAIM move entries
    into the reader's pending list), confirmed by `ack.replicas` replicas when it returned
    entries. Replication is in order, so the confirmation covers the entries themselves: a
    reader hands on nothing a failover could take back (an entry a client was answered 451 for,
    then stored again under another id on its retry)."""
    if not ack.replicas:
        async with redis.pipeline(transaction=False) as pipe:
            command(pipe)
            (reply,) = await pipe.execute()
        return reply
    async with redis.pipeline(transaction=False) as pipe:
        command(pipe)
        pipe.wait(ack.replicas, ack.timeout_ms)
        reply, replicas = await pipe.execute()
    if not is_empty(reply) and int(replicas) < ack.replicas:
        raise NotReplicated(int(replicas), ack.replicas)
    return reply


async def _run_once(
    redis: aioredis.Redis, calls: list[ScriptCall], ack: ReplicaAck, also: AlsoQueue | None
) -> list[Any]:
    sent = await script_replies(redis, calls, ack=ack, also=also)
    for reply in sent.replies:
        if isinstance(reply, ResponseError):
            raise as_failover_error(reply)
        if isinstance(reply, Exception):
            raise reply
    if ack.replicas and sent.confirmed < ack.replicas:
        raise NotReplicated(sent.confirmed, ack.replicas)
    return sent.replies


@dataclass(slots=True)
class ScriptReplies:
    """What one `script_replies` round gave back."""

    replies: list[Any]  # each call's reply, an error reply in its place
    confirmed: int  # replicas that confirmed the calls (0 unless asked)
    also: list[Any]  # the replies of `also`'s commands, as they came (not sent again)


async def script_replies(
    redis: aioredis.Redis,
    calls: list[ScriptCall],
    *,
    ack: ReplicaAck = NO_ACK,
    also: AlsoQueue | None = None,
    in_order: bool = False,
) -> ScriptReplies:
    """Each call's reply (an error reply in its place), how many replicas confirmed them
    (0 unless `ack` asks) and the replies of `also`'s commands, from one pipeline: the calls as
    EVALSHA, then `also`'s commands, then WAIT.

    A Redis that lacks a script (restarted, flushed, just promoted) answers NOSCRIPT to each call
    of it, which therefore did not run: those calls alone are sent again, after SCRIPT LOAD of
    their scripts in the same pipeline (so callers of one loop turn share that write too), and
    with WAIT again (the first WAIT confirmed the calls that did run). A connection error is
    raised. `also`'s commands are not sent again.

    `in_order`: a call depends on the writes of those before it (the prompt worker's finish
    script checks the markers of the end writes sent just before it), so a call that ran after
    one answered NOSCRIPT saw a write missing and its reply is void: every call from the first
    NOSCRIPT on is sent again, in order (they must be idempotent); the calls before it stand."""
    sent = await _pipeline(redis, calls, ack, also)
    refused = [index for index, reply in enumerate(sent.replies) if isinstance(reply, NoScriptError)]
    if refused:
        missing = list(range(refused[0], len(calls))) if in_order else refused
        load = tuple({calls[index].script: None for index in refused})
        again = await _pipeline(redis, [calls[index] for index in missing], ack, None, load)
        for index, reply in zip(missing, again.replies, strict=True):
            sent.replies[index] = reply
        sent.confirmed = min(sent.confirmed, again.confirmed)
    return sent


async def call_scripts(redis: aioredis.Redis, calls: list[ScriptCall]) -> list[Any]:
    """The calls' replies, from one pipeline; the first error reply is raised. No retry and no
    replica acknowledgement (see `run_scripts` for the writes that need them)."""
    replies = (await script_replies(redis, calls)).replies
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


@dataclass(frozen=True, slots=True)
class PipelinedScript:
    """A script called like redis-py's `AsyncScript` (keys=, args=), as `call_scripts` sends it:
    EVALSHA straight away, where `AsyncScript` in a pipeline asks SCRIPT EXISTS first."""

    redis: aioredis.Redis
    script: LuaScript

    async def __call__(self, *, keys: list[Any], args: list[Any]) -> Any:
        (reply,) = await call_scripts(self.redis, [ScriptCall(self.script, keys, args)])
        return reply


async def _pipeline(
    redis: aioredis.Redis,
    calls: list[ScriptCall],
    ack: ReplicaAck,
    also: AlsoQueue | None,
    load: tuple[LuaScript, ...] = (),
) -> ScriptReplies:
    async with redis.pipeline(transaction=False) as pipe:
        for script in load:
            pipe.script_load(script.source)
        for call in calls:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        if also is not None:
            also(pipe)
        if ack.replicas:
            pipe.wait(ack.replicas, ack.timeout_ms)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    confirmed = int(replies.pop()) if ack.replicas else 0
    return ScriptReplies(replies[len(load) : len(load) + len(calls)], confirmed, replies[len(load) + len(calls) :])
