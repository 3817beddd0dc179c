"""Issue 9 against a real `protege-relay tunnel` process: header From spoofing (item 1), memory
before authentication (item 2) and memory of outbound streams (item 3, outbound half). Each
attack runs while an honest gateway, connected beforehand, keeps being served (an inbound
message during and after the attack, a fresh authentication after it: `while_serving_honest`),
and the memory attacks print the tunnel's RSS (from /proc) before, at the peak and after.

Addresses: the attacks come from 127.0.0.2-4, the honest gateway from 127.0.0.5 and .6, honest
outbound mail from 127.0.0.7 (all of 127.0.0.0/8 is local on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis
from arq.connections import RedisSettings, create_pool
from websockets.frames import Opcode

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys, protocol
from shared.identity import Passport
from shared.payloads import OutboundJob
from tests.support.ws_client import GatewayClient, RawWsClient
from tests.tunnel.test_abuse_tunnel import (
    DOMAIN,
    Target,
    open_client,
    start_target,
    upgrade_request,
    while_serving_honest,
)

ATTACK_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
HONEST_IPS = ("127.0.0.5", "127.0.0.6")
HONEST_SENDER_IP = "127.0.0.7"
MIB = 1024 * 1024
RSS_GROWTH_BOUND = 64 * MIB
SAMPLE_PERIOD_S = 0.02


# --- measuring ---------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssSampler:
    """The tunnel's RSS before (`baseline`), at its highest while sampling (`peak`), and after."""

    def __init__(self, target: Target) -> None:
        self.pid = target.pid
        self.baseline = rss_bytes(self.pid)
        self.peak = self.baseline
        self.after = self.baseline

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[RssSampler]:
        async def sample() -> None:
            while True:
                self.peak = max(self.peak, rss_bytes(self.pid))
                await asyncio.sleep(SAMPLE_PERIOD_S)  # a sampling period, not synchronisation

        task = asyncio.get_running_loop().create_task(sample())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.peak = max(self.peak, rss_bytes(self.pid))
            self.after = rss_bytes(self.pid)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def report(self, what: str) -> str:
        return (
            f"{what}: tunnel RSS baseline {self.baseline / MIB:.1f} MiB, peak {self.peak / MIB:.1f} MiB "
            f"(+{self.growth / MIB:.1f} MiB, bound +{RSS_GROWTH_BOUND // MIB} MiB), after {self.after / MIB:.1f} MiB"
        )


async def queued_jobs(redis_server: EmbeddedRedis) -> list[OutboundJob]:
    arq = await create_pool(RedisSettings.from_dsn(redis_server.url))
    try:
        jobs = await arq.queued_jobs(queue_name=keys.EGRESS_QUEUE)
    finally:
        await arq.aclose()
    return [OutboundJob.unpack(job.args[0]) for job in jobs]


async def until_queued(redis_server: EmbeddedRedis, stream_id: str, timeout_s: float = 20) -> OutboundJob:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        jobs = {job.stream_id: job for job in await queued_jobs(redis_server)}
        if stream_id in jobs:
            return jobs[stream_id]
        assert loop.time() < deadline, f"stream {stream_id} was not queued"
        await asyncio.sleep(0.05)  # polling interval


def own_message(persona_key: str, body: bytes = b"hello\r\n", author: str | None = None) -> bytes:
    author = author or f"{persona_key}@{DOMAIN}"
    return f"From: {author}\r\nTo: a@example.org\r\nSubject: test\r\n\r\n".encode() + body


async def barrier(client: GatewayClient) -> None:
    """The tunnel handles a socket's messages in order: once it answered this ping, it has
    handled everything sent before it."""
    await client.send_json({"type": "ping"})
    await client.next_of_type("pong", timeout_s=60)


async def honest_outbound(target: Target, redis_server: EmbeddedRedis) -> None:
    """An honest persona's message is queued for the egress while the attack runs."""
    passport = Passport.generate()
    client = await open_client(target, HONEST_SENDER_IP)
    await client.authenticate(passport, role="outbound")
    stream_id = str(uuid.uuid4())
    message = own_message(passport.persona_key)
    await client.send_outbound(stream_id, f"{passport.persona_key}@{DOMAIN}", "a@example.org", message)
    job = await until_queued(redis_server, stream_id)
    assert job.data == message
    await client.close()


# --- 1. header From ----------------------------------------------------------------------------


