"""The ingress's batching Redis client (shared/redis_batch.py) against a real redis-server.

Pipelines executed together by concurrent sessions must leave on one connection, and each
caller must still get exactly what redis-py's own pipeline would give it: its replies in
order, errors in place or raised, a failed connection as an exception, never a hang or
another caller's reply.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError

from protege_relay.embedded_redis import EmbeddedRedis
from shared.redis_batch import BatchingRedis, pack_commands
from tests.support.wait import eventually

CLIENT_NAME = "batch-test"
CALL_TIMEOUT_S = 10.0


def named_connections(redis_client: redis.Redis) -> int:
    clients: list[dict[str, Any]] = redis_client.client_list()  # type: ignore[assignment]
    return sum(1 for client in clients if client.get("name") == CLIENT_NAME)


async def counter_pipeline(client: BatchingRedis, index: int) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        pipe.incr(f"counter:{index}")
        pipe.incrby(f"counter:{index}", index)
        pipe.get(f"counter:{index}")
        replies: list[Any] = await pipe.execute()
    return replies


async def test_concurrent_pipelines_share_one_connection_and_get_their_own_replies(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    client = BatchingRedis.from_url(redis_server.url, client_name=CLIENT_NAME)
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            results = await asyncio.gather(*(counter_pipeline(client, index) for index in range(50)))
        connections = named_connections(redis_client)
    finally:
        await client.aclose()
    print(f"50 concurrent pipelines used {connections} connection(s)")
    assert results == [[1, 1 + index, str(1 + index).encode()] for index in range(50)]
    assert connections == 1


async def test_an_error_reply_is_raised_or_kept_in_place_as_redis_py_does(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    redis_client.set("text", "not a number")
    client = BatchingRedis.from_url(redis_server.url)

    async def failing(raise_on_error: bool) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("before", "1")
            pipe.incr("text")
            pipe.get("before")
            replies: list[Any] = await pipe.execute(raise_on_error=raise_on_error)
        return replies

    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            results: list[Any] = await asyncio.gather(
                failing(False), failing(True), counter_pipeline(client, 7), return_exceptions=True
            )
    finally:
        await client.aclose()
    kept, raised, neighbour = results
    assert isinstance(kept, list) and kept[0] is True and kept[2] == b"1"
    assert isinstance(kept[1], ResponseError)
    assert isinstance(raised, ResponseError) and "not an integer" in str(raised)
    assert neighbour == [1, 8, b"8"]  # a neighbour's error is not the caller's


async def test_a_connection_redis_closed_while_idle_is_replaced_not_failed(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    """After a Redis restart or CLIENT KILL the next message must still get its replies (a
    451 would bounce mail for nothing): the idle connection is dropped, a new one is used."""
    client = BatchingRedis.from_url(redis_server.url, client_name=CLIENT_NAME)
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await counter_pipeline(client, 1)
            killed: Any = redis_client.client_kill_filter(_type="normal", skipme=True)
            assert int(killed) >= 1
            # the loop has seen Redis close it (as after a restart, before the next message)
            await eventually(lambda: all(connection._reader.at_eof() for connection in client.batcher._idle))
            replies = await counter_pipeline(client, 2)
    finally:
        await client.aclose()
    assert replies == [1, 3, b"3"]


@pytest.mark.own_redis  # CLIENT KILL TYPE normal would also cut the shared test server's own connection
async def test_a_connection_lost_mid_batch_fails_every_pipeline_in_it_and_the_next_one_works(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    client = BatchingRedis.from_url(redis_server.url, client_name=CLIENT_NAME)

    async def killer() -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            pipe.execute_command("CLIENT", "KILL", "SKIPME", "no", "TYPE", "normal")
            replies: list[Any] = await pipe.execute()
        return replies

    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            results = await asyncio.gather(
                counter_pipeline(client, 1), killer(), counter_pipeline(client, 2), return_exceptions=True
            )
            after = await counter_pipeline(client, 3)
    finally:
        await client.aclose()
    print("mid-batch kill:", [type(result).__name__ for result in results])
    assert results[0] == [1, 2, b"2"]  # answered before the kill
    assert results[1] == [1]  # Redis answers CLIENT KILL, then closes its own connection
    assert isinstance(results[2], RedisConnectionError | ConnectionError)
    assert after == [1, 4, b"4"]


async def test_transactions_are_left_to_redis_py(redis_server: EmbeddedRedis) -> None:
    client = BatchingRedis.from_url(redis_server.url)
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S), client.pipeline(transaction=True) as pipe:
            pipe.incr("tx")
            pipe.incr("tx")
            replies = await pipe.execute()
    finally:
        await client.aclose()
    assert replies == [1, 2]


@pytest.mark.parametrize("count", [1, 3])
async def test_pipelines_issued_one_after_another_each_complete(redis_server: EmbeddedRedis, count: int) -> None:
    client = BatchingRedis.from_url(redis_server.url)
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            for round_index in range(count):
                assert await counter_pipeline(client, 5) == [
                    1 + round_index * 6,
                    6 + round_index * 6,
                    str(6 + round_index * 6).encode(),
                ]
    finally:
        await client.aclose()


COMMANDS: list[tuple[Any, ...]] = [
    ("EXISTS", "relay:{pk}:seen"),
    ("SET", b"key", "välue", "PX", 1500),
    ("EVALSHA", "a" * 40, 2, "k1", "k2", b"x" * 10_000, b"", 86400, 1.5, "wake"),
    ("CLIENT KILL", "TYPE", "normal"),
    (b"CONFIG GET", b"maxmemory"),
    ("SET", "view", memoryview(b"y" * 7000)),
    ("INCRBY", "counter", -3),
]


@pytest.mark.parametrize("count", range(1, len(COMMANDS) + 1))
def test_the_packer_writes_what_redis_py_writes(count: int) -> None:
    connection = BatchingRedis().connection_pool.make_connection()  # type: ignore[no-untyped-call]
    commands = COMMANDS[:count]
    ours = pack_commands(connection, commands)
    theirs = connection.pack_commands(commands)
    assert b"".join(bytes(chunk) for chunk in ours) == b"".join(bytes(chunk) for chunk in theirs)
    assert max(len(chunk) for chunk in ours) < 2 * 10_000  # large values are not copied into one buffer


def test_the_packer_refuses_what_redis_py_refuses() -> None:
    connection = BatchingRedis().connection_pool.make_connection()  # type: ignore[no-untyped-call]
    with pytest.raises(DataError):
        pack_commands(connection, [("SET", "key", True)])
    with pytest.raises(DataError):
        pack_commands(connection, [("SET", "key", None)])


def queue_mixed(pipe: Any) -> None:
    """Commands whose replies redis-py post-processes in different ways (bool, dict, options)."""
    pipe.set("mixed:s", "1", px=60_000)
    pipe.get("mixed:s")
    pipe.pexpire("mixed:s", 60_000)
    pipe.expire("mixed:missing", 10)
    pipe.hset("mixed:h", mapping={"a": "1", "b": "2"})
    pipe.hgetall("mixed:h")
    pipe.zadd("mixed:z", {"m": 1.5})
    pipe.zrange("mixed:z", 0, -1, withscores=True)
    pipe.exists("mixed:s", "mixed:h", "mixed:missing")
    pipe.info("memory")
    pipe.delete("mixed:s", "mixed:h", "mixed:z")


async def test_replies_are_post_processed_as_redis_py_does(redis_server: EmbeddedRedis) -> None:
    plain = redis.asyncio.Redis.from_url(redis_server.url)
    batching = BatchingRedis.from_url(redis_server.url)
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            async with plain.pipeline(transaction=False) as pipe:
                queue_mixed(pipe)
                expected = await pipe.execute()
            async with batching.pipeline(transaction=False) as pipe:
                queue_mixed(pipe)
                got = await pipe.execute()
    finally:
        await plain.aclose()
        await batching.aclose()
    memory = 9
    assert got[:memory] == expected[:memory] and got[memory + 1 :] == expected[memory + 1 :]
    assert isinstance(got[memory], dict) and "used_memory" in got[memory]
    assert got[2] is True and got[3] is False and got[7] == [(b"m", 1.5)]
