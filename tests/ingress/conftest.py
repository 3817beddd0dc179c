"""The SMTP ingress: in-process `serve()` (tests/support/ingress.py) or real `protege-relay ingress`
processes, over real SMTP against a real redis-server.

Fixtures every ingress test file shares. A file that needs its ingress configured differently
overrides `ingress_env` (a dict of RELAY_* overrides) rather than copying `start_ingress`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from protege_relay.embedded_redis import EmbeddedRedis
from tests.support.clock import ManualClock
from tests.support.dns_server import DnsServer
from tests.support.ingress import InProcessIngress, ingress_starter, mark_seen, new_persona
from tests.support.sender_auth import sender_zones

StartIngress = Callable[..., InProcessIngress]


@pytest.fixture
def ingress_env() -> dict[str, str]:
    """RELAY_* overrides applied to every ingress `start_ingress` starts; a test file overrides this."""
    return {}


@pytest.fixture
def start_ingress(
    redis_server: EmbeddedRedis, ingress_env: dict[str, str], rate_clock: ManualClock
) -> Iterator[StartIngress]:
    """start_ingress(**env) -> a running in-process ingress on `rate_clock`; all stopped at teardown."""
    starter = ingress_starter(redis_server, rate_clock)
    start = next(starter)

    def start_with_env(drain_timeout_s: float = 5.0, **env: str) -> InProcessIngress:
        return start(drain_timeout_s, **{**ingress_env, **env})

    yield start_with_env
    next(starter, None)  # stops every ingress it started


@pytest.fixture
def ingress(start_ingress: StartIngress) -> InProcessIngress:
    return start_ingress()


@pytest.fixture
def persona(redis_client: redis.Redis) -> str:
    """A fresh persona key the relay has seen (so its mail is accepted)."""
    persona_key = new_persona()
    mark_seen(redis_client, persona_key)
    return persona_key


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """The local DNS server with the sender domain's SPF, DKIM and DMARC records."""
    with DnsServer(sender_zones()) as server:
        yield server
