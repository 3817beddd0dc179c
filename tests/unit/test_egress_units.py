"""Pure pieces of the egress: line endings, reply classification, backoff, DKIM header lists."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from services.egress.outcome import Disposition, Outcome
from services.egress.signing import DkimSigner, header_names
from services.egress.worker import MAX_BACKOFF_S, backoff_s, summarize
from shared.config import DkimConfig
from shared.normalize import normalize_line_endings
from shared.payloads import OutboundJob
from shared.secrets import SecretFileError


def test_bare_lf_becomes_crlf() -> None:
    assert normalize_line_endings(b"a\nb\n") == b"a\r\nb\r\n"


def test_mixed_line_endings_become_crlf() -> None:
    assert normalize_line_endings(b"a\r\nb\nc\rd\n\re") == b"a\r\nb\r\nc\r\nd\r\n\r\ne"


def test_crlf_message_is_unchanged() -> None:
    message = b"Subject: x\r\n\r\nbody\r\n.leading dot\r\n"
    assert normalize_line_endings(message) == message


@given(st.binary(max_size=300))
def test_normalised_text_has_only_crlf_and_the_same_lines(message: bytes) -> None:
    normalised = normalize_line_endings(message)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", normalised) is None
    assert normalised.split(b"\r\n") == re.split(rb"\r\n|\r|\n", message)
    assert normalize_line_endings(normalised) == normalised


def test_replies_are_classified_by_code() -> None:
    sent = Outcome.from_reply(250, "2.0.0 Ok: queued as ABC123")
    assert (sent.disposition, sent.message_id, sent.enhanced_code) == (Disposition.SENT, "ABC123", "2.0.0")
    assert Outcome.from_reply(250, "OK").message_id == "OK"
    refused = Outcome.from_reply(550, "5.1.1 user\n unknown")
    assert refused.disposition is Disposition.PERMANENT
    assert refused.error == "smtp_5xx: 550 5.1.1 user unknown"
    assert (refused.smtp_code, refused.enhanced_code) == (550, "5.1.1")
    deferred = Outcome.from_reply(451, "try later")
    assert (deferred.disposition, deferred.error, deferred.enhanced_code) == (
        Disposition.TEMPORARY,
        "smtp_4xx: 451 try later",
        None,
    )


def test_backoff_is_full_jitter_capped_by_the_remaining_age() -> None:
    samples = [backoff_s(3, 10.0, 10_000.0) for _ in range(300)]
    assert all(0 <= sample <= 40 for sample in samples)
    assert max(samples) > 20 and min(samples) < 20
    assert all(backoff_s(30, 10.0, 1e9) <= MAX_BACKOFF_S for _ in range(50))
    assert all(backoff_s(5, 10.0, 2.0) <= 2.0 for _ in range(50))


def test_summary_reports_the_first_failed_recipient() -> None:
    job = OutboundJob("pk", "s1", "a@x.test", ["b@y.test", "c@z.test"], b"", 0)
    outcomes = {"b@y.test": Outcome.from_reply(250, "ok"), "c@z.test": Outcome.from_reply(550, "5.1.1 no")}
    result = summarize(job, outcomes, attempt=2)
    assert (result.status, result.recipient, result.smtp_code, result.permanent, result.attempts) == (
        "failed",
        "c@z.test",
        550,
        True,
        2,
    )
    all_sent = summarize(job, {r: Outcome.from_reply(250, "queued as Q1") for r in job.rcpt_to}, 1)
    assert (all_sent.status, all_sent.message_id, all_sent.error, all_sent.permanent) == ("sent", "Q1", None, None)


def test_header_names_take_colon_strings_and_lists() -> None:
    assert header_names("From: To :subject::from") == ["from", "to", "subject"]
    assert header_names(["Date", " Message-ID "]) == ["date", "message-id"]
    assert header_names(["from:to", "Subject"]) == ["from", "to", "subject"]


MESSAGE = (
    b"From: Persona <p@mail.example.test>\r\nTo: someone@example.test\r\nSubject: hello\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@mail.example.test>\r\n\r\nHi there.\r\n"
)


def _write_key(path: Path, private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, mode: int = 0o600) -> None:
    path.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(mode)


def test_a_dkim_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    _write_key(tmp_path / "dkim.pem", ed25519.Ed25519PrivateKey.generate(), mode=0o644)
    config = DkimConfig(
        enabled=True, domainName="relay.test", keySelector="s1", privateKeyPath=str(tmp_path / "dkim.pem")
    )
    with pytest.raises(SecretFileError, match=r"dkim\.privateKeyPath"):
        DkimSigner(config)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_dkim_signature_verifies_and_covers_configured_headers(tmp_path: Path, kind: str) -> None:
    if kind == "rsa":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = rsa_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        _write_key(tmp_path / "dkim.pem", rsa_key)
    else:
        ed_key = ed25519.Ed25519PrivateKey.generate()
        public = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        _write_key(tmp_path / "dkim.pem", ed_key)
    record = f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode()}".encode()
    signer = DkimSigner(
        DkimConfig(
            enabled=True,
            domainName="mail.example.test",
            keySelector="relay",
            privateKeyPath=str(tmp_path / "dkim.pem"),
            headerFieldNames="From:To:Subject:Date:Return-Path",
            skipFields="date",
        )
    )
    signed = signer.sign(MESSAGE)
    assert signed.endswith(MESSAGE) and signed.startswith(b"DKIM-Signature:")
    header = signed[: len(signed) - len(MESSAGE)].decode()
    assert "d=mail.example.test" in header and "s=relay" in header
    assert re.search(r"h=from\s*:\s*to\s*:\s*subject;", header)  # Date skipped, Return-Path never signed

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return record if name == b"relay._domainkey.mail.example.test." else b""

    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert not dkim.verify(signed.replace(b"Hi there.", b"Hi there!"), dnsfunc=dnsfunc)
