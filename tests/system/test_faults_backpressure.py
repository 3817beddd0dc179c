"""A slow gateway must not grow the tunnel's memory without bound: with a gateway that stops
reading, the tunnel holds at most its in-flight window of entries and waits on the socket's
write buffer, while the rest of the queued mail stays in Redis. Measured from /proc."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis
from websockets.frames import Opcode

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys, protocol
from shared.identity import Passport
from shared.payloads import InboxEntry
from shared.wakeup import Wakeup, WakeupKind
from tests.support.cluster import Cluster, Node, soak_factor
from tests.support.ws_client import RawWsClient

MESSAGE_BYTES = 1024 * 1024
MESSAGES = 50 * soak_factor()  # 50 MiB queued for one persona by default
IN_FLIGHT_WINDOW = 8  # services/tunnel/inbox.py WINDOW: entries sent but not acknowledged
OBSERVE_S = 3.0  # RSS is sampled this long once the tunnel is stuck on the unread socket
RSS_GROWTH_BOUND_MIB = 32  # the window (8 x 1 MiB) with its frame copies: 11-17 MiB measured


@pytest.fixture
def tunnel(tmp_path: Path, redis_server: EmbeddedRedis) -> Iterator[Node]:
    cluster = Cluster(redis_server.url, tmp_path / "cluster", {"RELAY_QUEUE_MAX_BYTES": str(2 * 1024**3)})
    try:
        yield cluster.start(ingress=0, tunnel=1, egress=0).of("tunnel")[0]
    finally:
        cluster.stop()


def queue_mail(client: redis.Redis, persona_key: str, count: int) -> None:
    """What ingress writes (one entry + byte count per message), straight into Redis."""
    for index in range(count):
        entry = InboxEntry(
            f"qslow{index:05d}",
            0,
            "s@example.org",
            f"{persona_key}@relay.test",
            os.urandom(MESSAGE_BYTES),
            int(time.time() * 1000),
            "192.0.2.1",
        )
        with client.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.inbox(persona_key), {b"m": entry.pack()})
            pipe.incrby(keys.inbox_bytes(persona_key), MESSAGE_BYTES)
            pipe.execute()


def pending(client: redis.Redis, persona_key: str) -> int:
    summary = cast(dict[str, int], client.xpending(keys.inbox(persona_key), keys.INBOX_GROUP))
    return int(summary["pending"])


async def test_gateway_that_does_not_read_does_not_grow_tunnel_memory(tunnel: Node, redis_client: redis.Redis) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    assert tunnel.port is not None
    gateway = await RawWsClient.open("127.0.0.1", tunnel.port)
    auth_ok = await gateway.authenticate(passport, capabilities=["inbound_ack"])
    assert auth_ok["type"] == "auth_ok" and auth_ok["capabilities"] == ["inbound_ack"]
    rss_before_kib = tunnel.rss_kib()

    await asyncio.to_thread(queue_mail, redis_client, pk, MESSAGES)
    redis_client.publish(keys.node_channel(tunnel.node_id), Wakeup(WakeupKind.INBOX, pk).encode())
    deadline = time.monotonic() + 20
    while pending(redis_client, pk) < IN_FLIGHT_WINDOW:
        assert time.monotonic() < deadline, "the tunnel did not start sending"
        await asyncio.sleep(0.05)
    peak_kib = 0
    observe_until = time.monotonic() + OBSERVE_S
    while time.monotonic() < observe_until:  # a measurement window, not a wait for an event
        peak_kib = max(peak_kib, tunnel.rss_kib())
        await asyncio.sleep(0.05)
    read_ahead = pending(redis_client, pk)
    growth_mib = (peak_kib - rss_before_kib) / 1024
    queued_mib = MESSAGES * MESSAGE_BYTES / 1024**2

    # Now the gateway reads: every message arrives whole and is removed on its ack.
    received: dict[str, int] = {}
    sizes: dict[str, int] = {}
    while len(received) < MESSAGES:
        opcode, payload = await gateway.next_frame(timeout_s=20)
        if opcode is not Opcode.BINARY:
            continue
        frame = protocol.decode_frame(payload)
        if frame.frame_type is protocol.FrameType.SMTP_CHUNK:
            sizes[frame.stream_id] = sizes.get(frame.stream_id, 0) + len(frame.body)
        elif frame.frame_type is protocol.FrameType.SMTP_END:
            received[frame.stream_id] = sizes.pop(frame.stream_id)
            await gateway.send_text(f'{{"type":"smtp_ack","streamId":"{frame.stream_id}"}}')
    deadline = time.monotonic() + 20
    while redis_client.xlen(keys.inbox(pk)) != 0:
        assert time.monotonic() < deadline, "acknowledged mail still queued"
        await asyncio.sleep(0.05)
    gateway.close()

    print(
        f"\nslow gateway: queued_mib={queued_mib:.0f} tunnel_rss_before_mib={rss_before_kib / 1024:.1f}"
        f" tunnel_rss_peak_mib={peak_kib / 1024:.1f} growth_mib={growth_mib:.1f} bound_mib={RSS_GROWTH_BOUND_MIB}"
        f" entries_read_ahead={read_ahead} then sent={MESSAGES} received={len(received)} lost=0 duplicates=0"
    )
    assert read_ahead <= IN_FLIGHT_WINDOW
    assert growth_mib < RSS_GROWTH_BOUND_MIB
    assert growth_mib < queued_mib / 2
    assert sorted(received.values()) == [MESSAGE_BYTES] * MESSAGES
