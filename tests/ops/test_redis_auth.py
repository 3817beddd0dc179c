"""Every Redis client of the relay authenticates with `redis.username` + the configured password:
the services' pooled clients, arq's pool, the ingress' own client, and `protege-relay status`,
against a real redis-server whose default user is off."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from protege_relay.embedded_redis import EmbeddedRedis
from services.ingress.main import redis_client as ingress_redis_client
from shared.config import load_config
from shared.redis import connect, connect_arq, connect_sync
from tests.support import launcher
from tests.support.processes import REPO_ROOT, service_env

PASSWORD = "correct-horse-battery-staple"


@pytest.fixture
def auth_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    acl = tmp_path / "users.acl"
    acl.write_text(f"user default off\nuser relay on >{PASSWORD} ~* &* +@all\n")
    server = EmbeddedRedis(tmp_path / "redis", extra_args=("--aclfile", str(acl)))
    server.start()
    yield server
    server.stop()


def test_every_client_authenticates_as_the_configured_user(auth_redis: EmbeddedRedis, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    config = load_config(
        environ={
            "RELAY_REDIS_URL": auth_redis.url,
            "RELAY_REDIS_USERNAME": "relay",
            "RELAY_REDIS_PASSWORD_FILE": str(secret),
        }
    )

    async def check() -> list[str]:
        who: list[str] = []
        for client in (connect(config), ingress_redis_client(config)):
            who.append(_text(await client.acl_whoami()))
            await client.aclose()
        pool = connect_arq(config)
        who.append(_text(await pool.acl_whoami()))  # arq's pool decodes responses
        await pool.aclose()
        return who

    assert asyncio.run(check()) == ["relay", "relay", "relay"]
    sync_client = connect_sync(config)
    assert _text(sync_client.acl_whoami()) == "relay"
    sync_client.close()

    anonymous = redis.Redis.from_url(auth_redis.url)
    with pytest.raises(redis.AuthenticationError):
        anonymous.get("x")
    anonymous.close()


def test_status_authenticates_and_fails_clearly_without_the_password(auth_redis: EmbeddedRedis) -> None:
    def status(**env: str) -> subprocess.CompletedProcess[str]:
        return launcher.run(
            [sys.executable, "-m", "protege_relay.cli", "status", "--json"],
            env=service_env(auth_redis.url, RELAY_REDIS_USERNAME="relay", **env),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )

    good = status(RELAY_REDIS_PASSWORD=PASSWORD)
    assert good.returncode == 0, good.stderr
    assert '"nodes"' in good.stdout
    bad = status(RELAY_REDIS_PASSWORD="wrong")
    assert bad.returncode == 1
    assert "cannot read Redis" in bad.stderr and "Traceback" not in bad.stderr
    assert "wrong" not in bad.stderr


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
