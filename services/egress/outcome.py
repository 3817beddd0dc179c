"""What one delivery attempt did for one recipient, and the error tokens the gateway sees.

Every failure is an `Outcome` value; this module is the one place that turns a DNS problem, a
connection problem or a remote SMTP reply into the `error` string of `relay_delivery_result`.
The tokens, and which of them are permanent, are `shared.codes.DeliveryError` and
`shared.codes.PERMANENT` (listed in docs/PROTOCOL.md, checked by tests/unit/test_codes.py):
short and stable so a gateway can match on them. `smtp_5xx` / `smtp_4xx` carry the remote reply
(`smtp_5xx: <code> <text>`), `mta_sts_policy_violation` its reason: `mx_not_listed`,
`starttls_not_offered`, `certificate_invalid`, `tls_failed`.

When temporary failures outlast `egress.maxAttempts` or `egress.maxAgeSeconds`, the final
`failed` result carries the last temporary error with `permanent: false`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from shared.codes import PERMANENT, DeliveryError

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
    def failure(cls, token: DeliveryError, detail: str = "") -> Outcome:
        """`token` (`: detail` after it when given), permanent as `shared.codes.PERMANENT` says."""
        disposition = Disposition.PERMANENT if token in PERMANENT else Disposition.TEMPORARY
        return cls(disposition, error=f"{token}: {detail}" if detail else str(token))

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
        token = DeliveryError.SMTP_5XX if 500 <= code < 600 else DeliveryError.SMTP_4XX
        refused = cls.failure(token, f"{code} {text}".rstrip())
        return cls(refused.disposition, error=refused.error, smtp_code=code, enhanced_code=enhanced_code)


def remote_message_id(reply_text: str) -> str:
    """The accepting server's queue id (`... queued as ABC123`), else its whole reply text."""
    queued = _QUEUE_ID.search(reply_text)
    return queued.group(1) if queued else reply_text
