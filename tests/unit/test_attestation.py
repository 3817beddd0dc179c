"""Attestation: signed exactly as PROTOCOL.md part E, verified the way the Protege gateway does."""

from __future__ import annotations

import base64
import json

from shared.attestation import AttestationContext, create_attestation, verify_attestation
from shared.identity import Passport

CONTEXT = AttestationContext("qabc.0", "alice@example.com", "persona@relay.test")


def test_payload_is_compact_json_in_the_originals_key_order() -> None:
    signer = Passport.generate()
    attestation = create_attestation(
        signer,
        "relay-1",
        CONTEXT,
        {"spf": "pass", "dkim": "fail", "dmarc": "unknown"},
        issued_at="2026-11-25T10:00:00.000Z",
    )
    payload = base64.b64decode(attestation["payloadBase64"])
    assert payload == (
        b'{"streamId":"qabc.0","mailFrom":"alice@example.com","rcptTo":"persona@relay.test",'
        b'"issuedAt":"2026-11-25T10:00:00.000Z","signals":{"spf":"pass","dkim":"fail","dmarc":"unknown"}}'
    )
    assert list(attestation) == ["keyId", "payloadBase64", "signatureBase64"]


def test_valid_attestation_verifies_and_returns_signals() -> None:
    signer = Passport.generate()
    attestation = create_attestation(signer, "relay-1", CONTEXT, {"spf": "pass", "dkim": "pass", "dmarc": "pass"})
    reason, payload = verify_attestation(attestation, {"relay-1": signer.public_key}, CONTEXT)
    assert reason == "ok"
    assert payload is not None and payload["signals"] == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}


def test_each_failure_has_the_originals_reason() -> None:
    signer, other = Passport.generate(), Passport.generate()
    attestation = create_attestation(signer, "relay-1", CONTEXT, {})
    trusted = {"relay-1": signer.public_key}
    assert verify_attestation(None, trusted, CONTEXT)[0] == "missing_attestation"
    assert verify_attestation(attestation, {"other": signer.public_key}, CONTEXT)[0] == "missing_trusted_key"
    assert verify_attestation(attestation, {"relay-1": other.public_key}, CONTEXT)[0] == "invalid_signature"
    moved = AttestationContext("qabc.1", CONTEXT.mail_from, CONTEXT.rcpt_to)
    assert verify_attestation(attestation, trusted, moved)[0] == "context_mismatch"
    garbled = dict(attestation, payloadBase64=base64.b64encode(b"not json").decode())
    assert verify_attestation(garbled, trusted, CONTEXT)[0] == "invalid_payload"
    tampered_payload = json.loads(base64.b64decode(attestation["payloadBase64"]))
    tampered_payload["signals"]["spf"] = "pass"
    tampered = dict(attestation, payloadBase64=base64.b64encode(json.dumps(tampered_payload).encode()).decode())
    assert verify_attestation(tampered, trusted, CONTEXT)[0] == "invalid_signature"
