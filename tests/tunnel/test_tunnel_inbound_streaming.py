"""Large inbound bodies are stored apart from their inbox entry (shared/inbox_entries.py) and
streamed from Redis to the gateway: the frames are byte-identical to those of an inline body,
and the body leaves Redis with its entry (ack, retention trim, a missing body), the byte
counter staying right. Real redis-server, real WebSockets, entries written by shared.enqueue."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis
import redis.asyncio as aioredis
from websockets.frames import Opcode

from protege_relay.embedded_redis import EmbeddedRedis
from services.tunnel.inbox import trim_expired
from shared import backlog, keys, protocol
from shared.identity import Passport
from shared.inbox_entries import BODY_INLINE_MAX_BYTES
from shared.payloads import InboxEntry
from tests.support.inbox import queue_message
from tests.support.ws_client import GatewayClient, RawWsClient, RunningTunnel, eventually

ACK = ["inbound_ack"]


@pytest.fixture
async def tunnel(redis_server: EmbeddedRedis) -> AsyncIterator[RunningTunnel]:
    running = await RunningTunnel(redis_server.url).start()
    yield running
    await running.stop()


def body_keys(redis_client: redis.Redis, persona_key: str) -> list[bytes]:
    return list(redis_client.scan_iter(match=keys.inbox_body(persona_key, "*")))


def inbox_gone(redis_client: redis.Redis, persona_key: str) -> bool:
    return redis_client.xlen(keys.inbox(persona_key)) == 0 and not body_keys(redis_client, persona_key)


async def received_frames(raw: RawWsClient) -> list[bytes]:
    """Binary payloads of one message, smtp_start to smtp_end, as they came off the wire."""
    payloads: list[bytes] = []
    while True:
        opcode, payload = await raw.next_frame()
        assert opcode == Opcode.BINARY, (opcode, payload[:80])
        payloads.append(payload)
        if protocol.decode_frame(payload).frame_type is protocol.FrameType.SMTP_END:
            return payloads


def expected_frames(entry: InboxEntry) -> list[bytes]:
    start = protocol.SmtpStart(entry.mail_from, entry.rcpt_to, entry.auth_attestation)
    return protocol.encode_message_frames(entry.stream_id, start, entry.data)


async def test_large_bodies_are_stored_apart_and_streamed_byte_identical_to_inline(
    tunnel: RunningTunnel, redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    sizes = [BODY_INLINE_MAX_BYTES, BODY_INLINE_MAX_BYTES + 1, 5 * 4 * BODY_INLINE_MAX_BYTES + 7, 9_500_000]
    entries = [await queue_message(redis_server.url, pk, os.urandom(size - 2) + b"\r\n") for size in sizes]
    # One chunk stays inline; anything longer is stored apart, counted all the same.
    assert len(body_keys(redis_client, pk)) == 3
    assert int(cast(bytes, redis_client.get(keys.inbox_bytes(pk)))) == sum(sizes)
    status = backlog.inbox_backlog(redis_client, int(time.time() * 1000))
    assert (status.entries, status.total_bytes) == (4, sum(sizes))

    raw = await RawWsClient.open("127.0.0.1", tunnel.port)
    await raw.authenticate(passport, capabilities=ACK)
    for entry in entries:
        frames = await received_frames(raw)
        assert frames == expected_frames(entry), f"frames of {len(entry.data)} bytes differ from inline framing"
        await raw.send_text(protocol.encode_control({"type": "smtp_ack", "streamId": entry.stream_id}))
    await eventually(lambda: inbox_gone(redis_client, pk), message="entries or bodies left after ack")
    assert int(cast(bytes, redis_client.get(keys.inbox_bytes(pk)))) == 0
    raw.close()


async def test_unacked_streamed_body_is_sent_again_after_reconnect(
    tunnel: RunningTunnel, redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    entry = await queue_message(redis_server.url, pk, os.urandom(700_000))
    first = await GatewayClient.open(tunnel.url)
    await first.authenticate(passport, capabilities=ACK)
    got = await first.next_inbound()
    assert (got.stream_id, got.data) == (entry.stream_id, entry.data)
    await first.abort()  # crashed before acknowledging
    second = await GatewayClient.open(tunnel.url)
    await second.authenticate(passport, capabilities=ACK)
    again = await second.next_inbound()
    assert (again.stream_id, again.data) == (entry.stream_id, entry.data)
    await second.ack(again.stream_id)
    await eventually(lambda: inbox_gone(redis_client, pk), message="entry or body left after ack")
    assert int(cast(bytes, redis_client.get(keys.inbox_bytes(pk)))) == 0
    await second.close()


async def test_entry_whose_body_is_missing_is_dropped_and_the_next_delivered(
    tunnel: RunningTunnel, redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    damaged = await queue_message(redis_server.url, pk, os.urandom(200_000))
    redis_client.delete(keys.inbox_body(pk, damaged.stream_id))
    intact = await queue_message(redis_server.url, pk, os.urandom(300_000))
    client = await GatewayClient.open(tunnel.url)
    await client.authenticate(passport, capabilities=ACK)
    got = await client.next_inbound()
    assert (got.stream_id, got.data) == (intact.stream_id, intact.data)
    await client.ack(got.stream_id)
    await eventually(lambda: inbox_gone(redis_client, pk), message="damaged or delivered entry left")
    assert int(cast(bytes, redis_client.get(keys.inbox_bytes(pk)))) == 0
    await client.close()


async def test_retention_trim_removes_bodies_and_markers_with_their_entries(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    pk = Passport.generate().persona_key
    digest = "ab" * 32
    await queue_message(redis_server.url, pk, os.urandom(400_000), digest=digest)
    await queue_message(redis_server.url, pk, b"small\r\n")
    assert redis_client.exists(keys.accepted(pk, digest))
    await eventually(
        lambda: (
            int(time.time() * 1000)
            > int(
                cast(list[tuple[bytes, dict[bytes, bytes]]], redis_client.xrange(keys.inbox(pk)))[-1][0].split(b"-")[0]
            )
        )
    )
    redis_client.xgroup_create(keys.inbox(pk), keys.INBOX_GROUP, id="0")  # as the tunnel's claim does
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await trim_expired(client, pk, retention_s=0) == 2
    finally:
        await client.aclose()
    assert inbox_gone(redis_client, pk)
    assert int(cast(bytes, redis_client.get(keys.inbox_bytes(pk)))) == 0
    assert not redis_client.exists(keys.accepted(pk, digest))