async def test_header_from_spoofing_is_refused_and_never_queued(
    spawn: Any, redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    """The three spoofs of the issue (another persona, postmaster, a bank), a foreign Sender, a
    second From and a missing From, all with the persona's own envelope sender: each is
    `failed` `header_from_not_allowed` and nothing but the honest messages reaches the queue."""
    target = start_target(spawn, RELAY_MAIL_DOMAINS=DOMAIN)

    async def attack() -> list[str]:
        abuser, victim = Passport.generate(), Passport.generate()
        client = await open_client(target, ATTACK_IPS[0])
        await client.authenticate(abuser, role="outbound")
        own = f"{abuser.persona_key}@{DOMAIN}"
        spoofs = [
            f"From: {victim.persona_key}@{DOMAIN}\r\n",
            f"From: postmaster@{DOMAIN}\r\n",
            "From: Security <security@bank.example>\r\n",
            f'From: "{own}" <security@bank.example>\r\n',
            f"From: {own}\r\nSender: security@bank.example\r\n",
            f"From: {own}\r\nFrom: security@bank.example\r\n",
            f"From: {own}, security@bank.example\r\n",
            "Subject: no From at all\r\n",
            f"From: {own}\rFrom: security@bank.example\r\n",
        ]
        for head in spoofs:
            stream_id = str(uuid.uuid4())
            await client.send_outbound(stream_id, own, "a@example.org", head.encode() + b"\r\nbody\r\n")
            result = await client.next_of_type("relay_delivery_result")
            assert result == {
                "type": "relay_delivery_result",
                "streamId": stream_id,
                "status": "failed",
                "error": "header_from_not_allowed",
                "expectedSender": own,  # the refusal names the address to use (PROTOCOL.md)
            }, head
        # The persona's own address, with a display name and a +tag, is fine.
        accepted = str(uuid.uuid4())
        author = f"Agent <{abuser.persona_key}+replies@{DOMAIN}>"
        await client.send_outbound(accepted, own, "a@example.org", own_message(abuser.persona_key, author=author))
        await until_queued(redis_server, accepted)
        await honest_outbound(target, redis_server)
        await client.close()
        return [accepted]

    accepted = await while_serving_honest(target, redis_client, attack, honest_ips=HONEST_IPS)
    jobs = await queued_jobs(redis_server)
    assert len(jobs) == 2 and accepted[0] in {job.stream_id for job in jobs}
    for job in jobs:
        assert b"bank.example" not in job.data and b"postmaster" not in job.data


# --- 2. memory before authentication -----------------------------------------------------------

FRAGMENT_BYTES = 1 * MIB
SOCKETS_PER_IP = 100
WRITE_PIECE = 64 * 1024


async def unfinished_fragment(port: int, ip: str, payload: bytes) -> str:
    """Upgrade, then send a text fragment (FIN=0) of FRAGMENT_BYTES that is never finished,
    and wait for the server. How it ended: `close <code>`, `reset`, or the refused status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0))
    try:
        writer.write(upgrade_request(port))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        status = head.split(b" ", 2)[1].decode()
        if status != "101":
            return status
        # Masked as a client must; a zero key leaves the ASCII payload valid UTF-8 as sent.
        header = bytes([Opcode.TEXT.value, 0x80 | 127]) + struct.pack(">Q", len(payload)) + b"\0\0\0\0"
        client = RawWsClient(reader, writer)
        try:
            writer.write(header)
            for start in range(0, len(payload), WRITE_PIECE):
                writer.write(payload[start : start + WRITE_PIECE])
                await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        try:
            while True:
                opcode, body = await client.next_frame(timeout_s=60)
                if opcode == Opcode.CLOSE:
                    return f"close {struct.unpack('>H', body[:2])[0]}"
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return "reset"
    finally:
        writer.transport.abort()


async def test_unfinished_fragments_before_auth_stay_small(spawn: Any, redis_client: redis.Redis) -> None:
    """300 upgraded sockets from 3 addresses, each sending a ~1 MiB text fragment that never
    ends: with defaults, each is closed 1009 at the frame header (ws.maxUnauthenticatedMessageBytes),
    and the tunnel's RSS grows by at most 64 MiB (it grew by ~1 GiB for 1,024 such sockets)."""
    target = start_target(spawn)
    payload = b"x" * FRAGMENT_BYTES

    async def attack() -> tuple[Counter[str], RssSampler]:
        sampler = RssSampler(target)
        async with sampler.sampling():
            outcomes = await asyncio.gather(
                *(unfinished_fragment(target.port, ip, payload) for ip in ATTACK_IPS for _ in range(SOCKETS_PER_IP))
            )
        return Counter(outcomes), sampler

    tally, sampler = await while_serving_honest(target, redis_client, attack, honest_ips=HONEST_IPS)
    print(f"{len(ATTACK_IPS) * SOCKETS_PER_IP} unfinished 1 MiB fragments before auth: {dict(tally)}")
    print(sampler.report("unauthenticated fragments"))
    assert set(tally) <= {"close 1009", "reset"}, tally
    assert tally["close 1009"] > 0
    assert sampler.growth <= RSS_GROWTH_BOUND, sampler.report("unauthenticated fragments")


async def open_tcp(port: int, ip: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0))


