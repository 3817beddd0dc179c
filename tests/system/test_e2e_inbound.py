"""Inbound mail end to end, all real processes: SMTP client -> ingress -> Redis -> tunnel ->
reference gateway (`protege-relay gateway`) -> Maildir.

The only change the relay may make to a message is one prepended `Received:` header naming the
queue id of the 250 reply; everything after it must be byte-identical to what the client sent.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.protocol import MAX_CHUNK_BYTES
from tests.support import launcher
from tests.support.processes import REPO_ROOT, ServiceProcess, free_port, service_env
from tests.support.wait import poll_until

DELIVERY_TIMEOUT_S = 30.0
SENDER = "alice@example.com"
_RECEIVED = re.compile(rb"Received:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")
_QUEUED = re.compile(r"queued as (\S+)")

Spawn = Callable[..., ServiceProcess]


@dataclass
class Persona:
    key_path: Path
    address: str
    maildir: Path

    @property
    def persona_key(self) -> str:
        return self.address.split("@", 1)[0]

    def stored(self) -> list[bytes]:
        folder = self.maildir / "new"
        if not folder.exists():
            return []
        return [(folder / name).read_bytes() for name in sorted(os.listdir(folder))]


@dataclass
class Relay:
    smtp_port: int
    ws_url: str
    ingress: ServiceProcess
    tunnels: list[ServiceProcess]


@dataclass
class Gateways:
    """Reference gateway processes started by a test; stopped at teardown."""

    tmp_path: Path
    redis_url: str
    started: list[ServiceProcess] = field(default_factory=list)

    def start(self, persona: Persona, url: str, *args: str, connected: bool = True, **env: str) -> ServiceProcess:
        process = ServiceProcess(
            "gateway",
            service_env(self.redis_url, PROTEGE_GATEWAY_RECONNECT_CAP_S="1", **env),
            log_path=self.tmp_path / f"gateway-{len(self.started)}.log",
            extra_args=["--key", str(persona.key_path), "--url", url, "--maildir", str(persona.maildir), *args],
        )
        self.started.append(process)
        process.start()
        if connected:
            wait_connected(process)
        return process


def log_events(process: ServiceProcess, message: str) -> list[dict[str, Any]]:
    events = []
    for line in process.logs().splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == message:
                events.append(entry)
    return events


def wait_connected(gateway: ServiceProcess, count: int = 1) -> None:
    poll_until(
        lambda: len(log_events(gateway, "gateway connected")) >= count,
        DELIVERY_TIMEOUT_S,
        message=f"gateway did not connect:\n{gateway.logs()}",
    )


def make_persona(tmp_path: Path, name: str) -> Persona:
    key_path = tmp_path / f"{name}.key"
    done = launcher.run(
        [sys.executable, "-m", "protege_relay.cli", "keygen", "--out", str(key_path), "--domain", "localhost"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    address = done.stdout.strip()
    assert re.fullmatch(r"[a-z2-7]{52}@localhost", address), done.stdout
    return Persona(key_path, address, tmp_path / f"{name}-mail")


def split_received(stored: bytes) -> tuple[bytes, bytes]:
    """(our Received header, the rest); fails if the message does not start with it."""
    match = _RECEIVED.match(stored)
    assert match is not None, f"stored message does not start with a Received header: {stored[:200]!r}"
    return match.group(0), stored[match.end() :]


def assert_delivered_intact(stored: bytes, sent: bytes, queue_id: str, recipient: str) -> None:
    received, rest = split_received(stored)
    assert queue_id.encode() in received
    assert recipient.encode() in received
    assert rest == sent


def wait_stored(persona: Persona, count: int = 1) -> list[bytes]:
    return poll_until(
        lambda: (messages := persona.stored()) and len(messages) >= count and messages,
        DELIVERY_TIMEOUT_S,
        message=f"{count} message(s) not delivered to {persona.maildir}",
    )


def smtp_send(
    port: int,
    recipients: list[str],
    message: bytes,
    sender: str = SENDER,
    mail_options: tuple[str, ...] = (),
) -> str:
    """One SMTP transaction; returns the queue id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        code, reply = client.mail(sender, list(mail_options))
        assert code == 250, reply
        for recipient in recipients:
            code, reply = client.rcpt(recipient)
            assert code == 250, (recipient, code, reply)
        code, reply = client.data(message)
        assert code == 250, reply
    match = _QUEUED.search(reply.decode())
    assert match is not None, reply
    return match.group(1)


def inbox_length(client: redis.Redis, persona: Persona) -> int:
    return cast(int, client.xlen(keys.inbox(persona.persona_key)))


def sample_message(subject: str, body: bytes = b"Hello from the internet.\r\n") -> bytes:
    return (
        b"From: Alice <alice@example.com>\r\n"
        b"To: persona\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Message-ID: <" + subject.replace(" ", "-").encode() + b"@example.com>\r\n"
        b"\r\n" + body + b".leading dot survives unstuffing\r\n"
    )


