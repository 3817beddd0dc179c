"""Which of this node's sockets gets each delivery result of a persona, and when to look.

services/tunnel/results.py holds the Redis steps of forwarding (read a batch with the origin
of each stream, send, delete on the pong); this module decides the target among the sockets in
the registry (services/tunnel/registry.py): the socket that sent the stream if it is here,
nothing if it is held by another live node, else the persona's inbound socket here, else an
outbound-role socket here if no node holds an inbound one. It also remembers which accepted
streams each socket still waits a result for, so a closing socket's origin records are
forgotten and their results go to another socket.

One forwarding pass per persona at a time (a lock each), started by a wake-up, the sweep or an
authentication that found results waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.tunnel import results
from services.tunnel.ownership import Ownership
from services.tunnel.registry import NodeSocket, SocketRegistry
from shared.logs import get_logger, log
from shared.wakeup import WakeupKind, wake_owner

logger = get_logger(__name__)


class ResultRouter:
    """Forwards a persona's pending results to the right socket of this node (see the module)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        node_id: str,
        registry: SocketRegistry[NodeSocket],
        ownership: Ownership,
        pong_timeout_s: float,
    ) -> None:
        self._redis = redis
        self._node_id = node_id
        self._registry = registry
        self._ownership = ownership
        self._pong_timeout_s = pong_timeout_s
        self._origins = results.OriginRecords(redis)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Accepted outbound streams whose result has not reached the socket that sent them.
        self._awaiting: dict[NodeSocket, set[str]] = {}

    def stream_accepted(self, socket: NodeSocket, stream_id: str) -> None:
        """`socket` sent `stream_id` and it was queued: its result is due back on it."""
        self._awaiting.setdefault(socket, set()).add(stream_id)

    def spawn(self, persona_key: str) -> None:
        """Forward in the background (a wake-up, the sweep or an authentication found some)."""
        task = asyncio.get_running_loop().create_task(self.forward(persona_key))
        task.add_done_callback(_ignore_outcome)

    async def forward(self, persona_key: str) -> int:
        """Send the persona's pending results this node is responsible for; the number delivered."""
        async with self._locks[persona_key]:
            delivered = 0
            after: bytes | None = None
            while True:
                batch = await results.read_batch(self._redis, persona_key, after)
                if not batch:
                    return delivered
                after = batch[-1].entry_id
                plan = await self._plan(persona_key, batch)
                await results.drop_unreadable(self._redis, persona_key, [p.entry_id for p in batch if p.result is None])
                if plan:
                    delivered += await results.deliver(
                        self._redis, persona_key, plan, self._pong_timeout_s, self._delivered
                    )
                if len(batch) < results.RESULTS_BATCH:
                    return delivered

    async def socket_gone(self, socket: NodeSocket, persona_key: str) -> None:
        """A closing socket's unanswered streams: their results go to another socket now, so
        wake whoever may hold one."""
        stream_ids = list(self._awaiting.pop(socket, ()))
        origin = results.Origin(self._node_id, socket.socket_id)
        try:
            if await self._origins.forget(persona_key, origin, stream_ids):
                await wake_owner(self._redis, persona_key, WakeupKind.RESULT)
        except RedisError as exc:
            log(logger, logging.WARNING, "origin records not forgotten", persona=persona_key, error=repr(exc))
        lock = self._locks.get(persona_key)
        if not self._registry.serves(persona_key) and lock and not lock.locked():
            del self._locks[persona_key]

    async def _plan(
        self, persona_key: str, batch: list[results.PendingResult]
    ) -> dict[results.ResultTarget, list[results.PendingResult]]:
        foreign = {p.origin.node_id for p in batch if p.origin is not None and p.origin.node_id != self._node_id}
        alive = await results.live_nodes(self._redis, foreign)
        fallback: NodeSocket | None = None
        fallback_known = False
        plan: dict[results.ResultTarget, list[results.PendingResult]] = {}
        for pending in batch:
            if pending.result is None:
                continue
            origin = pending.origin
            target: NodeSocket | None = None
            if origin is not None:
                if origin.node_id == self._node_id:
                    target = self._registry.socket(origin.socket_id)
                elif origin.node_id in alive:
                    continue  # the origin's node sends it (or forgets the origin on close)
            if target is None:
                if not fallback_known:
                    fallback, fallback_known = await self._fallback(persona_key), True
                target = fallback
            if target is not None:
                plan.setdefault(target, []).append(pending)
        return plan

    async def _fallback(self, persona_key: str) -> NodeSocket | None:
        target = self._registry.inbound(persona_key)
        if target is not None:
            return target
        holders = self._registry.outbound_sockets(persona_key)
        if not holders or await self._ownership.current_owner(persona_key) is not None:
            return None
        return holders[0]

    def _delivered(self, target: results.ResultTarget, stream_id: str) -> None:
        awaiting = self._awaiting.get(target)  # type: ignore[call-overload]
        if awaiting is not None:
            awaiting.discard(stream_id)


def _ignore_outcome(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