async def refused_status(port: int, ip: str) -> str:
    """A new connection's fate when nothing is sent: the status line the server wrote first."""
    reader, writer = await open_tcp(port, ip)
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return head.split(b" ", 2)[1].decode()
    finally:
        writer.transport.abort()


async def test_pending_upgrades_and_unauthenticated_sockets_are_capped_per_ip_and_per_node(
    spawn: Any, redis_client: redis.Redis
) -> None:
    """TCP connections that have not finished the upgrade: at most ws.maxPendingHandshakesPerIp
    per address and ws.maxPendingHandshakes per node, one more gets 503 before anything is
    read; upgraded unauthenticated sockets: at most ws.maxUnauthenticated per node (429).
    Slots come back when the holders go."""
    target = start_target(
        spawn,
        RELAY_WS_MAX_PENDING_HANDSHAKES_PER_IP="5",
        RELAY_WS_MAX_PENDING_HANDSHAKES="12",
        RELAY_WS_MAX_UNAUTHENTICATED="10",
        RELAY_WS_HANDSHAKE_TIMEOUT_MS="30000",
    )

    async def attack() -> None:
        # Pending upgrades: 5 silent connections fill 127.0.0.2's share...
        held = [await open_tcp(target.port, ATTACK_IPS[0]) for _ in range(5)]
        assert await refused_status(target.port, ATTACK_IPS[0]) == "503"
        # ...another address still gets in, until the node's 12 are taken.
        held += [await open_tcp(target.port, ATTACK_IPS[1]) for _ in range(5)]
        held += [await open_tcp(target.port, ATTACK_IPS[2]) for _ in range(2)]
        assert await refused_status(target.port, ATTACK_IPS[2]) == "503"
        for _, writer in held:
            writer.transport.abort()
        # The slots come back once the server has let go of the closed connections.
        await until_status(target.port, ATTACK_IPS[0], "101")
        await until_open_sockets(target, 1)  # the honest gateway's
        # Upgraded unauthenticated sockets: 10 per node, whatever their addresses.
        upgraded = [await upgraded_client(target.port, ATTACK_IPS[n % 3]) for n in range(10)]
        assert await upgrade_status(target.port, HONEST_SENDER_IP) == "429"
        for client in upgraded:
            client.close()
        await until_open_sockets(target, 1)
        assert await upgrade_status(target.port, HONEST_SENDER_IP) == "101"

    await while_serving_honest(target, redis_client, attack, honest_ips=HONEST_IPS)


async def upgrade_status(port: int, ip: str) -> str:
    reader, writer = await open_tcp(port, ip)
    try:
        writer.write(upgrade_request(port))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return head.split(b" ", 2)[1].decode()
    finally:
        writer.transport.abort()


async def upgraded_client(port: int, ip: str) -> RawWsClient:
    reader, writer = await open_tcp(port, ip)
    writer.write(upgrade_request(port))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return RawWsClient(reader, writer)


async def open_sockets(target: Target) -> float:
    """`relay_tunnel_connections_open` from the tunnel's /metrics."""
    reader, writer = await open_tcp(target.port, "127.0.0.1")
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: tunnel\r\n\r\n")
        text = (await asyncio.wait_for(reader.read(), 10)).decode()
    finally:
        writer.transport.abort()
    [value] = [line.split()[1] for line in text.splitlines() if line.startswith("relay_tunnel_connections_open ")]
    return float(value)


