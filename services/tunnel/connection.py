"""One gateway WebSocket from handshake to close: feeds the sans-I/O session and carries out
its actions (the thin I/O layer, like websockets' own connection over its protocol).

Every rule is the session's (services/tunnel/session.py); this module only performs the
actions it returns and reports each Redis step's outcome back as an event. It reaches the rest
of the node only through the narrow interfaces in `ConnectionContext` (auth steps, the socket
registry's view, the outbound queue, the result router, the assembly budget), never the node
itself: services/tunnel/node.py builds the context and is not imported here.

The reader loop handles one message at a time, so every Redis step of authentication happens
in order; inbound delivery runs as a task owned by this connection and ends with it. The
heartbeat is one node-wide loop (services/tunnel/duties.py) calling `heartbeat` on every socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State as SocketState

from services.tunnel import metrics
from services.tunnel.budget import Allowance
from services.tunnel.challenges import ChallengeRecord
from services.tunnel.challenges import now_ms as clock_ms
from services.tunnel.inbox import InboxDelivery
from services.tunnel.results import Origin
from services.tunnel.session import (
    ROLE_INBOUND,
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
from services.tunnel.wsio import send_binary_messages
from shared.codes import CLOSE_REASON_CODE, AuthError, CloseCode, CloseReason, OutboundRefusal
from shared.config import RelayConfig
from shared.logs import get_logger, log
from shared.payloads import OutboundJob
from shared.replication import ReplicaAck

logger = get_logger(__name__)


# --- what a connection may use of its node ----------------------------------------------------


class AuthSteps(Protocol):
    """The Redis steps of auth (services/tunnel/auth.py)."""

    async def store_challenge(self, client_ip: str, challenge: ChallengeRecord) -> bool: ...

    async def discard_challenge(self, challenge_id: str) -> None: ...

    async def within_rate(self, client_ip: str) -> bool: ...

    async def load_challenge(self, challenge_id: str) -> ChallengeRecord | None: ...

    async def consume_challenge(self, challenge_id: str, persona_key: str, at_ms: int) -> AuthError | None: ...


class SocketHome(Protocol):
    """This node's sockets and persona ownership, as one socket joins and leaves them
    (services/tunnel/node.py over services/tunnel/registry.py)."""

    def take_outbound_slot(self, socket: TunnelConnection, persona_key: str) -> bool: ...

    async def claim(self, socket: TunnelConnection, persona_key: str, *, inbound: bool) -> str | None: ...

    def attach(self, socket: TunnelConnection) -> bool: ...

    async def detach(self, socket: TunnelConnection) -> None: ...


class OutboundSink(Protocol):
    """The persona's outbound rate and the egress queue (services/tunnel/outbound.py)."""

    async def admit(self, persona_key: str, stream_id: str, origin: str) -> bool: ...

    async def enqueue(self, job: OutboundJob) -> bool: ...


class ResultRoutes(Protocol):
    """Where delivery results go back to (services/tunnel/result_router.py)."""

    def stream_accepted(self, socket: TunnelConnection, stream_id: str) -> None: ...


class AssemblyBudget(Protocol):
    """The node's outbound assembly budget (services/tunnel/budget.py)."""

    def allowance(self, persona_key: str, client_ip: str) -> Allowance: ...


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """Everything a connection uses beyond its own socket: built once per node."""

    config: RelayConfig
    redis: aioredis.Redis  # the inbox delivery's own reads and deletions
    replica_ack: ReplicaAck
    auth: AuthSteps
    home: SocketHome
    outbound: OutboundSink
    results: ResultRoutes
    budget: AssemblyBudget


def session_limits(config: RelayConfig) -> SessionLimits:
    return SessionLimits(
        challenge_ttl_s=config.auth.challengeTtlSeconds,
        max_message_bytes=config.smtp.maxMessageBytes,
        outbound_stream_timeout_ms=config.ws.outboundStreamTimeoutMs,
        mail_domains=tuple(config.mailDomains),
    )


