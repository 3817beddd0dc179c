"""Fixtures every test group uses: a real redis-server (one per test process, emptied before each
test; its own per test with `own_redis`), real service processes, a free SMTP port for sinks, a
test CA. A group's own fixtures live in its conftest.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trustme

from protege_relay.embedded_redis import EmbeddedRedis, use_port_block
from shared.redis_acl import write_secrets
from tests.support.clock import ManualClock
from tests.support.processes import ServiceProcess, free_port, service_env
from tests.support.shared_redis import SharedRedis

# Each pytest-xdist worker picks ports from its own block below the ephemeral range (32768+).
WORKER_PORT_BASE = 10_000
WORKER_PORT_BLOCK = 2_500


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # this process only: children inherit the variable
    if worker.startswith("gw") and worker[2:].isdigit():
        start = WORKER_PORT_BASE + int(worker[2:]) * WORKER_PORT_BLOCK
        use_port_block(range(start, min(start + WORKER_PORT_BLOCK, 32_768)))
    config.addinivalue_line(
        "markers",
        "own_redis: the test stops, kills, restarts or reconfigures Redis, so `redis_server` is a fresh "
        "redis-server of its own instead of this test process's shared one",
    )


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRedis]:
    """This test process's redis-server (each xdist worker is a process: one each); see
    tests/support/shared_redis.py for how tests are kept from seeing each other's state."""
    shared = SharedRedis(tmp_path_factory.mktemp("shared-redis"))
    yield shared
    shared.stop()


@pytest.fixture
def redis_server(request: pytest.FixtureRequest) -> Iterator[EmbeddedRedis]:
    """A real redis-server with nothing in it and no other client connected: the shared one,
    emptied, or with `@pytest.mark.own_redis` one started for this test alone."""
    if request.node.get_closest_marker("own_redis") is None:
        shared: SharedRedis = request.getfixturevalue("shared_redis")
        yield shared.acquire(request.node.nodeid)
        shared.release(request.node.nodeid)
        return
    tmp_path: Path = request.getfixturevalue("tmp_path")
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def spawn(tmp_path: Path, redis_server: EmbeddedRedis) -> Iterator[object]:
    """spawn(service, port=None, **env) starts `protege-relay <service>`; all stopped at teardown."""
    started: list[ServiceProcess] = []

    def start(service: str, port: int | None = None, **env: str) -> ServiceProcess:
        process = ServiceProcess(
            service,
            service_env(redis_server.url, **env),
            port=port,
            log_path=tmp_path / f"{service}-{len(started)}.log",
        )
        started.append(process)
        return process.start()

    yield start
    for process in started:
        if process.process is not None and process.process.poll() is None:
            try:
                process.terminate(timeout_s=10)
            except Exception:
                process.kill()


@pytest.fixture
def rate_clock() -> ManualClock:
    """The clock in-process services cut their rate windows from: it stands mid-minute until a
    test advances it, so rate tests never wait for (or straddle) a minute boundary."""
    return ManualClock()


@pytest.fixture
def smtp_port() -> int:
    """The port every loopback MX sink of a test listens on (egress routes point at it)."""
    return free_port()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A test certificate authority (trustme); one per run, it only issues certificates."""
    return trustme.CA()


@pytest.fixture
def acl_dir(tmp_path: Path) -> Path:
    """The Redis ACL file and per-user credentials, as `python -m shared.redis_acl` writes them."""
    directory = tmp_path / "secrets"
    write_secrets(directory)
    return directory


@pytest.fixture
def acl_redis(tmp_path: Path, acl_dir: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server that requires those users (`--aclfile`)."""
    server = EmbeddedRedis(tmp_path / "redis-acl", extra_args=("--aclfile", str(acl_dir / "users.acl")))
    server.start()
    yield server
    server.stop()


__all__ = ["free_port"]
