"""What one delivery attempt did for one recipient, and the error tokens the gateway sees.

Every failure is an `Outcome` value; this module is the one place that turns a DNS problem, a
connection problem or a remote SMTP reply into the `error` string of `relay_delivery_result`.
The tokens are short and stable so a gateway can match on them:

| token | permanent | meaning |
|---|---|---|
| `smtp_5xx: <code> <text>` | yes | the remote server refused (the reply follows the token) |
| `smtp_4xx: <code> <text>` | no | the remote server deferred |
| `null_mx` | yes | the domain publishes an RFC 7505 null MX: it accepts no mail |
| `nxdomain` | yes | the recipient domain does not exist |
| `no_mail_host` | yes | no MX and no A/AAAA, or no MX host name has an address |
| `destination_not_allowed` | yes | every MX address is loopback, private, link-local, ... (destinations.py) |
| `invalid_recipient` | yes | the recipient is not `local@domain` |
| `smtputf8_not_supported` | yes | a non-ASCII address, and the server lacks SMTPUTF8 |
| `dns_temporary` | no | SERVFAIL, timeout or another DNS failure worth retrying |
| `connection_failed` | no | no MX host accepted a connection and greeted us |
| `tls_failed` | no | STARTTLS failed and `egress.tls.verify` forbids falling back to plain text |
| `mta_sts_policy_violation: <reason>` | no | an enforced MTA-STS policy ruled out every MX (reasons below) |
| `connection_lost` | no | the connection dropped or timed out inside the mail transaction |
| `internal_error` | no | an unexpected error in the worker (logged with its traceback) |
| `max_attempts_exceeded` | no | the job was re-run after crashes more often than `egress.maxAttempts` |

MTA-STS reasons: `mx_not_listed`, `starttls_not_offered`, `certificate_invalid`, `tls_failed`.

When temporary failures outlast `egress.maxAttempts` or `egress.maxAgeSeconds`, the final
`failed` result carries the last temporary error with `permanent: false`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

MAX_REPLY_TEXT_CHARS = 200
_ENHANCED_CODE = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")
_QUEUE_ID = re.compile(r"queued as\s+<?([^\s>]+)>?", re.IGNORECASE)


class Disposition(StrEnum):
    SENT = "sent"
    PERMANENT = "permanent"
    TEMPORARY = "temporary"


@dataclass(frozen=True, slots=True)
class Outcome:
    disposition: Disposition
    error: str | None = None
    smtp_code: int | None = None
    enhanced_code: str | None = None
    message_id: str | None = None

    @property
    def sent(self) -> bool:
        return self.disposition is Disposition.SENT

    @property
    def temporary(self) -> bool:
        return self.disposition is Disposition.TEMPORARY

    @classmethod
    def failure(cls, token: str, *, permanent: bool) -> Outcome:
        return cls(Disposition.PERMANENT if permanent else Disposition.TEMPORARY, error=token)

    @classmethod
    def from_reply(cls, code: int, text: str) -> Outcome:
        """Classify a final SMTP reply: 2xx sent, 5xx permanent, anything else temporary."""
        text = " ".join(text.split())[:MAX_REPLY_TEXT_CHARS]
        enhanced = _ENHANCED_CODE.match(text)
        enhanced_code = enhanced.group(1) if enhanced else None
        if 200 <= code < 300:
            return cls(
                Disposition.SENT, smtp_code=code, enhanced_code=enhanced_code, message_id=remote_message_id(text)
            )
        permanent = 500 <= code < 600
        token = f"smtp_{'5' if permanent else '4'}xx: {code} {text}".rstrip()
        disposition = Disposition.PERMANENT if permanent else Disposition.TEMPORARY
        return cls(disposition, error=token, smtp_code=code, enhanced_code=enhanced_code)


def remote_message_id(reply_text: str) -> str:
    """The accepting server's queue id (`... queued as ABC123`), else its whole reply text."""
    queued = _QUEUE_ID.search(reply_text)
    return queued.group(1) if queued else reply_text
