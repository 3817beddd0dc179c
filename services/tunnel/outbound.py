"""Outbound requests (PROTOCOL.md A6, B; DESIGN.md "Outbound" 1-2): who may send what, and
handing an accepted message to the egress queue.

The envelope rules are pure functions used by the session; `OutboundQueue` holds the two
rules that need Redis (the per-persona rate and the once-only arq job).
"""

from __future__ import annotations

import re
import time

import redis.asyncio as aioredis
from arq.connections import ArqRedis

from shared import keys, ratelimit
from shared.envelope import has_control_characters
from shared.payloads import OutboundJob

SENDER_NOT_ALLOWED = "sender_not_allowed"
TOO_MANY_RECIPIENTS = "too_many_recipients"
MESSAGE_TOO_LARGE = "message_too_large"
RATE_LIMITED = "rate_limited"
STREAM_NOT_STARTED = "stream_not_started"
INVALID_RECIPIENT = "invalid_recipient"
TOO_MANY_STREAMS = "too_many_streams"
HEADER_FROM_NOT_ALLOWED = "header_from_not_allowed"  # services/tunnel/header_from.py
OUTBOUND_BUSY = "outbound_busy"  # over an assembly budget: services/tunnel/budget.py

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


def check_sender(mail_from: str, persona_key: str, mail_domains: list[str]) -> str | None:
    """The sender must be the persona's own address: local part is its key (any case), and the
    domain one of ours when domains are configured, else at least a well-formed domain."""
    if has_control_characters(mail_from):
        return SENDER_NOT_ALLOWED
    local_part, at, domain = _bare(mail_from).rpartition("@")
    if not at or local_part.lower() != persona_key or not _DOMAIN.fullmatch(domain):
        return SENDER_NOT_ALLOWED
    if mail_domains and domain.lower().rstrip(".") not in {d.lower().rstrip(".") for d in mail_domains}:
        return SENDER_NOT_ALLOWED
    return None


def check_recipient(rcpt_to: str) -> str | None:
    """One `local@domain` address, nothing that could smuggle SMTP syntax."""
    if has_control_characters(rcpt_to):
        return INVALID_RECIPIENT
    address = _bare(rcpt_to)
    if "," in address and all(part.strip() for part in address.split(",")):
        return TOO_MANY_RECIPIENTS
    if not _ADDRESS.fullmatch(address):
        return INVALID_RECIPIENT
    local_part, _, domain = address.rpartition("@")
    if not local_part or not domain or len(address) > 320:
        return INVALID_RECIPIENT
    return None


def bare_address(address: str) -> str:
    """The address without surrounding angle brackets or spaces."""
    return _bare(address)


# Counts one message in the persona's minute window; within the rate, records which socket
# sent the stream (services/tunnel/results.py) in the same round trip.
_ADMIT = """
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
if count > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
return 1
"""


class OutboundQueue:
    """Per-persona outbound rate (fixed one-minute windows), the socket each accepted stream
    came from, and the arq `deliver` job."""

    def __init__(
        self,
        redis: aioredis.Redis,
        arq: ArqRedis,
        messages_per_minute: int,
        origin_ttl_s: int,
        clock: ratelimit.Clock = time.time,
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._arq = arq
        self._messages_per_minute = messages_per_minute
        self._origin_ttl_s = origin_ttl_s
        self._admit = redis.register_script(_ADMIT)

    async def admit(self, persona_key: str, stream_id: str, origin: str) -> bool:
        """False when the persona is over its outbound rate; else `origin` is recorded."""
        window = int(self._clock()) // RATE_WINDOW_S
        admitted = await self._admit(
            keys=[keys.outbound_rate(persona_key, window), keys.outbound_origin(persona_key, stream_id)],
            args=[RATE_WINDOW_S * 2, self._messages_per_minute, origin, self._origin_ttl_s],
        )
        return bool(admitted)

    async def enqueue(self, job: OutboundJob) -> bool:
        """True if a new job was queued; False if this stream id was already accepted."""
        queued = await self._arq.enqueue_job(
            DELIVER_FUNCTION,
            job.pack(),
            _job_id=keys.egress_job_id(job.persona_key, job.stream_id),
            _queue_name=keys.EGRESS_QUEUE,
        )
        return queued is not None
