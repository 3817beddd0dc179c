"""Inbound delivery in batches (issue 11): several entries per XREADGROUP, acknowledgements
removed together (and with the next read), one socket write per message. Batching must not
change what the gateway sees: every entry once, in order, and whatever was not acknowledged
when a socket dropped comes again, under the same stream id, to the next socket."""

from __future__ import annotations

import asyncio
import re
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from protege_relay.embedded_redis import EmbeddedRedis
from services.tunnel.inbox import WINDOW
from services.tunnel.wsio import CoalescingConnection, send_binary_messages
from shared import keys
from shared.identity import Passport
from tests.support.wait import eventually
from tests.support.ws_client import GatewayClient, RunningTunnel
from tests.tunnel.test_tunnel_inbound import ACK, add_inbox_entry, inbox_empty, wake

BACKLOG = 20


async def test_a_backlog_is_read_in_batches_and_delivered_in_order_each_once(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    """20 entries waiting when the gateway connects: read WINDOW at a time (COUNT 8), each
    delivered once and in order, all removed; far fewer reads than messages."""
    tunnel = await RunningTunnel(redis_server.url, RELAY_WS_RESULTS_SWEEP_INTERVAL_MS="600000").start()
    monitor_client = aioredis.Redis.from_url(redis_server.url)
    try:
        passport = Passport.generate()
        pk = passport.persona_key
        entries = [add_inbox_entry(redis_client, pk, f"message {n}\r\n".encode()) for n in range(BACKLOG)]
        async with monitor_client.monitor() as monitor:
            client = await GatewayClient.open(tunnel.url)
            await client.authenticate(passport, capabilities=ACK)
            received = []
            for _ in entries:
                message = await client.next_inbound()
                received.append(message.stream_id)
                await client.ack(message.stream_id)
            await eventually(lambda: inbox_empty(redis_client, pk), message="acknowledged entries not removed")
            redis_client.echo("end-of-deliveries")
            reads: list[str] = []
            removals = 0
            while True:
                info = await asyncio.wait_for(monitor.next_command(), 5)
                command = info["command"]
                if "end-of-deliveries" in command:
                    break
                name = command.split(" ", 1)[0].upper()
                if name == "XREADGROUP" and keys.inbox(pk) in command:
                    reads.append(command)
                elif name == "XDEL" and keys.inbox(pk) in command:
                    removals += 1
        # Nothing else may arrive: every entry was delivered exactly once.
        with pytest.raises(TimeoutError):
            await client.next_inbound(timeout_s=0.3)
        await client.close()
    finally:
        await monitor_client.aclose()
        await tunnel.stop()
    assert received == [entry.stream_id for entry in entries]
    assert removals == BACKLOG
    counts = [int(match.group(1)) for read in reads if (match := re.search(r"COUNT (\d+)", read))]
    print(f"{BACKLOG} messages: {len(reads)} XREADGROUP calls, COUNT {counts}")
    assert counts and counts[0] == WINDOW, reads
    assert len(reads) <= BACKLOG // 2, reads


async def test_a_batch_cut_by_a_disconnect_is_sent_again_from_the_first_unacknowledged(
    tunnel: RunningTunnel, redis_client: redis.Redis
) -> None:
    """Six messages sent in one batch, two acknowledged, then the gateway dies: the next socket
    gets exactly the other four, in order, under their stream ids."""
    passport = Passport.generate()
    pk = passport.persona_key
    entries = [add_inbox_entry(redis_client, pk, f"message {n}\r\n".encode()) for n in range(6)]
    first = await GatewayClient.open(tunnel.url)
    await first.authenticate(passport, capabilities=ACK)
    got = [await first.next_inbound() for _ in entries]  # all in flight at once (window 8)
    assert [m.stream_id for m in got] == [e.stream_id for e in entries]
    for message in got[:2]:
        await first.ack(message.stream_id)
    await eventually(lambda: redis_client.xlen(keys.inbox(pk)) == 4, message="two acknowledged entries not removed")
    await first.abort()

    second = await GatewayClient.open(tunnel.url)
    await second.authenticate(passport, capabilities=ACK)
    again = [await second.next_inbound() for _ in entries[2:]]
    assert [(m.stream_id, m.data) for m in again] == [(e.stream_id, e.data) for e in entries[2:]]
    for message in again:
        await second.ack(message.stream_id)
    await eventually(lambda: inbox_empty(redis_client, pk))
    with pytest.raises(TimeoutError):
        await second.next_inbound(timeout_s=0.3)
    await second.close()


async def test_acknowledgements_out_of_order_remove_each_entry_once(
    tunnel: RunningTunnel, redis_client: redis.Redis
) -> None:
    """Acks for later messages before the oldest one's: all are removed (the byte count back to
    zero), none is sent again."""
    passport = Passport.generate()
    pk = passport.persona_key
    entries = [add_inbox_entry(redis_client, pk, f"message {n}\r\n".encode() * (n + 1)) for n in range(4)]
    client = await GatewayClient.open(tunnel.url)
    await client.authenticate(passport, capabilities=ACK)
    got = [await client.next_inbound() for _ in entries]
    for message in reversed(got):
        await client.ack(message.stream_id)
    await eventually(lambda: inbox_empty(redis_client, pk))
    assert int(cast(bytes, redis_client.get(keys.inbox_bytes(pk)) or b"0")) == 0  # removed with the entries
    with pytest.raises(TimeoutError):
        await client.next_inbound(timeout_s=0.3)
    await client.close()


async def test_removals_after_redis_lost_its_scripts_still_remove_and_read_on(
    tunnel: RunningTunnel, redis_client: redis.Redis
) -> None:
    """Redis loses its scripts (restart, flush) while a message is in flight: the removal sent
    after its ack (alone or with the next read) is answered NOSCRIPT, loaded and sent again,
    and the next message is still read and delivered."""
    passport = Passport.generate()
    pk = passport.persona_key
    client = await GatewayClient.open(tunnel.url)
    await client.authenticate(passport, capabilities=ACK)
    first_entry = add_inbox_entry(redis_client, pk, b"first\r\n")
    wake(redis_client, tunnel, pk)
    first = await client.next_inbound()
    redis_client.script_flush()
    second_entry = add_inbox_entry(redis_client, pk, b"second\r\n")
    wake(redis_client, tunnel, pk)  # this wake-up meets the ack: the removal rides with the next read
    await client.ack(first.stream_id)
    second = await client.next_inbound()
    await client.ack(second.stream_id)
    await eventually(lambda: inbox_empty(redis_client, pk), message="entries not removed after the script flush")
    await client.close()
    assert [first.stream_id, second.stream_id] == [first_entry.stream_id, second_entry.stream_id]


async def test_several_messages_leave_in_one_socket_write_in_order() -> None:
    """`send_binary_messages` on a `CoalescingConnection`: three binary messages, one transport
    write, received by a stock websockets client as three messages in order."""
    writes: list[int] = []
    sent = asyncio.get_running_loop().create_future()

    class CountingTransport:
        """The real transport, counting the writes handed to it (messages per write)."""

        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def write(self, data: bytes) -> None:
            writes.append(1)
            self._inner.write(data)

        def writelines(self, data: list[bytes]) -> None:
            writes.append(len(data))
            self._inner.writelines(data)

    async def handler(ws: ServerConnection) -> None:
        transport = ws.transport
        ws.transport = CountingTransport(transport)  # type: ignore[assignment]
        await send_binary_messages(ws, [b"start", memoryview(b"--chunk--")[2:7], b"end"])
        ws.transport = transport
        sent.set_result(None)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, create_connection=CoalescingConnection, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/", compression=None) as client:
            received = [await asyncio.wait_for(client.recv(), 5) for _ in range(3)]
            await asyncio.wait_for(sent, 5)
    assert received == [b"start", b"chunk", b"end"]
    assert writes == [3], writes  # one writelines carrying the three frames
