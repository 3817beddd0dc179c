"""Issue 14 item 3: for gateways without `inbound_ack` a pong is not a stored message. The
relay keeps the entry until the socket has stayed open `ws.legacyAckGraceMs` after the pong
of the ping that followed smtp_end; a gateway that drops its socket sooner gets the message
again, under the same stream id, when it reconnects.

The gateways here are plain `websockets` clients without capabilities, like the real Protege
client: the library answers the relay's ping by itself. Real tunnel, real Redis; the grace is
set to 1.5 s through its RELAY_ environment override.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.identity import Passport
from tests.support.inbox import queue_message
from tests.support.ws_client import GatewayClient, RunningTunnel, eventually

GRACE_MS = 1500
DROP_AFTER_S = 1.0  # the crashing gateway's socket lives this long after smtp_end


@pytest.fixture
async def tunnel(redis_server: EmbeddedRedis) -> AsyncIterator[RunningTunnel]:
    running = await RunningTunnel(redis_server.url, RELAY_WS_LEGACY_ACK_GRACE_MS=str(GRACE_MS)).start()
    assert running.config.ws.legacyAckGraceMs == GRACE_MS
    yield running
    await running.stop()


def inbox_length(redis_client: redis.Redis, persona_key: str) -> int:
    return cast(int, redis_client.xlen(keys.inbox(persona_key)))


async def test_legacy_gateway_that_drops_its_socket_within_the_grace_gets_the_message_again(
    tunnel: RunningTunnel, redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    sent = [await queue_message(redis_server.url, pk, f"Subject: {n}\r\n\r\n{n}\r\n".encode()) for n in range(3)]
    sent.append(await queue_message(redis_server.url, pk, os.urandom(300_000)))  # streamed body too

    crashing = await GatewayClient.open(tunnel.url)
    auth_ok = await crashing.authenticate(passport)
    assert "capabilities" not in auth_ok
    first_copies = [await crashing.next_inbound() for _ in sent]
    assert [(m.stream_id, m.data) for m in first_copies] == [(e.stream_id, e.data) for e in sent]
    await asyncio.sleep(DROP_AFTER_S)  # the scenario: the gateway dies 1 s after receiving
    assert inbox_length(redis_client, pk) == len(sent), "removed on the pong alone"
    await crashing.abort()

    reconnected = await GatewayClient.open(tunnel.url)
    await reconnected.authenticate(passport)
    second_copies = [await reconnected.next_inbound() for _ in sent]
    assert [(m.stream_id, m.data) for m in second_copies] == [(e.stream_id, e.data) for e in sent]
    await eventually(lambda: inbox_length(redis_client, pk) == 0, message="not removed after the grace")
    assert int(cast(bytes, redis_client.get(keys.inbox_bytes(pk)))) == 0
    assert reconnected.inbound.empty()
    await reconnected.close()


async def test_legacy_gateway_that_stays_connected_gets_the_message_exactly_once(
    tunnel: RunningTunnel, redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    gateway = await GatewayClient.open(tunnel.url)
    await gateway.authenticate(passport)
    entry = await queue_message(redis_server.url, pk, b"Subject: once\r\n\r\nonce\r\n")
    got = await gateway.next_inbound()
    assert (got.stream_id, got.data) == (entry.stream_id, entry.data)
    await eventually(
        lambda: inbox_length(redis_client, pk) == 0, timeout_s=GRACE_MS / 1000 + 10, message="never removed"
    )
    # Removed from Redis: it can never be sent again; it was sent once.
    assert gateway.inbound.empty()
    later = await queue_message(redis_server.url, pk, b"Subject: later\r\n\r\nlater\r\n")
    got_later = await gateway.next_inbound()
    assert (got_later.stream_id, got_later.data) == (later.stream_id, later.data)
    await eventually(lambda: inbox_length(redis_client, pk) == 0, message="later message never removed")
    assert gateway.inbound.empty()
    await gateway.close()
