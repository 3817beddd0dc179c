"""Inbound delivery over real WebSockets: entries XADDed into Redis exactly as the ingress
writes them reach the gateway in <= 64 KiB chunks, byte-exact, and leave Redis only when the
gateway has them (smtp_ack, or the pong after smtp_end for legacy gateways)."""

from __future__ import annotations

import asyncio
import os
from typing import Any, cast

import pytest
import redis
from websockets.frames import Opcode

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys, protocol
from shared.identity import Passport
from shared.payloads import InboxEntry
from shared.wakeup import Wakeup, WakeupKind
from tests.support.clock import ManualClock
from tests.support.wait import eventually
from tests.support.ws_client import GatewayClient, RawWsClient, RunningTunnel

ACK = ["inbound_ack"]
QUICK_SWEEP = {"RELAY_WS_RESULTS_SWEEP_INTERVAL_MS": "500"}


@pytest.fixture
def tunnel_env() -> dict[str, str]:
    # A short legacy-ack grace: these tests prove the pong barrier; tests/tunnel/test_tunnel_legacy_ack.py the grace.
    return {"RELAY_WS_LEGACY_ACK_GRACE_MS": "300"}


def add_inbox_entry(
    redis_client: redis.Redis,
    persona_key: str,
    data: bytes,
    *,
    index: int = 0,
    entry_id: str = "*",
    attestation: dict[str, str] | None = None,
) -> InboxEntry:
    """What the ingress does: XADD + INCRBY in one transaction."""
    entry = InboxEntry(
        queue_id="q" + os.urandom(10).hex(),
        recipient_index=index,
        mail_from="sender@example.org",
        rcpt_to=f"{persona_key}+tag@relay.test",
        data=data,
        received_at_ms=1,
        client_ip="192.0.2.1",
        auth_attestation=attestation,
    )
    pipe = redis_client.pipeline(transaction=True)
    pipe.xadd(keys.inbox(persona_key), {b"m": entry.pack()}, id=entry_id)
    pipe.incrby(keys.inbox_bytes(persona_key), len(data))
    pipe.execute()
    return entry


def wake(redis_client: redis.Redis, tunnel: RunningTunnel, persona_key: str) -> None:
    redis_client.publish(keys.node_channel(tunnel.config.node_id), Wakeup(WakeupKind.INBOX, persona_key).encode())


def inbox_empty(redis_client: redis.Redis, persona_key: str) -> bool:
    return redis_client.xlen(keys.inbox(persona_key)) == 0


