"""The aiosmtpd handler: recipient policy and durable enqueue, nothing about SMTP parsing.

aiosmtpd parses commands, dot-unstuffs DATA and enforces line and size limits; it calls the
`handle_*` hooks here for the decisions. Facts come from Redis (seen key, inbox size, rate
counters), decisions from `policy`, and a message is answered 250 only after `enqueue`
confirmed the atomic write, or found the same message (envelope and bytes) accepted before: the
sender's retry after a reply lost on the way back gets the first queue id, not a second copy.
Any Redis trouble is `451 4.3.0`, never a 250.

Redis round trips of a message to one persona: one per RCPT (seen, inbox length and bytes, and
at the transaction's first RCPT the per-IP message count and the IP's bytes this hour, in one
pipeline) and one at the final dot (the enqueue script, which also wakes the owning tunnel node,
pipelined with the IP's byte count); one more per connection (the connection rate, before the
greeting). Redis memory for the admission rule (`memory.MemoryWatch`) is one `INFO memory` per
second per process, not per message. tests/ingress/test_ingress_roundtrips.py holds that budget.

When sender authentication is on (`smtp.evaluateSenderAuth`, implied by `attestation.enabled`)
DATA also runs SPF/DKIM/DMARC (`sender_auth`), adds an Authentication-Results header below
the Received header, and, with an attestation key, signs the signals for each recipient's
smtp_start (PROTOCOL.md part E).

Several RCPTs routing to the same persona each get their own inbox entry (recipient index
`n` in the stream id `<queue_id>.<n>`), exactly as written: a gateway sees one delivery per
address the sender used, e.g. both `key+a@` and `key+b@`, which is what `+tag` users expect.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from aiosmtpd.smtp import SMTP, Envelope, Session
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from services.ingress import metrics, policy
from services.ingress.memory import MemorySample, MemoryWatch
from services.ingress.policy import InboxState, Reply
from services.ingress.received import TraceInfo, received_header
from services.ingress.sender_auth import (
    SenderAuthenticator,
    SenderAuthVerdict,
    SenderFacts,
    SpfResult,
    authentication_results,
)
from shared import keys, ratelimit
from shared.attestation import AttestationContext, create_attestation
from shared.config import RelayConfig
from shared.enqueue import Delivery, EnqueueFailed, enqueue, message_digest, new_queue_id
from shared.identity import Passport
from shared.logs import get_logger, log
from shared.payloads import InboxEntry
from shared.replication import ReplicaAck

logger = get_logger(__name__)

REDIS_CHECK_TIMEOUT_S = 5.0
REVERSE_DNS_TIMEOUT_S = 1.0
NULL_SENDER = "<>"
EXTRA_EHLO_KEYWORDS = ("PIPELINING", "ENHANCEDSTATUSCODES")
IP_BYTES_WINDOW_S = 3600


class IngressSession(Session):
    """aiosmtpd's session plus what we learn once per connection (client IP, reverse name)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.reverse_name: str | None = None
        self.reverse_looked_up = False
        self.failed_recipients = 0
        self.close_after_reply = False  # set with a 421: the server closes once it is sent
        # SPF of the current transaction, started at its first accepted RCPT (see handle_RCPT)
        self.spf: tuple[str, str, asyncio.Task[SpfResult]] | None = None


class IngressEnvelope(Envelope):
    """aiosmtpd's envelope plus the per-IP message rate verdict, counted at the first RCPT that
    reaches Redis (in that RCPT's round trip) and answered at DATA, and the client IP's bytes
    queued this hour as read in that round trip (for `rateLimits.smtpQueuedBytesPerHourPerIp`)."""

    def __init__(self) -> None:
        super().__init__()
        self.message_rate_allowed: bool | None = None
        self.ip_bytes_this_hour = 0


def _mail_from(envelope: Envelope) -> str:
    """MAIL FROM as stored and framed: "" for the null sender."""
    return "" if envelope.mail_from in (None, NULL_SENDER) else str(envelope.mail_from)


