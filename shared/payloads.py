"""msgpack payloads that cross Redis between services.

Each payload is a frozen dataclass with `pack`/`unpack`, so a field added on one side is a
type error on the other rather than a silent KeyError at run time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

import msgpack

_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(field.name for field in dataclasses.fields(cls))
    return names


class _Packed:
    """msgpack of the dataclass's fields as a map; unknown keys are ignored on read."""

    def pack(self) -> bytes:
        # the fields as they are: dataclasses.asdict deep-copies them (~3 % of the ingress's CPU
        # per message); no payload nests a dataclass, so the bytes are the same (tests/unit/test_payloads.py)
        fields = {name: getattr(self, name) for name in _field_names(type(self))}
        packed: bytes = msgpack.packb(fields, use_bin_type=True)
        return packed

    @classmethod
    def unpack(cls, packed: bytes) -> Self:
        fields: dict[str, Any] = msgpack.unpackb(packed, raw=False)
        names = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{name: value for name, value in fields.items() if name in names})


@dataclasses.dataclass(frozen=True, slots=True)
class InboxEntry(_Packed):
    """One accepted inbound message for one recipient persona (field `m` of an inbox entry)."""

    queue_id: str
    recipient_index: int
    mail_from: str
    rcpt_to: str
    data: bytes
    received_at_ms: int
    client_ip: str
    auth_attestation: dict[str, str] | None = None

    @property
    def stream_id(self) -> str:
        """Stable across redeliveries, so a gateway can deduplicate (PROTOCOL.md B)."""
        return f"{self.queue_id}.{self.recipient_index}"


@dataclasses.dataclass(frozen=True, slots=True)
class OutboundJob(_Packed):
    """An accepted outbound request: arq job `deliver` argument."""

    persona_key: str
    stream_id: str
    mail_from: str
    rcpt_to: list[str]
    data: bytes
    enqueued_at_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveryResult(_Packed):
    """Outcome for one outbound stream, appended to the persona's results stream."""

    stream_id: str
    status: str  # "sent" | "failed"
    message_id: str | None = None
    error: str | None = None
    recipient: str | None = None
    smtp_code: int | None = None
    enhanced_code: str | None = None
    permanent: bool | None = None
    attempts: int | None = None

    def extra_fields(self) -> dict[str, Any]:
        """PROTOCOL.md B's richer result fields, present only when known."""
        extra = {
            "recipient": self.recipient,
            "smtpCode": self.smtp_code,
            "enhancedCode": self.enhanced_code,
            "permanent": self.permanent,
            "attempts": self.attempts,
        }
        return {name: value for name, value in extra.items() if value is not None}