@pytest.fixture
def start_relay(spawn: Spawn) -> Callable[..., Relay]:
    def start(tunnels: int = 1, ingress_env: dict[str, str] | None = None, **tunnel_env: str) -> Relay:
        smtp_port = free_port()
        ingress = spawn("ingress", port=smtp_port, RELAY_SMTP_PORT=str(smtp_port), **(ingress_env or {}))
        started = []
        for _ in range(tunnels):
            ws_port = free_port()
            started.append(spawn("tunnel", port=ws_port, RELAY_PORT=str(ws_port), **tunnel_env))
        ports = [process.port for process in started]
        return Relay(smtp_port, ",".join(f"ws://127.0.0.1:{p}/ws" for p in ports), ingress, started)

    return start


@pytest.fixture
def gateways(tmp_path: Path, redis_server: EmbeddedRedis) -> Iterator[Gateways]:
    running = Gateways(tmp_path, redis_server.url)
    yield running
    for process in running.started:
        if process.process is not None and process.process.poll() is None:
            process.kill()


# --- the happy paths ---------------------------------------------------------------------------


def test_smtplib_message_reaches_the_maildir_with_only_a_received_header_added(
    tmp_path: Path, start_relay: Callable[..., Relay], gateways: Gateways, redis_client: redis.Redis
) -> None:
    relay = start_relay()
    persona = make_persona(tmp_path, "p")
    gateways.start(persona, relay.ws_url)
    sent = sample_message("smtplib")
    queue_id = smtp_send(relay.smtp_port, [persona.address], sent)
    [stored] = wait_stored(persona)
    assert_delivered_intact(stored, sent, queue_id, persona.address)
    poll_until(
        lambda: inbox_length(redis_client, persona) == 0,
        DELIVERY_TIMEOUT_S,
        message="the acknowledged message was not removed from the inbox",
    )


def test_swaks_message_reaches_the_maildir(
    tmp_path: Path, start_relay: Callable[..., Relay], gateways: Gateways
) -> None:
    relay = start_relay()
    persona = make_persona(tmp_path, "p")
    gateways.start(persona, relay.ws_url)
    body = sample_message("swaks").rstrip(b"\r\n")  # swaks ends the data with one CRLF of its own
    (tmp_path / "message.eml").write_bytes(body)
    transcript = subprocess.run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(relay.smtp_port),
            "--from",
            SENDER,
            "--to",
            persona.address,
            "--data",
            f"@{tmp_path / 'message.eml'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert transcript.returncode == 0, transcript.stdout + transcript.stderr
    queue_id = _QUEUED.search(transcript.stdout)
    assert queue_id is not None, transcript.stdout
    [stored] = wait_stored(persona)
    assert_delivered_intact(stored, body + b"\r\n", queue_id.group(1), persona.address)


def test_two_personas_in_one_transaction_each_get_their_own_copy(
    tmp_path: Path, start_relay: Callable[..., Relay], gateways: Gateways
) -> None:
    relay = start_relay(ingress_env={"RELAY_SMTP_MAX_RECIPIENTS": "10"})
    first, second = make_persona(tmp_path, "first"), make_persona(tmp_path, "second")
    first_gateway = gateways.start(first, relay.ws_url)
    second_gateway = gateways.start(second, relay.ws_url)
    sent = sample_message("two personas")
    queue_id = smtp_send(relay.smtp_port, [first.address, second.address], sent)
    [to_first], [to_second] = wait_stored(first), wait_stored(second)
    assert_delivered_intact(to_first, sent, queue_id, first.address)
    assert_delivered_intact(to_second, sent, queue_id, second.address)
    assert second.address.encode() not in split_received(to_first)[0]  # no Bcc leak
    # The gateway logs "message stored" just after the file appears in its Maildir.
    expected_ids = {f"{queue_id}.0", f"{queue_id}.1"}
    poll_until(
        lambda: (
            {event["stream_id"] for g in (first_gateway, second_gateway) for event in log_events(g, "message stored")}
            == expected_ids
        ),
        message=f"gateways did not log {expected_ids} as stored",
    )


