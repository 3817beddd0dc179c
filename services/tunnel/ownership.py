"""Which tunnel node holds a persona's inbound socket (DESIGN.md "Ownership of a persona").

Two keys move together: `owner(pk)` = node id (what ingress and egress read to wake the right
node) and `socket(pk)` = the socket id (so a replacement anywhere can name the socket it
replaced, and so a closing socket deletes the keys only if it still holds them: two sockets of
one persona on the same node share the node id, not the socket id). Claim, renewal and release are
Lua scripts, atomic against a racing node.

Outbound-role sockets own nothing, but a node holding one registers itself in
`outbound_holders(pk)` (member = node id, score = expiry in epoch ms, renewed with the owner
keys) so that `shared.wakeup.wake_owner` can wake it for a delivery result at once instead of
leaving it to the periodic sweep. A dead node's member simply expires.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from shared import keys, lua
from shared.replication import PipelinedScript
from shared.wakeup import Wakeup, WakeupKind

OWNER_TTL_S = 30
OWNER_RENEW_INTERVAL_S = 10


@dataclass(frozen=True, slots=True)
class PreviousOwner:
    node_id: str | None
    socket_id: str | None


@dataclass(frozen=True, slots=True)
class SessionClaim:
    previous: PreviousOwner
    inbox_length: int
    results_length: int


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else None


class Ownership:
    def __init__(self, redis: aioredis.Redis, node_id: str) -> None:
        self._redis = redis
        self.node_id = node_id
        # claims and releases of every socket share writes (shared/redis_batch.py)
        self._claim_session = PipelinedScript(redis, lua.CLAIM_SESSION)
        self._renew = lua.RENEW_OWNER.on(redis)
        self._release = PipelinedScript(redis, lua.RELEASE_OWNER)

    async def claim_session(self, persona_key: str, socket_id: str, *, inbound: bool, seen_ttl_s: int) -> SessionClaim:
        """All of an authentication's writes in one round trip (`lua.CLAIM_SESSION`); an inbound
        socket takes the persona and evicts a previous socket on another node."""
        reply = await self._claim_session(
            keys=[
                keys.seen(persona_key),
                keys.owner(persona_key),
                keys.socket(persona_key),
                keys.inbox(persona_key),
                keys.results(persona_key),
                keys.outbound_holders(persona_key),
            ],
            args=[
                "1" if inbound else "0",
                self.node_id,
                socket_id,
                OWNER_TTL_S,
                seen_ttl_s,
                int(time.time() * 1000),
                keys.INBOX_GROUP,
            ],
        )
        owner = PreviousOwner(_text(reply[0]), _text(reply[1]))
        if owner.node_id and owner.node_id != self.node_id and owner.socket_id:
            evict = Wakeup(WakeupKind.EVICT, persona_key, owner.socket_id)
            await self._redis.publish(keys.node_channel(owner.node_id), evict.encode())
        return SessionClaim(owner, int(reply[2]), int(reply[3]))

    async def renew_many(self, sockets: list[tuple[str, str]], seen_ttl_s: int) -> list[bool]:
        """Extend the owner and socket TTLs of many (persona, socket) pairs in one round trip,
        refreshing each persona's seen key too; one flag per pair, False where another socket
        has taken the persona meanwhile."""
        if not sockets:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for persona_key, socket_id in sockets:
                await self._renew(
                    keys=[keys.owner(persona_key), keys.socket(persona_key)],
                    args=[self.node_id, socket_id, OWNER_TTL_S],
                    client=pipe,
                )
                pipe.set(keys.seen(persona_key), "1", ex=seen_ttl_s)
            replies = await pipe.execute()
        return [bool(renewed) for renewed in replies[::2]]

    async def release(self, persona_key: str, socket_id: str) -> bool:
        released = await self._release(
            keys=[keys.owner(persona_key), keys.socket(persona_key)], args=[self.node_id, socket_id]
        )
        return bool(released)

    async def current_owner(self, persona_key: str) -> str | None:
        return _text(await self._redis.get(keys.owner(persona_key)))

    async def hold_outbound(self, persona_keys: list[str]) -> None:
        """Register (or renew) this node as a holder of outbound-role sockets of the personas."""
        if not persona_keys:
            return
        now_ms = int(time.time() * 1000)
        expires_at_ms = now_ms + OWNER_TTL_S * 1000
        async with self._redis.pipeline(transaction=False) as pipe:
            for persona_key in persona_keys:
                holders = keys.outbound_holders(persona_key)
                pipe.zadd(holders, {self.node_id: expires_at_ms})
                pipe.zremrangebyscore(holders, "-inf", now_ms)
                pipe.expire(holders, OWNER_TTL_S)
            await pipe.execute()

    async def drop_outbound(self, persona_key: str) -> None:
        """This node holds no outbound-role socket of the persona any more."""
        await self._redis.zrem(keys.outbound_holders(persona_key), self.node_id)
