"""Relay auth attestation on smtp_start (PROTOCOL.md part E).

The ingress signs what it learnt about a message's sender (SPF, DKIM, DMARC) bound to the
frame's context, so a gateway that trusts the relay's key can tell forged mail from
authenticated mail without redoing the checks. Byte-compatible with the original: compact
JSON payload in a fixed key order, Ed25519 signature over its UTF-8 bytes, both base64.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from shared.identity import Passport, verify_signature
from shared.protocol import compact_json

Signal = Literal["pass", "fail", "unknown"]


@dataclass(frozen=True, slots=True)
class AttestationContext:
    stream_id: str
    mail_from: str
    rcpt_to: str

    def digest(self) -> str:
        return hashlib.sha256(f"{self.stream_id}\n{self.mail_from}\n{self.rcpt_to}".encode()).hexdigest()


def iso_now_ms() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def payload_bytes(context: AttestationContext, issued_at: str, signals: dict[str, Signal]) -> bytes:
    return compact_json(
        {
            "streamId": context.stream_id,
            "mailFrom": context.mail_from,
            "rcptTo": context.rcpt_to,
            "issuedAt": issued_at,
            "signals": {name: signals.get(name, "unknown") for name in ("spf", "dkim", "dmarc")},
        }
    )


def create_attestation(
    signer: Passport,
    key_id: str,
    context: AttestationContext,
    signals: dict[str, Signal],
    issued_at: str | None = None,
) -> dict[str, str]:
    payload = payload_bytes(context, issued_at or iso_now_ms(), signals)
    return {
        "keyId": key_id,
        "payloadBase64": base64.b64encode(payload).decode("ascii"),
        "signatureBase64": signer.sign_base64(payload),
    }


VerificationReason = Literal[
    "missing_attestation", "missing_trusted_key", "invalid_payload", "invalid_signature", "context_mismatch", "ok"
]


def verify_attestation(
    attestation: dict[str, str] | None, trusted_keys: dict[str, bytes], expected: AttestationContext
) -> tuple[VerificationReason, dict[str, object] | None]:
    """The gateway's check, in the original's order: key known, payload JSON, signature, context."""
    if not attestation:
        return "missing_attestation", None
    public_key = trusted_keys.get(attestation.get("keyId", ""))
    if public_key is None:
        return "missing_trusted_key", None
    try:
        payload_raw = base64.b64decode(attestation.get("payloadBase64", ""), validate=True)
        payload = json.loads(payload_raw)
        signature = base64.b64decode(attestation.get("signatureBase64", ""), validate=True)
    except (binascii.Error, ValueError):
        return "invalid_payload", None
    if not isinstance(payload, dict):
        return "invalid_payload", None
    if not verify_signature(public_key, payload_raw, signature):
        return "invalid_signature", payload
    signed = AttestationContext(str(payload.get("streamId")), str(payload.get("mailFrom")), str(payload.get("rcptTo")))
    if signed.digest() != expected.digest():
        return "context_mismatch", payload
    return "ok", payload
