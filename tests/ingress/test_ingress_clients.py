"""Ingress with other clients and surfaces: STARTTLS (trustme certificate), swaks, and the
health/metrics port."""

from __future__ import annotations

import http.client
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import trustme

from protege_relay.embedded_redis import EmbeddedRedis
from tests.support.ingress import (
    InProcessIngress,
    address,
    inbox_entries,
    new_persona,
    open_session,
    send_raw,
    split_trace_header,
)
from tests.support.processes import free_port
from tests.support.wait import poll_until

StartIngress = Callable[..., InProcessIngress]
MESSAGE = b"Subject: via a client\r\n\r\nhello\r\n"
SWAKS_TIMEOUT_S = 30


@pytest.fixture
def tls_ingress(start_ingress: StartIngress, ca: trustme.CA, tmp_path: Path) -> InProcessIngress:
    server_cert = ca.issue_cert("mx.relay.test", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert_path))
    server_cert.private_key_pem.write_to_path(str(key_path))
    key_path.chmod(0o600)  # shared.secrets refuses a key others can read
    return start_ingress(RELAY_SMTP_TLS_CERT_PATH=str(cert_path), RELAY_SMTP_TLS_KEY_PATH=str(key_path))


# --- STARTTLS -----------------------------------------------------------------------------


def test_starttls_is_advertised_only_when_a_certificate_is_configured(
    tls_ingress: InProcessIngress, start_ingress: StartIngress
) -> None:
    with open_session(tls_ingress.port) as client:
        assert "starttls" in client.esmtp_features
    plain = start_ingress()
    with open_session(plain.port) as client:
        assert "starttls" not in client.esmtp_features


def test_mail_over_starttls_is_accepted_and_traced_as_esmtps(
    tls_ingress: InProcessIngress,
    ca: trustme.CA,
    persona: str,
    redis_client: redis.Redis,
) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with open_session(tls_ingress.port) as client:
        assert client.starttls(context=context)[0] == 220
        client.ehlo("tls-sender.example")
        assert "starttls" not in client.esmtp_features  # not offered twice
        assert "size" in client.esmtp_features
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[union-attr]
        client.mail("s@example.org")
        client.rcpt(address(persona))
        code, reply = client.data(MESSAGE)
    assert code == 250, reply
    [entry] = inbox_entries(redis_client, persona)
    header, original = split_trace_header(entry.data)
    assert original == MESSAGE
    assert header.startswith(b"Received: from tls-sender.example (")
    assert b" with ESMTPS id " in header


def test_plaintext_mail_is_still_accepted_when_tls_is_available(
    tls_ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    assert send_raw(tls_ingress.port, "s@example.org", [address(persona)], MESSAGE)[0] == 250
    header, _ = split_trace_header(inbox_entries(redis_client, persona)[0].data)
    assert b" with ESMTP id " in header


def test_failed_tls_handshake_does_not_hurt_the_server(tls_ingress: InProcessIngress, persona: str) -> None:
    untrusting = ssl.create_default_context()  # does not trust our test CA
    with open_session(tls_ingress.port) as client, pytest.raises(ssl.SSLError):
        client.starttls(context=untrusting)
    assert send_raw(tls_ingress.port, "s@example.org", [address(persona)], MESSAGE)[0] == 250


# --- swaks --------------------------------------------------------------------------------


def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--helo", "swaks.example", "--hide-informational", *args],
        capture_output=True,
        text=True,
        timeout=SWAKS_TIMEOUT_S,
        check=False,
    )


def test_swaks_delivers_a_file_and_it_is_stored_exactly(
    start_ingress: StartIngress, persona: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    ingress = start_ingress()
    message = b"From: swaks@example.org\r\nSubject: swaks\r\n\r\nline one\r\n.dotted\r\nlast\r\n"
    message_path = tmp_path / "message.eml"
    message_path.write_bytes(message.removesuffix(b"\r\n"))  # swaks adds CRLF before the final dot

    result = swaks(
        ingress.port, "--from", "swaks@example.org", "--to", address(persona, "swaks"), "--data", f"@{message_path}"
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.0.0 queued as q" in result.stdout
    [entry] = inbox_entries(redis_client, persona)
    assert entry.mail_from == "swaks@example.org"
    assert entry.rcpt_to == address(persona, "swaks")
    assert split_trace_header(entry.data)[1] == message


def test_swaks_sees_the_reply_codes_of_refusals(start_ingress: StartIngress) -> None:
    ingress = start_ingress()
    result = swaks(ingress.port, "--from", "s@example.org", "--to", address(new_persona()))
    assert result.returncode != 0
    assert "<** 450 4.2.1 relay_rejected_recipient_not_connected" in result.stdout


def test_swaks_over_starttls(tls_ingress: InProcessIngress, persona: str, redis_client: redis.Redis) -> None:
    result = swaks(tls_ingress.port, "--tls", "--from", "s@example.org", "--to", address(persona))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 queued as q" in result.stdout
    header, _ = split_trace_header(inbox_entries(redis_client, persona)[0].data)
    assert b" with ESMTPS id " in header


# --- health and metrics -------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.mark.own_redis  # kills or restarts Redis
def test_health_port_serves_readiness_and_metrics(
    start_ingress: StartIngress, persona: str, redis_server: EmbeddedRedis
) -> None:
    ingress = start_ingress(RELAY_SMTP_HTTP_PORT=str(free_port()))
    assert http_get(ingress.http_port, "/healthz") == (200, '{"status":"ok"}')
    # Ready once the service has reached Redis, which may be just after the health port opens.
    poll_until(lambda: http_get(ingress.http_port, "/readyz")[0] == 200, message="/readyz never answered 200")
    assert send_raw(ingress.port, "s@example.org", [address(persona)], MESSAGE)[0] == 250
    with open_session(ingress.port) as client:
        client.mail("s@example.org")
        client.rcpt(address(new_persona()))

    status, metrics = http_get(ingress.http_port, "/metrics")

    assert status == 200
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line and not line.startswith("#")
    }
    assert samples["relay_ingress_messages_accepted_total"] >= 1
    assert samples["relay_ingress_connections_total"] >= 2
    assert samples["relay_ingress_bytes_accepted_total"] >= len(MESSAGE)
    assert samples['relay_ingress_rejections_total{code="450",reason="recipient_not_connected"}'] >= 1
    assert samples["relay_ingress_enqueue_seconds_count"] >= 1
    redis_server.kill()
    assert http_get(ingress.http_port, "/readyz")[0] == 503


def test_disabled_smtp_serves_only_the_health_port(start_ingress: StartIngress) -> None:
    smtp_port = free_port()
    ingress = start_ingress(
        RELAY_SMTP_ENABLED="false", RELAY_SMTP_PORT=str(smtp_port), RELAY_SMTP_HTTP_PORT=str(free_port())
    )
    # Ready once the service has reached Redis, which may be just after the health port opens.
    poll_until(lambda: http_get(ingress.http_port, "/readyz")[0] == 200, message="/readyz never answered 200")
    with pytest.raises(OSError):
        open_session(smtp_port)
