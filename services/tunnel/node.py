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
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.tunnel import ownership, results
from services.tunnel.budget import BudgetLimits, OutboundBudget
from services.tunnel.challenges import ChallengeStore
from services.tunnel.connection import GOING_AWAY_REASON, TunnelConnection
from services.tunnel.outbound import OutboundQueue
from services.tunnel.ratelimit import AuthRateLimiter
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
        self.challenges = ChallengeStore(redis)
        self.ownership = ownership.Ownership(redis, self.node_id)
        self.auth_rate = AuthRateLimiter(
            redis, config.rateLimits.wsAuthAttemptsPerMinutePerIp, config.rateLimits.denyWindowMs, rate_clock
        )
        self.replica_ack = ReplicaAck.from_config(config)
        self.outbound = OutboundQueue(
            redis,
            config.rateLimits.outboundMessagesPerMinutePerPersona,
            config.queue.retentionSeconds,
            self.replica_ack,
            rate_clock,
        )
        self.connections: set[TunnelConnection] = set()
        self.sockets: dict[str, TunnelConnection] = {}  # authenticated ones, by socket id
        self.claiming: dict[str, TunnelConnection] = {}  # persona -> socket between claim and attach
        self.origins = results.OriginRecords(redis)
        self.inbound: dict[str, TunnelConnection] = {}
        self.outbound_only: dict[str, set[TunnelConnection]] = defaultdict(set)
        # Outbound-role sockets registered in `outbound_holders(pk)`, from claim (before auth_ok)
        # to detach; a superset of `outbound_only`, which they join only once auth_ok is sent.
        self.outbound_registered: dict[str, set[TunnelConnection]] = defaultdict(set)
        self.unauthenticated_by_ip: Counter[str] = Counter()
        self.unauthenticated_total = 0
        self.outbound_by_persona: Counter[str] = Counter()  # outbound-role sockets, claim to detach
        self.outbound_by_ip: Counter[str] = Counter()
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
        connections = list(self.connections)
        for connection in connections:
            if connection.claimed_inbound and connection.persona_key is not None:
                with contextlib.suppress(RedisError):
                    await self.ownership.release(connection.persona_key, connection.socket_id)
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

    def unauthenticated_full(self, client_ip: str) -> bool:
        """True when `client_ip` already has `ws.maxUnauthenticatedPerIp` sockets not yet
        authenticated here, or the node `ws.maxUnauthenticated`: a new one would only hold a
        file descriptor and memory."""
        return (
            self.unauthenticated_by_ip[client_ip] >= self.config.ws.maxUnauthenticatedPerIp
            or self.unauthenticated_total >= self.config.ws.maxUnauthenticated
        )

    def connected(self, connection: TunnelConnection) -> bool:
        """Take a new socket, counted as unauthenticated; False (not taken) over the per-IP cap."""
        if self.unauthenticated_full(connection.client_ip):
            return False
        self.connections.add(connection)
        self.unauthenticated_by_ip[connection.client_ip] += 1
        self.unauthenticated_total += 1
        connection.counted_unauthenticated = True
        return True

    def take_outbound_slot(self, connection: TunnelConnection, persona_key: str) -> bool:
        """Count an outbound-role socket about to authenticate; False over
        `ws.maxOutboundSocketsPerPersona` or `ws.maxOutboundSocketsPerIp` on this node (each
        such socket may hold up to 8 streams being assembled)."""
        ws = self.config.ws
        if (
            self.outbound_by_persona[persona_key] >= ws.maxOutboundSocketsPerPersona
            or self.outbound_by_ip[connection.client_ip] >= ws.maxOutboundSocketsPerIp
        ):
            return False
        self.outbound_by_persona[persona_key] += 1
        self.outbound_by_ip[connection.client_ip] += 1
        connection.counted_outbound = persona_key
        return True

    def _uncount_outbound(self, connection: TunnelConnection) -> None:
        persona_key = connection.counted_outbound
        if persona_key is None:
            return
        connection.counted_outbound = None
        for counter, key in ((self.outbound_by_persona, persona_key), (self.outbound_by_ip, connection.client_ip)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    def _uncount_unauthenticated(self, connection: TunnelConnection) -> None:
        if not connection.counted_unauthenticated:
            return
        connection.counted_unauthenticated = False
        self.unauthenticated_total -= 1
        remaining = self.unauthenticated_by_ip[connection.client_ip] - 1
        if remaining > 0:
            self.unauthenticated_by_ip[connection.client_ip] = remaining
        else:
            del self.unauthenticated_by_ip[connection.client_ip]

    async def claim(self, connection: TunnelConnection, persona_key: str, *, inbound: bool) -> str | None:
        """Ownership at auth time, one round trip; returns the replaced socket id (inbound only).

        Until `attach`, wake-ups for the persona are noted on the connection (`claiming`), so
        one arriving between the claim and the start of delivery is not lost."""
        self.claiming[persona_key] = connection
        if not inbound:
            self.outbound_registered[persona_key].add(connection)
        else:
            local = self.inbound.pop(persona_key, None)
            if local is not None and local is not connection:
                local.evict()
            connection.claimed_inbound = True
        claim = await self.ownership.claim_session(
            persona_key, connection.socket_id, inbound=inbound, seen_ttl_s=self.config.queue.retentionSeconds
        )
        connection.inbox_woken |= claim.inbox_length > 0
        connection.results_woken |= claim.results_length > 0
        if not inbound or claim.previous.socket_id == connection.socket_id:
            return None
        return claim.previous.socket_id or (local.socket_id if local is not None else None)

    def attach(self, connection: TunnelConnection) -> None:
        """After auth_ok was sent: start serving the persona on this socket."""
        self._uncount_unauthenticated(connection)
        persona_key = connection.persona_key
        assert persona_key is not None
        self.sockets[connection.socket_id] = connection
        if self.claiming.get(persona_key) is connection:
            del self.claiming[persona_key]
        if connection.is_inbound:
            self.inbound[persona_key] = connection
            connection.start_delivery()
        else:
            self.outbound_only[persona_key].add(connection)
        if connection.results_woken:
            self._spawn_results(persona_key)

    async def detach(self, connection: TunnelConnection) -> None:
        self.connections.discard(connection)
        self._uncount_unauthenticated(connection)
        for claimed_key, claimant in list(self.claiming.items()):
            if claimant is connection:
                del self.claiming[claimed_key]
        self._uncount_outbound(connection)
        persona_key = connection.persona_key
        if persona_key is None:
            return
        if self.sockets.get(connection.socket_id) is connection:
            del self.sockets[connection.socket_id]
        if self.inbound.get(persona_key) is connection:
            del self.inbound[persona_key]
        if connection.claimed_inbound:
            with contextlib.suppress(RedisError):
                await self.ownership.release(persona_key, connection.socket_id)
        holders = self.outbound_only.get(persona_key)
        if holders is not None:
            holders.discard(connection)
            if not holders:
                del self.outbound_only[persona_key]
        registered = self.outbound_registered.get(persona_key)
        if registered is not None and connection in registered:
            registered.discard(connection)
            if not registered:
                del self.outbound_registered[persona_key]
                with contextlib.suppress(RedisError):
                    await self.ownership.drop_outbound(persona_key)
        await self._forget_origins(connection, persona_key)
        lock = self._result_locks.get(persona_key)
        if persona_key not in self.inbound and persona_key not in self.outbound_only and lock and not lock.locked():
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
                    target = self.sockets.get(origin.socket_id)
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
        target = self.inbound.get(persona_key)
        if target is not None:
            return target
        holders = self.outbound_only.get(persona_key)
        if not holders or await self.ownership.current_owner(persona_key) is not None:
            return None
        return next(iter(holders))

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
        claimant = self.claiming.get(wakeup.persona_key)
        if claimant is not None:  # authenticating: attach looks at these flags
            claimant.inbox_woken |= wakeup.kind is WakeupKind.INBOX
            claimant.results_woken |= wakeup.kind is WakeupKind.RESULT
        connection = self.inbound.get(wakeup.persona_key)
        if wakeup.kind is WakeupKind.INBOX:
            if connection is not None and connection.delivery is not None:
                connection.delivery.wake()
        elif wakeup.kind is WakeupKind.RESULT:
            self._spawn_results(wakeup.persona_key)
        elif wakeup.kind is WakeupKind.EVICT:
            if connection is not None and connection.socket_id == wakeup.detail:
                del self.inbound[wakeup.persona_key]
                log(
                    logger,
                    logging.INFO,
                    "socket replaced on another node",
                    persona=wakeup.persona_key,
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
                for connection in list(self.inbound.values()):
                    if connection.delivery is not None:
                        connection.delivery.wake()
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
            owned = list(self.inbound.items())
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
                    if not still_ours and self.inbound.get(persona_key) is connection:
                        del self.inbound[persona_key]
                        connection.evict()
            try:
                await self.ownership.hold_outbound(list(self.outbound_registered))
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
        personas = list({**dict.fromkeys(self.inbound), **dict.fromkeys(self.outbound_only)})
        for start in range(0, len(personas), SWEEP_BATCH):
            batch = personas[start : start + SWEEP_BATCH]
            async with self.redis.pipeline(transaction=False) as pipe:
                for persona_key in batch:
                    pipe.xlen(keys.inbox(persona_key))
                    pipe.xlen(keys.results(persona_key))
                lengths = await pipe.execute()
            for index, persona_key in enumerate(batch):
                inbox_length, results_length = lengths[2 * index], lengths[2 * index + 1]
                connection = self.inbound.get(persona_key)
                if connection is not None and connection.delivery is not None:
                    if connection.delivery.behind(inbox_length):
                        connection.delivery.wake()
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
