"""Who may receive mail here: the recipient rules of PROTOCOL.md part C, with no I/O.

Every SMTP reply the ingress itself composes is a `Reply` constant in this module, so "what
does the relay answer when ..." has one place to look. The handler gathers facts (the RCPT
address, how many recipients so far, what Redis says about the persona) and these functions
turn them into either a route or a refusal.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from shared.envelope import has_control_characters
from shared.identity import InvalidKey, persona_key_of_local_part

ROUTE_CACHE_SIZE = 4096  # local parts (<= one command line each) whose routing is remembered


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply line; `reason` is the metric/log label of a refusal."""

    code: int
    enhanced: str
    text: str
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


CONNECTION_RATE_LIMITED = Reply(421, "4.7.0", "relay_rejected_connection_rate_limited", "connection_rate_limited")
TOO_MANY_CONNECTIONS = Reply(  # its own text: an operator reading a bounce can tell cap from rate
    421, "4.7.0", "relay_rejected_too_many_connections", "too_many_connections"
)
RECIPIENT_INVALID = Reply(550, "5.1.1", "relay_rejected_recipient_invalid", "recipient_invalid")
RELAY_ACCESS_DENIED = Reply(550, "5.7.1", "relay access denied", "relay_access_denied")
RECIPIENT_NOT_CONNECTED = Reply(450, "4.2.1", "relay_rejected_recipient_not_connected", "recipient_not_connected")
MAILBOX_FULL = Reply(452, "4.2.2", "mailbox full", "mailbox_full")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "relay_rejected_too_many_recipients", "too_many_recipients")
MESSAGE_TOO_LARGE = Reply(552, "5.3.4", "relay_rejected_message_too_large", "message_too_large")
STORAGE_FULL = Reply(452, "4.3.1", "insufficient system storage, try again later", "storage_full")
IP_BYTES_BUDGET = Reply(  # same words: to the sender both mean "not now"; the label tells them apart
    452, "4.3.1", "insufficient system storage, try again later", "ip_bytes_budget"
)
MESSAGE_RATE_LIMITED = Reply(451, "4.7.0", "relay_rejected_rate_limited", "message_rate_limited")
TEMPORARY_FAILURE = Reply(451, "4.3.0", "temporary failure, try again later", "temporary_failure")
SENDER_INVALID = Reply(553, "5.1.7", "sender address has invalid characters", "sender_invalid")
SHUTTING_DOWN = Reply(421, "4.3.2", "service shutting down, try again later", "shutting_down")
COMMAND_TIMEOUT = Reply(421, "4.4.2", "timeout exceeded, closing connection", "command_timeout")
EARLY_TALKER = Reply(554, "5.5.1", "protocol error: command sent before the greeting", "early_talker")
BAD_SEQUENCE = Reply(503, "5.5.1", "bad sequence of commands", "bad_sequence")
COMMAND_LINE_TOO_LONG = Reply(500, "5.5.2", "command line too long", "command_line_too_long")
DATA_LINE_TOO_LONG = Reply(500, "5.5.2", "message line too long (RFC 5321 4.5.3.1.6)", "data_line_too_long")
TOO_MANY_FAILED_RECIPIENTS = Reply(
    421, "4.7.0", "too many failed recipients, closing connection", "too_many_failed_recipients"
)
CLOSING = Reply(221, "2.0.0", "closing connection")

SENDER_OK = Reply(250, "2.1.0", "OK")
RECIPIENT_OK = Reply(250, "2.1.5", "OK")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"queued as {queue_id}")


@dataclass(frozen=True, slots=True)
class InboxState:
    """What Redis says about a persona at RCPT time."""

    seen: bool
    message_count: int
    byte_count: int


def route_recipient(address: str, mail_domains: list[str]) -> str | Reply:
    """The persona key an RCPT address routes to, or the refusal.

    The local part before any `+tag` must be a persona key; when mail domains are configured
    the domain must be one of them (case-insensitive). A bare local part with no `@` is
    refused: we only take mail addressed to a full address.
    """
    local_part, at_sign, domain = address.rpartition("@")
    if not at_sign or not local_part or not _is_utf8(address):
        return RECIPIENT_INVALID
    persona_key = _persona_key(local_part)
    if persona_key is None:
        return RECIPIENT_INVALID
    if mail_domains and domain.lower() not in {configured.lower() for configured in mail_domains}:
        return RELAY_ACCESS_DENIED
    return persona_key


@functools.lru_cache(maxsize=ROUTE_CACHE_SIZE)
def _persona_key(local_part: str) -> str | None:
    """`persona_key_of_local_part` remembered: its base32 check costs ~20 us, and a message's
    recipient is routed twice (RCPT, then its inbox entry). None: not a persona key."""
    try:
        return persona_key_of_local_part(local_part)
    except InvalidKey:
        return None


def check_recipient_count(accepted_so_far: int, max_recipients: int) -> Reply | None:
    """Refuse the recipient beyond `smtp.maxRecipients` (the earlier ones stay accepted)."""
    return TOO_MANY_RECIPIENTS if accepted_so_far >= max_recipients else None


def check_inbox(state: InboxState, max_messages: int, max_bytes: int) -> Reply | None:
    """A persona never seen within the retention window, or whose queue is at its cap."""
    if not state.seen:
        return RECIPIENT_NOT_CONNECTED
    if state.message_count >= max_messages or state.byte_count >= max_bytes:
        return MAILBOX_FULL
    return None


def check_storage(used_bytes: int, max_bytes: int, high_watermark_percent: int, queued_bytes: int) -> Reply | None:
    """The Redis memory admission rule (docs/SECURITY.md "Redis memory and admission").

    `room` is what is left below the high watermark (`redis.admissionHighWatermarkPercent` of
    Redis `maxmemory`). New mail is refused when there is no room, and before that whenever
    `queued_bytes` (at RCPT the persona's inbox bytes, at DATA the bytes about to be written)
    is at least the room left: as memory rises, the personas with the largest backlogs are
    refused first, small inboxes keep receiving until the watermark itself. No `maxmemory`
    (0): no watermark, Redis' own limit is the only one (set one: deploy/ does).
    """
    if max_bytes <= 0:
        return None
    room = max_bytes * high_watermark_percent // 100 - used_bytes
    return STORAGE_FULL if room <= 0 or queued_bytes >= room else None


def check_ip_bytes(queued_this_hour: int, message_bytes: int, budget: int) -> Reply | None:
    """`rateLimits.smtpQueuedBytesPerHourPerIp`: bytes one client IP may add to the inboxes per
    hour (all its recipients counted), so that a few addresses cannot fill Redis for everyone."""
    return IP_BYTES_BUDGET if queued_this_hour + message_bytes > budget else None


def check_failed_recipients(failed_so_far: int, max_failed: int) -> Reply | None:
    """`smtp.maxFailedRecipients` refused RCPTs per session are answered as they are; the next
    refusal is `421 4.7.0` and the connection closes (directory harvesting, log flooding). A
    temporary failure of ours (Redis) is not the client's and is not counted."""
    return TOO_MANY_FAILED_RECIPIENTS if failed_so_far >= max_failed else None


def check_sender(address: str) -> Reply | None:
    """The envelope sender is stored as a string in msgpack, so it must be valid UTF-8."""
    return None if _is_utf8(address) else SENDER_INVALID


def _is_utf8(text: str) -> bool:
    """False for text holding lone surrogates (aiosmtpd's surrogateescape of raw 8-bit bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not has_control_characters(text)
