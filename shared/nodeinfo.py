"""Liveness records of every service process, read by `protege-relay status`.

Each process refreshes `relay:nodeinfo:<node>` (a hash with a TTL) and adds itself to the
`relay:nodes` set; a node whose hash expired is dead and is pruned by the reader.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from shared import keys

# A node is dead once it missed three heartbeats. Short, because a tunnel node's liveness
# decides when results of streams sent through it may go to the persona's other sockets:
# a crashed node's results then move within ~10 s, inside a gateway's 20 s wait.
HEARTBEAT_INTERVAL_S = 3
NODE_TTL_S = 10


async def publish_node_info(redis: aioredis.Redis, node_id: str, role: str, **counters: int) -> None:
    fields: dict[str, str | int] = {"role": role, "updated_ms": int(time.time() * 1000), **counters}
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hset(keys.node_alive(node_id), mapping=fields)
        pipe.expire(keys.node_alive(node_id), NODE_TTL_S)
        pipe.sadd(keys.NODES_KEY, node_id)
        await pipe.execute()


async def remove_node_info(redis: aioredis.Redis, node_id: str) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.delete(keys.node_alive(node_id))
        pipe.srem(keys.NODES_KEY, node_id)
        await pipe.execute()
