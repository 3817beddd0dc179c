"""One gateway WebSocket from handshake to close: feeds the sans-I/O session and carries out
its actions (the thin I/O layer, like websockets' own connection over its protocol).

The reader loop handles one message at a time, so every Redis step of authentication happens
in order; inbound delivery runs as a task owned by this connection and ends with it. The
heartbeat is one node-wide loop (`TunnelNode._heartbeats`) calling `heartbeat` on every socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State as SocketState

from services.tunnel import metrics
from services.tunnel.budget import Allowance
from services.tunnel.challenges import now_ms as clock_ms
from services.tunnel.inbox import InboxDelivery
from services.tunnel.session import (
    RATE_LIMITED,
    ROLE_INBOUND,
    TOO_MANY_SOCKETS,
    AckInbound,
    Action,
    Authenticated,
    CheckAuthRate,
    ClaimPersona,
    Close,
    ConsumeChallenge,
    DiscardChallenge,
    EnqueueOutbound,
    IssueChallenge,
    LoadChallenge,
    OutboundDropped,
    RefuseOutbound,
    SendText,
    SessionLimits,
    State,
    TunnelSession,
)
from shared import protocol
from shared.logs import get_logger, log

if TYPE_CHECKING:
    from services.tunnel.node import TunnelNode

logger = get_logger(__name__)

GOING_AWAY_REASON = "going_away"
INTERNAL_ERROR_CODE = 1011
IDLE_REASON = "idle_timeout"


def session_limits(node: TunnelNode) -> SessionLimits:
    config = node.config
    return SessionLimits(
        challenge_ttl_s=config.auth.challengeTtlSeconds,
        max_message_bytes=config.smtp.maxMessageBytes,
        outbound_stream_timeout_ms=config.ws.outboundStreamTimeoutMs,
        mail_domains=tuple(config.mailDomains),
    )


class TunnelConnection:
    def __init__(self, node: TunnelNode, ws: ServerConnection, client_ip: str) -> None:
        self.node = node
        self.ws = ws
        self.client_ip = client_ip
        self.socket_id = str(uuid.uuid4())
        self.session = TunnelSession(self.socket_id, session_limits(node), clock_ms)
        self.delivery: InboxDelivery | None = None
        self._delivery_task: asyncio.Task[Any] | None = None
        self._deadline_task: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_heard = time.monotonic()
        self._last_ping = self._last_heard
        self._closing = False
        self.origin_streams: set[str] = set()  # accepted outbound streams whose result is not delivered
        self.allowance: Allowance | None = None  # share of the node's outbound budget, from auth

    @property
    def persona_key(self) -> str | None:
        return self.session.persona_key

    @property
    def is_inbound(self) -> bool:
        return self.session.authenticated and self.session.role == ROLE_INBOUND

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        metrics.CONNECTIONS_OPEN.inc()
        self._deadline_task = self._spawn(self._auth_deadline())
        try:
            async for message in self.ws:
                self._last_heard = time.monotonic()
                if isinstance(message, str):
                    actions = self.session.receive_text(message)
                else:
                    actions = self.session.receive_binary(message)
                await self._perform(actions)
                if self.session.state is State.CLOSED:
                    break
        except ConnectionClosed:
            pass
        except Exception as exc:  # e.g. Redis unreachable mid-auth: the gateway retries later
            log(
                logger,
                logging.ERROR,
                "connection failed",
                socket_id=self.socket_id,
                persona=self.persona_key,
                error=repr(exc),
            )
            await self.close(INTERNAL_ERROR_CODE, "internal_error")
        finally:
            metrics.CONNECTIONS_OPEN.dec()
            self._log_closed()
            for task in list(self._tasks):
                task.cancel()
            if self.allowance is not None:
                self.allowance.give_all()
            await self.node.detach(self)

    def _log_closed(self) -> None:
        """Every close, with who closed and why, and what was cut off mid-message."""
        unacked = self.delivery.unacknowledged if self.delivery is not None else 0
        dropped = self.session.open_outbound_streams
        log(
            logger,
            logging.INFO,
            "socket closed mid-message" if unacked or dropped else "socket closed",
            socket_id=self.socket_id,
            persona=self.persona_key,
            client_ip=self.client_ip,
            closed_by="relay" if self._closing else "gateway",
            close_code=self.ws.close_code,
            close_reason=self.ws.close_reason or None,
            inbound_unacknowledged=unacked,
            outbound_streams_dropped=dropped,
        )

    async def close(self, code: int, reason: str) -> None:
        """Close the socket; safe to call from any task and more than once."""
        if self._closing:
            return
        self._closing = True
        if self.delivery is not None:
            self._cancel_delivery()
        with contextlib.suppress(ConnectionClosed, OSError):
            await self.ws.close(code, reason)

    def evict(self) -> None:
        """Another socket took the persona: close with 4400, without waiting here."""
        log(
            logger,
            logging.INFO,
            "socket replaced by a newer session",
            socket_id=self.socket_id,
            persona=self.persona_key,
        )
        self._cancel_delivery()
        for action in self.session.replaced():
            if isinstance(action, Close):
                self._spawn(self.close(action.code, action.reason))

    async def send_text(self, text: str) -> None:
        await self.ws.send(text)

    async def ping(self) -> Awaitable[Any]:
        return await self.ws.ping()

    def wake_inbox(self) -> None:
        """New inbox entries may be there: the delivery looks at once (if this socket has one)."""
        if self.delivery is not None:
            self.delivery.wake()

    def inbox_behind(self, length: int) -> bool:
        """The inbox holds more than the delivery knows of (the sweep's check)."""
        return self.delivery is not None and self.delivery.behind(length)

    def _start_delivery(self, known_empty: bool) -> None:
        assert self.persona_key is not None
        config = self.node.config
        self.delivery = InboxDelivery(
            self.node.redis,
            self.persona_key,
            self.node.node_id,
            self.ws.send,
            self.ws.ping,
            use_ack=self.session.wants_inbound_ack,
            ack_timeout_s=config.ws.ackTimeoutMs / 1000,
            retention_s=config.queue.retentionSeconds,
            legacy_ack_grace_s=config.ws.legacyAckGraceMs / 1000,
            is_open=lambda: self.ws.state is SocketState.OPEN,
            ack=self.node.replica_ack,
        )
        self._delivery_task = self._spawn(self.delivery.run(known_empty=known_empty))

    def _cancel_delivery(self) -> None:
        if self._delivery_task is not None:
            self._delivery_task.cancel()

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not isinstance(error, ConnectionClosed):
            log(
                logger,
                logging.ERROR,
                "connection task failed",
                socket_id=self.socket_id,
                persona=self.persona_key,
                error=repr(error),
            )
            self._spawn(self.close(protocol.CLOSE_GOING_AWAY, GOING_AWAY_REASON))

    def heartbeat(self, now: float, heartbeat_s: float, idle_s: float) -> None:
        """One tick of the node-wide heartbeat (no timer per socket): close 1001 after `idle_s`
        without hearing anything, ping every `heartbeat_s`, drop timed-out outbound streams."""
        if self._closing:
            return
        if now - self._last_heard >= idle_s:
            log(logger, logging.INFO, "idle socket closed", socket_id=self.socket_id, persona=self.persona_key)
            self._spawn(self.close(protocol.CLOSE_GOING_AWAY, IDLE_REASON))
            return
        if now - self._last_ping >= heartbeat_s:
            self._last_ping = now
            self._spawn(self._keepalive_ping())
        expired = self.session.expire_streams()
        if expired:
            self._spawn(self._perform(list(expired)))

    async def _keepalive_ping(self) -> None:
        pong = asyncio.ensure_future(await self.ws.ping())
        pong.add_done_callback(self._pong_received)

    async def _auth_deadline(self) -> None:
        """`ws.authTimeoutMs` after the upgrade; the session decides what it means (4401 for a
        socket still unauthenticated, nothing during a verification or after auth)."""
        await asyncio.sleep(self.node.config.ws.authTimeoutMs / 1000)
        await self._perform(self.session.auth_timed_out())

    def _pong_received(self, pong: asyncio.Future[Any]) -> None:
        if not pong.cancelled() and pong.exception() is None:
            self._last_heard = time.monotonic()

    # --- carrying out the session's actions --------------------------------------------------

    async def _perform(self, actions: list[Action]) -> None:
        """Carry out the session's actions in order; a Redis step reports its outcome back to
        the session and carries out what that returns before the next action."""
        for action in actions:
            if isinstance(action, SendText):
                await self.ws.send(action.text)
            elif isinstance(action, Close):
                if action.code in (protocol.CLOSE_AUTH_FAILED, protocol.CLOSE_RATE_LIMITED):
                    self._auth_outcome(action.reason)
                await self.close(action.code, action.reason)
            elif isinstance(action, IssueChallenge):
                within_rate = await self.node.auth.store_challenge(self.client_ip, action.challenge)
                await self._perform(self.session.challenge_stored(within_rate))
            elif isinstance(action, DiscardChallenge):
                await self.node.auth.discard_challenge(action.challenge_id)
            elif isinstance(action, CheckAuthRate):
                await self._perform(self.session.auth_rate_checked(await self.node.auth.within_rate(self.client_ip)))
            elif isinstance(action, LoadChallenge):
                record = await self.node.auth.load_challenge(action.challenge_id)
                await self._perform(self.session.challenge_loaded(record))
            elif isinstance(action, ConsumeChallenge):
                code = await self.node.auth.consume_challenge(action.challenge_id, action.persona_key, action.at_ms)
                await self._perform(self.session.challenge_consumed(code))
            elif isinstance(action, ClaimPersona):
                await self._perform(await self._claim(action))
            elif isinstance(action, Authenticated):
                self._authenticated(action)
            elif isinstance(action, AckInbound):
                if self.delivery is not None:
                    self.delivery.acked(action.stream_id)
            elif isinstance(action, EnqueueOutbound):
                await self._enqueue_outbound(action)
            elif isinstance(action, RefuseOutbound):
                await self.ws.send(action.text)
                self._outbound_outcome(action.stream_id, action.reason)
            elif isinstance(action, OutboundDropped):
                self._outbound_outcome(action.stream_id, action.reason)

    def _auth_outcome(self, code: str) -> None:
        metrics.AUTH_OUTCOMES.labels(code=code).inc()
        log(
            logger,
            logging.INFO,
            "auth refused" if self.persona_key is None else "socket refused",
            code=code,
            socket_id=self.socket_id,
            persona=self.persona_key or self.session.attempted_key,
            client_ip=self.client_ip,
        )

    async def _claim(self, action: ClaimPersona) -> list[Action]:
        """An outbound-role slot on this node, then ownership in Redis (one round trip)."""
        persona_key = action.persona_key
        inbound = action.role == ROLE_INBOUND
        if not inbound and not self.node.take_outbound_slot(self, persona_key):
            return self.session.auth_failed(TOO_MANY_SOCKETS)
        replaced_socket_id = await self.node.claim(self, persona_key, inbound=inbound)
        self._authenticated_limits(persona_key)
        return self.session.auth_succeeded(persona_key, action.role, replaced_socket_id)

    def _authenticated(self, action: Authenticated) -> None:
        metrics.AUTH_OUTCOMES.labels(code="ok").inc()
        log(
            logger,
            logging.INFO,
            "auth ok",
            code="ok",
            socket_id=self.socket_id,
            persona=action.persona_key,
            role=action.role,
            replaced_socket_id=action.replaced_socket_id,
            capabilities=list(self.session.capabilities),
            client_ip=self.client_ip,
        )
        if self._deadline_task is not None:
            self._deadline_task.cancel()  # an idle authenticated socket keeps no timer
        inbox_woken = self.node.attach(self)
        if self.is_inbound:
            self._start_delivery(known_empty=not inbox_woken)

    def _authenticated_limits(self, persona_key: str) -> None:
        """Before auth_ok is sent (the gateway sends nothing larger before it): messages up to
        ws.maxMessageBytes from now on, and outbound streams on the node's budget. websockets
        reads the limit when the next frame starts arriving, so the next frame gets it."""
        if self.session.state is not State.VERIFYING:
            return
        self.ws.protocol.max_message_size = self.node.config.ws.maxMessageBytes
        self.allowance = self.node.outbound_budget.allowance(persona_key, self.client_ip)
        self.session.allowance = self.allowance

    async def _enqueue_outbound(self, action: EnqueueOutbound) -> None:
        try:
            await self._enqueue_outbound_job(action)
        finally:
            if self.allowance is not None:
                self.allowance.give(action.size_bytes)

    async def _enqueue_outbound_job(self, action: EnqueueOutbound) -> None:
        job = action.job
        origin = f"{self.node.node_id}/{self.socket_id}"
        if not await self.node.outbound.admit(job.persona_key, job.stream_id, origin):
            await self._perform(self.session.outbound_refused(job.stream_id, RATE_LIMITED))
            self._outbound_outcome(job.stream_id, RATE_LIMITED)
            return
        self.origin_streams.add(job.stream_id)
        queued = await self.node.outbound.enqueue(job)
        self._outbound_outcome(job.stream_id, "accepted" if queued else "duplicate", size=len(job.data))

    def _outbound_outcome(self, stream_id: str, outcome: str, **fields: Any) -> None:
        metrics.OUTBOUND_OUTCOMES.labels(outcome=outcome).inc()
        log(
            logger,
            logging.INFO,
            "outbound " + ("accepted" if outcome in ("accepted", "duplicate") else "refused"),
            stream_id=stream_id,
            reason=outcome,
            persona=self.persona_key,
            socket_id=self.socket_id,
            **fields,
        )
