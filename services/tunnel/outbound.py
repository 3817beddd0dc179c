"""Outbound requests (PROTOCOL.md A6, B; DESIGN.md "Outbound" 1-2): who may send what, and
handing an accepted message to the egress queue.

The envelope rules are pure functions used by the session; `OutboundQueue` holds the two
rules that need Redis (the per-persona rate and the once-only arq job).

The job is written as arq's `enqueue_job` writes it (the job key, then the queue's sorted set,
nothing if the job id exists), by a script instead of WATCH/MULTI: one round trip, and it can be
followed by WAIT on the same connection, so a stream counts as accepted only once
`redis.minReplicasToAck` replicas hold its job, and it can be sent again to a new primary after
a failover (the job id makes it idempotent). Not confirmed in time, the write raises, which
closes the socket as any Redis failure does; the gateway sends the stream again on its next
socket, under the same stream id, hence the same job id.
"""

from __future__ import annotations

import re
import time

import redis.asyncio as aioredis
from arq.constants import expires_extra_ms, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms

from shared import keys, lua, ratelimit
from shared.codes import OutboundRefusal
from shared.envelope import has_control_characters
from shared.payloads import OutboundJob
from shared.replication import NO_ACK, ReplicaAck, ScriptCall, run_scripts

DELIVER_FUNCTION = "deliver"
RATE_WINDOW_S = 60

_ADDRESS = re.compile(r'[^\s<>@,;"]+@[^\s<>@,;"]+')
# A domain of dot-separated labels (ASCII letters, digits, hyphens, or non-ASCII for IDNs),
# optionally fully qualified: nothing an SMTP client could be made to send as a command.
_DOMAIN = re.compile(r"(?:(?:[A-Za-z0-9-]|[^\x00-\x7f])+\.)*(?:[A-Za-z0-9-]|[^\x00-\x7f])+\.?")


def _bare(address: str) -> str:
    address = address.strip(" ")
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip(" ")
    return address


def check_sender(mail_from: str, persona_key: str, mail_domains: list[str]) -> OutboundRefusal | None:
    """The sender must be the persona's own address: local part is its key (any case), and the
    domain one of ours when domains are configured, else at least a well-formed domain."""
    if has_control_characters(mail_from):
        return OutboundRefusal.SENDER_NOT_ALLOWED
    local_part, at, domain = _bare(mail_from).rpartition("@")
    if not at or local_part.lower() != persona_key or not is_sender_domain(domain, mail_domains):
        return OutboundRefusal.SENDER_NOT_ALLOWED
    return None


def is_sender_domain(domain: str, mail_domains: list[str]) -> bool:
    """A persona sends from one of our domains when domains are configured, else from any
    well-formed one: the one rule for the envelope sender and the header From."""
    if not _DOMAIN.fullmatch(domain):
        return False
    return not mail_domains or domain.lower().rstrip(".") in {d.lower().rstrip(".") for d in mail_domains}


def expected_sender(persona_key: str, mail_domains: list[str]) -> str:
    """The address `check_sender` accepts, for the refusal's `expectedSender` field."""
    return f"{persona_key}@{mail_domains[0] if mail_domains else '<any domain>'}"


def check_recipient(rcpt_to: str) -> OutboundRefusal | None:
    """One `local@domain` address, nothing that could smuggle SMTP syntax."""
    if has_control_characters(rcpt_to):
        return OutboundRefusal.INVALID_RECIPIENT
    address = _bare(rcpt_to)
    if "," in address and all(part.strip() for part in address.split(",")):
        return OutboundRefusal.TOO_MANY_RECIPIENTS
    if not _ADDRESS.fullmatch(address):
        return OutboundRefusal.INVALID_RECIPIENT
    local_part, _, domain = address.rpartition("@")
    if not local_part or not domain or len(address) > 320:
        return OutboundRefusal.INVALID_RECIPIENT
    return None


def bare_address(address: str) -> str:
    """The address without surrounding angle brackets or spaces."""
    return _bare(address)


class OutboundQueue:
    """Per-persona outbound rate (fixed one-minute windows), the socket each accepted stream
    came from, and the arq `deliver` job."""

    def __init__(
        self,
        redis: aioredis.Redis,
        messages_per_minute: int,
        origin_ttl_s: int,
        ack: ReplicaAck = NO_ACK,
        clock: ratelimit.Clock = time.time,
    ) -> None:
        self._redis = redis
        self._ack = ack
        self._clock = clock
        self._messages_per_minute = messages_per_minute
        self._origin_ttl_s = origin_ttl_s
        self._admit = lua.ADMIT_OUTBOUND.on(redis)

    async def admit(self, persona_key: str, stream_id: str, origin: str) -> bool:
        """False when the persona is over its outbound rate; else `origin` is recorded."""
        window = int(self._clock()) // RATE_WINDOW_S
        admitted = await self._admit(
            keys=[keys.outbound_rate(persona_key, window), keys.outbound_origin(persona_key, stream_id)],
            args=[RATE_WINDOW_S * 2, self._messages_per_minute, origin, self._origin_ttl_s],
        )
        return bool(admitted)

    async def enqueue(self, job: OutboundJob) -> bool:
        """True if a new job was queued; False if this stream id was already accepted. Raises
        a RedisError if it could not be written (and replicated, when required) in time."""
        job_id = keys.egress_job_id(job.persona_key, job.stream_id)
        now_ms = timestamp_ms()
        serialized = serialize_job(DELIVER_FUNCTION, (job.pack(),), {}, None, now_ms, serializer=None)
        call = ScriptCall(
            lua.ENQUEUE_JOB,
            [job_key_prefix + job_id, result_key_prefix + job_id, keys.EGRESS_QUEUE],
            [expires_extra_ms, serialized, now_ms, job_id],
        )
        (queued,) = await run_scripts(self._redis, [call], self._ack)  # retried through a failover
        return bool(queued)
