"""Attestation end to end, real processes: SMTP sender -> `protege-relay ingress` (SPF, DKIM,
DMARC against a local DNS server, signed) -> Redis -> `protege-relay tunnel` -> a gateway
socket, which checks the smtp_start's `authAttestation` exactly as a Protege gateway does."""

from __future__ import annotations

import asyncio
import json
import smtplib
from collections.abc import Callable
from pathlib import Path

from shared.attestation import AttestationContext, verify_attestation
from shared.identity import Passport
from tests.support.dns_server import DnsServer
from tests.support.processes import ServiceProcess, free_port
from tests.support.sender_auth import HONEST_IP, SENDER_DOMAIN, dkim_key, message_from, sender_zones
from tests.support.ws_client import GatewayClient

Spawn = Callable[..., ServiceProcess]
KEY_ID = "relay-e2e"


def smtp_send(port: int, mail_from: str, recipient: str, message: bytes) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(HONEST_IP, 0)) as client:
        client.ehlo("mta.sender.test")
        assert client.mail(mail_from)[0] == 250
        assert client.rcpt(recipient)[0] == 250
        code, _ = client.data(message)
        return code


async def test_the_gateway_receives_an_attestation_it_can_verify(spawn: Spawn, tmp_path: Path) -> None:
    relay_key = Passport.generate()
    relay_key_path = tmp_path / "attestation.pem"
    relay_key.save(relay_key_path)
    persona = Passport.generate()
    signed = dkim_key().sign(message_from(f"alice@{SENDER_DOMAIN}"))

    with DnsServer(sender_zones()) as dns_server:
        smtp_port, ws_port = free_port(), free_port()
        spawn(
            "ingress",
            port=smtp_port,
            RELAY_SMTP_PORT=str(smtp_port),
            RELAY_SMTP_HOSTNAME="mx.relay.test",
            RELAY_ATTESTATION_ENABLED="true",
            RELAY_ATTESTATION_KEY_ID=KEY_ID,
            RELAY_ATTESTATION_SIGNING_PRIVATE_KEY_PATH=str(relay_key_path),
            RELAY_SMTP_AUTH_NAMESERVERS=json.dumps([dns_server.nameserver]),
        )
        spawn("tunnel", port=ws_port, RELAY_PORT=str(ws_port))
        gateway = await GatewayClient.open(f"ws://127.0.0.1:{ws_port}/ws")
        try:
            await gateway.authenticate(persona)
            recipient = f"{persona.persona_key}@relay.test"
            code = await asyncio.to_thread(smtp_send, smtp_port, f"bounce@{SENDER_DOMAIN}", recipient, signed)
            assert code == 250
            inbound = await gateway.next_inbound(timeout_s=30)
        finally:
            await gateway.close()

    start = inbound.start
    assert (start.mail_from, start.rcpt_to) == (f"bounce@{SENDER_DOMAIN}", recipient)
    expected = AttestationContext(inbound.stream_id, start.mail_from, start.rcpt_to)
    reason, payload = verify_attestation(start.auth_attestation, {KEY_ID: relay_key.public_key}, expected)
    assert reason == "ok"
    assert payload is not None
    assert payload["signals"] == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    assert b"Authentication-Results: mx.relay.test;\r\n\tspf=pass" in inbound.data
    assert inbound.data.endswith(signed)
