"""Every code the relay puts on the wire to a gateway (PROTOCOL.md A3, B), and the WebSocket
close code each socket-ending one goes with: the tunnel's counterpart of
services/ingress/policy.py's SMTP replies, so "what does the relay send when ..." has one place
to look, and a typo is a mypy error instead of a silent new wire code.

The members are `StrEnum`s: `json.dumps`, msgpack and f-strings write their plain value, so the
bytes on the wire are those of the bare strings they replace. docs/PROTOCOL.md and README.md
list these tokens; tests/unit/test_codes.py checks those lists against this module both ways.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class CloseCode(IntEnum):
    """WebSocket close codes the tunnel sends (PROTOCOL.md "Close codes in one place")."""

    GOING_AWAY = 1001  # idle, or the tunnel is stopping: reconnect
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # too many unauthenticated sockets from one address
    REPLACED = 4400  # a newer socket of the persona took over
    AUTH_FAILED = 4401
    RATE_LIMITED = 4408  # back off before reconnecting


class AuthError(StrEnum):
    """`{"type":"auth_error","code":CODE}`, then close `AUTH_ERROR_CLOSE[CODE]` with reason CODE."""

    INVALID_MESSAGE = "invalid_message"  # malformed JSON, unknown type, missing field
    INVALID_TUNNEL_FRAME = "invalid_tunnel_frame"  # an undecodable binary frame (also after auth)
    AUTH_TIMEOUT = "auth_timeout"
    # the challenge response, in the order PROTOCOL.md A3 checks it
    CHALLENGE_NOT_FOUND = "challenge_not_found"
    CHALLENGE_MISMATCH = "challenge_mismatch"
    CHALLENGE_ALREADY_USED = "challenge_already_used"
    CHALLENGE_EXPIRED = "challenge_expired"
    INVALID_SIGNATURE_ENCODING = "invalid_signature_encoding"
    INVALID_SIGNATURE = "invalid_signature"
    # back-off refusals
    RATE_LIMITED = "rate_limited"  # auth attempts per client address
    TOO_MANY_SOCKETS = "too_many_sockets"  # outbound-role sockets per persona / per address


AUTH_ERROR_CLOSE: dict[AuthError, CloseCode] = {
    code: CloseCode.RATE_LIMITED
    if code in (AuthError.RATE_LIMITED, AuthError.TOO_MANY_SOCKETS)
    else CloseCode.AUTH_FAILED
    for code in AuthError
}


class ControlError(StrEnum):
    """`{"type":"error","code":CODE}` after auth; the socket stays open (PROTOCOL.md B)."""

    INVALID_MESSAGE = "invalid_message"
    ALREADY_AUTHENTICATED = "already_authenticated"
    UNKNOWN_TYPE = "unknown_type"


class CloseReason(StrEnum):
    """Close reasons not preceded by an auth_error, with `CLOSE_REASON_CODE[reason]`."""

    REPLACED = "replaced_by_new_session"
    GOING_AWAY = "going_away"  # the tunnel is stopping
    IDLE_TIMEOUT = "idle_timeout"  # silent for ws.idleTimeoutMs
    INTERNAL_ERROR = "internal_error"
    TOO_MANY_UNAUTHENTICATED = "too_many_unauthenticated"


CLOSE_REASON_CODE: dict[CloseReason, CloseCode] = {
    CloseReason.REPLACED: CloseCode.REPLACED,
    CloseReason.GOING_AWAY: CloseCode.GOING_AWAY,
    CloseReason.IDLE_TIMEOUT: CloseCode.GOING_AWAY,
    CloseReason.INTERNAL_ERROR: CloseCode.INTERNAL_ERROR,
    CloseReason.TOO_MANY_UNAUTHENTICATED: CloseCode.TRY_AGAIN_LATER,
}


class OutboundRefusal(StrEnum):
    """`error` of a `failed` relay_delivery_result sent at once: the stream is not queued."""

    SENDER_NOT_ALLOWED = "sender_not_allowed"  # mailFrom is not the persona's own address
    HEADER_FROM_NOT_ALLOWED = "header_from_not_allowed"  # services/tunnel/header_from.py
    TOO_MANY_RECIPIENTS = "too_many_recipients"
    MESSAGE_TOO_LARGE = "message_too_large"
    RATE_LIMITED = "rate_limited"  # the persona's outbound messages per minute
    STREAM_NOT_STARTED = "stream_not_started"  # a chunk or end without a start
    INVALID_RECIPIENT = "invalid_recipient"
    TOO_MANY_STREAMS = "too_many_streams"  # open outbound streams on one socket
    OUTBOUND_BUSY = "outbound_busy"  # over an assembly budget: services/tunnel/budget.py


# The refusals whose result also carries `expectedSender`, the address the relay would accept.
NAMES_EXPECTED_SENDER = frozenset({OutboundRefusal.SENDER_NOT_ALLOWED, OutboundRefusal.HEADER_FROM_NOT_ALLOWED})


class DeliveryError(StrEnum):
    """`error` of a `failed` relay_delivery_result from the egress (services/egress/outcome.py
    makes them) or the operator; `PERMANENT` says which ones retrying cannot fix. The two
    `smtp_*` and `mta_sts_policy_violation` are followed by `: <detail>`."""

    SMTP_5XX = "smtp_5xx"  # the remote server refused: `smtp_5xx: <code> <text>`
    SMTP_4XX = "smtp_4xx"  # the remote server deferred
    NULL_MX = "null_mx"  # RFC 7505: the domain accepts no mail
    NXDOMAIN = "nxdomain"
    NO_MAIL_HOST = "no_mail_host"  # no MX and no A/AAAA, or no MX host has an address
    DESTINATION_NOT_ALLOWED = "destination_not_allowed"  # every MX address is non-public
    INVALID_RECIPIENT = "invalid_recipient"
    SMTPUTF8_NOT_SUPPORTED = "smtputf8_not_supported"
    DNS_TEMPORARY = "dns_temporary"
    CONNECTION_FAILED = "connection_failed"
    TLS_FAILED = "tls_failed"  # STARTTLS failed and egress.tls.verify forbids plain text
    MTA_STS_POLICY_VIOLATION = "mta_sts_policy_violation"  # `: <reason>`, see services/egress/mta_sts.py
    CONNECTION_LOST = "connection_lost"
    INTERNAL_ERROR = "internal_error"  # an unexpected error in the worker (logged)
    MAX_ATTEMPTS_EXCEEDED = "max_attempts_exceeded"  # re-run after crashes too often
    CANCELLED_BY_OPERATOR = "cancelled_by_operator"  # `protege-relay queue cancel`
    DELIVERY_FAILED = "delivery_failed"  # a failed result that named no error


PERMANENT = frozenset(
    {
        DeliveryError.SMTP_5XX,
        DeliveryError.NULL_MX,
        DeliveryError.NXDOMAIN,
        DeliveryError.NO_MAIL_HOST,
        DeliveryError.DESTINATION_NOT_ALLOWED,
        DeliveryError.INVALID_RECIPIENT,
        DeliveryError.SMTPUTF8_NOT_SUPPORTED,
        DeliveryError.CANCELLED_BY_OPERATOR,
    }
)
