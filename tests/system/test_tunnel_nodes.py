"""Real `protege-relay tunnel` processes sharing one Redis: replacement across nodes, a node
SIGKILLed mid-delivery, results reaching a reconnected gateway, and graceful SIGTERM."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from typing import Any, cast

import redis

from protege_relay.embedded_redis import free_port
from shared import keys, lua
from shared.identity import Passport
from shared.payloads import DeliveryResult, InboxEntry
from shared.wakeup import Wakeup, WakeupKind
from tests.support.processes import ServiceProcess
from tests.support.wait import eventually
from tests.support.ws_client import GatewayClient

ACK = ["inbound_ack"]


def start_node(spawn: Any, name: str) -> tuple[ServiceProcess, str]:
    port = free_port()
    process: ServiceProcess = spawn("tunnel", port=port, RELAY_PORT=str(port), RELAY_NODE_ID=name)
    return process, f"ws://127.0.0.1:{port}/ws"


def add_inbox_entry(redis_client: redis.Redis, persona_key: str, data: bytes) -> InboxEntry:
    entry = InboxEntry("q" + os.urandom(8).hex(), 0, "s@example.org", f"{persona_key}@relay.test", data, 1, "192.0.2.1")
    pipe = redis_client.pipeline(transaction=True)
    pipe.xadd(keys.inbox(persona_key), {b"m": entry.pack()})
    pipe.incrby(keys.inbox_bytes(persona_key), len(data))
    pipe.execute()
    return entry


def wake_owner(redis_client: redis.Redis, persona_key: str, kind: WakeupKind) -> None:
    """What ingress and egress do (shared.wakeup.wake_owner: the wake-up script), with a sync client."""
    holders = [keys.outbound_holders(persona_key)] if kind is WakeupKind.RESULT else []
    message = Wakeup(kind, persona_key).encode()
    woken = lua.WAKE.on(redis_client)(keys=[keys.owner(persona_key), *holders], args=[message, int(time.time() * 1000)])
    assert woken >= 1, "the persona has an owner node"


def test_process_serves_health(spawn: Any) -> None:
    process, url = start_node(spawn, "health-node")
    port = url.split(":")[2].split("/")[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    assert '"msg": "ready"' in process.logs() or '"msg":"ready"' in process.logs()


async def test_replacement_across_two_nodes(spawn: Any, redis_client: redis.Redis) -> None:
    _, url_a = start_node(spawn, "node-a")
    _, url_b = start_node(spawn, "node-b")
    passport = Passport.generate()
    pk = passport.persona_key
    first = await GatewayClient.open(url_a)
    await first.authenticate(passport)
    first_socket_id = cast(bytes, redis_client.get(keys.socket(pk))).decode()
    second = await GatewayClient.open(url_b)
    auth_ok = await second.authenticate(passport)
    assert auth_ok["replacedSocketId"] == first_socket_id
    assert await first.closed() == (4400, "replaced_by_new_session")
    assert redis_client.get(keys.owner(pk)) == b"node-b"
    # node-a's close of the old socket left node-b's ownership alone
    await second.send_json({"type": "ping"})
    assert await second.next_of_type("pong")
    assert redis_client.get(keys.owner(pk)) == b"node-b"
    await second.close()


async def test_sigkilled_node_message_is_delivered_by_another_after_reconnect(
    spawn: Any, redis_client: redis.Redis
) -> None:
    node_a, url_a = start_node(spawn, "node-a")
    _, url_b = start_node(spawn, "node-b")
    passport = Passport.generate()
    pk = passport.persona_key
    body = os.urandom(200_000)
    entry = add_inbox_entry(redis_client, pk, body)
    first = await GatewayClient.open(url_a)
    await first.authenticate(passport, capabilities=ACK)
    assert (await first.next_inbound()).stream_id == entry.stream_id
    node_a.kill()  # before our ack: the entry stays pending under node-a's consumer
    await first.closed()
    second = await GatewayClient.open(url_b)
    auth_ok = await second.authenticate(passport, capabilities=ACK)
    assert auth_ok["replacedSocketId"] is not None  # node-a's socket never released its record
    again = await second.next_inbound()
    assert (again.stream_id, again.data) == (entry.stream_id, body)
    await second.ack(again.stream_id)
    await eventually(lambda: redis_client.xlen(keys.inbox(pk)) == 0, message="entry not removed after ack")
    assert redis_client.get(keys.owner(pk)) == b"node-b"
    await second.close()


async def test_result_reaches_gateway_reconnected_to_second_node(spawn: Any, redis_client: redis.Redis) -> None:
    _, url_a = start_node(spawn, "node-a")
    _, url_b = start_node(spawn, "node-b")
    passport = Passport.generate()
    pk = passport.persona_key
    first = await GatewayClient.open(url_a)
    await first.authenticate(passport)
    await first.close()
    await eventually(lambda: redis_client.get(keys.owner(pk)) is None, message="node-a kept ownership")
    # Written while the gateway is offline: waits in Redis.
    redis_client.xadd(keys.results(pk), {b"r": DeliveryResult("out-1", "failed", error="rejected").pack()})
    second = await GatewayClient.open(url_b)
    await second.authenticate(passport)
    offline = await second.next_of_type("relay_delivery_result")
    assert (offline["streamId"], offline["status"], offline["error"]) == ("out-1", "failed", "rejected")
    # Written while connected to node-b: the wake-up goes to node-b's channel.
    redis_client.xadd(keys.results(pk), {b"r": DeliveryResult("out-2", "sent", message_id="<id@x>").pack()})
    wake_owner(redis_client, pk, WakeupKind.RESULT)
    live = await second.next_of_type("relay_delivery_result")
    assert (live["streamId"], live["status"], live["messageId"]) == ("out-2", "sent", "<id@x>")
    await eventually(lambda: redis_client.xlen(keys.results(pk)) == 0)
    await second.close()


async def test_inbox_wakeup_reaches_the_owning_node(spawn: Any, redis_client: redis.Redis) -> None:
    _, url = start_node(spawn, "node-a")
    passport = Passport.generate()
    pk = passport.persona_key
    client = await GatewayClient.open(url)
    await client.authenticate(passport, capabilities=ACK)
    entry = add_inbox_entry(redis_client, pk, b"woken\r\n")
    wake_owner(redis_client, pk, WakeupKind.INBOX)
    message = await client.next_inbound(timeout_s=5)
    assert message.stream_id == entry.stream_id
    await client.ack(message.stream_id)
    await client.close()


async def test_sigterm_releases_ownership_and_closes_1001(spawn: Any, redis_client: redis.Redis) -> None:
    node, url = start_node(spawn, "node-a")
    passport = Passport.generate()
    client = await GatewayClient.open(url)
    await client.authenticate(passport)
    assert redis_client.get(keys.owner(passport.persona_key)) == b"node-a"
    node.process.send_signal(15)  # type: ignore[union-attr]
    code, _ = await client.closed()
    assert code == 1001
    assert node.process.wait(timeout=15) == 0  # type: ignore[union-attr]
    assert redis_client.get(keys.owner(passport.persona_key)) is None
    assert redis_client.get(keys.socket(passport.persona_key)) is None
    assert not redis_client.exists(keys.node_alive("node-a"))


async def test_result_of_a_stream_sent_through_a_killed_node_reaches_the_persona_elsewhere(
    spawn: Any, redis_client: redis.Redis
) -> None:
    """The origin node's liveness record decides who may deliver; after a SIGKILL it expires
    within NODE_TTL_S, inside the 20 s a gateway waits for a result."""
    node_a, url_a = start_node(spawn, "node-a")
    _, url_b = start_node(spawn, "node-b")
    passport = Passport.generate()
    pk = passport.persona_key
    sender = await GatewayClient.open(url_a)
    await sender.authenticate(passport, role="outbound")
    own = f"{pk}@relay.test"
    await sender.send_outbound("out-1", own, "bob@example.org", f"From: {own}\r\nSubject: hi\r\n\r\nhi\r\n".encode())
    await eventually(lambda: redis_client.get(keys.outbound_origin(pk, "out-1")) is not None)
    node_a.kill()
    await sender.abort()
    receiver = await GatewayClient.open(url_b)
    await receiver.authenticate(passport)
    redis_client.xadd(keys.results(pk), {b"r": DeliveryResult("out-1", "sent", message_id="<q1@mx>").pack()})
    wake_owner(redis_client, pk, WakeupKind.RESULT)
    result = await receiver.next_of_type("relay_delivery_result", timeout_s=20)
    assert (result["streamId"], result["status"], result["messageId"]) == ("out-1", "sent", "<q1@mx>")
    await receiver.close()
