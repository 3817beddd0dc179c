"""Script calls (shared/replication.py `call_scripts`, `PipelinedScript`) through the batching client
(shared/redis_batch.py) against a real Redis: calls made in one loop turn leave in one write, each
caller gets its own reply or its own error, a Redis that lost its scripts is handled, and a caller
cancelled before the write leaves is left out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from redis.exceptions import ResponseError

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys, lua
from shared.redis_batch import BatchingRedis
from shared.replication import PipelinedScript, ScriptCall, call_scripts, script_replies


@pytest.fixture
async def client(redis_server: EmbeddedRedis) -> AsyncIterator[BatchingRedis]:
    connection = BatchingRedis.from_url(redis_server.url)
    yield connection
    await connection.aclose()


def release_call(n: int) -> ScriptCall:
    persona = f"persona{n}"
    return ScriptCall(lua.RELEASE_OWNER, [keys.owner(persona), keys.socket(persona)], ["node-a", f"socket{n}"])


async def release(client: BatchingRedis, n: int) -> Any:
    (reply,) = await call_scripts(client, [release_call(n)])
    return reply


def seed_sockets(redis_client: redis.Redis, count: int) -> None:
    for script in (lua.RELEASE_OWNER, lua.CONSUME_CHALLENGE):
        redis_client.script_load(script.source)
    for n in range(count):
        redis_client.set(keys.owner(f"persona{n}"), "node-a")
        # Odd personas are held by another socket: their release must answer 0 and keep the keys.
        redis_client.set(keys.socket(f"persona{n}"), f"socket{n}" if n % 2 == 0 else "someone-else")


async def test_calls_of_one_loop_turn_share_one_write_and_get_their_own_replies(
    client: BatchingRedis, redis_client: redis.Redis
) -> None:
    seed_sockets(redis_client, 10)
    replies = await asyncio.gather(*(release(client, n) for n in range(10)))
    print(f"10 calls: {client.batcher.writes} write(s)")
    assert replies == [1, 0] * 5
    assert client.batcher.writes == 1
    assert redis_client.get(keys.socket("persona1")) == b"someone-else"
    assert redis_client.get(keys.socket("persona0")) is None


async def test_an_error_goes_to_its_caller_only(client: BatchingRedis, redis_client: redis.Redis) -> None:
    seed_sockets(redis_client, 2)
    redis_client.hset(keys.challenge("c1"), mapping={"pk": "pk1", "exp": "100", "used": "0"})
    consume = PipelinedScript(client, lua.CONSUME_CHALLENGE)
    replies: list[object] = await asyncio.gather(
        release(client, 0), consume(keys=[keys.challenge("c1")], args=["pk1", "not a number"]), return_exceptions=True
    )
    good, bad = replies
    assert good == 1
    assert isinstance(bad, ResponseError)
    assert client.batcher.writes == 1


async def test_scripts_missing_in_redis_are_loaded_and_the_calls_sent_again(
    client: BatchingRedis, redis_client: redis.Redis
) -> None:
    seed_sockets(redis_client, 4)
    redis_client.script_flush()
    assert await asyncio.gather(*(release(client, n) for n in range(4))) == [1, 0, 1, 0]
    assert redis_client.script_exists(lua.RELEASE_OWNER.sha) == [True]
    assert client.batcher.writes == 2  # the calls, then every caller's SCRIPT LOAD and call again


async def test_only_the_calls_redis_answered_noscript_are_sent_again(
    client: BatchingRedis, redis_client: redis.Redis
) -> None:
    """A call that ran is not run twice: its reply is its one run's (a release sent again would
    answer 0, its keys gone), so scripts that are not idempotent are safe too."""
    seed_sockets(redis_client, 2)
    redis_client.script_flush()
    redis_client.script_load(lua.RELEASE_OWNER.source)
    redis_client.hset(keys.challenge("c1"), mapping={"pk": "pk1", "exp": "99999999999999", "used": "0"})
    consume = ScriptCall(lua.CONSUME_CHALLENGE, [keys.challenge("c1")], ["pk1", "1"])
    replies = await call_scripts(client, [release_call(0), consume, release_call(1)])
    assert replies == [1, b"ok", 0]
    used: Any = redis_client.hget(keys.challenge("c1"), "used")
    assert used == b"1"
    assert client.batcher.writes == 2  # the calls, then SCRIPT LOAD and the consume again


async def test_in_order_every_call_from_the_first_noscript_on_is_sent_again(
    client: BatchingRedis, redis_client: redis.Redis
) -> None:
    """`in_order` (a call depends on the writes before it): the release after the refused
    consume ran, and runs again (a second release of its own socket answers 0); the one before
    ran once (1)."""
    seed_sockets(redis_client, 3)
    redis_client.script_flush()
    redis_client.script_load(lua.RELEASE_OWNER.source)
    redis_client.hset(keys.challenge("c1"), mapping={"pk": "pk1", "exp": "99999999999999", "used": "0"})
    consume = ScriptCall(lua.CONSUME_CHALLENGE, [keys.challenge("c1")], ["pk1", "1"])
    sent = await script_replies(client, [release_call(0), consume, release_call(2)], in_order=True)
    assert sent.replies == [1, b"ok", 0]
    assert client.batcher.writes == 2  # the calls, then SCRIPT LOAD and the calls from the consume on


async def test_a_caller_cancelled_before_the_write_leaves_is_not_sent(
    client: BatchingRedis, redis_client: redis.Redis
) -> None:
    seed_sockets(redis_client, 2)
    cancelled = asyncio.ensure_future(release(client, 0))
    kept = asyncio.ensure_future(release(client, 1))
    # Runs after both tasks queued their call and before the write they scheduled leaves.
    asyncio.get_running_loop().call_soon(cancelled.cancel)
    assert await kept == 0  # persona1 belongs to someone else
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert redis_client.get(keys.socket("persona0")) == b"socket0"  # the cancelled release never ran
    assert client.batcher.pipelines == 1


async def test_plain_commands_share_the_write_and_get_their_own_replies(
    client: BatchingRedis, redis_client: redis.Redis
) -> None:
    seed_sockets(redis_client, 2)
    redis_client.set("text", "not a number")

    async def count() -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            pipe.incr("counter")
            pipe.expire("counter", 60)
            replies: list[Any] = await pipe.execute()
        return replies

    async def broken() -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            pipe.incr("text")
            replies: list[Any] = await pipe.execute()
        return replies

    replies: list[object] = await asyncio.gather(count(), release(client, 0), broken(), count(), return_exceptions=True)
    assert replies[:2] == [[1, True], 1]
    assert isinstance(replies[2], ResponseError)  # an error reply is raised to its caller only
    assert replies[3] == [2, True]
    assert client.batcher.writes == 1
