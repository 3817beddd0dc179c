"""Issue 9 item 3 (inbound): large mail queued for gateways that read slowly or not at all must
not pile up in a real `protege-relay tunnel` process's memory, while an honest gateway is served.

The attack as reported: 3 personas with 8 x 9.5 MB queued each; their gateways authenticate and
then never read (two raw sockets that do not even answer pings) or read one frame at a time
(one). Before bodies were streamed from Redis, the tunnel loaded 8 whole entries per socket
before its first send: RSS went 47 -> 311 MiB. Now a socket holds about two GETRANGE blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any, cast

import redis

from protege_relay.embedded_redis import EmbeddedRedis, free_port
from shared import keys
from shared.identity import Passport
from tests.support.inbox import queue_message
from tests.support.ws_client import GatewayClient, RawWsClient, eventually

ATTACK_PERSONAS = 3
ENTRIES_PER_PERSONA = 8
BODY_BYTES = 9_500_000
GROWTH_LIMIT_MIB = 64  # today's main grows by several hundred MiB here
HONEST_IP = "127.0.0.2"
ATTACK_HOLD_S = 3.0  # how long the attack runs after the honest gateway was served
SAMPLE_INTERVAL_S = 0.05


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


class RssSampler:
    """Peak resident size of a process, sampled from /proc while the attack runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before_kib = status_kib(pid, "VmRSS")
        self.peak_kib = self.before_kib
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS"))
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS"))


async def slow_reader(client: RawWsClient) -> int:
    """Reads one frame every 20 ms and never acknowledges; returns the frames read."""
    frames = 0
    with contextlib.suppress(asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
        while True:
            await client.next_frame(timeout_s=30)
            frames += 1
            await asyncio.sleep(0.02)
    return frames


async def test_large_mail_for_gateways_that_read_slowly_or_not_at_all_keeps_tunnel_memory_bounded(
    spawn: Any, redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    port = free_port()
    node_id = f"inbound-memory-{port}"
    process = spawn("tunnel", port, RELAY_PORT=str(port), RELAY_NODE_ID=node_id)
    pid = process.process.pid
    url = f"ws://127.0.0.1:{port}/ws"

    attackers = [Passport.generate() for _ in range(ATTACK_PERSONAS)]
    body = os.urandom(BODY_BYTES - 2) + b"\r\n"
    for passport in attackers:
        for _ in range(ENTRIES_PER_PERSONA):
            await queue_message(redis_server.url, passport.persona_key, body)

    honest_passport = Passport.generate()
    honest = await GatewayClient.open(url, local_addr=(HONEST_IP, 0))
    await honest.authenticate(honest_passport, capabilities=["inbound_ack"])
    sampler = RssSampler(pid)
    sampler.start()

    sockets = [await RawWsClient.open("127.0.0.1", port) for _ in attackers]
    # Two legacy sockets that never read (nor answer pings), one announcing inbound_ack that reads slowly.
    for passport, socket in zip(attackers, sockets, strict=True):
        capabilities = ["inbound_ack"] if socket is sockets[-1] else None
        auth_ok = await socket.authenticate(passport, capabilities=capabilities)
        assert auth_ok["type"] == "auth_ok", auth_ok
    reading = asyncio.get_running_loop().create_task(slow_reader(sockets[-1]))

    # The honest gateway is served during the attack: a small and a large message, byte-exact.
    honest_pk = honest_passport.persona_key
    small = await queue_message(redis_server.url, honest_pk, b"Subject: during the attack\r\n\r\nhello\r\n")
    large = await queue_message(redis_server.url, honest_pk, os.urandom(BODY_BYTES))
    for expected in (small, large):
        got = await honest.next_inbound(timeout_s=60)
        assert (got.stream_id, got.data) == (expected.stream_id, expected.data)
        await honest.ack(got.stream_id)
    await eventually(lambda: redis_client.xlen(keys.inbox(honest_pk)) == 0, message="honest mail not removed")
    loop = asyncio.get_running_loop()
    hold_until = loop.time() + ATTACK_HOLD_S
    await eventually(lambda: loop.time() >= hold_until, timeout_s=ATTACK_HOLD_S + 5)
    assert process.process.poll() is None, process.logs()[-2000:]
    await sampler.stop()

    reading.cancel()
    frames_read = await reading
    for socket in sockets:
        socket.close()
    await eventually(
        lambda: all(not redis_client.exists(keys.owner(p.persona_key)) for p in attackers),
        timeout_s=20,
        message="attack sockets not released",
    )
    after_kib = status_kib(pid, "VmRSS")
    growth_mib = (sampler.peak_kib - sampler.before_kib) / 1024
    print(
        f"\ntunnel RSS before {sampler.before_kib / 1024:.1f} MiB, peak {sampler.peak_kib / 1024:.1f} MiB "
        f"(+{growth_mib:.1f} MiB), after {after_kib / 1024:.1f} MiB; "
        f"{ATTACK_PERSONAS} personas x {ENTRIES_PER_PERSONA} x {BODY_BYTES / 1e6:.1f} MB queued, "
        f"slow reader got {frames_read} frames"
    )
    assert growth_mib <= GROWTH_LIMIT_MIB, f"tunnel RSS grew by {growth_mib:.1f} MiB"
    # Nothing of the attackers' mail was lost: none of it was acknowledged.
    for passport in attackers:
        assert redis_client.xlen(keys.inbox(passport.persona_key)) == ENTRIES_PER_PERSONA
        assert (
            int(cast(bytes, redis_client.get(keys.inbox_bytes(passport.persona_key))))
            == ENTRIES_PER_PERSONA * BODY_BYTES
        )
    await honest.close()
