"""Delivery status notifications (RFC 3464): the bounce a persona finds in its own inbox.

A gateway stops listening for `relay_delivery_result` after about 20 s; a message that fails
after hours of retries would otherwise look sent. Every MTA answers that with a DSN, and so do
we (bounce.py decides when). The message is built as bytes here, not with `email.message`,
because its layout is fixed and small, and so that what a gateway receives is exactly what the
RFC prescribes: `multipart/report; report-type=delivery-status` with a human-readable part, a
`message/delivery-status` part (per-message fields, then one block per recipient) and the
original message's header section as `text/rfc822-headers` (RFC 6522), never its body.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from enum import StrEnum

from services.egress.outcome import Outcome
from shared.codes import DeliveryError

MAX_ORIGINAL_HEADER_BYTES = 64 * 1024  # the returned header section; a longer one is cut at a line
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^<>\s]{1,500}>)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_SMTP_TOKEN = re.compile(rf"^(?:{DeliveryError.SMTP_5XX}|{DeliveryError.SMTP_4XX}): ")

# Status codes (RFC 3463, RFC 7505) for our own failure tokens, when no remote reply gave one.
_STATUS_OF_TOKEN: dict[str, str] = {
    DeliveryError.NULL_MX: "5.1.10",
    DeliveryError.NXDOMAIN: "5.1.2",
    DeliveryError.NO_MAIL_HOST: "5.4.4",
    DeliveryError.DESTINATION_NOT_ALLOWED: "5.4.4",
    DeliveryError.INVALID_RECIPIENT: "5.1.3",
    DeliveryError.SMTPUTF8_NOT_SUPPORTED: "5.6.7",
    DeliveryError.DNS_TEMPORARY: "4.4.3",
    DeliveryError.CONNECTION_FAILED: "4.4.1",
    DeliveryError.CONNECTION_LOST: "4.4.2",
    DeliveryError.TLS_FAILED: "4.7.5",
    DeliveryError.MTA_STS_POLICY_VIOLATION: "4.7.5",
}


class Action(StrEnum):
    FAILED = "failed"  # no more attempts
    DELAYED = "delayed"  # still being retried (the optional warning)


@dataclass(frozen=True, slots=True)
class Notice:
    """What one DSN reports; times are aware datetimes."""

    action: Action
    reporting_mta: str  # our host name, `Reporting-MTA: dns; <name>`
    mailer_daemon: str  # `MAILER-DAEMON@<first mail domain>`
    persona_address: str  # the original sender, who receives the notice
    message_id: str  # `<...>` of the notice itself
    stream_id: str  # the outbound stream the gateway sent (an extension field, for matching)
    arrival: datetime  # when the tunnel accepted the original message
    now: datetime
    recipients: Sequence[tuple[str, Outcome]]  # the recipients this notice is about
    original: bytes  # the original message (only its header section is returned)
    retry_until: datetime | None = None  # `Will-Retry-Until` of a delayed notice


def status_code(outcome: Outcome) -> str:
    """The RFC 3463 status of a recipient: the remote enhanced code, else one for our token."""
    if outcome.enhanced_code:
        return outcome.enhanced_code
    token = (outcome.error or "").split(":", 1)[0]
    if token in _STATUS_OF_TOKEN:
        return _STATUS_OF_TOKEN[token]
    if outcome.smtp_code is not None:
        return f"{str(outcome.smtp_code)[0]}.0.0"
    return "4.4.7" if outcome.temporary else "5.0.0"  # 4.4.7: delivery time expired


def diagnostic_code(outcome: Outcome) -> str:
    """`smtp; <the remote reply>` when there was one, else our token under our own type."""
    error = outcome.error or ""
    if outcome.smtp_code is not None and _SMTP_TOKEN.match(error):
        return "smtp; " + _SMTP_TOKEN.sub("", error)
    return f"X-Protege-Relay; {error or 'unknown'}"


def original_headers(message: bytes) -> bytes:
    """The header section (CRLF lines, up to the empty line), at most `MAX_ORIGINAL_HEADER_BYTES`."""
    normalized = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    header = normalized.partition(b"\n\n")[0].replace(b"\n", b"\r\n")
    if len(header) > MAX_ORIGINAL_HEADER_BYTES:
        header = header[:MAX_ORIGINAL_HEADER_BYTES].rpartition(b"\r\n")[0]
    return header + b"\r\n" if header else b""


def build(notice: Notice) -> bytes:
    """The whole DSN, CRLF line endings."""
    boundary = f"=_dsn_{notice.message_id.strip('<>').split('@', 1)[0]}"
    headers = original_headers(notice.original)
    in_reply_to = _MESSAGE_ID.search(headers)
    failed = notice.action is Action.FAILED
    subject = "Undelivered Mail Returned to Sender" if failed else "Delayed Mail (still being retried)"
    lines = [
        f"From: Mail Delivery System <{_one_line(notice.mailer_daemon)}>",
        f"To: <{_one_line(notice.persona_address)}>",
        f"Subject: {subject}",
        f"Date: {format_datetime(notice.now)}",
        f"Message-ID: {notice.message_id}",
    ]
    if in_reply_to is not None:
        original_id = in_reply_to.group(1).decode("ascii", "replace")
        lines += [f"In-Reply-To: {original_id}", f"References: {original_id}"]
    lines += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "Content-Transfer-Encoding: 8bit",
        "",
        *_human_text(notice),
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "Content-Transfer-Encoding: 8bit",
        "",
        *_status_fields(notice),
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered message headers",
        f"Content-Transfer-Encoding: {'7bit' if headers.isascii() else '8bit'}",
        "",
    ]
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    return head + headers + f"\r\n--{boundary}--\r\n".encode("ascii")


def _human_text(notice: Notice) -> list[str]:
    if notice.action is Action.FAILED:
        intro = [
            f"This is the mail system at {notice.reporting_mta}.",
            "",
            "Your message could not be delivered to the recipients below; the relay has",
            "stopped trying. Its headers are attached.",
        ]
    else:
        until = format_datetime(notice.retry_until) if notice.retry_until else "its retry limit"
        intro = [
            f"This is the mail system at {notice.reporting_mta}.",
            "",
            "Your message has not been delivered yet to the recipients below. The relay",
            f"keeps trying until {until}; you do not need to send it again.",
        ]
    details = [f"<{recipient}>: {_one_line(diagnostic_code(outcome))}" for recipient, outcome in notice.recipients]
    return [*intro, "", *details]


def _status_fields(notice: Notice) -> list[str]:
    fields = [
        f"Reporting-MTA: dns; {notice.reporting_mta}",
        f"X-Protege-Relay-Stream-Id: {_one_line(notice.stream_id)}",
        f"Arrival-Date: {format_datetime(notice.arrival)}",
        "",
    ]
    for recipient, outcome in notice.recipients:
        fields += [
            f"Final-Recipient: rfc822; {_one_line(recipient)}",
            f"Action: {notice.action.value}",
            f"Status: {status_code(outcome)}",
            f"Diagnostic-Code: {_one_line(diagnostic_code(outcome))}",
            f"Last-Attempt-Date: {format_datetime(notice.now)}",
        ]
        if notice.retry_until is not None:
            fields.append(f"Will-Retry-Until: {format_datetime(notice.retry_until)}")
        fields.append("")
    return fields


def _one_line(text: str) -> str:
    """No CR/LF from a remote reply or an address can start a header of its own."""
    return " ".join(text.split())
