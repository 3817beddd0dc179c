"""The tunnel node's background loops over its sockets, one task each, whatever the number of
sockets: an idle socket costs no timer and no Redis call of its own, which is what lets one node
hold many thousands of them.

- wake-ups: the node's pub/sub channel (new inbox entry, new result, evict);
- owner renewal: the owner keys of every inbound socket and the node's outbound-holder
  registrations (so result wake-ups reach `send`-only sockets too), in pipelined batches;
- sweep: every inbox and results stream served here, in one pipelined pass (pub/sub is only a
  wake-up, correctness never depends on it);
- heartbeat: one loop pinging every socket and closing idle ones;
- liveness: the node's record that other nodes and the CLI read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.tunnel import ownership
from services.tunnel.registry import NodeSocket, SocketRegistry
from services.tunnel.result_router import ResultRouter
from shared import keys
from shared.config import RelayConfig
from shared.logs import get_logger, log
from shared.nodeinfo import HEARTBEAT_INTERVAL_S, publish_node_info
from shared.wakeup import Wakeup, WakeupKind

logger = get_logger(__name__)

PUBSUB_POLL_S = 1.0
SWEEP_BATCH = 500  # personas per pipelined round trip of the sweep and the owner renewal
PUBSUB_RETRY_S = 1.0


class NodeDuties:
    """The node's background loops (see the module); `start` once, `stop` at shutdown."""

    def __init__(
        self,
        config: RelayConfig,
        redis: aioredis.Redis,
        registry: SocketRegistry[NodeSocket],
        owners: ownership.Ownership,
        router: ResultRouter,
    ) -> None:
        self._config = config
        self._redis = redis
        self._node_id = config.node_id
        self._registry = registry
        self._owners = owners
        self._router = router
        self.tasks: list[asyncio.Task[Any]] = []

    def start(self) -> None:
        """One task per loop; the node cancels `tasks` at shutdown."""
        loop = asyncio.get_running_loop()
        loops = (self._listen_wakeups, self._renew_owned, self._sweep, self._heartbeats, self._publish_liveness)
        self.tasks = [loop.create_task(duty()) for duty in loops]

    # --- wake-ups ------------------------------------------------------------------------------

    def on_wakeup(self, wakeup: Wakeup) -> None:
        persona_key = wakeup.persona_key
        self._registry.woken(
            persona_key, inbox=wakeup.kind is WakeupKind.INBOX, results=wakeup.kind is WakeupKind.RESULT
        )
        socket = self._registry.inbound(persona_key)
        if wakeup.kind is WakeupKind.INBOX:
            if socket is not None:
                socket.wake_inbox()
        elif wakeup.kind is WakeupKind.RESULT:
            self._router.spawn(persona_key)
        elif wakeup.kind is WakeupKind.EVICT:
            if socket is not None and socket.socket_id == wakeup.detail:
                self._registry.drop_inbound(persona_key, socket)
                log(
                    logger,
                    logging.INFO,
                    "socket replaced on another node",
                    persona=persona_key,
                    socket_id=socket.socket_id,
                )
                socket.evict()

    async def _listen_wakeups(self) -> None:
        channel = keys.node_channel(self._node_id)
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                # Sockets may have missed wake-ups while we were not subscribed.
                for _, socket in self._registry.inbound_sockets():
                    socket.wake_inbox()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=PUBSUB_POLL_S)
                    if message is None or message.get("type") != "message":
                        continue
                    wakeup = Wakeup.decode(message["data"])
                    if wakeup is not None:
                        self.on_wakeup(wakeup)
            except (RedisError, OSError) as exc:
                log(logger, logging.WARNING, "wake-up channel lost, resubscribing", error=repr(exc))
                await asyncio.sleep(PUBSUB_RETRY_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    # --- owner renewal -------------------------------------------------------------------------

    async def _renew_owned(self) -> None:
        while True:
            await asyncio.sleep(ownership.OWNER_RENEW_INTERVAL_S)
            owned = self._registry.inbound_sockets()
            for start in range(0, len(owned), SWEEP_BATCH):
                batch = owned[start : start + SWEEP_BATCH]
                try:
                    renewed = await self._owners.renew_many(
                        [(pk, socket.socket_id) for pk, socket in batch], self._config.queue.retentionSeconds
                    )
                except RedisError as exc:
                    log(logger, logging.WARNING, "owner renewal failed", personas=len(batch), error=repr(exc))
                    continue
                for (persona_key, socket), still_ours in zip(batch, renewed, strict=True):
                    if not still_ours and self._registry.drop_inbound(persona_key, socket):
                        socket.evict()
            try:
                await self._owners.hold_outbound(self._registry.outbound_holders())
            except RedisError as exc:
                log(logger, logging.WARNING, "outbound holder renewal failed", error=repr(exc))

    # --- sweep ---------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Correctness never depends on pub/sub: every `ws.resultsSweepIntervalMs` one pipelined
        pass looks at all inboxes and results streams of the personas served here."""
        sweep_interval_s = self._config.ws.resultsSweepIntervalMs / 1000
        while True:
            await asyncio.sleep(sweep_interval_s)
            try:
                await self.sweep_once()
            except RedisError as exc:
                log(logger, logging.WARNING, "sweep failed", error=repr(exc))

    async def sweep_once(self) -> None:
        personas = self._registry.served_personas()
        for start in range(0, len(personas), SWEEP_BATCH):
            batch = personas[start : start + SWEEP_BATCH]
            async with self._redis.pipeline(transaction=False) as pipe:
                for persona_key in batch:
                    pipe.xlen(keys.inbox(persona_key))
                    pipe.xlen(keys.results(persona_key))
                lengths = await pipe.execute()
            for index, persona_key in enumerate(batch):
                inbox_length, results_length = lengths[2 * index], lengths[2 * index + 1]
                socket = self._registry.inbound(persona_key)
                if socket is not None and socket.inbox_behind(inbox_length):
                    socket.wake_inbox()
                if results_length:
                    self._router.spawn(persona_key)

    # --- heartbeat and liveness ----------------------------------------------------------------

    async def _heartbeats(self) -> None:
        """One loop for every socket's keepalive, instead of a sleeping task per socket."""
        heartbeat_s = self._config.ws.heartbeatIntervalMs / 1000
        idle_s = self._config.ws.idleTimeoutMs / 1000
        tick_s = min(heartbeat_s, idle_s / 4)
        while True:
            await asyncio.sleep(tick_s)
            now = time.monotonic()
            for socket in list(self._registry.connections):
                socket.heartbeat(now, heartbeat_s, idle_s)

    async def _publish_liveness(self) -> None:
        while True:
            try:
                await publish_node_info(self._redis, self._node_id, "tunnel", connected=len(self._registry.connections))
            except RedisError as exc:
                log(logger, logging.WARNING, "node liveness not published", error=repr(exc))
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
