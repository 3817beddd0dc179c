"""One tunnel node: builds its parts and joins a socket's life to them.

The parts, each in its own module: the socket registry (services/tunnel/registry.py, every
in-memory index over the node's sockets), the background duties (services/tunnel/duties.py:
wake-ups, owner renewal, sweep, heartbeat, liveness), the result router
(services/tunnel/result_router.py), the auth steps (services/tunnel/auth.py), the outbound
queue and the outbound assembly budget. A connection gets them as the narrow interfaces of
`ConnectionContext`, not the node; the node itself is only the `SocketHome` there: claiming a
persona, attaching and detaching a socket, where the registry and ownership in Redis must
move together. It also owns startup and shutdown (owner keys handed back, sockets closed 1001).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.tunnel.auth import AuthStore
from services.tunnel.budget import BudgetLimits, OutboundBudget
from services.tunnel.connection import ConnectionContext
from services.tunnel.duties import NodeDuties
from services.tunnel.outbound import OutboundQueue
from services.tunnel.ownership import Ownership
from services.tunnel.registry import CapLimits, NodeSocket, SocketRegistry
from services.tunnel.result_router import ResultRouter
from shared import ratelimit
from shared.codes import CLOSE_REASON_CODE, CloseReason
from shared.config import RelayConfig
from shared.logs import get_logger
from shared.nodeinfo import remove_node_info
from shared.replication import ReplicaAck

logger = get_logger(__name__)

SHUTDOWN_CLOSE_TIMEOUT_S = 5.0


class TunnelNode:
    """This process's tunnel node: its parts (see the module) and the socket lifecycle steps
    that touch both the registry and Redis (`claim`, `attach`, `detach`)."""

    def __init__(self, config: RelayConfig, redis: aioredis.Redis, rate_clock: ratelimit.Clock = time.time) -> None:
        self.config = config
        self.redis = redis
        self.node_id = config.node_id
        self.ownership = Ownership(redis, self.node_id)
        ws = config.ws
        self.registry: SocketRegistry[NodeSocket] = SocketRegistry(
            CapLimits(
                max_unauthenticated_per_ip=ws.maxUnauthenticatedPerIp,
                max_unauthenticated=ws.maxUnauthenticated,
                max_outbound_per_persona=ws.maxOutboundSocketsPerPersona,
                max_outbound_per_ip=ws.maxOutboundSocketsPerIp,
            )
        )
        self.router = ResultRouter(redis, self.node_id, self.registry, self.ownership, ws.ackTimeoutMs / 1000)
        self.duties = NodeDuties(config, redis, self.registry, self.ownership, self.router)
        replica_ack = ReplicaAck.from_config(config)
        rates = config.rateLimits
        self.context = ConnectionContext(
            config=config,
            redis=redis,
            replica_ack=replica_ack,
            auth=AuthStore(redis, rates.wsAuthAttemptsPerMinutePerIp, rates.denyWindowMs, rate_clock),
            home=self,
            outbound=OutboundQueue(
                redis,
                rates.outboundMessagesPerMinutePerPersona,
                config.queue.retentionSeconds,
                replica_ack,
                rate_clock,
            ),
            results=self.router,
            budget=OutboundBudget(
                BudgetLimits(
                    per_persona=ws.outboundAssemblyBytesPerPersona,
                    per_ip=ws.outboundAssemblyBytesPerIp,
                    per_node=ws.outboundAssemblyBytes,
                )
            ),
        )

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.duties.start()

    async def shutdown(self) -> None:
        """Hand every persona back (owner keys released) and close sockets with 1001."""
        connections = list(self.registry.connections)
        for persona_key, socket in self.registry.inbound_claims():
            with contextlib.suppress(RedisError):
                await self.ownership.release(persona_key, socket.socket_id)
        closing = [
            socket.close(CLOSE_REASON_CODE[CloseReason.GOING_AWAY], CloseReason.GOING_AWAY) for socket in connections
        ]
        if closing:
            await asyncio.wait([asyncio.ensure_future(c) for c in closing], timeout=SHUTDOWN_CLOSE_TIMEOUT_S)
        await _cancel_all(self.duties.tasks)
        with contextlib.suppress(RedisError):
            await remove_node_info(self.redis, self.node_id)

    async def ready(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except RedisError:
            return False

    @property
    def connections(self) -> set[NodeSocket]:
        return self.registry.connections

    # --- a socket's life (the `SocketHome` of services/tunnel/connection.py) ----------------

    def unauthenticated_full(self, client_ip: str) -> bool:
        return self.registry.unauthenticated_full(client_ip)

    def connected(self, socket: NodeSocket) -> bool:
        """Take a new socket, counted as unauthenticated; False (not taken) over the caps."""
        return self.registry.connected(socket)

    def take_outbound_slot(self, socket: NodeSocket, persona_key: str) -> bool:
        return self.registry.take_outbound_slot(socket, persona_key)

    async def claim(self, socket: NodeSocket, persona_key: str, *, inbound: bool) -> str | None:
        """Ownership at auth time, one round trip; returns the replaced socket id (inbound only).

        Until `attach`, wake-ups for the persona are noted in the registry, so one arriving
        between the claim and the start of delivery is not lost."""
        local = self.registry.claim(socket, persona_key, inbound=inbound)
        if local is not None:
            local.evict()
        claim = await self.ownership.claim_session(
            persona_key, socket.socket_id, inbound=inbound, seen_ttl_s=self.config.queue.retentionSeconds
        )
        self.registry.note_claimed(socket, inbox=claim.inbox_length > 0, results=claim.results_length > 0)
        if not inbound or claim.previous.socket_id == socket.socket_id:
            return None
        return claim.previous.socket_id or (local.socket_id if local is not None else None)

    def attach(self, socket: NodeSocket) -> bool:
        """After auth_ok was sent: serve the claimed persona on this socket. True when its inbox
        may hold entries (the claim or a wake-up saw some)."""
        woken = self.registry.attach(socket)
        if woken.results:
            self.router.spawn(woken.persona_key)
        return woken.inbox

    async def detach(self, socket: NodeSocket) -> None:
        """The socket closed: out of the registry at once, then its Redis traces."""
        gone = self.registry.detach(socket)
        persona_key = gone.persona_key
        if persona_key is None:
            return
        if gone.release_owner:
            with contextlib.suppress(RedisError):
                await self.ownership.release(persona_key, socket.socket_id)
        if gone.drop_outbound_holder:
            with contextlib.suppress(RedisError):
                await self.ownership.drop_outbound(persona_key)
        await self.router.socket_gone(socket, persona_key)


async def _cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait for them, cancelling again any still running a second later: under
    load a cancellation can be lost inside a Redis call (seen in tests: the liveness loop went on to
    its next sleep and shutdown waited forever)."""
    tasks = list(tasks)
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved, as gather(return_exceptions=True) did
