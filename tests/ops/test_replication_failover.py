"""shared/replication.run_scripts through a failover on a real redis-server: a write refused by a
demoted primary is sent again until the node takes writes, however Redis reports the refusal
(Redis 6 turns READONLY inside a script into a generic script error)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ReadOnlyError, ResponseError

from protege_relay.embedded_redis import EmbeddedRedis, free_port
from shared.lua import LuaScript
from shared.replication import NO_ACK, ScriptCall, as_failover_error, run_scripts
from tests.support.wait import eventually

WRITE = LuaScript.of("redis.call('SET', KEYS[1], ARGV[1]) return 7")


async def error_replies(admin: aioredis.Redis) -> int:
    return int((await admin.info("stats"))["total_error_replies"])


@pytest.mark.own_redis  # REPLICAOF: the server is demoted for a moment
async def test_a_script_write_refused_by_a_demoted_primary_is_retried_until_it_takes_writes(
    redis_server: EmbeddedRedis,
) -> None:
    admin = aioredis.Redis.from_url(redis_server.url)
    writer = aioredis.Redis.from_url(redis_server.url)
    try:
        await writer.script_load(WRITE.source)
        await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # nobody there: read-only
        refused_before = await error_replies(admin)
        write = asyncio.ensure_future(
            run_scripts(writer, [ScriptCall(WRITE, ["failover:k"], ["v"])], NO_ACK, deadline_s=30)
        )
        # Refused at least twice, so it was retried; then the node is a primary again.
        await eventually(lambda: _refused_twice(admin, refused_before, write), 10, "the refused write was not retried")
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        assert await asyncio.wait_for(write, 10) == [7]
        assert await admin.get("failover:k") == b"v"
    finally:
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        await admin.aclose()
        await writer.aclose()


async def _refused_twice(admin: aioredis.Redis, before: int, write: asyncio.Future[list[Any]]) -> bool:
    if write.done():
        write.result()  # raises what run_scripts raised: the refusal was not treated as a failover
        raise AssertionError("the write finished while the node was read-only")
    return await error_replies(admin) >= before + 2


@pytest.mark.parametrize(
    ("reply", "failover"),
    [
        (
            "Error running script (call to f_x): @user_script:1: -READONLY You can't write against a read only replica",
            True,
        ),
        ("READONLY You can't write against a read only replica.", True),
        ("Error running script: @user_script:1: refused", False),
    ],
)
def test_only_a_readonly_refusal_counts_as_a_failover(reply: str, failover: bool) -> None:
    error = ResponseError(reply) if reply.startswith("Error") else ReadOnlyError(reply)
    assert isinstance(as_failover_error(error), ReadOnlyError) is failover
