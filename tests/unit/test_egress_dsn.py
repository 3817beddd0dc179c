"""The DSN itself (RFC 3464 / RFC 6522), parsed back with the stdlib email package as a mail
client would; the worker and end-to-end paths are in test_egress_worker.py and
test_e2e_outbound.py."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

from services.egress import dsn
from services.egress.bounce import notice_queue_id
from services.egress.outcome import Outcome
from shared.codes import DeliveryError
from tests.support.dsn import status_groups

ORIGINAL = (
    b"From: persona@relay.test\nTo: user@example.test\nSubject: quarterly numbers\n"
    b"Message-ID: <abc.123@relay.test>\n\nsecret body text\n"
)
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def notice(action: dsn.Action = dsn.Action.FAILED, **overrides: object) -> dsn.Notice:
    fields: dict[str, object] = {
        "action": action,
        "reporting_mta": "egress.relay.test",
        "mailer_daemon": "MAILER-DAEMON@relay.test",
        "persona_address": "persona@relay.test",
        "message_id": "<qexample.dsn@relay.test>",
        "stream_id": "stream-1",
        "arrival": NOW - timedelta(hours=5),
        "now": NOW,
        "recipients": [
            ("user@example.test", Outcome.from_reply(550, "5.1.1 user unknown\r\nInjected: header")),
            ("other@example.test", Outcome.failure(DeliveryError.CONNECTION_FAILED)),
        ],
        "original": ORIGINAL,
    }
    fields.update(overrides)
    return dsn.Notice(**fields)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_failed_dsn_is_a_delivery_status_report_with_the_original_headers_only() -> None:
    raw = dsn.build(notice())
    message = parse(raw)
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert str(message["From"]) == "Mail Delivery System <MAILER-DAEMON@relay.test>"
    assert str(message["To"]) == "persona@relay.test"
    assert str(message["Auto-Submitted"]) == "auto-replied"
    assert str(message["In-Reply-To"]) == "<abc.123@relay.test>"
    assert message["Injected"] is None
    text, status, headers = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert "<user@example.test>: smtp; 550 5.1.1 user unknown Injected: header" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, first, second = status_groups(status)
    assert per_message["Reporting-MTA"] == "dns; egress.relay.test"
    assert per_message["X-Protege-Relay-Stream-Id"] == "stream-1"
    assert (first["Final-Recipient"], first["Action"], first["Status"]) == (
        "rfc822; user@example.test",
        "failed",
        "5.1.1",
    )
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 user unknown Injected: header"
    assert (second["Status"], second["Diagnostic-Code"]) == ("4.4.1", "X-Protege-Relay; connection_failed")
    assert headers.get_content_type() == "text/rfc822-headers"
    returned = headers.get_payload(decode=True)
    assert isinstance(returned, bytes)
    assert b"Subject: quarterly numbers\r\n" in returned and b"secret body text" not in raw


def test_delayed_dsn_says_until_when() -> None:
    message = parse(dsn.build(notice(dsn.Action.DELAYED, retry_until=NOW + timedelta(hours=3))))
    assert str(message["Subject"]) == "Delayed Mail (still being retried)"
    _, status, _ = message.iter_parts()
    _, first, _ = status_groups(status)
    assert first["Action"] == "delayed" and first["Will-Retry-Until"] == "Thu, 02 Jan 2025 06:04:05 +0000"


def test_huge_or_headerless_originals_are_bounded() -> None:
    huge = b"".join(b"X-Filler-%06d: %s\r\n" % (n, b"y" * 100) for n in range(2000)) + b"\r\nbody"
    returned = dsn.original_headers(huge)
    assert len(returned) <= dsn.MAX_ORIGINAL_HEADER_BYTES + 2 and returned.endswith(b"\r\n")
    assert returned.count(b"\r\n") == returned.count(b"\n")
    assert dsn.original_headers(b"") == b""
    assert parse(dsn.build(notice(original=b""))).get_content_type() == "multipart/report"


def test_status_codes_for_our_tokens() -> None:
    assert dsn.status_code(Outcome.failure(DeliveryError.NULL_MX)) == "5.1.10"
    assert dsn.status_code(Outcome.failure(DeliveryError.DESTINATION_NOT_ALLOWED)) == "5.4.4"
    assert dsn.status_code(Outcome.failure(DeliveryError.MAX_ATTEMPTS_EXCEEDED)) == "4.4.7"
    assert dsn.status_code(Outcome.from_reply(451, "try again")) == "4.0.0"


def test_notice_queue_ids_are_stable_per_job_and_kind() -> None:
    failed = notice_queue_id(dsn.Action.FAILED, "pk/stream-1")
    assert failed == notice_queue_id(dsn.Action.FAILED, "pk/stream-1")
    assert failed != notice_queue_id(dsn.Action.DELAYED, "pk/stream-1")
    assert failed != notice_queue_id(dsn.Action.FAILED, "pk/stream-2")
    assert failed.startswith("q") and len(failed) == 25