async def until_open_sockets(target: Target, wanted: int, timeout_s: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (count := await open_sockets(target)) != wanted:
        assert loop.time() < deadline, f"{count} sockets still open"
        await asyncio.sleep(0.05)  # polling interval


async def until_status(port: int, ip: str, wanted: str, timeout_s: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (status := await upgrade_status(port, ip)) != wanted:
        assert loop.time() < deadline, f"upgrade still answered {status}"
        await asyncio.sleep(0.05)  # polling interval


# --- 3. memory of outbound streams -------------------------------------------------------------

OUTBOUND_SOCKETS = 4
STREAMS_PER_SOCKET = 8
STREAM_BYTES = 8 * MIB
CHUNK_BYTES = 256 * 1024


async def unfinished_streams(client: GatewayClient, persona_key: str, chunk: bytes) -> list[str]:
    """8 streams of 8 MiB each, chunks interleaved, never ended; the stream ids."""
    stream_ids = [str(uuid.uuid4()) for _ in range(STREAMS_PER_SOCKET)]
    own = f"{persona_key}@{DOMAIN}"
    for stream_id in stream_ids:
        await client.ws.send(protocol.encode_start(stream_id, protocol.SmtpStart(own, "a@example.org")))
    head = own_message(persona_key, b"")
    for index in range(STREAM_BYTES // CHUNK_BYTES):
        body = head + chunk[len(head) :] if index == 0 else chunk
        for stream_id in stream_ids:
            await client.ws.send(protocol.encode_frame(protocol.FrameType.SMTP_CHUNK, stream_id, body))
    await barrier(client)
    return stream_ids


async def test_unfinished_outbound_streams_are_budgeted(
    spawn: Any, redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    """One persona opens 4 outbound sockets (a 5th is refused `too_many_sockets`, 4408) with 8
    streams of 8 MiB each that never end: the bytes held are bounded by
    ws.outboundAssemblyBytesPerPersona (24 MiB), every stream past it fails `outbound_busy`,
    RSS grows by at most 64 MiB (256 MiB held before), an honest persona's mail is queued
    meanwhile, and once the sockets are gone the persona sends an 8 MiB message again."""
    target = start_target(spawn, RELAY_MAIL_DOMAINS=DOMAIN)
    chunk = b"y" * CHUNK_BYTES
    abuser = Passport.generate()

    async def attack() -> tuple[Counter[str], RssSampler]:
        sampler = RssSampler(target)
        async with sampler.sampling():
            clients = []
            for _ in range(OUTBOUND_SOCKETS):
                client = await open_client(target, ATTACK_IPS[0])
                await client.authenticate(abuser, role="outbound")
                clients.append(client)
            fifth = await open_client(target, ATTACK_IPS[0])
            challenge = await fifth.request_challenge(abuser.persona_key, role="outbound")
            signature = abuser.sign_base64(challenge["challengeText"].encode())
            refusal = await fifth.respond(abuser.persona_key, challenge["challengeId"], signature, role="outbound")
            assert refusal == {"type": "auth_error", "code": "too_many_sockets"}
            assert await fifth.closed() == (4408, "too_many_sockets")
            sent = await asyncio.gather(*(unfinished_streams(c, abuser.persona_key, chunk) for c in clients))
            await honest_outbound(target, redis_server)
        outcomes: Counter[str] = Counter()
        for client, stream_ids in zip(clients, sent, strict=True):
            texts = [json.loads(raw) for raw in client.raw_texts]  # `barrier` skipped them in `texts`
            results = {t["streamId"]: t["error"] for t in texts if t["type"] == "relay_delivery_result"}
            outcomes.update(results.get(stream_id, "held") for stream_id in stream_ids)
            await client.close()
        return outcomes, sampler

    outcomes, sampler = await while_serving_honest(target, redis_client, attack, honest_ips=HONEST_IPS)
    total = OUTBOUND_SOCKETS * STREAMS_PER_SOCKET
    print(
        f"{OUTBOUND_SOCKETS} outbound sockets x {STREAMS_PER_SOCKET} unfinished {STREAM_BYTES // MIB} MiB streams "
        f"from one persona: {dict(outcomes)}"
    )
    print(sampler.report("unfinished outbound streams"))
    assert set(outcomes) <= {"outbound_busy", "held"} and outcomes["outbound_busy"] >= total - 3, outcomes
    assert sampler.growth <= RSS_GROWTH_BOUND, sampler.report("unfinished outbound streams")
    # The budget came back with the sockets: a whole 8 MiB message from the same persona is queued.
    await send_again_after_budget_returns(target, redis_server, abuser)


async def send_again_after_budget_returns(target: Target, redis_server: EmbeddedRedis, passport: Passport) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:  # the server lets go of the closed sockets (and their slots) asynchronously
        client = await open_client(target, ATTACK_IPS[1])
        challenge = await client.request_challenge(passport.persona_key, role="outbound")
        signature = passport.sign_base64(challenge["challengeText"].encode())
        reply = await client.respond(passport.persona_key, challenge["challengeId"], signature, role="outbound")
        if reply["type"] == "auth_ok":
            break
        assert loop.time() < deadline, reply
        await asyncio.sleep(0.05)  # polling interval
    stream_id = str(uuid.uuid4())
    message = own_message(passport.persona_key, os.urandom(STREAM_BYTES // 2).hex().encode())
    await client.send_outbound(stream_id, f"{passport.persona_key}@{DOMAIN}", "a@example.org", message)
    job = await until_queued(redis_server, stream_id)
    assert job.data == message
    await client.close()
