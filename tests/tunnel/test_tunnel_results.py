"""Delivery results over real WebSockets: a result goes back to the socket that sent its stream
(on whichever node holds it), to another live socket once that one is gone, and leaves Redis
only after a ping sent after it was answered."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis
import redis.asyncio as aioredis
from websockets.frames import Opcode

from protege_relay.embedded_redis import EmbeddedRedis
from services.tunnel.results import Origin
from shared import keys
from shared.identity import Passport
from shared.payloads import DeliveryResult
from shared.wakeup import WakeupKind, wake_owner
from tests.support.wait import eventually
from tests.support.ws_client import GatewayClient, RawWsClient, RunningTunnel

DOMAIN = "relay.test"


@pytest.fixture
def tunnel_env() -> dict[str, str]:
    return {"RELAY_MAIL_DOMAINS": DOMAIN}


@pytest.fixture
async def wakeups(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def barrier(client: GatewayClient) -> None:
    await client.send_json({"type": "ping"})
    await client.next_of_type("pong")


def results_received(client: GatewayClient) -> list[str]:
    return [text for text in client.raw_texts if '"relay_delivery_result"' in text]


async def send_stream(client: GatewayClient, passport: Passport) -> str:
    """An accepted outbound stream (the tunnel recorded its origin once the barrier returns)."""
    stream_id = str(uuid.uuid4())
    own = f"{passport.persona_key}@{DOMAIN}"
    await client.send_outbound(stream_id, own, "bob@example.org", f"From: {own}\r\n\r\nhi\r\n".encode())
    await barrier(client)
    return stream_id


async def publish_result(redis_client: redis.Redis, wakeups: aioredis.Redis, persona_key: str, stream_id: str) -> None:
    """What the egress does: XADD the result, then wake the owner and the outbound holders."""
    result = DeliveryResult(stream_id, "sent", message_id=f"<{stream_id}@{DOMAIN}>")
    redis_client.xadd(keys.results(persona_key), {b"r": result.pack()})
    await wake_owner(wakeups, persona_key, WakeupKind.RESULT)


async def test_result_goes_to_the_outbound_socket_that_sent_it_not_the_inbound_one(
    tunnel: RunningTunnel, redis_client: redis.Redis, wakeups: aioredis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    receiver = await GatewayClient.open(tunnel.url)
    await receiver.authenticate(passport, role="inbound")
    sender = await GatewayClient.open(tunnel.url)
    await sender.authenticate(passport, role="outbound")
    stream_id = await send_stream(sender, passport)
    origin = Origin.decode(cast(bytes | None, redis_client.get(keys.outbound_origin(pk, stream_id))))
    assert origin is not None and origin.node_id == tunnel.config.node_id

    await publish_result(redis_client, wakeups, pk, stream_id)
    result = await sender.next_of_type("relay_delivery_result", timeout_s=3)
    assert (result["streamId"], result["status"]) == (stream_id, "sent")
    await eventually(lambda: redis_client.xlen(keys.results(pk)) == 0, message="result not deleted")
    await barrier(receiver)
    assert results_received(receiver) == []
    await sender.close()
    await receiver.close()


async def test_result_of_a_closed_sender_goes_to_the_inbound_socket(
    tunnel: RunningTunnel, redis_client: redis.Redis, wakeups: aioredis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    receiver = await GatewayClient.open(tunnel.url)
    await receiver.authenticate(passport, role="inbound")
    sender = await GatewayClient.open(tunnel.url)
    await sender.authenticate(passport, role="outbound")
    stream_id = await send_stream(sender, passport)
    await sender.close()
    await eventually(
        lambda: redis_client.get(keys.outbound_origin(pk, stream_id)) is None,
        message="origin record not forgotten on close",
    )
    await publish_result(redis_client, wakeups, pk, stream_id)
    result = await receiver.next_of_type("relay_delivery_result", timeout_s=3)
    assert result["streamId"] == stream_id
    await receiver.close()


async def test_result_goes_to_the_sender_on_another_node(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, wakeups: aioredis.Redis
) -> None:
    """Inbound socket on node A (the owner), sender on node B: both are woken, only B sends."""
    node_a = await RunningTunnel(redis_server.url, RELAY_MAIL_DOMAINS=DOMAIN).start()
    node_b = await RunningTunnel(redis_server.url, RELAY_MAIL_DOMAINS=DOMAIN).start()
    try:
        passport = Passport.generate()
        pk = passport.persona_key
        receiver = await GatewayClient.open(node_a.url)
        await receiver.authenticate(passport, role="inbound")
        sender = await GatewayClient.open(node_b.url)
        await sender.authenticate(passport, role="outbound")
        await eventually(lambda: redis_client.exists(keys.node_alive(node_b.config.node_id)))
        stream_id = await send_stream(sender, passport)
        await publish_result(redis_client, wakeups, pk, stream_id)
        result = await sender.next_of_type("relay_delivery_result", timeout_s=3)
        assert result["streamId"] == stream_id
        await eventually(lambda: redis_client.xlen(keys.results(pk)) == 0)
        await barrier(receiver)
        assert results_received(receiver) == []
        await sender.close()
        await receiver.close()
    finally:
        await node_b.stop()
        await node_a.stop()


async def test_result_is_deleted_only_after_the_pong_that_follows_it(
    tunnel: RunningTunnel, redis_client: redis.Redis, wakeups: aioredis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    raw = await RawWsClient.open("127.0.0.1", tunnel.port)
    assert (await raw.authenticate(passport))["type"] == "auth_ok"
    await publish_result(redis_client, wakeups, pk, "s-unanswered")
    opcode, payload = await raw.next_frame()
    assert opcode == Opcode.TEXT and b"s-unanswered" in payload
    opcode, ping_payload = await raw.next_frame()
    assert opcode == Opcode.PING
    assert redis_client.xlen(keys.results(pk)) == 1  # sent, not yet known to be at the gateway
    raw.close()  # dies without answering: the result waits for the next socket

    again = await RawWsClient.open("127.0.0.1", tunnel.port)
    assert (await again.authenticate(passport))["type"] == "auth_ok"
    opcode, payload = await again.next_frame()
    assert opcode == Opcode.TEXT and b"s-unanswered" in payload
    opcode, ping_payload = await again.next_frame()
    assert opcode == Opcode.PING
    await again.pong(ping_payload)
    await eventually(lambda: redis_client.xlen(keys.results(pk)) == 0, message="result kept after the pong")
    again.close()


async def test_origin_on_a_live_node_is_left_to_it_and_a_dead_nodes_origin_is_not(
    tunnel: RunningTunnel, redis_client: redis.Redis, wakeups: aioredis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    receiver = await GatewayClient.open(tunnel.url)
    await receiver.authenticate(passport, role="inbound")
    redis_client.hset(keys.node_alive("other-node"), "role", "tunnel")
    redis_client.set(keys.outbound_origin(pk, "s-elsewhere"), Origin("other-node", "sock-1").encode())
    redis_client.set(keys.outbound_origin(pk, "s-orphaned"), Origin("dead-node", "sock-2").encode())
    await publish_result(redis_client, wakeups, pk, "s-elsewhere")
    await publish_result(redis_client, wakeups, pk, "s-orphaned")
    result = await receiver.next_of_type("relay_delivery_result", timeout_s=3)
    assert result["streamId"] == "s-orphaned"  # the first one, left to other-node, was skipped
    await eventually(lambda: redis_client.xlen(keys.results(pk)) == 1)
    [(_, fields)] = cast(list[tuple[bytes, dict[bytes, bytes]]], redis_client.xrange(keys.results(pk)))
    assert DeliveryResult.unpack(fields[b"r"]).stream_id == "s-elsewhere"
    await receiver.close()