def test_8bitmime_and_smtputf8_messages_arrive_intact(
    tmp_path: Path, start_relay: Callable[..., Relay], gateways: Gateways
) -> None:
    relay = start_relay()
    persona = make_persona(tmp_path, "p")
    gateways.start(persona, relay.ws_url)
    eight_bit = sample_message("8bit", "Grüße, ça va? 日本語\r\n".encode())
    eight_bit_queue = smtp_send(relay.smtp_port, [persona.address], eight_bit, mail_options=("BODY=8BITMIME",))
    utf8_sender = "jöran@exämple.com"
    utf8 = f"From: Jöran <{utf8_sender}>\r\nTo: persona\r\nSubject: Ünïcödé ✓\r\n\r\nbody ✓\r\n".encode()
    utf8_queue = smtp_send(
        relay.smtp_port, [persona.address], utf8, sender=utf8_sender, mail_options=("SMTPUTF8", "BODY=8BITMIME")
    )
    stored = wait_stored(persona, 2)
    by_queue = {q: m for m in stored for q in (eight_bit_queue, utf8_queue) if q.encode() in split_received(m)[0]}
    assert_delivered_intact(by_queue[eight_bit_queue], eight_bit, eight_bit_queue, persona.address)
    assert_delivered_intact(by_queue[utf8_queue], utf8, utf8_queue, persona.address)


def test_nine_mib_message_arrives_intact_in_chunks_of_at_most_64_kib(
    tmp_path: Path, start_relay: Callable[..., Relay], gateways: Gateways
) -> None:
    relay = start_relay()
    persona = make_persona(tmp_path, "p")
    gateway = gateways.start(persona, relay.ws_url)
    line = b"".join(bytes([33 + (n % 90)]) for n in range(76)) + b"\r\n"
    sent = sample_message("big", line * (9 * 1024 * 1024 // len(line)))
    assert len(sent) > 9 * 1024 * 1024 - len(line)
    queue_id = smtp_send(relay.smtp_port, [persona.address], sent)
    [stored] = wait_stored(persona)
    assert_delivered_intact(stored, sent, queue_id, persona.address)
    # The gateway logs "message stored" just after the file is in place: poll for the line.
    [event] = poll_until(lambda: log_events(gateway, "message stored"), message="no 'message stored' log line")
    assert event["bytes"] == len(stored)
    assert event["largest_chunk_bytes"] <= MAX_CHUNK_BYTES
    assert event["chunks"] >= len(stored) // MAX_CHUNK_BYTES


def test_legacy_gateway_without_ack_receives_and_the_inbox_empties(
    tmp_path: Path, start_relay: Callable[..., Relay], gateways: Gateways, redis_client: redis.Redis
) -> None:
    relay = start_relay()
    persona = make_persona(tmp_path, "p")
    gateway = gateways.start(persona, relay.ws_url, "--no-ack")
    [connected] = log_events(gateway, "gateway connected")
    assert connected["inbound_ack"] is False
    sent = sample_message("legacy")
    queue_id = smtp_send(relay.smtp_port, [persona.address], sent)
    [stored] = wait_stored(persona)
    assert_delivered_intact(stored, sent, queue_id, persona.address)
    poll_until(
        lambda: inbox_length(redis_client, persona) == 0,
        DELIVERY_TIMEOUT_S,
        message="the legacy gateway's message was not removed after the ping/pong",
    )


def accepted_markers(client: redis.Redis, persona: Persona) -> list[bytes]:
    return list(client.scan_iter(match=keys.accepted(persona.persona_key, "*")))


def test_identical_message_is_stored_once_while_queued_and_delivered_again_after_delivery(
    tmp_path: Path, start_relay: Callable[..., Relay], gateways: Gateways, redis_client: redis.Redis
) -> None:
    """Issue 14 item 2: the retry protection lasts only while the first copy is undelivered."""
    relay = start_relay()
    persona = make_persona(tmp_path, "p")
    gateway = gateways.start(persona, relay.ws_url)  # known to the relay from now on
    gateway.terminate()
    alert = sample_message("disk full")

    # The gateway is offline: a retry of the same message (after a lost reply) is the same message.
    first_id = smtp_send(relay.smtp_port, [persona.address], alert)
    assert smtp_send(relay.smtp_port, [persona.address], alert) == first_id
    assert inbox_length(redis_client, persona) == 1

    gateways.start(persona, relay.ws_url)
    [stored] = wait_stored(persona)
    assert_delivered_intact(stored, alert, first_id, persona.address)
    poll_until(
        lambda: inbox_length(redis_client, persona) == 0 and not accepted_markers(redis_client, persona),
        DELIVERY_TIMEOUT_S,
        message="delivered message or its retry marker left in Redis",
    )

    # Delivered: the same alert sent again is a new message, and it is delivered.
    second_id = smtp_send(relay.smtp_port, [persona.address], alert)
    assert second_id != first_id
    stored_messages = wait_stored(persona, 2)
    assert len(stored_messages) == 2
    by_queue_id = {queue_id: message for message in stored_messages for queue_id in (first_id, second_id)
                   if queue_id.encode() in split_received(message)[0]}  # fmt: skip
    assert set(by_queue_id) == {first_id, second_id}
    for queue_id, message in by_queue_id.items():
        assert_delivered_intact(message, alert, queue_id, persona.address)
