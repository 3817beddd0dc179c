"""The ingress's Redis round trips per message, as Redis sees them (MONITOR).

A message is answered 250 only after Redis confirmed it, so every round trip on the way is
latency the sender waits for and CPU on both sides. The budget (services/ingress/handler.py):
one per connection (connection rate), one per RCPT (persona facts, plus the transaction's
message count at its first RCPT), one at the final dot (the enqueue script, which also wakes
the owning tunnel node; nothing runs after the 250). Top-level commands are listed; those a
script runs inside itself are MONITORed as client type `lua` and listed apart.
"""

from __future__ import annotations

import asyncio
import smtplib
from typing import Any

import redis
import redis.asyncio as aioredis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.wakeup import Wakeup, WakeupKind
from tests.support.ingress import (
    InProcessIngress,
    address,
    inbox_entries,
    mark_seen,
    new_persona,
)

# and INFO: the admission rule's memory sample, at most once a second (services/ingress/memory.py)
HEARTBEAT = ("HSET RELAY:NODEINFO", "EXPIRE RELAY:NODEINFO", "SADD RELAY:NODES", "SCRIPT", "PING", "INFO")
END_MARKER = "end-of-message"
MONITOR_WAIT_S = 10


def send(port: int, rcpt_to: list[str], body: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("sender.example")
        assert client.mail("s@example.org")[0] == 250
        for recipient in rcpt_to:
            assert client.rcpt(recipient)[0] == 250
        return client.data(b"Subject: round trips\r\n\r\n" + body + b"\r\n")


async def commands_of_one_message(
    redis_url: str, port: int, rcpt_to: list[str], body: bytes
) -> tuple[list[str], list[str], tuple[int, bytes]]:
    """(top-level commands, commands run inside scripts, the DATA reply) from connect to 250."""
    monitor_client = aioredis.Redis.from_url(redis_url)
    try:
        async with monitor_client.monitor() as monitor:
            reply = await asyncio.to_thread(send, port, rcpt_to, body)
            marker = aioredis.Redis.from_url(redis_url)
            await marker.echo(END_MARKER)
            await marker.aclose()
            top_level: list[str] = []
            in_scripts: list[str] = []
            while True:
                info: dict[str, Any] = await asyncio.wait_for(monitor.next_command(), MONITOR_WAIT_S)
                command = str(info["command"])
                if END_MARKER in command:
                    break
                name = command.split(" ", 1)[0].upper()
                if info["client_type"] == "lua":
                    in_scripts.append(name)
                elif not command.upper().startswith(HEARTBEAT):
                    top_level.append(name)
    finally:
        await monitor_client.aclose()
    return top_level, in_scripts, reply


RCPT_CHECK = ["EXISTS", "XLEN", "GET"]
MESSAGE_COUNT = ["EXISTS", "INCRBY", "PEXPIRE", "GET"]  # + the IP's bytes this hour
FINAL_DOT = ["EVALSHA", "INCRBY", "EXPIRE"]  # the script, pipelined with the IP's byte count
CONNECTION_RATE = ["EXISTS", "INCRBY", "PEXPIRE"]


async def test_one_persona_message_is_three_round_trips_from_connect_to_250(
    ingress: InProcessIngress, redis_client: redis.Redis, redis_server: EmbeddedRedis
) -> None:
    persona = new_persona()
    mark_seen(redis_client, persona)
    redis_client.set(keys.owner(persona), b"node-a", ex=60)
    assert send(ingress.port, [address(persona)], b"warm-up")[0] == 250  # the script is loaded

    top_level, in_script, reply = await commands_of_one_message(
        redis_server.url, ingress.port, [address(persona)], b"measured"
    )

    assert reply[0] == 250
    # connection rate | RCPT: persona facts + the message count | final dot: one script
    assert top_level == [*CONNECTION_RATE, *RCPT_CHECK, *MESSAGE_COUNT, *FINAL_DOT], top_level
    assert in_script == ["GET", "XADD", "INCRBY", "SET", "GET", "PUBLISH"], in_script


async def test_the_wake_up_is_published_before_the_250(
    ingress: InProcessIngress, redis_client: redis.Redis, redis_server: EmbeddedRedis
) -> None:
    persona = new_persona()
    mark_seen(redis_client, persona)
    redis_client.set(keys.owner(persona), b"node-a", ex=60)
    subscriber = aioredis.Redis.from_url(redis_server.url)
    pubsub = subscriber.pubsub()
    try:
        await pubsub.subscribe(keys.node_channel("node-a"))
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        for attempt in range(2):  # the first acceptance, then its retry (accepted before)
            assert (await asyncio.to_thread(send, ingress.port, [address(persona)], b"same"))[0] == 250
            # already published when the 250 came: no waiting for a background task
            message = await pubsub.get_message(timeout=0.01)
            assert message is not None, f"attempt {attempt}: no wake-up by the time of the 250"
            assert Wakeup.decode(message["data"]) == Wakeup(WakeupKind.INBOX, persona)
    finally:
        await pubsub.aclose()
        await subscriber.aclose()
    assert redis_client.xlen(keys.inbox(persona)) == 1


async def test_two_personas_cost_one_more_round_trip_not_a_transaction_each(
    ingress: InProcessIngress, redis_client: redis.Redis, redis_server: EmbeddedRedis
) -> None:
    first, second = new_persona(), new_persona()
    for persona in (first, second):
        mark_seen(redis_client, persona)
    assert send(ingress.port, [address(first)], b"warm-up")[0] == 250

    top_level, in_script, reply = await commands_of_one_message(
        redis_server.url, ingress.port, [address(first), address(second)], b"measured"
    )

    assert reply[0] == 250
    # the first persona's script decides the queue id; the second is written with it
    assert top_level == [*CONNECTION_RATE, *RCPT_CHECK, *MESSAGE_COUNT, *RCPT_CHECK, *FINAL_DOT, "EVALSHA"], top_level
    assert in_script.count("XADD") == 2 and "PUBLISH" not in in_script  # nobody owns them
    queue_id = reply[1].decode().rsplit(" ", 1)[1]
    assert [entry.stream_id for entry in inbox_entries(redis_client, first)[1:]] == [f"{queue_id}.0"]
    assert [entry.stream_id for entry in inbox_entries(redis_client, second)] == [f"{queue_id}.1"]


async def test_the_first_message_after_a_script_flush_still_gets_250(
    ingress: InProcessIngress, redis_client: redis.Redis
) -> None:
    """A Redis restart forgets scripts: NOSCRIPT loads it again instead of failing the message."""
    persona = new_persona()
    mark_seen(redis_client, persona)
    redis_client.script_flush()
    assert (await asyncio.to_thread(send, ingress.port, [address(persona)], b"after flush"))[0] == 250
    assert redis_client.xlen(keys.inbox(persona)) == 1
