"""Redis access (docs/SECURITY.md "Redis access", issue item 5): the ACL file generated from
shared/redis_acl.py, loaded into a real redis-server. The real services run under their own
users end to end (SMTP in through the ingress, to a gateway through the tunnel, out through the
egress to an MX sink, `status`, /metrics scrapes) and Redis logs no denied command; what each
user must not do fails with NOPERM."""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.identity import Passport
from shared.redis_acl import SERVICE_USERS, write_secrets
from tests.support.mx_sink import MxSink
from tests.support.processes import REPO_ROOT, ServiceProcess, free_port, service_env
from tests.support.ws_client import GatewayClient

DOMAIN = "relay.test"
XRANGE_SCRIPT = "return redis.call('XRANGE', KEYS[1], '-', '+')"


@pytest.fixture
def acl_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets"
    write_secrets(directory)
    return directory


@pytest.fixture
def acl_redis(tmp_path: Path, acl_dir: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", extra_args=("--aclfile", str(acl_dir / "users.acl")))
    server.start()
    yield server
    server.stop()


def password(acl_dir: Path, user: str) -> str:
    return (acl_dir / f"{user}.password").read_text().strip()


def client_as(server: EmbeddedRedis, acl_dir: Path, user: str) -> redis.Redis:
    return redis.Redis.from_url(server.url, username=user, password=password(acl_dir, user))


def denied(call: object) -> bool:
    """NOPERM, top level or (wrapped in a script error) from a command a script ran."""
    try:
        call()  # type: ignore[operator]
    except redis.exceptions.NoPermissionError:
        return True
    except redis.exceptions.ResponseError as exc:
        return "user executing the script can't run this command" in str(exc)
    return False


def test_each_user_is_refused_what_it_does_not_need(acl_redis: EmbeddedRedis, acl_dir: Path) -> None:
    admin = client_as(acl_redis, acl_dir, "admin")
    persona = Passport.generate().persona_key
    admin.xadd(keys.inbox(persona), {b"m": b"secret mail"})
    ingress = client_as(acl_redis, acl_dir, "ingress")
    status = client_as(acl_redis, acl_dir, "status")
    tunnel = client_as(acl_redis, acl_dir, "tunnel")
    egress = client_as(acl_redis, acl_dir, "egress")
    anonymous = redis.Redis.from_url(acl_redis.url)
    inbox = keys.inbox(persona)
    xrange_sha = ingress.script_load(XRANGE_SCRIPT)  # loading is allowed; what it runs is checked
    forbidden = {
        "ingress XRANGE inbox": lambda: ingress.xrange(inbox),
        "ingress XREAD inbox": lambda: ingress.xread({inbox: "0"}),
        "ingress XREADGROUP inbox": lambda: ingress.xreadgroup(keys.INBOX_GROUP, "c", {inbox: ">"}),
        "ingress XRANGE inside a script": lambda: ingress.evalsha(xrange_sha, 1, inbox),
        "ingress EVAL": lambda: ingress.eval(XRANGE_SCRIPT, 1, inbox),
        "ingress ZADD egress queue": lambda: ingress.zadd(keys.EGRESS_QUEUE, {"deliver:x:y": 1}),
        "ingress LPUSH arq:queue": lambda: ingress.lpush("arq:queue", "job"),
        "ingress SET arq job": lambda: ingress.set("arq:job:deliver:x:y", b"job"),
        "ingress GET results": lambda: ingress.get(keys.results(persona)),
        "ingress KEYS": lambda: ingress.keys("*"),
        "ingress FLUSHALL": lambda: ingress.flushall(),
        "status SET": lambda: status.set(keys.seen(persona), b"1"),
        "status DEL inbox": lambda: status.delete(inbox),
        "status XADD inbox": lambda: status.xadd(inbox, {b"m": b"x"}),
        "status SREM nodes": lambda: status.srem(keys.NODES_KEY, "n"),
        "status EVAL": lambda: status.eval("return 1", 0),
        "status PUBLISH": lambda: status.publish(keys.node_channel("n"), b"x"),
        "tunnel FLUSHALL": lambda: tunnel.flushall(),
        "tunnel CONFIG SET": lambda: tunnel.config_set("maxmemory", "1"),
        "tunnel ACL SETUSER": lambda: tunnel.acl_setuser("x", enabled=True),
        "tunnel SET arq in-progress": lambda: tunnel.set("arq:in-progress:deliver:x:y", b"1"),
        "egress XRANGE inbox": lambda: egress.xrange(inbox),
        "egress XADD inbox": lambda: egress.xadd(inbox, {b"m": b"x"}),
        "egress SET seen": lambda: egress.set(keys.seen(persona), b"1"),
        "egress FLUSHALL": lambda: egress.flushall(),
        "no password GET": lambda: anonymous.get(keys.seen(persona)),
        "no password XRANGE": lambda: anonymous.xrange(inbox),
    }
    results = {name: denied(call) for name, call in forbidden.items()}
    print("\n" + "\n".join(f"  {'NOPERM' if ok else 'ALLOWED'}  {name}" for name, ok in results.items()))
    assert all(results.values()), [name for name, ok in results.items() if not ok]
    assert anonymous.ping() is True, "health checks need no password"
    assert ingress.xlen(inbox) == 1 and status.xlen(inbox) == 1
    assert [user.name for user in SERVICE_USERS] == ["ingress", "tunnel", "egress", "status"]
    for client in (admin, ingress, status, tunnel, egress, anonymous):
        client.close()


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
        status = subprocess.run(
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
    denials = admin.acl_log()
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
