"""Outbound mail end to end, real processes: gateway (`protege-relay send`, or a test gateway
socket) -> tunnel -> Redis/arq -> egress -> local MX sink found through a local DNS server,
and the delivery result back to the gateway."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.identity import Passport
from tests.support.dns_server import DnsServer
from tests.support.dsn import status_groups
from tests.support.mx_sink import MxSink
from tests.support.processes import REPO_ROOT, ServiceProcess, free_port, service_env
from tests.support.wait import poll_until
from tests.support.ws_client import GatewayClient

DOMAIN = "relay.test"


def message_from(author: str) -> bytes:
    """The message as a gateway writes it (bare LF), its header From the persona's address."""
    return (
        f"From: {author}\nTo: user@example.test\nSubject: outbound\n\nHello from the agent.\n.\n..two dots\n".encode()
    )


GATEWAY_RESULT_WINDOW_S = 20.0

Spawn = Callable[..., ServiceProcess]


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    zones = {
        "example.test": {"MX": ["10 mx1.example.test."]},
        "mx1.example.test": {"A": ["127.0.0.2"]},
        "nullmx.test": {"MX": ["0 ."]},
    }
    with DnsServer(zones) as server:
        yield server


@dataclass
class Relay:
    redis_url: str
    tunnel_urls: list[str]
    tunnels: list[ServiceProcess]
    egress: ServiceProcess


@pytest.fixture
def start_relay(
    spawn: Spawn, redis_server: EmbeddedRedis, dns_server: DnsServer, smtp_port: int
) -> Callable[..., Relay]:
    def start(tunnels: int = 1, **egress_env: str) -> Relay:
        urls, processes = [], []
        for index in range(tunnels):
            port = free_port()
            processes.append(
                spawn(
                    "tunnel",
                    port=port,
                    RELAY_PORT=str(port),
                    RELAY_MAIL_DOMAINS=DOMAIN,
                    RELAY_NODE_ID=f"tunnel-{index}",
                )
            )
            urls.append(f"ws://127.0.0.1:{port}/ws")
        env = {
            "RELAY_EGRESS_NAMESERVERS": json.dumps([dns_server.nameserver]),
            "RELAY_EGRESS_ALLOW_PRIVATE_DESTINATIONS": "true",  # the sinks listen on loopback
            "RELAY_EGRESS_SMTP_PORT": str(smtp_port),
            "RELAY_EGRESS_RETRY_BASE_SECONDS": "1",
            "RELAY_EGRESS_CONNECT_TIMEOUT_SECONDS": "5",
            "RELAY_MAIL_DOMAINS": DOMAIN,
            **egress_env,
        }
        egress = spawn("egress", **env)
        return Relay(redis_server.url, urls, processes, egress)

    return start


@pytest.fixture
def passport_file(tmp_path: Path) -> tuple[Passport, Path]:
    passport = Passport.generate()
    key_path = tmp_path / "passport.key"
    passport.save(key_path)
    return passport, key_path


def run_send(
    relay: Relay, key_path: Path, mail_from: str, rcpt_to: str, tmp_path: Path
) -> tuple[int, list[dict[str, Any]]]:
    message_path = tmp_path / "message.eml"
    message_path.write_bytes(message_from(mail_from))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "protege_relay.cli",
            "send",
            "--key",
            str(key_path),
            "--url",
            relay.tunnel_urls[0],
            "--from",
            mail_from,
            "--to",
            rcpt_to,
            "--timeout",
            str(GATEWAY_RESULT_WINDOW_S),
            str(message_path),
        ],
        cwd=REPO_ROOT,
        env=service_env(relay.redis_url),
        capture_output=True,
        timeout=60,
    )
    lines = [json.loads(line) for line in done.stdout.decode().splitlines() if line.startswith("{")]
    return done.returncode, lines


