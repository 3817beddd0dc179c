"""Redis access (docs/SECURITY.md "Redis access", issue 9 item 5): the real services run under
their own users of the ACL file generated from shared/redis_acl.py, end to end (SMTP in through
the ingress, to a gateway through the tunnel, out through the egress to an MX sink, `status`,
/metrics scrapes), and Redis logs no denied command."""

from __future__ import annotations

import asyncio
import json
import smtplib
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any, cast

from protege_relay.embedded_redis import EmbeddedRedis
from shared.identity import Passport
from tests.support import launcher
from tests.support.mx_sink import MxSink
from tests.support.processes import REPO_ROOT, ServiceProcess, free_port, service_env
from tests.support.redis_acl import client_as
from tests.support.ws_client import GatewayClient

DOMAIN = "relay.test"
XRANGE_SCRIPT = "return redis.call('XRANGE', KEYS[1], '-', '+')"


def test_the_real_services_work_under_their_users(acl_redis: EmbeddedRedis, acl_dir: Path, tmp_path: Path) -> None:
    admin = client_as(acl_redis, acl_dir, "admin")
    admin.acl_log_reset()
    mx_port = free_port()
    smtp_port, smtp_http, tunnel_port, egress_http = free_port(), free_port(), free_port(), free_port()

    def env(user: str, **more: str) -> dict[str, str]:
        return service_env(
            acl_redis.url,
            RELAY_REDIS_USERNAME=user,
            RELAY_REDIS_PASSWORD_FILE=str(acl_dir / f"{user}.password"),
            RELAY_MAIL_DOMAINS=DOMAIN,
            **more,
        )

    processes = [
        ServiceProcess(
            "ingress",
            env("ingress", RELAY_SMTP_PORT=str(smtp_port), RELAY_SMTP_HTTP_PORT=str(smtp_http)),
            port=smtp_port,
            log_path=tmp_path / "ingress.log",
        ),
        ServiceProcess(
            "tunnel",
            # the periodic sweeps run during the test too
            env(
                "tunnel",
                RELAY_PORT=str(tunnel_port),
                RELAY_AUTH_CHALLENGE_GC_INTERVAL_MS="200",
                RELAY_WS_RESULTS_SWEEP_INTERVAL_MS="200",
            ),
            port=tunnel_port,
            log_path=tmp_path / "tunnel.log",
        ),
        ServiceProcess(
            "egress",
            env(
                "egress",
                RELAY_EGRESS_HTTP_PORT=str(egress_http),
                RELAY_EGRESS_ROUTES=json.dumps({"example.test": f"127.0.0.2:{mx_port}"}),
                RELAY_EGRESS_RETRY_BASE_SECONDS="0",  # the first attempt's 451 is retried at once
            ),
            port=egress_http,
            log_path=tmp_path / "egress.log",
        ),
    ]
    try:
        for process in processes:
            process.start()
        with MxSink("127.0.0.2", mx_port, data_replies=["451 4.3.0 try again later"]) as mx:
            inbound, result = asyncio.run(
                gateway_round_trip(f"ws://127.0.0.1:{tunnel_port}/ws", smtp_port, Passport.generate())
            )
            [delivered] = mx.received()
        scrapes = {
            name: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            for name, port in (("ingress", smtp_http), ("tunnel", tunnel_port), ("egress", egress_http))
        }
        status = launcher.run(
            [sys.executable, "-m", "protege_relay.cli", "status", "--json"],
            env=env("status"),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        for process in processes:  # their shutdown paths (node records, ownership) run under ACL too
            if process.process is not None and process.process.poll() is None:
                process.terminate(timeout_s=15)
    denials = cast(list[dict[str, Any]], admin.acl_log())
    admin.close()
    logs = {process.service: process.logs() for process in processes}
    print(f"\ninbound {inbound!r}; outbound result {result['status']}; denied commands {denials}")
    assert denials == [], [{k: d[k] for k in ("username", "object", "reason", "context")} for d in denials]
    assert not [name for name, text in logs.items() if "NOPERM" in text or "Traceback" in text], logs
    assert inbound.endswith(b"acl test body\r\n")
    assert (result["status"], result["attempts"]) == ("sent", 2) and delivered.rcpt_tos == ["user@example.test"]
    assert status.returncode == 0, status.stderr
    assert {node["role"] for node in json.loads(status.stdout)["nodes"]} == {"ingress", "tunnel", "egress"}
    assert "relay_inbox_entries" in scrapes["tunnel"] and "relay_egress_queue_jobs" in scrapes["egress"]


async def gateway_round_trip(url: str, smtp_port: int, passport: Passport) -> tuple[bytes, dict[str, object]]:
    """SMTP in -> gateway (acked), then gateway out -> result; returns (inbound data, result)."""
    gateway = await GatewayClient.open(url)
    try:
        await gateway.authenticate(passport)
        address = f"{passport.persona_key}@{DOMAIN}"

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
                client.sendmail("someone@example.org", [address], b"Subject: in\r\n\r\nacl test body\r\n")

        await asyncio.to_thread(send)
        message = await gateway.next_inbound(timeout_s=20)
        await gateway.ack(message.stream_id)
        stream_id = str(uuid.uuid4())
        outbound = b"From: " + address.encode() + b"\r\nTo: user@example.test\r\nSubject: out\r\n\r\nhi\r\n"
        await gateway.send_outbound(stream_id, address, "user@example.test", outbound)
        result = await gateway.next_of_type("relay_delivery_result", 30)
        return message.data, result
    finally:
        await gateway.close()