async def test_offline_entries_are_delivered_on_connect_in_64k_chunks_byte_exact(
    tunnel: RunningTunnel, redis_client: redis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    big = os.urandom(150 * 1024) + b"\r\n.\r\nnot the end\r\n"
    attestation = {"keyId": "k1", "payloadBase64": "cA==", "signatureBase64": "c2ln"}
    first = add_inbox_entry(redis_client, pk, big, attestation=attestation)
    second = add_inbox_entry(redis_client, pk, b"", index=1)
    client = await GatewayClient.open(tunnel.url)
    await client.authenticate(passport, capabilities=ACK)
    got_first = await client.next_inbound()
    assert got_first.stream_id == first.stream_id
    assert got_first.data == big
    assert got_first.chunk_sizes == [65536, 65536, len(big) - 131072]
    assert got_first.start == protocol.SmtpStart(first.mail_from, first.rcpt_to, attestation)
    await client.ack(got_first.stream_id)
    got_second = await client.next_inbound()
    assert (got_second.stream_id, got_second.data, got_second.start.auth_attestation) == (
        second.stream_id,
        b"",
        None,
    )
    await client.ack(got_second.stream_id)
    await eventually(lambda: inbox_empty(redis_client, pk), message="acked entries not removed")
    assert int(cast(bytes, redis_client.get(keys.inbox_bytes(pk)))) == 0
    await client.close()


async def test_entry_stays_until_smtp_ack(tunnel: RunningTunnel, redis_client: redis.Redis) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    client = await GatewayClient.open(tunnel.url)
    await client.authenticate(passport, capabilities=ACK)
    entry = add_inbox_entry(redis_client, pk, b"Subject: hi\r\n\r\nbody\r\n")
    wake(redis_client, tunnel, pk)
    message = await client.next_inbound()
    assert message.stream_id == entry.stream_id
    # Delivered but not acknowledged: still in the stream and pending in the group.
    assert redis_client.xlen(keys.inbox(pk)) == 1
    assert cast(dict[str, Any], redis_client.xpending(keys.inbox(pk), keys.INBOX_GROUP))["pending"] == 1
    await client.ack(message.stream_id)
    await eventually(lambda: inbox_empty(redis_client, pk), message="entry not removed after smtp_ack")
    assert cast(dict[str, Any], redis_client.xpending(keys.inbox(pk), keys.INBOX_GROUP))["pending"] == 0
    await client.close()


async def test_legacy_gateway_entry_removed_only_after_pong(tunnel: RunningTunnel, redis_client: redis.Redis) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    entry = add_inbox_entry(redis_client, pk, b"legacy body\r\n")
    raw = await RawWsClient.open("127.0.0.1", tunnel.port)
    auth_ok = await raw.authenticate(passport)
    assert "capabilities" not in auth_ok
    kinds = []
    for _ in range(3):
        opcode, payload = await raw.next_frame()
        assert opcode == Opcode.BINARY
        kinds.append(protocol.decode_frame(payload).frame_type)
    assert kinds == [protocol.FrameType.SMTP_START, protocol.FrameType.SMTP_CHUNK, protocol.FrameType.SMTP_END]
    opcode, ping_payload = await raw.next_frame()
    assert opcode == Opcode.PING
    # We have not answered the ping: the relay must still hold the message.
    assert redis_client.xlen(keys.inbox(pk)) == 1
    await raw.pong(ping_payload)
    await eventually(lambda: inbox_empty(redis_client, pk), message="entry not removed after pong")
    assert entry.stream_id  # the id the gateway would deduplicate by
    raw.close()


async def test_unacked_message_is_sent_again_with_same_stream_id_after_reconnect(
    tunnel: RunningTunnel, redis_client: redis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    entry = add_inbox_entry(redis_client, pk, b"resend me\r\n")
    first = await GatewayClient.open(tunnel.url)
    await first.authenticate(passport, capabilities=ACK)
    assert (await first.next_inbound()).stream_id == entry.stream_id
    await first.abort()  # between smtp_end and smtp_ack
    second = await GatewayClient.open(tunnel.url)
    await second.authenticate(passport, capabilities=ACK)
    again = await second.next_inbound()
    assert (again.stream_id, again.data) == (entry.stream_id, b"resend me\r\n")
    await second.ack(again.stream_id)
    await eventually(lambda: inbox_empty(redis_client, pk))
    await second.close()


async def test_messages_arrive_in_order_and_without_wakeup(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, tunnel_env: dict[str, str], rate_clock: ManualClock
) -> None:
    # No wake-up published: the periodic sweep finds them (pub/sub is only a shortcut). The sweep
    # runs every 0.5 s here rather than the default 5 s, which the test would otherwise wait out.
    tunnel = await RunningTunnel(redis_server.url, rate_clock=rate_clock, **tunnel_env, **QUICK_SWEEP).start()
    try:
        passport = Passport.generate()
        pk = passport.persona_key
        client = await GatewayClient.open(tunnel.url)
        await client.authenticate(passport, capabilities=ACK)
        entries = [add_inbox_entry(redis_client, pk, f"message {n}\r\n".encode()) for n in range(12)]
        received = []
        for _ in entries:
            message = await client.next_inbound()
            received.append(message.stream_id)
            await client.ack(message.stream_id)
        assert received == [entry.stream_id for entry in entries]
        await eventually(lambda: inbox_empty(redis_client, pk))
        await client.close()
    finally:
        await tunnel.stop()


async def test_entries_older_than_retention_are_trimmed_not_delivered(
    tunnel: RunningTunnel, redis_client: redis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    add_inbox_entry(redis_client, pk, b"ancient", entry_id="1000-0")
    fresh = add_inbox_entry(redis_client, pk, b"fresh")
    client = await GatewayClient.open(tunnel.url)
    await client.authenticate(passport, capabilities=ACK)
    message = await client.next_inbound()
    assert message.stream_id == fresh.stream_id
    await client.ack(message.stream_id)
    await eventually(lambda: inbox_empty(redis_client, pk))
    assert int(cast(bytes, redis_client.get(keys.inbox_bytes(pk)))) == 0
    await client.close()


async def test_outbound_role_socket_gets_no_inbound_mail(tunnel: RunningTunnel, redis_client: redis.Redis) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    add_inbox_entry(redis_client, pk, b"for the inbound socket")
    outbound = await GatewayClient.open(tunnel.url)
    await outbound.authenticate(passport, role="outbound", capabilities=ACK)
    assert redis_client.get(keys.owner(pk)) is None
    inbound = await GatewayClient.open(tunnel.url)
    await inbound.authenticate(passport, capabilities=ACK)
    message = await inbound.next_inbound()
    assert message.data == b"for the inbound socket"
    assert outbound.inbound.empty()
    await inbound.close()
    await outbound.close()


async def test_unacked_message_is_sent_again_after_ack_timeout(redis_server: EmbeddedRedis) -> None:
    running = await RunningTunnel(redis_server.url, RELAY_WS_ACK_TIMEOUT_MS="300").start()
    try:
        passport = Passport.generate()
        redis_client = redis.Redis.from_url(redis_server.url)
        entry = add_inbox_entry(redis_client, passport.persona_key, b"again\r\n")
        client = await GatewayClient.open(running.url)
        await client.authenticate(passport, capabilities=ACK)
        assert (await client.next_inbound()).stream_id == entry.stream_id
        again = await client.next_inbound(timeout_s=5)  # no ack sent: same socket, same stream id
        assert again.stream_id == entry.stream_id
        await client.ack(again.stream_id)
        await eventually(lambda: inbox_empty(redis_client, passport.persona_key))
        await client.close()
        redis_client.close()
    finally:
        await running.stop()


async def test_silent_socket_is_closed_1001_and_ponging_one_is_kept(redis_server: EmbeddedRedis) -> None:
    running = await RunningTunnel(
        redis_server.url, RELAY_WS_HEARTBEAT_INTERVAL_MS="100", RELAY_WS_IDLE_TIMEOUT_MS="400"
    ).start()
    try:
        silent = await RawWsClient.open("127.0.0.1", running.port)
        lively = await GatewayClient.open(running.url)  # websockets answers pings by itself
        while True:
            opcode, payload = await silent.next_frame(timeout_s=5)
            if opcode == Opcode.CLOSE:
                break
            assert opcode == Opcode.PING  # heartbeat pings, which this client never answers
        assert int.from_bytes(payload[:2], "big") == 1001
        # Three idle periods later the ponging client is still served.
        await asyncio.sleep(1.2)
        await lively.send_json({"type": "auth_challenge_request", "publicKeyBase32": Passport.generate().persona_key})
        assert (await lively.next_text())["type"] == "auth_challenge"
        await lively.close()
        silent.close()
    finally:
        await running.stop()


async def test_unreadable_entry_is_dropped_and_does_not_block_the_inbox(
    tunnel: RunningTunnel, redis_client: redis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    redis_client.xadd(keys.inbox(pk), {b"m": b"\xc1 not msgpack"})
    redis_client.xadd(keys.inbox(pk), {b"other": b"field"})
    poison = InboxEntry("q" * 300, 0, "a@b.c", f"{pk}@relay.test", b"x", 1, "192.0.2.1")
    redis_client.xadd(keys.inbox(pk), {b"m": poison.pack()})
    good = add_inbox_entry(redis_client, pk, b"still delivered")
    client = await GatewayClient.open(tunnel.url)
    await client.authenticate(passport, capabilities=ACK)
    message = await client.next_inbound()
    assert message.stream_id == good.stream_id
    await client.ack(message.stream_id)
    await eventually(lambda: inbox_empty(redis_client, pk))
    await client.close()


async def test_permessage_deflate_is_declined_when_the_gateway_offers_it(tunnel: RunningTunnel) -> None:
    client = await GatewayClient.open(tunnel.url, compression="deflate")
    assert client.ws.response is not None
    assert "Sec-WebSocket-Extensions" not in client.ws.response.headers
    await client.authenticate(Passport.generate())
    await client.close()


async def test_an_idle_authenticated_socket_keeps_at_most_two_tasks(tunnel: RunningTunnel) -> None:
    """Keepalive and sweeps are node-wide loops: an idle socket holds only websockets' handler
    task and its (parked) inbox delivery, no timer of its own."""
    sockets = 20
    before = len(asyncio.all_tasks())
    clients = []
    for _ in range(sockets):
        client = await GatewayClient.open(tunnel.url)
        await client.authenticate(Passport.generate(), capabilities=ACK)
        clients.append(client)
    await asyncio.sleep(0)  # lets cancelled auth deadlines finish
    client_tasks = sockets  # each test client's reader (websockets' client runs none without keepalive)
    per_socket = (len(asyncio.all_tasks()) - before - client_tasks) / sockets
    print(f"tasks per idle socket: {per_socket}")
    assert per_socket < 2.5, per_socket  # a timer task per socket would make it >= 3
    for client in clients:
        await client.close()


@pytest.mark.parametrize("size", [0, 1, protocol.MAX_CHUNK_BYTES, protocol.MAX_CHUNK_BYTES + 1, 200_000])
def test_lazy_frames_are_the_codec_frames(size: int) -> None:
    from services.tunnel.inbox import message_frames

    start = protocol.SmtpStart("a@example.org", "b@relay.test", {"v": "1"})
    message = os.urandom(size)
    assert list(message_frames("q1.0", start, message)) == protocol.encode_message_frames("q1.0", start, message)


async def test_a_woken_message_costs_one_read_and_one_ack_transaction(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    """After a short read the delivery waits for the next wake-up instead of reading the (empty)
    stream again: per message one XREADGROUP, then XACK + XDEL + DECRBY on the ack."""
    import redis.asyncio as aioredis

    tunnel = await RunningTunnel(redis_server.url, RELAY_WS_RESULTS_SWEEP_INTERVAL_MS="600000").start()
    monitor_client = aioredis.Redis.from_url(redis_server.url)
    try:
        passport = Passport.generate()
        pk = passport.persona_key
        client = await GatewayClient.open(tunnel.url)
        await client.authenticate(passport, capabilities=ACK)
        async with monitor_client.monitor() as monitor:
            for n in range(3):
                entry = add_inbox_entry(redis_client, pk, f"message {n}\r\n".encode())
                redis_client.publish(keys.node_channel(tunnel.config.node_id), Wakeup(WakeupKind.INBOX, pk).encode())
                assert (await client.next_inbound()).stream_id == entry.stream_id
                await client.ack(entry.stream_id)
                await eventually(lambda: inbox_empty(redis_client, pk))
            redis_client.echo("end-of-deliveries")
            commands: list[str] = []
            while True:
                info = await asyncio.wait_for(monitor.next_command(), 5)
                if "end-of-deliveries" in info["command"]:
                    break
                name = info["command"].split(" ", 1)[0].upper()
                if name in ("XREADGROUP", "XAUTOCLAIM", "XRANGE", "XACK", "XDEL", "DECRBY"):
                    commands.append(name)
        await client.close()
    finally:
        await monitor_client.aclose()
        await tunnel.stop()
    assert commands == ["XREADGROUP", "XACK", "XDEL", "DECRBY"] * 3, commands
