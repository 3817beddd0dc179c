"""The WebSocket tunnel: in-process `RunningTunnel` or real `protege-relay tunnel` processes, real
WebSockets (tests/support/ws_client.py) against a real redis-server.

A test file that needs its tunnel configured differently overrides `tunnel_env` (RELAY_* overrides)
rather than copying the `tunnel` fixture.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from protege_relay.embedded_redis import EmbeddedRedis
from tests.support.clock import ManualClock
from tests.support.ws_client import RunningTunnel


@pytest.fixture
def tunnel_env() -> dict[str, str]:
    """RELAY_* overrides for the `tunnel` fixture; a test file overrides this."""
    return {}


@pytest.fixture
async def tunnel(
    redis_server: EmbeddedRedis, tunnel_env: dict[str, str], rate_clock: ManualClock
) -> AsyncIterator[RunningTunnel]:
    """An in-process tunnel (`services.tunnel.main.serve`) on a free port and on `rate_clock`,
    stopped at teardown."""
    running = await RunningTunnel(redis_server.url, rate_clock=rate_clock, **tunnel_env).start()
    yield running
    await running.stop()