def test_sent_mail_reaches_the_mx_and_the_gateway_gets_the_queue_id(
    start_relay: Callable[..., Relay], passport_file: tuple[Passport, Path], smtp_port: int, tmp_path: Path
) -> None:
    passport, key_path = passport_file
    relay = start_relay()
    with MxSink("127.0.0.2", smtp_port) as mx1:
        started = time.monotonic()
        code, [result] = run_send(relay, key_path, f"{passport.persona_key}@{DOMAIN}", "user@example.test", tmp_path)
        elapsed = time.monotonic() - started
    [received] = mx1.received()
    assert code == 0, result
    assert (result["type"], result["status"]) == ("relay_delivery_result", "sent")
    assert result["messageId"] == received.queue_id
    assert (result["smtpCode"], result["attempts"], result["recipient"]) == (250, 1, "user@example.test")
    assert received.data == message_from(f"{passport.persona_key}@{DOMAIN}").replace(b"\n", b"\r\n")
    assert (received.mail_from, received.rcpt_tos) == (f"{passport.persona_key}@{DOMAIN}", ["user@example.test"])
    assert elapsed < GATEWAY_RESULT_WINDOW_S


@pytest.mark.parametrize(
    ("rcpt_to", "sink_options", "expected"),
    [
        (
            "nobody@example.test",
            {"rcpt_reply": "550 5.1.1 user unknown"},
            {"error": "smtp_5xx: 550 5.1.1 user unknown", "permanent": True, "smtpCode": 550, "enhancedCode": "5.1.1"},
        ),
        ("user@nullmx.test", {}, {"error": "null_mx", "permanent": True}),
        (
            "user@example.test",
            {"data_replies": ["451 4.3.0 try again later"] * 3},
            {"error": "smtp_4xx: 451 4.3.0 try again later", "permanent": False, "smtpCode": 451, "attempts": 2},
        ),
    ],
    ids=["5xx", "null-mx", "4xx-exhausted"],
)
def test_failures_arrive_as_failed_results_with_codes(
    start_relay: Callable[..., Relay],
    passport_file: tuple[Passport, Path],
    smtp_port: int,
    tmp_path: Path,
    rcpt_to: str,
    sink_options: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    passport, key_path = passport_file
    relay = start_relay(RELAY_EGRESS_MAX_ATTEMPTS="2")
    with MxSink("127.0.0.2", smtp_port, **sink_options) as mx1:
        code, [result] = run_send(relay, key_path, f"{passport.persona_key}@{DOMAIN}", rcpt_to, tmp_path)
    assert code == 1
    assert result["status"] == "failed" and "messageId" not in result
    assert {name: result.get(name) for name in expected} == expected
    assert mx1.received() == []


def test_spoofed_sender_is_refused_and_nothing_is_sent(
    start_relay: Callable[..., Relay], passport_file: tuple[Passport, Path], smtp_port: int, tmp_path: Path
) -> None:
    _, key_path = passport_file
    relay = start_relay()
    someone_else = Passport.generate().persona_key
    with MxSink("127.0.0.2", smtp_port) as mx1:
        code, [result] = run_send(relay, key_path, f"{someone_else}@{DOMAIN}", "user@example.test", tmp_path)
    assert code == 1
    assert (result["status"], result["error"]) == ("failed", "sender_not_allowed")
    assert mx1.received() == []


async def next_result(client: GatewayClient, timeout_s: float = GATEWAY_RESULT_WINDOW_S) -> dict[str, Any]:
    return await client.next_of_type("relay_delivery_result", timeout_s)


async def test_result_reaches_the_gateway_after_it_reconnected_to_another_tunnel(
    start_relay: Callable[..., Relay], passport_file: tuple[Passport, Path], smtp_port: int
) -> None:
    passport, _ = passport_file
    relay = start_relay(tunnels=2)
    stream_id = str(uuid.uuid4())
    with MxSink("127.0.0.2", smtp_port, hold_data=1) as mx1:
        first = await GatewayClient.open(relay.tunnel_urls[0])
        await first.authenticate(passport)
        own = f"{passport.persona_key}@{DOMAIN}"
        await first.send_outbound(stream_id, own, "user@example.test", message_from(own))
        assert await asyncio.to_thread(mx1.holding.wait, 15)
        await first.abort()
        second = await GatewayClient.open(relay.tunnel_urls[1])
        await second.authenticate(passport)
        mx1.release()
        result = await next_result(second)
        await second.close()
    assert (result["streamId"], result["status"]) == (stream_id, "sent")
    assert result["messageId"] == mx1.received()[0].queue_id


async def test_same_stream_id_sent_twice_is_delivered_once(
    start_relay: Callable[..., Relay], passport_file: tuple[Passport, Path], smtp_port: int, redis_client: Any
) -> None:
    passport, _ = passport_file
    relay = start_relay()
    stream_id = str(uuid.uuid4())
    mail_from = f"{passport.persona_key}@{DOMAIN}"
    with MxSink("127.0.0.2", smtp_port) as mx1:
        client = await GatewayClient.open(relay.tunnel_urls[0])
        await client.authenticate(passport)
        await client.send_outbound(stream_id, mail_from, "user@example.test", message_from(mail_from))
        first = await next_result(client)
        await client.send_outbound(stream_id, mail_from, "user@example.test", message_from(mail_from))
        await client.send_json({"type": "ping"})
        await client.next_of_type("pong")  # frames are handled in order: the repeat is behind us
        await asyncio.to_thread(
            poll_until, lambda: redis_client.zcard(keys.EGRESS_QUEUE) == 0, 10, message="job still queued"
        )
        await client.close()
    assert first["status"] == "sent"
    assert len(mx1.received()) == 1
    # The delivered result is deleted once the gateway has it; the deletion may still be on its way.
    results_key = keys.results(passport.persona_key)
    await asyncio.to_thread(poll_until, lambda: redis_client.xlen(results_key) == 0, 10, message="result kept")


async def test_late_failure_reaches_the_gateway_as_a_dsn_in_its_inbox(
    start_relay: Callable[..., Relay], passport_file: tuple[Passport, Path], smtp_port: int
) -> None:
    """Issue 14 item 1 with real processes: tunnel + egress; the MX defers, then refuses; the
    bounce is stored through the inbound enqueue path and streamed to the persona's gateway."""
    passport, _ = passport_file
    relay = start_relay()
    stream_id = str(uuid.uuid4())
    mail_from = f"{passport.persona_key}@{DOMAIN}"
    replies = ["451 4.3.0 greylisted, try again later", "550 5.7.1 message refused by policy"]
    original = b"From: " + mail_from.encode() + b"\nTo: user@example.test\nSubject: numbers\n"
    original += b"Message-ID: <orig-1@relay.test>\n\nbody that must not come back\n"
    with MxSink("127.0.0.2", smtp_port, data_replies=replies) as mx1:
        client = await GatewayClient.open(relay.tunnel_urls[0])
        await client.authenticate(passport, capabilities=["inbound_ack"])
        await client.send_outbound(stream_id, mail_from, "user@example.test", original)
        result = await next_result(client, timeout_s=30)
        inbound = await client.next_inbound(timeout_s=30)
        await client.ack(inbound.stream_id)
        await client.close()
    assert (result["streamId"], result["status"], result["attempts"], result["smtpCode"]) == (
        stream_id,
        "failed",
        2,
        550,
    )
    assert len(mx1.data_payloads) == 2 and mx1.received() == []
    assert (inbound.start.mail_from, inbound.start.rcpt_to) == ("", mail_from)
    message = email.message_from_bytes(inbound.data, policy=email.policy.default)
    print(f"DSN {len(inbound.data)} bytes, stream {inbound.stream_id}: {message['Subject']}")
    assert str(message["From"]) == f"Mail Delivery System <MAILER-DAEMON@{DOMAIN}>"
    assert str(message["To"]) == mail_from and str(message["In-Reply-To"]) == "<orig-1@relay.test>"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    text, status, headers = message.iter_parts()
    assert "550 5.7.1 message refused by policy" in text.get_content()
    per_message, recipient = status_groups(status)
    assert per_message["X-Protege-Relay-Stream-Id"] == stream_id
    assert (recipient["Final-Recipient"], recipient["Action"], recipient["Status"]) == (
        "rfc822; user@example.test",
        "failed",
        "5.7.1",
    )
    assert recipient["Diagnostic-Code"] == "smtp; 550 5.7.1 message refused by policy"
    returned = headers.get_payload(decode=True)
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: numbers\r\n" in returned and b"must not come back" not in inbound.data
