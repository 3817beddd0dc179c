"""shared/redis_send.py against a real Redis: commands sent without a task each, still
bounded by the client's timeout, and the client usable after a timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from protege_relay.embedded_redis import EmbeddedRedis
from shared.config import load_config
from shared.redis import connect
from shared.redis_send import TimedSend, bound_sends

COMMANDS = 50


async def tasks_created_by(client: aioredis.Redis) -> int:
    """How many tasks `COMMANDS` SET/GET calls create (the loop's task factory counts them)."""
    loop = asyncio.get_running_loop()
    created = 0

    def counting_factory(
        loop: asyncio.AbstractEventLoop, coro: Generator[Any, None, Any] | Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        nonlocal created
        created += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    await client.ping()  # connected before counting
    loop.set_task_factory(counting_factory)
    try:
        for n in range(COMMANDS):
            await client.set(f"k{n}", n)
            assert await client.get(f"k{n}") == str(n).encode()
    finally:
        loop.set_task_factory(None)
    return created


async def test_commands_are_sent_without_a_task_each(redis_server: EmbeddedRedis) -> None:
    plain = aioredis.Redis.from_url(redis_server.url, socket_timeout=5)
    bounded = aioredis.Redis.from_url(redis_server.url, socket_timeout=5)
    bound_sends(bounded)
    try:
        before, after = await tasks_created_by(plain), await tasks_created_by(bounded)
    finally:
        await plain.aclose()
        await bounded.aclose()
    print(f"tasks for {2 * COMMANDS} commands: redis-py {before}, bound_sends {after}")
    assert before >= 2 * COMMANDS
    assert after == 0


async def test_a_stalled_redis_still_times_out_and_the_client_recovers(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=0.3)
    bound_sends(client)
    try:
        await client.set("k", "v")
        redis_client.client_pause(1500)
        with pytest.raises(RedisTimeoutError):
            await client.get("k")
        redis_client.client_unpause()
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()


async def test_every_client_with_a_socket_timeout_sends_without_a_task_each(redis_server: EmbeddedRedis) -> None:
    config = load_config(environ={"RELAY_REDIS_URL": redis_server.url})
    bounded, unbounded = connect(config), connect(config, timeout_s=None)
    try:
        assert await tasks_created_by(bounded) == 0
        assert not issubclass(unbounded.connection_pool.connection_class, TimedSend)
    finally:
        await bounded.aclose()
        await unbounded.aclose()
