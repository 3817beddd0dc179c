"""Outbound over real WebSockets: refusals arrive as failed results, an accepted stream becomes
exactly one arq `deliver` job, and delivery results in Redis reach the gateway."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from arq.connections import ArqRedis, RedisSettings, create_pool

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys, protocol
from shared.identity import Passport
from shared.payloads import DeliveryResult, OutboundJob
from shared.wakeup import Wakeup, WakeupKind, wake_owner
from tests.support.clock import ManualClock
from tests.support.wait import eventually
from tests.support.ws_client import GatewayClient, RunningTunnel

DOMAIN = "relay.test"


@pytest.fixture
def tunnel_env() -> dict[str, str]:
    return {
        "RELAY_MAIL_DOMAINS": DOMAIN,
        "RELAY_SMTP_MAX_MESSAGE_BYTES": "200000",
        "RELAY_RATE_LIMITS_OUTBOUND_MESSAGES_PER_MINUTE_PER_PERSONA": "3",
    }


@pytest.fixture
async def arq_pool(redis_server: EmbeddedRedis) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(redis_server.url))
    yield pool
    await pool.aclose()


async def connected(tunnel: RunningTunnel, role: str = "inbound") -> tuple[GatewayClient, Passport]:
    passport = Passport.generate()
    client = await GatewayClient.open(tunnel.url)
    await client.authenticate(passport, role=role)
    return client, passport


async def barrier(client: GatewayClient) -> None:
    """The tunnel handles a socket's messages in order: once it answered this ping, it has
    handled everything sent before it."""
    await client.send_json({"type": "ping"})
    await client.next_of_type("pong")


def mail_from(author: str, body: bytes) -> bytes:
    """A message whose header From is `author`."""
    return f"From: {author}\r\n\r\n".encode() + body


async def queued(arq_pool: ArqRedis) -> list[Any]:
    return list(await arq_pool.queued_jobs(queue_name=keys.EGRESS_QUEUE))


async def test_accepted_outbound_is_one_arq_job_even_when_sent_twice(tunnel: RunningTunnel, arq_pool: ArqRedis) -> None:
    client, passport = await connected(tunnel)
    stream_id = str(uuid.uuid4())
    sender = f"{passport.persona_key.upper()}@{DOMAIN}"
    message = f"From: {sender}\r\n\r\n".encode() + os.urandom(100_000)
    await client.send_outbound(stream_id, sender, "someone@example.org", message)
    await client.send_outbound(stream_id, sender, "someone@example.org", message)
    await barrier(client)
    jobs = await queued(arq_pool)
    assert len(jobs) == 1
    assert jobs[0].function == "deliver"
    assert jobs[0].job_id == keys.egress_job_id(passport.persona_key, stream_id)
    job = OutboundJob.unpack(jobs[0].args[0])
    assert (job.persona_key, job.stream_id, job.rcpt_to, job.data) == (
        passport.persona_key,
        stream_id,
        ["someone@example.org"],
        message,
    )
    assert job.mail_from.lower() == f"{passport.persona_key}@{DOMAIN}"
    assert client.texts.empty()  # an accepted stream gets its result later, from egress
    await client.close()


@pytest.mark.parametrize(
    ("mail_from", "rcpt_to", "error"),
    [
        ("{other}@" + DOMAIN, "someone@example.org", "sender_not_allowed"),
        ("{pk}@elsewhere.example", "someone@example.org", "sender_not_allowed"),
        ("", "someone@example.org", "sender_not_allowed"),
        ("{pk}@" + DOMAIN, "no-at-sign", "invalid_recipient"),
        ("{pk}@" + DOMAIN, "a@example.org\r\nRCPT TO:<b@example.org>", "invalid_recipient"),
        ("{pk}@" + DOMAIN, "a b@example.org", "invalid_recipient"),
        ("{pk}@" + DOMAIN, "a@example.org,b@example.org", "too_many_recipients"),
    ],
)
async def test_outbound_refusals_are_failed_results(
    tunnel: RunningTunnel, arq_pool: ArqRedis, mail_from: str, rcpt_to: str, error: str
) -> None:
    client, passport = await connected(tunnel)
    sender = mail_from.format(pk=passport.persona_key, other=Passport.generate().persona_key)
    stream_id = str(uuid.uuid4())
    await client.send_outbound(stream_id, sender, rcpt_to, f"From: {sender}\r\nSubject: x\r\n\r\nhi\r\n".encode())
    result = await client.next_text()
    expected_sender = result.pop("expectedSender", None)  # PROTOCOL.md B: says which address to use
    assert expected_sender == (f"{passport.persona_key}@{DOMAIN}" if error == "sender_not_allowed" else None)
    assert result == {"type": "relay_delivery_result", "streamId": stream_id, "status": "failed", "error": error}
    assert await queued(arq_pool) == []
    await client.close()


async def test_chunk_or_end_without_start_is_stream_not_started(tunnel: RunningTunnel) -> None:
    client, _ = await connected(tunnel)
    await client.ws.send(protocol.encode_frame(protocol.FrameType.SMTP_CHUNK, "lost-1", b"data"))
    await client.ws.send(protocol.encode_frame(protocol.FrameType.SMTP_END, "lost-2"))
    for stream_id in ("lost-1", "lost-2"):
        result = await client.next_text()
        assert (result["streamId"], result["status"], result["error"]) == (stream_id, "failed", "stream_not_started")
    await client.close()


async def test_too_large_outbound_gets_one_failed_result(tunnel: RunningTunnel, arq_pool: ArqRedis) -> None:
    client, passport = await connected(tunnel)
    stream_id = str(uuid.uuid4())
    await client.send_outbound(stream_id, f"{passport.persona_key}@{DOMAIN}", "a@example.org", b"x" * 250_000)
    result = await client.next_text()
    assert (result["streamId"], result["error"]) == (stream_id, "message_too_large")
    await barrier(client)  # the remaining chunks and smtp_end produced nothing more
    assert await queued(arq_pool) == []
    await client.close()


async def test_outbound_rate_per_persona(tunnel: RunningTunnel, arq_pool: ArqRedis, rate_clock: ManualClock) -> None:
    client, passport = await connected(tunnel)
    sender = f"{passport.persona_key}@{DOMAIN}"
    for _ in range(3):
        await client.send_outbound(str(uuid.uuid4()), sender, "a@example.org", mail_from(sender, b"ok"))
    limited = str(uuid.uuid4())
    await client.send_outbound(limited, sender, "a@example.org", mail_from(sender, b"one too many"))
    result = await client.next_text()
    assert (result["streamId"], result["error"]) == (limited, "rate_limited")
    assert len(await queued(arq_pool)) == 3
    rate_clock.advance(60)  # the next minute window admits the persona again
    await client.send_outbound(str(uuid.uuid4()), sender, "a@example.org", mail_from(sender, b"next minute"))
    await barrier(client)
    assert len(await queued(arq_pool)) == 4
    await client.close()


async def test_outbound_role_socket_may_send(tunnel: RunningTunnel, arq_pool: ArqRedis) -> None:
    client, passport = await connected(tunnel, role="outbound")
    sender = f"{passport.persona_key}@{DOMAIN}"
    await client.send_outbound(str(uuid.uuid4()), sender, "a@example.org", mail_from(sender, b"hi"))
    await barrier(client)
    assert len(await queued(arq_pool)) == 1
    await client.close()


# --- results -----------------------------------------------------------------------------------


def add_result(redis_client: redis.Redis, persona_key: str, result: DeliveryResult) -> None:
    redis_client.xadd(keys.results(persona_key), {b"r": result.pack()})


async def test_result_reaches_the_socket_with_extra_fields(tunnel: RunningTunnel, redis_client: redis.Redis) -> None:
    client, passport = await connected(tunnel)
    pk = passport.persona_key
    add_result(
        redis_client,
        pk,
        DeliveryResult(
            "s-1",
            "sent",
            message_id="<m1@relay.test>",
            recipient="a@example.org",
            smtp_code=250,
            enhanced_code="2.0.0",
            permanent=False,
            attempts=1,
        ),
    )
    redis_client.publish(keys.node_channel(tunnel.config.node_id), Wakeup(WakeupKind.RESULT, pk).encode())
    result = await client.next_of_type("relay_delivery_result")
    assert result == {
        "type": "relay_delivery_result",
        "streamId": "s-1",
        "status": "sent",
        "messageId": "<m1@relay.test>",
        "recipient": "a@example.org",
        "smtpCode": 250,
        "enhancedCode": "2.0.0",
        "permanent": False,
        "attempts": 1,
    }
    compatible_first = ["type", "streamId", "status", "messageId", "recipient"]
    assert list(json.loads(client.raw_texts[-1]))[:5] == compatible_first
    await eventually(lambda: redis_client.xlen(keys.results(pk)) == 0, message="result not deleted after send")
    await client.close()


async def test_result_written_while_offline_arrives_on_next_auth(
    tunnel: RunningTunnel, redis_client: redis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    add_result(redis_client, pk, DeliveryResult("s-2", "failed", error="mailbox_unavailable", permanent=True))
    client = await GatewayClient.open(tunnel.url)
    await client.authenticate(passport)
    result = await client.next_of_type("relay_delivery_result")
    assert (result["streamId"], result["status"], result["error"], result["permanent"]) == (
        "s-2",
        "failed",
        "mailbox_unavailable",
        True,
    )
    await eventually(lambda: redis_client.xlen(keys.results(pk)) == 0)
    await client.close()


async def test_result_goes_to_outbound_role_socket_when_no_inbound(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, tunnel_env: dict[str, str], rate_clock: ManualClock
) -> None:
    # No owner key to wake: the periodic sweep delivers it (every 0.5 s here; the default 5 s
    # would only be waited out).
    tunnel = await RunningTunnel(
        redis_server.url, rate_clock=rate_clock, **tunnel_env, RELAY_WS_RESULTS_SWEEP_INTERVAL_MS="500"
    ).start()
    try:
        client, passport = await connected(tunnel, role="outbound")
        add_result(redis_client, passport.persona_key, DeliveryResult("s-3", "sent", message_id=None))
        result = await client.next_of_type("relay_delivery_result", timeout_s=15)
        assert result == {"type": "relay_delivery_result", "streamId": "s-3", "status": "sent", "messageId": None}
        await client.close()
    finally:
        await tunnel.stop()


async def test_outbound_only_sender_is_woken_for_its_result_without_the_sweep(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    """The egress's `wake_owner(RESULT)` reaches a node holding only an outbound-role socket; the
    sweep is 30 s here, so only the wake-up can deliver within the 2 s deadline."""
    tunnel = await RunningTunnel(redis_server.url, RELAY_WS_RESULTS_SWEEP_INTERVAL_MS="30000").start()
    wakeups = aioredis.Redis.from_url(redis_server.url)
    try:
        client, passport = await connected(tunnel, role="outbound")
        pk = passport.persona_key
        assert redis_client.zscore(keys.outbound_holders(pk), tunnel.config.node_id) is not None
        assert redis_client.get(keys.owner(pk)) is None
        add_result(redis_client, pk, DeliveryResult("s-4", "sent", message_id="<m4@relay.test>"))
        written_at = time.monotonic()
        assert await wake_owner(wakeups, pk, WakeupKind.RESULT)
        result = await client.next_of_type("relay_delivery_result", timeout_s=2)
        latency_s = time.monotonic() - written_at
        assert (result["streamId"], result["status"]) == ("s-4", "sent")
        assert latency_s < 2
        print(f"outbound-only result latency after the wake-up: {latency_s * 1000:.1f} ms")
        await client.close()
        await eventually(
            lambda: redis_client.zscore(keys.outbound_holders(pk), tunnel.config.node_id) is None,
            message="outbound holder not removed on close",
        )
        assert not await wake_owner(wakeups, pk, WakeupKind.RESULT)
    finally:
        await wakeups.aclose()
        await tunnel.stop()


async def test_result_wakeup_reaches_owner_and_outbound_holder_nodes_once_each(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    pk = Passport.generate().persona_key
    far_future_ms = int(time.time() * 1000) + 60_000
    redis_client.set(keys.owner(pk), "node-a")
    redis_client.zadd(keys.outbound_holders(pk), {"node-a": far_future_ms, "node-b": far_future_ms, "gone": 1})
    listener = redis_client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    listener.subscribe(*(keys.node_channel(node) for node in ("node-a", "node-b", "gone")))
    wakeups = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await wake_owner(wakeups, pk, WakeupKind.RESULT)
        assert await wake_owner(wakeups, pk, WakeupKind.INBOX)
        received: list[tuple[str, bytes]] = []

        def collect() -> bool:
            message = listener.get_message(timeout=0.05)
            if message is not None:
                received.append((message["channel"].decode(), message["data"]))
            return len(received) >= 3

        await eventually(collect, message=f"wake-ups seen: {received}")
        assert sorted(received) == sorted(
            [
                (keys.node_channel("node-a"), Wakeup(WakeupKind.RESULT, pk).encode()),
                (keys.node_channel("node-b"), Wakeup(WakeupKind.RESULT, pk).encode()),
                (keys.node_channel("node-a"), Wakeup(WakeupKind.INBOX, pk).encode()),
            ]
        )
        assert listener.get_message(timeout=0.2) is None  # nothing for the expired holder, no duplicate
    finally:
        listener.close()
        await wakeups.aclose()
