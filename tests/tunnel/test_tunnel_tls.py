"""Implicit TLS on the tunnel port (`wss://` without a proxy), with a trustme CA: a real
websockets client authenticates over `wss://127.0.0.1:port/ws`, `/health` answers over https,
and a key file others could read stops the process instead of serving plain `ws://`."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from protege_relay.embedded_redis import EmbeddedRedis
from shared.identity import Passport
from tests.support.processes import free_port
from tests.support.wait import poll_until
from tests.support.ws_client import GatewayClient, RunningTunnel


def write_server_files(ca: trustme.CA, directory: Path, key_mode: int = 0o600) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = directory / "tunnel.crt", directory / "tunnel.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    key_path.write_bytes(cert.private_key_pem.bytes())
    os.chmod(key_path, key_mode)
    return cert_path, key_path


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
async def tls_tunnel(redis_server: EmbeddedRedis, ca: trustme.CA, tmp_path: Path) -> AsyncIterator[RunningTunnel]:
    cert_path, key_path = write_server_files(ca, tmp_path)
    running = await RunningTunnel(
        redis_server.url, RELAY_WS_TLS_CERT_PATH=str(cert_path), RELAY_WS_TLS_KEY_PATH=str(key_path)
    ).start()
    yield running
    await running.stop()


async def test_gateway_authenticates_over_wss(tls_tunnel: RunningTunnel, ca: trustme.CA) -> None:
    passport = Passport.generate()
    client = await GatewayClient.open(f"wss://127.0.0.1:{tls_tunnel.port}/ws", ssl=client_context(ca))
    auth_ok = await client.authenticate(passport)
    assert auth_ok["publicKeyBase32"] == passport.persona_key
    assert client.ws.transport.get_extra_info("ssl_object") is not None
    await client.close()


async def test_health_over_https(tls_tunnel: RunningTunnel, ca: trustme.CA) -> None:
    def fetch() -> tuple[int, Any]:
        url = f"https://127.0.0.1:{tls_tunnel.port}/health"
        with urllib.request.urlopen(url, timeout=5, context=client_context(ca)) as response:
            return response.status, json.loads(response.read())

    assert await asyncio.to_thread(fetch) == (200, {"status": "ok"})


async def test_plain_ws_and_untrusted_certificates_are_refused(tls_tunnel: RunningTunnel) -> None:
    with pytest.raises(Exception):  # noqa: B017 - a TLS port answers no plain HTTP upgrade
        await GatewayClient.open(f"ws://127.0.0.1:{tls_tunnel.port}/ws")
    with pytest.raises(ssl.SSLCertVerificationError):
        await GatewayClient.open(f"wss://127.0.0.1:{tls_tunnel.port}/ws", ssl=ssl.create_default_context())


def test_group_readable_key_stops_the_process(spawn: Any, ca: trustme.CA, tmp_path: Path) -> None:
    cert_path, key_path = write_server_files(ca, tmp_path, key_mode=0o644)
    port = free_port()
    process = spawn(
        "tunnel", None, RELAY_PORT=str(port), RELAY_WS_TLS_CERT_PATH=str(cert_path), RELAY_WS_TLS_KEY_PATH=str(key_path)
    )
    poll_until(lambda: process.process.poll() is not None, timeout_s=20, message="tunnel started with an open key")
    assert process.process.returncode != 0
    logs = process.logs()
    assert "ws.tls.keyPath" in logs and "chmod 600" in logs
    assert "PRIVATE KEY" not in logs