def _ip_bytes_key(client_ip: str, now_s: float | None = None) -> str:
    """The client IP's byte counter for this clock hour."""
    window = int((time.time() if now_s is None else now_s) // IP_BYTES_WINDOW_S)
    return keys.rate_counter(ratelimit.RateKind.SMTP_BYTES, client_ip, window)


def client_ip_of(session: Session) -> str:
    peer: Any = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


class IngressHandler:
    def __init__(
        self,
        redis: aioredis.Redis,
        config: RelayConfig,
        hostname: str,
        *,
        sender_auth: SenderAuthenticator | None = None,
        attestation_signer: Passport | None = None,
        rate_clock: ratelimit.Clock = time.time,
    ) -> None:
        self._redis = redis
        self._config = config
        self._hostname = hostname
        self._sender_auth = sender_auth
        self._attestation_signer = attestation_signer
        self._replica_ack = ReplicaAck.from_config(config)
        self._connection_limit = ratelimit.RateLimit(
            ratelimit.RateKind.SMTP_CONNECTION,
            config.rateLimits.smtpConnectionsPerMinutePerIp,
            config.rateLimits.denyWindowMs,
            rate_clock,
        )
        self._message_limit = ratelimit.RateLimit(
            ratelimit.RateKind.SMTP_MESSAGE,
            config.rateLimits.smtpMessagesPerMinutePerIp,
            config.rateLimits.denyWindowMs,
            rate_clock,
        )
        self._memory = MemoryWatch(redis)

    # --- connection ------------------------------------------------------------------------

    async def admit_connection(self, session: Session) -> Reply | None:
        """Per-IP connection rate, checked before the greeting. Fails open if Redis is down:
        every later step that matters (RCPT checks, enqueue) answers 451 on its own."""
        client_ip = client_ip_of(session)
        metrics.CONNECTIONS.inc()
        try:
            async with asyncio.timeout(REDIS_CHECK_TIMEOUT_S):
                allowed = await ratelimit.allow(self._redis, self._connection_limit, client_ip)
        except (RedisError, OSError, TimeoutError) as exc:
            log(
                logger,
                logging.WARNING,
                "connection rate check failed; admitting",
                client_ip=client_ip,
                error=type(exc).__name__,
            )
            return None
        if not allowed:
            return self._refuse(policy.CONNECTION_RATE_LIMITED, client_ip=client_ip)
        return None

    # --- aiosmtpd hooks --------------------------------------------------------------------

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        """Add PIPELINING and ENHANCEDSTATUSCODES; drop AUTH (we never authenticate senders)."""
        session.host_name = hostname
        *keywords, last = responses
        kept = [line for line in keywords if not line.startswith("250-AUTH")]
        return [*kept, *(f"250-{keyword}" for keyword in EXTRA_EHLO_KEYWORDS), last]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        refusal = policy.check_sender(address)
        if refusal is not None:
            return str(self._refuse(refusal, client_ip=client_ip_of(session)))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(policy.SENDER_OK)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        client_ip = client_ip_of(session)
        route = policy.route_recipient(address, self._config.mailDomains)
        if isinstance(route, Reply):
            return str(self._refuse_recipient(session, route, client_ip=client_ip))
        refusal = policy.check_recipient_count(len(envelope.rcpt_tos), self._config.smtp.maxRecipients)
        if refusal is None:
            try:
                async with asyncio.timeout(REDIS_CHECK_TIMEOUT_S):
                    state = await self._inbox_state(route, envelope, client_ip)
                    memory = await self._memory.sample()
            except (RedisError, OSError, TimeoutError) as exc:
                return str(
                    self._refuse(policy.TEMPORARY_FAILURE, client_ip=client_ip, persona=route, error=type(exc).__name__)
                )
            refusal = policy.check_inbox(
                state, self._config.queue.maxMessages, self._config.queue.maxBytes
            ) or self._check_storage(memory, state.byte_count)
        if refusal is not None:
            return str(self._refuse_recipient(session, refusal, client_ip=client_ip, persona=route))
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        if len(envelope.rcpt_tos) == 1:
            self._start_spf(session, envelope)
        return str(policy.RECIPIENT_OK)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        client_ip = client_ip_of(session)
        try:
            allowed = await self._message_allowed(envelope, client_ip)
        except (RedisError, OSError, TimeoutError) as exc:
            return str(self._refuse(policy.TEMPORARY_FAILURE, client_ip=client_ip, error=type(exc).__name__))
        if not allowed:
            return str(self._refuse(policy.MESSAGE_RATE_LIMITED, client_ip=client_ip))
        content = envelope.original_content or b""
        if len(content) > self._config.smtp.maxMessageBytes:
            return str(self._refuse(policy.MESSAGE_TOO_LARGE, client_ip=client_ip))
        queued_bytes = len(content) * len(envelope.rcpt_tos)
        ip_bytes = envelope.ip_bytes_this_hour if isinstance(envelope, IngressEnvelope) else 0
        refusal = policy.check_ip_bytes(ip_bytes, queued_bytes, self._config.rateLimits.smtpQueuedBytesPerHourPerIp)
        if refusal is None:
            memory = self._memory.fresh()
            if memory is None:
                try:
                    async with asyncio.timeout(REDIS_CHECK_TIMEOUT_S):
                        memory = await self._memory.sample()
                except (RedisError, OSError, TimeoutError) as exc:
                    return str(self._refuse(policy.TEMPORARY_FAILURE, client_ip=client_ip, error=type(exc).__name__))
            refusal = self._check_storage(memory, queued_bytes)
        if refusal is not None:
            return str(self._refuse(refusal, client_ip=client_ip, bytes=queued_bytes))

        # before anything of ours is added: a retry of the same message must hash the same
        digest = message_digest(_mail_from(envelope), list(envelope.rcpt_tos), content)
        queue_id = new_queue_id()
        verdict = await self._authenticate_sender(session, envelope, content)
        if verdict is not None and self._sender_auth is not None:
            # RFC 8601 §5: headers claiming our authserv-id are forgeries; ours follows the Received
            content = await self._sender_auth.strip_forged_results(content, self._hostname)
        reverse_name = await self._reverse_name(session)

        def deliveries_for(chosen_queue_id: str) -> list[Delivery]:
            return self._deliveries(chosen_queue_id, session, envelope, content, reverse_name, verdict)

        started_s = time.perf_counter()
        try:
            # also wakes the owning tunnel node, after a duplicate too (enqueue.py)
            enqueued = await enqueue(
                self._redis,
                digest,
                queue_id,
                deliveries_for,
                self._replica_ack,
                also=self._count_ip_bytes(client_ip, queued_bytes),
            )
        except EnqueueFailed as exc:
            # Redis full (noeviction refused the write): "insufficient storage", still never a 250
            reply = policy.STORAGE_FULL if exc.out_of_memory else policy.TEMPORARY_FAILURE
            return str(self._refuse(reply, client_ip=client_ip, queue_id=queue_id, error=str(exc)))
        metrics.ENQUEUE_SECONDS.observe(time.perf_counter() - started_s)
        if enqueued.entries_written:
            metrics.MESSAGES_ACCEPTED.inc()
            metrics.RECIPIENTS_ACCEPTED.inc(enqueued.entries_written)
            metrics.BYTES_ACCEPTED.inc(len(content))
            if logger.isEnabledFor(logging.INFO):
                log(
                    logger,
                    logging.INFO,
                    "accepted",
                    queue_id=enqueued.queue_id,
                    client_ip=client_ip,
                    recipients=enqueued.entries_written,
                    bytes=len(content),
                )
        else:
            metrics.DUPLICATES.inc()
            log(
                logger,
                logging.INFO,
                "accepted before; not stored again",
                queue_id=enqueued.queue_id,
                client_ip=client_ip,
            )
        return str(policy.queued(enqueued.queue_id))

    async def handle_exception(self, error: Exception) -> str:
        """Anything unexpected in a hook: logged with its traceback, answered 451, never 250."""
        logger.error("unexpected error in SMTP session", exc_info=error)
        metrics.rejections("internal_error", policy.TEMPORARY_FAILURE.code).inc()
        return str(policy.TEMPORARY_FAILURE)

    # --- helpers ---------------------------------------------------------------------------

    async def close(self) -> None:
        if self._sender_auth is not None:
            self._sender_auth.close()

    async def _authenticate_sender(
        self, session: Session, envelope: Envelope, content: bytes
    ) -> SenderAuthVerdict | None:
        if self._sender_auth is None:
            return None
        facts = SenderFacts(client_ip_of(session), session.host_name or "", _mail_from(envelope), content)
        spf = None
        if isinstance(session, IngressSession) and session.spf is not None:
            mail_from, helo, spf = session.spf
            session.spf = None
            if (mail_from, helo) != (facts.mail_from, facts.helo):
                spf.cancel()
                spf = None
        verdict = await self._sender_auth.evaluate(facts, spf)
        signals = verdict.signals()
        for mechanism, signal in signals.items():
            metrics.sender_auth(mechanism, signal).inc()
        if logger.isEnabledFor(logging.INFO):
            log(logger, logging.INFO, "sender authenticated", client_ip=facts.client_ip, **signals)
        return verdict

    def _start_spf(self, session: Session, envelope: Envelope) -> None:
        """SPF needs only the envelope: start it at the first accepted RCPT so its lookups overlap
        the rest of the transaction (not at MAIL FROM: a sender refused at every RCPT costs no
        DNS). One per session: a new transaction cancels the previous one's."""
        if self._sender_auth is None or not isinstance(session, IngressSession):
            return
        if session.spf is not None:
            session.spf[2].cancel()
        mail_from, helo = _mail_from(envelope), session.host_name or ""
        session.spf = (mail_from, helo, self._sender_auth.start_spf(client_ip_of(session), helo, mail_from))

    def _deliveries(
        self,
        queue_id: str,
        session: Session,
        envelope: Envelope,
        content: bytes,
        reverse_name: str | None,
        verdict: SenderAuthVerdict | None = None,
    ) -> list[Delivery]:
        now = datetime.now(UTC)
        trace = TraceInfo(
            helo=session.host_name or "",
            client_ip=client_ip_of(session),
            reverse_name=reverse_name,
            extended=session.extended_smtp,
            tls=session.ssl is not None,
            smtputf8=envelope.smtp_utf8,
        )
        mail_from = _mail_from(envelope)
        auth_header = b""
        if verdict is not None:
            auth_header = authentication_results(self._hostname, verdict)
        deliveries: list[Delivery] = []
        for index, rcpt_to in enumerate(envelope.rcpt_tos):
            route = policy.route_recipient(rcpt_to, self._config.mailDomains)
            if isinstance(route, Reply):  # accepted at RCPT, so unreachable unless config changed
                continue
            entry = InboxEntry(
                queue_id=queue_id,
                recipient_index=index,
                mail_from=mail_from,
                rcpt_to=rcpt_to,
                data=received_header(trace, self._hostname, queue_id, rcpt_to, now) + auth_header + content,
                received_at_ms=int(now.timestamp() * 1000),
                client_ip=trace.client_ip,
                auth_attestation=self._attest(f"{queue_id}.{index}", mail_from, rcpt_to, verdict),
            )
            deliveries.append(Delivery(route, entry))
        return deliveries

    def _attest(
        self, stream_id: str, mail_from: str, rcpt_to: str, verdict: SenderAuthVerdict | None
    ) -> dict[str, str] | None:
        """The signed signals for one smtp_start: its stream id, mailFrom and rcptTo exactly."""
        if self._attestation_signer is None or verdict is None:
            return None
        context = AttestationContext(stream_id, mail_from, rcpt_to)
        return create_attestation(self._attestation_signer, self._config.attestation.keyId, context, verdict.signals())

    def _check_storage(self, memory: MemorySample, queued_bytes: int) -> Reply | None:
        percent = self._config.redis.admissionHighWatermarkPercent
        return policy.check_storage(memory.used_bytes, memory.max_bytes, percent, queued_bytes)

    def _count_ip_bytes(self, client_ip: str, queued_bytes: int) -> Callable[[Pipeline], object]:
        """INCRBY the client IP's hourly byte counter, in the enqueue script's round trip."""
        counter = _ip_bytes_key(client_ip)

        def queue(pipe: Pipeline) -> None:
            pipe.incrby(counter, queued_bytes)
            pipe.expire(counter, 2 * IP_BYTES_WINDOW_S)

        return queue

    async def _inbox_state(self, persona_key: str, envelope: Envelope, client_ip: str) -> InboxState:
        """The persona's facts for the RCPT policy, in one round trip that also counts the
        transaction against the per-IP message rate (once, at its first RCPT to reach Redis).

        The rate keys are not hash-tagged with the persona, so they cannot join the enqueue
        script (one Cluster slot per script); a non-transactional pipeline may mix slots. The
        verdict waits on the envelope and is answered at DATA, as before.
        """
        count_message = isinstance(envelope, IngressEnvelope) and envelope.message_rate_allowed is None
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(keys.seen(persona_key))
            pipe.xlen(keys.inbox(persona_key))
            pipe.get(keys.inbox_bytes(persona_key))
            if count_message:
                ratelimit.count(pipe, self._message_limit, client_ip)
                pipe.get(_ip_bytes_key(client_ip))
            replies = await pipe.execute()
        if count_message:
            assert isinstance(envelope, IngressEnvelope)
            envelope.ip_bytes_this_hour = int(replies[6] or 0)
            envelope.message_rate_allowed = await ratelimit.judge(
                self._redis, self._message_limit, client_ip, replies[3:6]
            )
        seen, message_count, byte_count = replies[:3]
        return InboxState(bool(seen), int(message_count), int(byte_count or 0))

    async def _message_allowed(self, envelope: Envelope, client_ip: str) -> bool:
        """The per-IP message rate verdict counted at RCPT; counted here only if it was not."""
        if isinstance(envelope, IngressEnvelope) and envelope.message_rate_allowed is not None:
            return envelope.message_rate_allowed
        async with asyncio.timeout(REDIS_CHECK_TIMEOUT_S):
            return await ratelimit.allow(self._redis, self._message_limit, client_ip)

    async def _reverse_name(self, session: Session) -> str | None:
        """The client's PTR name for the trace header, looked up once per connection, bounded."""
        if not isinstance(session, IngressSession):
            return None
        if not session.reverse_looked_up:
            session.reverse_looked_up = True
            try:
                host, _ = await asyncio.wait_for(
                    asyncio.get_running_loop().getnameinfo((client_ip_of(session), 0), socket.NI_NAMEREQD),
                    REVERSE_DNS_TIMEOUT_S,
                )
                session.reverse_name = host
            except (OSError, TimeoutError, ValueError):
                session.reverse_name = None
        return session.reverse_name

    def _refuse_recipient(self, session: Session, reply: Reply, **fields: Any) -> Reply:
        """A refused RCPT, counted per session; past `smtp.maxFailedRecipients` the answer is
        421 and the server closes the connection after sending it."""
        if isinstance(session, IngressSession):
            over = policy.check_failed_recipients(session.failed_recipients, self._config.smtp.maxFailedRecipients)
            if over is not None:
                session.close_after_reply = True
                return self._refuse(over, failed_recipients=session.failed_recipients, **fields)
            session.failed_recipients += 1
        return self._refuse(reply, **fields)

    def _refuse(self, reply: Reply, **fields: Any) -> Reply:
        metrics.rejections(reply.reason, reply.code).inc()
        if logger.isEnabledFor(logging.INFO):
            log(logger, logging.INFO, "rejected", reason=reply.text, code=reply.code, **fields)
        return reply

    def refused_by_protocol(self, reply: Reply, session: Session | None) -> None:
        """Count and log a refusal that aiosmtpd itself produced (e.g. its size checks)."""
        self._refuse(reply, client_ip=client_ip_of(session) if session else "unknown")