class TunnelConnection:
    """One gateway socket: runs its reader loop, auth deadline and inbound delivery, and carries
    out its session's actions through the node's narrow interfaces (`ConnectionContext`)."""

    def __init__(self, context: ConnectionContext, ws: ServerConnection, client_ip: str) -> None:
        self.context = context
        self.config = context.config
        self.ws = ws
        self.client_ip = client_ip
        self.socket_id = str(uuid.uuid4())
        self.session = TunnelSession(self.socket_id, session_limits(context.config), clock_ms)
        self.delivery: InboxDelivery | None = None
        self._delivery_task: asyncio.Task[Any] | None = None
        self._deadline_task: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_heard = time.monotonic()
        self._last_ping = self._last_heard
        self._closing = False
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
            await self.close(CLOSE_REASON_CODE[CloseReason.INTERNAL_ERROR], CloseReason.INTERNAL_ERROR)
        finally:
            metrics.CONNECTIONS_OPEN.dec()
            self._log_closed()
            for task in list(self._tasks):
                task.cancel()
            if self.allowance is not None:
                self.allowance.give_all()
            await self.context.home.detach(self)

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
        config = self.config
        self.delivery = InboxDelivery(
            self.context.redis,
            self.persona_key,
            config.node_id,
            functools.partial(send_binary_messages, self.ws),
            self.ws.ping,
            use_ack=self.session.wants_inbound_ack,
            ack_timeout_s=config.ws.ackTimeoutMs / 1000,
            retention_s=config.queue.retentionSeconds,
            legacy_ack_grace_s=config.ws.legacyAckGraceMs / 1000,
            is_open=lambda: self.ws.state is SocketState.OPEN,
            ack=self.context.replica_ack,
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
            self._spawn(self.close(CLOSE_REASON_CODE[CloseReason.GOING_AWAY], CloseReason.GOING_AWAY))

    def heartbeat(self, now: float, heartbeat_s: float, idle_s: float) -> None:
        """One tick of the node-wide heartbeat (no timer per socket): close 1001 after `idle_s`
        without hearing anything, ping every `heartbeat_s`, drop timed-out outbound streams."""
        if self._closing:
            return
        if now - self._last_heard >= idle_s:
            log(logger, logging.INFO, "idle socket closed", socket_id=self.socket_id, persona=self.persona_key)
            self._spawn(self.close(CLOSE_REASON_CODE[CloseReason.IDLE_TIMEOUT], CloseReason.IDLE_TIMEOUT))
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
        await asyncio.sleep(self.config.ws.authTimeoutMs / 1000)
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
                if action.code in (CloseCode.AUTH_FAILED, CloseCode.RATE_LIMITED):
                    self._auth_outcome(action.reason)
                await self.close(action.code, action.reason)
            elif isinstance(action, IssueChallenge):
                within_rate = await self.context.auth.store_challenge(self.client_ip, action.challenge)
                await self._perform(self.session.challenge_stored(within_rate))
            elif isinstance(action, DiscardChallenge):
                await self.context.auth.discard_challenge(action.challenge_id)
            elif isinstance(action, CheckAuthRate):
                await self._perform(self.session.auth_rate_checked(await self.context.auth.within_rate(self.client_ip)))
            elif isinstance(action, LoadChallenge):
                record = await self.context.auth.load_challenge(action.challenge_id)
                await self._perform(self.session.challenge_loaded(record))
            elif isinstance(action, ConsumeChallenge):
                code = await self.context.auth.consume_challenge(action.challenge_id, action.persona_key, action.at_ms)
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
        home = self.context.home
        if not inbound and not home.take_outbound_slot(self, persona_key):
            return self.session.auth_failed(AuthError.TOO_MANY_SOCKETS)
        replaced_socket_id = await home.claim(self, persona_key, inbound=inbound)
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
        inbox_woken = self.context.home.attach(self)
        if self.is_inbound:
            self._start_delivery(known_empty=not inbox_woken)

    def _authenticated_limits(self, persona_key: str) -> None:
        """Before auth_ok is sent (the gateway sends nothing larger before it): messages up to
        ws.maxMessageBytes from now on, and outbound streams on the node's budget. websockets
        reads the limit when the next frame starts arriving, so the next frame gets it."""
        if self.session.state is not State.VERIFYING:
            return
        self.ws.protocol.max_message_size = self.config.ws.maxMessageBytes
        self.allowance = self.context.budget.allowance(persona_key, self.client_ip)
        self.session.allowance = self.allowance

    async def _enqueue_outbound(self, action: EnqueueOutbound) -> None:
        try:
            await self._enqueue_outbound_job(action)
        finally:
            if self.allowance is not None:
                self.allowance.give(action.size_bytes)

    async def _enqueue_outbound_job(self, action: EnqueueOutbound) -> None:
        job = action.job
        outbound = self.context.outbound
        origin = Origin(self.config.node_id, self.socket_id).encode()
        if not await outbound.admit(job.persona_key, job.stream_id, origin):
            await self._perform(self.session.outbound_refused(job.stream_id, OutboundRefusal.RATE_LIMITED))
            self._outbound_outcome(job.stream_id, OutboundRefusal.RATE_LIMITED)
            return
        self.context.results.stream_accepted(self, job.stream_id)
        queued = await outbound.enqueue(job)
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
