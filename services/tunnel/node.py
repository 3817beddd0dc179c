"""This tunnel node's sockets and its background duties towards them.

Holds which persona has which socket here, claims and releases ownership in Redis, listens on
the node's wake-up channel (new inbox entry, new result, evict), renews owner keys and its
outbound-holder registrations (so result wake-ups reach `send`-only sockets too), sweeps every
inbox and results stream it serves in one pipelined pass (pub/sub is only a wake-up), runs the
one heartbeat loop of all its sockets, decides which socket gets each delivery result (the one
that sent the stream, see services/tunnel/results.py) and publishes the node's liveness record.
It also counts unauthenticated sockets (`ws.maxUnauthenticatedPerIp`, `ws.maxUnauthenticated`),
outbound-role sockets (`ws.maxOutboundSocketsPerPersona`, `ws.maxOutboundSocketsPerIp`) and
holds the outbound assembly budget (services/tunnel/budget.py).
Idle sockets cost no timer and no Redis call of their own: that is what lets one node hold
many thousands of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.tunnel import ownership, results
from services.tunnel.auth import AuthStore
from services.tunnel.budget import BudgetLimits, OutboundBudget
from services.tunnel.connection import GOING_AWAY_REASON, TunnelConnection
from services.tunnel.outbound import OutboundQueue
from services.tunnel.registry import CapLimits, SocketRegistry
from shared import keys, protocol, ratelimit
from shared.config import RelayConfig
from shared.logs import get_logger, log
from shared.nodeinfo import HEARTBEAT_INTERVAL_S, publish_node_info, remove_node_info
from shared.replication import ReplicaAck
from shared.wakeup import Wakeup, WakeupKind, wake_owner

logger = get_logger(__name__)

PUBSUB_POLL_S = 1.0
SWEEP_BATCH = 500  # personas per pipelined round trip of the sweep and the owner renewal
PUBSUB_RETRY_S = 1.0
SHUTDOWN_CLOSE_TIMEOUT_S = 5.0


class TunnelNode:
    def __init__(self, config: RelayConfig, redis: aioredis.Redis, rate_clock: ratelimit.Clock = time.time) -> None:
        self.config = config
        self.redis = redis
        self.node_id = config.node_id
        self.auth = AuthStore(
            redis, config.rateLimits.wsAuthAttemptsPerMinutePerIp, config.rateLimits.denyWindowMs, rate_clock
        )
        self.ownership = ownership.Ownership(redis, self.node_id)
        self.replica_ack = ReplicaAck.from_config(config)
        self.outbound = OutboundQueue(
            redis,
            config.rateLimits.outboundMessagesPerMinutePerPersona,
            config.queue.retentionSeconds,
            self.replica_ack,
            rate_clock,
        )
        self.registry: SocketRegistry[TunnelConnection] = SocketRegistry(
            CapLimits(
                max_unauthenticated_per_ip=config.ws.maxUnauthenticatedPerIp,
                max_unauthenticated=config.ws.maxUnauthenticated,
                max_outbound_per_persona=config.ws.maxOutboundSocketsPerPersona,
                max_outbound_per_ip=config.ws.maxOutboundSocketsPerIp,
            )
        )
        self.origins = results.OriginRecords(redis)
        self.outbound_budget = OutboundBudget(
            BudgetLimits(
                per_persona=config.ws.outboundAssemblyBytesPerPersona,
                per_ip=config.ws.outboundAssemblyBytesPerIp,
                per_node=config.ws.outboundAssemblyBytes,
            )
        )
        self._result_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: list[asyncio.Task[Any]] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        duties = (self._listen_wakeups, self._renew_owned, self._sweep, self._heartbeats, self._publish_liveness)
        for duty in duties:
            self._tasks.append(loop.create_task(duty()))

    async def shutdown(self) -> None:
        """Hand every persona back (owner keys released) and close sockets with 1001."""
        connections = list(self.registry.connections)
        for persona_key, connection in self.registry.inbound_claims():
            with contextlib.suppress(RedisError):
                await self.ownership.release(persona_key, connection.socket_id)
        closing = [connection.close(protocol.CLOSE_GOING_AWAY, GOING_AWAY_REASON) for connection in connections]
        if closing:
            await asyncio.wait([asyncio.ensure_future(c) for c in closing], timeout=SHUTDOWN_CLOSE_TIMEOUT_S)
        await _cancel_all(self._tasks)
        with contextlib.suppress(RedisError):
            await remove_node_info(self.redis, self.node_id)

    async def ready(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except RedisError:
            return False

    # --- sockets -----------------------------------------------------------------------------

    @property
    def connections(self) -> set[TunnelConnection]:
        return self.registry.connections

    def unauthenticated_full(self, client_ip: str) -> bool:
        return self.registry.unauthenticated_full(client_ip)

    def connected(self, connection: TunnelConnection) -> bool:
        """Take a new socket, counted as unauthenticated; False (not taken) over the caps."""
        return self.registry.connected(connection)

    def take_outbound_slot(self, connection: TunnelConnection, persona_key: str) -> bool:
        return self.registry.take_outbound_slot(connection, persona_key)

    async def claim(self, connection: TunnelConnection, persona_key: str, *, inbound: bool) -> str | None:
        """Ownership at auth time, one round trip; returns the replaced socket id (inbound only).

        Until `attach`, wake-ups for the persona are noted in the registry, so one arriving
        between the claim and the start of delivery is not lost."""
        local = self.registry.claim(connection, persona_key, inbound=inbound)
        if local is not None:
            local.evict()
        claim = await self.ownership.claim_session(
            persona_key, connection.socket_id, inbound=inbound, seen_ttl_s=self.config.queue.retentionSeconds
        )
        self.registry.note_claimed(connection, inbox=claim.inbox_length > 0, results=claim.results_length > 0)
        if not inbound or claim.previous.socket_id == connection.socket_id:
            return None
        return claim.previous.socket_id or (local.socket_id if local is not None else None)

    def attach(self, connection: TunnelConnection) -> bool:
        """After auth_ok was sent: start serving the persona on this socket. True when its inbox
        may hold entries (the claim or a wake-up saw some)."""
        woken = self.registry.attach(connection)
        if woken.results:
            assert connection.persona_key is not None
            self._spawn_results(connection.persona_key)
        return woken.inbox

    async def detach(self, connection: TunnelConnection) -> None:
        gone = self.registry.detach(connection)
        persona_key = gone.persona_key
        if persona_key is None:
            return
        if gone.release_owner:
            with contextlib.suppress(RedisError):
                await self.ownership.release(persona_key, connection.socket_id)
        if gone.drop_outbound_holder:
            with contextlib.suppress(RedisError):
                await self.ownership.drop_outbound(persona_key)
        await self._forget_origins(connection, persona_key)
        lock = self._result_locks.get(persona_key)
        if not self.registry.serves(persona_key) and lock and not lock.locked():
            del self._result_locks[persona_key]

    # --- results -----------------------------------------------------------------------------

    def _spawn_results(self, persona_key: str) -> None:
        task = asyncio.get_running_loop().create_task(self.forward_results(persona_key))
        task.add_done_callback(_ignore_outcome)

    async def forward_results(self, persona_key: str) -> int:
        """Send the persona's pending results this node is responsible for (services/tunnel/results.py):
        to the socket that sent the stream if it is connected here, nothing if it is connected on
        another live node, else to the persona's inbound socket here, else to an outbound-role
        socket here if no node holds an inbound one. The number delivered."""
        async with self._result_locks[persona_key]:
            delivered = 0
            after: bytes | None = None
            while True:
                batch = await results.read_batch(self.redis, persona_key, after)
                if not batch:
                    return delivered
                after = batch[-1].entry_id
                plan = await self._plan_results(persona_key, batch)
                await results.drop_unreadable(self.redis, persona_key, [p.entry_id for p in batch if p.result is None])
                if plan:
                    delivered += await results.deliver(
                        self.redis, persona_key, plan, self.config.ws.ackTimeoutMs / 1000, self._result_delivered
                    )
                if len(batch) < results.RESULTS_BATCH:
                    return delivered

    async def _plan_results(
        self, persona_key: str, batch: list[results.PendingResult]
    ) -> dict[results.ResultTarget, list[results.PendingResult]]:
        foreign = {p.origin.node_id for p in batch if p.origin is not None and p.origin.node_id != self.node_id}
        alive = await results.live_nodes(self.redis, foreign)
        fallback: TunnelConnection | None = None
        fallback_known = False
        plan: dict[results.ResultTarget, list[results.PendingResult]] = {}
        for pending in batch:
            if pending.result is None:
                continue
            origin = pending.origin
            target: TunnelConnection | None = None
            if origin is not None:
                if origin.node_id == self.node_id:
                    target = self.registry.socket(origin.socket_id)
                elif origin.node_id in alive:
                    continue  # the origin's node sends it (or forgets the origin on close)
            if target is None:
                if not fallback_known:
                    fallback, fallback_known = await self._fallback_target(persona_key), True
                target = fallback
            if target is not None:
                plan.setdefault(target, []).append(pending)
        return plan

    async def _fallback_target(self, persona_key: str) -> TunnelConnection | None:
        target = self.registry.inbound(persona_key)
        if target is not None:
            return target
        holders = self.registry.outbound_sockets(persona_key)
        if not holders or await self.ownership.current_owner(persona_key) is not None:
            return None
        return holders[0]

    def _result_delivered(self, target: results.ResultTarget, stream_id: str) -> None:
        if isinstance(target, TunnelConnection):
            target.origin_streams.discard(stream_id)

    async def _forget_origins(self, connection: TunnelConnection, persona_key: str) -> None:
        """A closing socket's unanswered streams: their results go to another socket now, so
        wake whoever may hold one."""
        stream_ids = list(connection.origin_streams)
        connection.origin_streams.clear()
        origin = results.Origin(self.node_id, connection.socket_id)
        try:
            if await self.origins.forget(persona_key, origin, stream_ids):
                await wake_owner(self.redis, persona_key, WakeupKind.RESULT)
        except RedisError as exc:
            log(logger, logging.WARNING, "origin records not forgotten", persona=persona_key, error=repr(exc))

    # --- background duties -------------------------------------------------------------------

    def _on_wakeup(self, wakeup: Wakeup) -> None:
        persona_key = wakeup.persona_key
        self.registry.woken(
            persona_key, inbox=wakeup.kind is WakeupKind.INBOX, results=wakeup.kind is WakeupKind.RESULT
        )
        connection = self.registry.inbound(persona_key)
        if wakeup.kind is WakeupKind.INBOX:
            if connection is not None:
                connection.wake_inbox()
        elif wakeup.kind is WakeupKind.RESULT:
            self._spawn_results(persona_key)
        elif wakeup.kind is WakeupKind.EVICT:
            if connection is not None and connection.socket_id == wakeup.detail:
                self.registry.drop_inbound(persona_key, connection)
                log(
                    logger,
                    logging.INFO,
                    "socket replaced on another node",
                    persona=persona_key,
                    socket_id=connection.socket_id,
                )
                connection.evict()

    async def _listen_wakeups(self) -> None:
        channel = keys.node_channel(self.node_id)
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                # Sockets may have missed wake-ups while we were not subscribed.
                for _, connection in self.registry.inbound_sockets():
                    connection.wake_inbox()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=PUBSUB_POLL_S)
                    if message is None or message.get("type") != "message":
                        continue
                    wakeup = Wakeup.decode(message["data"])
                    if wakeup is not None:
                        self._on_wakeup(wakeup)
            except (RedisError, OSError) as exc:
                log(logger, logging.WARNING, "wake-up channel lost, resubscribing", error=repr(exc))
                await asyncio.sleep(PUBSUB_RETRY_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _renew_owned(self) -> None:
        while True:
            await asyncio.sleep(ownership.OWNER_RENEW_INTERVAL_S)
            owned = self.registry.inbound_sockets()
            for start in range(0, len(owned), SWEEP_BATCH):
                batch = owned[start : start + SWEEP_BATCH]
                try:
                    renewed = await self.ownership.renew_many(
                        [(pk, connection.socket_id) for pk, connection in batch], self.config.queue.retentionSeconds
                    )
                except RedisError as exc:
                    log(logger, logging.WARNING, "owner renewal failed", personas=len(batch), error=repr(exc))
                    continue
                for (persona_key, connection), still_ours in zip(batch, renewed, strict=True):
                    if not still_ours and self.registry.drop_inbound(persona_key, connection):
                        connection.evict()
            try:
                await self.ownership.hold_outbound(self.registry.outbound_holders())
            except RedisError as exc:
                log(logger, logging.WARNING, "outbound holder renewal failed", error=repr(exc))

    async def _sweep(self) -> None:
        """Correctness never depends on pub/sub: every `ws.resultsSweepIntervalMs` one pipelined
        pass looks at all inboxes and results streams of the personas served here."""
        sweep_interval_s = self.config.ws.resultsSweepIntervalMs / 1000
        while True:
            await asyncio.sleep(sweep_interval_s)
            try:
                await self.sweep_once()
            except RedisError as exc:
                log(logger, logging.WARNING, "sweep failed", error=repr(exc))

    async def sweep_once(self) -> None:
        personas = self.registry.served_personas()
        for start in range(0, len(personas), SWEEP_BATCH):
            batch = personas[start : start + SWEEP_BATCH]
            async with self.redis.pipeline(transaction=False) as pipe:
                for persona_key in batch:
                    pipe.xlen(keys.inbox(persona_key))
                    pipe.xlen(keys.results(persona_key))
                lengths = await pipe.execute()
            for index, persona_key in enumerate(batch):
                inbox_length, results_length = lengths[2 * index], lengths[2 * index + 1]
                connection = self.registry.inbound(persona_key)
                if connection is not None and connection.inbox_behind(inbox_length):
                    connection.wake_inbox()
                if results_length:
                    self._spawn_results(persona_key)

    async def _heartbeats(self) -> None:
        """One loop for every socket's keepalive, instead of a sleeping task per socket."""
        heartbeat_s = self.config.ws.heartbeatIntervalMs / 1000
        idle_s = self.config.ws.idleTimeoutMs / 1000
        tick_s = min(heartbeat_s, idle_s / 4)
        while True:
            await asyncio.sleep(tick_s)
            now = time.monotonic()
            for connection in list(self.connections):
                connection.heartbeat(now, heartbeat_s, idle_s)

    async def _publish_liveness(self) -> None:
        while True:
            try:
                await publish_node_info(self.redis, self.node_id, "tunnel", connected=len(self.connections))
            except RedisError as exc:
                log(logger, logging.WARNING, "node liveness not published", error=repr(exc))
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)


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


def _ignore_outcome(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
