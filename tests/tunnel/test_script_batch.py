"""The node-wide script batch (services/tunnel/script_batch.py) against a real Redis: calls made in
one loop turn leave in one pipeline, each caller gets its own reply or its own error, a Redis that
lost its scripts is handled, and a caller cancelled before the pipeline leaves is left out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from protege_relay.embedded_redis import EmbeddedRedis
from services.tunnel.script_batch import ScriptBatch, batch_for
from shared import keys, lua
from shared.replication import ScriptCall


@pytest.fixture
async def client(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    connection = aioredis.Redis.from_url(redis_server.url)
    yield connection
    await connection.aclose()


def release_call(n: int) -> ScriptCall:
    persona = f"persona{n}"
    return ScriptCall(lua.RELEASE_OWNER, [keys.owner(persona), keys.socket(persona)], ["node-a", f"socket{n}"])


def seed_sockets(redis_client: redis.Redis, count: int) -> None:
    for n in range(count):
        redis_client.set(keys.owner(f"persona{n}"), "node-a")
        # Odd personas are held by another socket: their release must answer 0 and keep the keys.
        redis_client.set(keys.socket(f"persona{n}"), f"socket{n}" if n % 2 == 0 else "someone-else")


async def test_calls_of_one_loop_turn_share_one_pipeline_and_get_their_own_replies(
    client: aioredis.Redis, redis_client: redis.Redis
) -> None:
    seed_sockets(redis_client, 10)
    batch = ScriptBatch(client)
    replies = await asyncio.gather(*(batch.run(release_call(n)) for n in range(10)))
    print(f"10 calls: {batch.pipelines} pipeline(s)")
    assert replies == [1, 0] * 5
    assert batch.pipelines == 1
    assert redis_client.get(keys.socket("persona1")) == b"someone-else"
    assert redis_client.get(keys.socket("persona0")) is None


async def test_an_error_goes_to_its_caller_only(client: aioredis.Redis, redis_client: redis.Redis) -> None:
    seed_sockets(redis_client, 2)
    redis_client.hset(keys.challenge("c1"), mapping={"pk": "pk1", "exp": "100", "used": "0"})
    batch = ScriptBatch(client)
    broken = ScriptCall(lua.CONSUME_CHALLENGE, [keys.challenge("c1")], ["pk1", "not a number"])
    replies: list[object] = await asyncio.gather(batch.run(release_call(0)), batch.run(broken), return_exceptions=True)
    good, bad = replies
    assert good == 1
    assert isinstance(bad, ResponseError)
    assert batch.pipelines == 1


async def test_scripts_missing_in_redis_are_loaded_and_the_calls_sent_again(
    client: aioredis.Redis, redis_client: redis.Redis
) -> None:
    seed_sockets(redis_client, 4)
    redis_client.script_flush()
    batch = ScriptBatch(client)
    assert await asyncio.gather(*(batch.run(release_call(n)) for n in range(4))) == [1, 0, 1, 0]
    assert redis_client.script_exists(lua.RELEASE_OWNER.sha) == [True]


async def test_a_caller_cancelled_before_the_pipeline_leaves_is_not_sent(
    client: aioredis.Redis, redis_client: redis.Redis
) -> None:
    seed_sockets(redis_client, 2)
    batch = ScriptBatch(client)
    cancelled = asyncio.ensure_future(batch.run(release_call(0)))
    kept = asyncio.ensure_future(batch.run(release_call(1)))
    # Runs after both tasks queued their call and before the pipeline they scheduled leaves.
    asyncio.get_running_loop().call_soon(cancelled.cancel)
    assert await kept == 0  # persona1 belongs to someone else
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert redis_client.get(keys.socket("persona0")) == b"socket0"  # the cancelled release never ran
    assert batch.calls == 1


async def test_users_of_one_client_share_its_batch(client: aioredis.Redis) -> None:
    assert batch_for(client) is batch_for(client)


async def test_plain_commands_share_the_pipeline_and_get_their_own_replies(
    client: aioredis.Redis, redis_client: redis.Redis
) -> None:
    seed_sockets(redis_client, 2)
    batch = ScriptBatch(client)
    redis_client.set("text", "not a number")

    def count(pipe: Pipeline) -> None:
        pipe.incr("counter")
        pipe.expire("counter", 60)

    def broken(pipe: Pipeline) -> None:
        pipe.incr("text")

    replies: list[object] = await asyncio.gather(
        batch.run_commands(count),
        batch.run(release_call(0)),
        batch.run_commands(broken),
        batch.run_commands(count),
        return_exceptions=True,
    )
    assert replies[:2] == [[1, True], 1]
    assert isinstance(replies[2], ResponseError)  # an error reply is raised to its caller only
    assert replies[3] == [2, True]
    assert batch.pipelines == 1
