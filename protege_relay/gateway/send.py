"""`protege-relay send`: one message out through the relay, the way a Protege gateway sends it.

One stream per envelope recipient under a fresh UUID stream id, the message with LF line
endings (the relay normalises to CRLF) in chunks of at most 64 KiB, then a wait of up to
`timeout_s` for each stream's `relay_delivery_result` (PROTOCOL.md A6, A7). Each outcome is
printed as one JSON line; a stream with no result in time is printed with status "timeout"
(it may still be delivered later: the relay queued it).

The envelope sender must be the persona's own address, `<key>@<one of the relay's
mailDomains>`; without `--from` it is exactly that, the key read from the key file and the
domain from the relay's config (`mailDomains`, else `localhost`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from websockets.exceptions import ConnectionClosed

from protege_relay.gateway.client import AuthFailed, BadRelayUrl, GatewayError, RelaySession, open_session
from protege_relay.gateway.keyfile import KeyFileError, load_passport
from protege_relay.gateway.receive import parse_urls
from shared.codes import OutboundRefusal
from shared.identity import Passport, persona_address
from shared.logs import get_logger, log
from shared.protocol import ControlMessageError, SmtpStart, decode_control, encode_message_frames

DELIVERY_RESULT_TIMEOUT_S = 20.0
EXIT_ALL_SENT = 0
EXIT_NOT_ALL_SENT = 1
EXIT_BAD_ARGUMENTS = 2
FALLBACK_MAIL_DOMAIN = "localhost"
# the relay's refusal tokens (services/tunnel/outbound.py)

logger = get_logger(__name__)


def to_lf_line_endings(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n")


@dataclass
class SendReport:
    """Outcome lines keyed by stream id, in the order the streams were sent."""

    recipients: dict[str, str]  # stream id -> recipient
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def pending(self) -> list[str]:
        return [stream_id for stream_id in self.recipients if stream_id not in self.outcomes]

    @property
    def all_sent(self) -> bool:
        return all(self.outcomes.get(s, {}).get("status") == "sent" for s in self.recipients)


def default_sender(passport: Passport, mail_domain: str) -> str:
    """The persona's own address: what the relay requires as the envelope sender."""
    return persona_address(passport.persona_key, mail_domain or FALLBACK_MAIL_DOMAIN)


def run_send(
    key_path: str,
    url: str,
    mail_from: str | None,
    recipients: list[str],
    file_path: str,
    timeout_s: float = DELIVERY_RESULT_TIMEOUT_S,
    *,
    mail_domain: str = "",
) -> int:
    """0 if every recipient's result is "sent"; 1 if any failed or timed out; 2 on bad input.
    `mail_from` None: the persona's own address at `mail_domain`."""
    try:
        passport = load_passport(key_path)
        message = Path(file_path).read_bytes()
    except KeyFileError as exc:
        print(f"protege-relay send: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    except OSError as exc:
        print(f"protege-relay send: cannot read {file_path}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    urls = parse_urls(url)
    if not urls:
        print("protege-relay send: no relay url given (--url ws://HOST:PORT/ws)", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    sender = mail_from or default_sender(passport, mail_domain)
    try:
        report = asyncio.run(send_message(urls, passport, sender, recipients, message, timeout_s, sys.stdout))
    except BadRelayUrl as exc:
        print(f"protege-relay send: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    except AuthFailed as exc:
        print(f"protege-relay send: relay refused authentication: {exc.code}", file=sys.stderr)
        return EXIT_NOT_ALL_SENT
    except GatewayError as exc:
        print(f"protege-relay send: relay unreachable: {exc}", file=sys.stderr)
        return EXIT_NOT_ALL_SENT
    for outcome in report.outcomes.values():
        expected = outcome.get("expectedSender") or default_sender(passport, mail_domain)
        if outcome.get("error") == OutboundRefusal.SENDER_NOT_ALLOWED:
            print(f"protege-relay send: the relay refused sender {sender}; it expects {expected}", file=sys.stderr)
            break
        if outcome.get("error") == OutboundRefusal.HEADER_FROM_NOT_ALLOWED:
            print(f"protege-relay send: the message's From/Sender header must be {expected}", file=sys.stderr)
            break
    return EXIT_ALL_SENT if report.all_sent else EXIT_NOT_ALL_SENT


async def send_message(
    urls: list[str],
    passport: Passport,
    mail_from: str,
    recipients: list[str],
    message: bytes,
    timeout_s: float,
    output: TextIO,
) -> SendReport:
    session = await _open_first(urls, passport)
    connection = session.connection
    report = SendReport(recipients={str(uuid.uuid4()): recipient for recipient in dict.fromkeys(recipients)})
    body = to_lf_line_endings(message)
    try:
        for stream_id, recipient in report.recipients.items():
            for frame in encode_message_frames(stream_id, SmtpStart(mail_from, recipient), body):
                await connection.send(frame)
            log(
                logger,
                logging.INFO,
                "outbound stream sent",
                persona=session.persona_key,
                stream_id=stream_id,
                bytes=len(body),
            )
        await _collect_results(session, report, timeout_s, output)
    except ConnectionClosed:
        log(
            logger,
            logging.WARNING,
            "relay closed the connection before every result arrived",
            close_code=connection.close_code,
            close_reason=connection.close_reason,
        )
    finally:
        await connection.close()
    for stream_id in report.pending:
        _emit(
            report,
            {
                "type": "relay_delivery_result",
                "streamId": stream_id,
                "status": "timeout",
                "recipient": report.recipients[stream_id],
            },
            output,
        )
    return report


async def _open_first(urls: list[str], passport: Passport) -> RelaySession:
    """Outbound role, so the persona's receiving gateway keeps its inbound socket."""
    last_error: GatewayError | None = None
    for url in urls:
        try:
            return await open_session(url, passport, session_role="outbound")
        except (AuthFailed, BadRelayUrl):
            raise
        except GatewayError as exc:
            last_error = exc
    assert last_error is not None
    raise last_error


async def _collect_results(session: RelaySession, report: SendReport, timeout_s: float, output: TextIO) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while report.pending:
                raw = await session.connection.recv()
                if not isinstance(raw, str):
                    continue
                try:
                    fields = decode_control(raw)
                except ControlMessageError:
                    continue
                stream_id = fields.get("streamId")
                if fields["type"] == "relay_delivery_result" and stream_id in report.pending:
                    fields.setdefault("recipient", report.recipients[stream_id])
                    _emit(report, fields, output)
    except TimeoutError:
        log(
            logger,
            logging.WARNING,
            "no delivery result in time",
            pending=len(report.pending),
            timeout_s=timeout_s,
        )


def _emit(report: SendReport, fields: dict[str, Any], output: TextIO) -> None:
    report.outcomes[fields["streamId"]] = fields
    output.write(json.dumps(fields, ensure_ascii=False, separators=(",", ":")) + "\n")
    output.flush()
