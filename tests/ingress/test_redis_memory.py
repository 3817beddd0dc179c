"""Redis memory admission (docs/SECURITY.md "Redis memory and admission", issue item 4), against a
real redis-server started with a small `maxmemory` and `noeviction`.

As Redis fills, the persona with the largest backlog is refused first (`452 4.3.1`), honest
small mail keeps being accepted until the high watermark, then everything new is `452 4.3.1`;
every message answered 250 is in Redis. A write that Redis itself refuses (OOM) is 452, never
250. And one client IP cannot queue more than its hourly byte budget while another IP can.
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aioredis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.enqueue import Delivery, EnqueueFailed, enqueue, message_digest, new_queue_id
from shared.payloads import InboxEntry
from tests.support.ingress import InProcessIngress, address, ingress_starter, mark_seen, new_persona
from tests.support.processes import poll_until

MAXMEMORY = 16 * 1024 * 1024
STORAGE_FULL = b"4.3.1 insufficient system storage, try again later"
HONEST_BYTES = 8 * 1024
BACKLOG_MESSAGE_BYTES = 64 * 1024
SMALL_PERSONAS = 40  # honest mail spread over many inboxes, each with a small backlog
BACKLOG_MESSAGES = 48  # 3 MiB waiting for the "big" persona before memory gets tight
MAX_TRANSACTIONS = 6000  # far more than 16 MiB holds: the loop ends on refusals, this bounds it
GENEROUS_LIMITS = {
    "RELAY_RATE_LIMITS_SMTP_MESSAGES_PER_MINUTE_PER_IP": "1000000",
    "RELAY_RATE_LIMITS_SMTP_CONNECTIONS_PER_MINUTE_PER_IP": "1000000",
    "RELAY_SMTP_MAX_FAILED_RECIPIENTS": "1000000",  # one session sees many 452s here
}

StartIngress = Callable[..., InProcessIngress]


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(
        tmp_path / "redis", extra_args=("--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction")
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def small_client(small_redis: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(small_redis.url)
    yield client
    client.close()


@pytest.fixture
def start_ingress(small_redis: EmbeddedRedis) -> Iterator[StartIngress]:
    yield from ingress_starter(small_redis)


def used_memory(client: redis.Redis) -> int:
    return int(cast(dict[str, Any], client.info("memory"))["used_memory"])


def message(size: int, serial: int) -> bytes:
    body = (b"x" * 76 + b"\r\n") * (size // 78)
    return f"Subject: m{serial}\r\nMessage-ID: <{serial}@sender.example>\r\n\r\n".encode() + body


def transaction(client: smtplib.SMTP, rcpt: str, content: bytes) -> tuple[int, bytes]:
    """MAIL, RCPT, DATA; the RCPT or the DATA reply, whichever ended it, after RSET."""
    client.rset()
    assert client.mail("sender@example.org")[0] == 250
    code, reply = client.rcpt(rcpt)
    if code != 250:
        return code, reply
    return client.data(content)


def stored_queue_ids(client: redis.Redis, persona: str) -> list[str]:
    return [
        InboxEntry.unpack(f[b"m"]).queue_id
        for _, f in cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.inbox(persona)))
    ]


def test_high_watermark_refuses_largest_backlogs_first_and_loses_no_250(
    start_ingress: StartIngress, small_client: redis.Redis
) -> None:
    ingress = start_ingress(**GENEROUS_LIMITS)
    big, smalls = new_persona(), [new_persona() for _ in range(SMALL_PERSONAS)]
    for persona in (big, *smalls):
        mark_seen(small_client, persona)
    accepted: dict[str, list[str]] = {persona: [] for persona in (big, *smalls)}
    first_refusal: dict[str, tuple[int, int, bytes]] = {}  # big/small -> (transaction, used memory, reply)
    accepted_after_big_refused = 0
    baseline = used_memory(small_client)

    with smtplib.SMTP("127.0.0.1", ingress.port, timeout=30) as client:
        client.ehlo("sender.example")
        for serial in range(BACKLOG_MESSAGES):
            code, reply = transaction(client, address(big), message(BACKLOG_MESSAGE_BYTES, serial))
            assert code == 250, reply
            accepted[big].append(reply.decode().rsplit(" ", 1)[1])
        after_backlog = used_memory(small_client)
        for serial in range(BACKLOG_MESSAGES, MAX_TRANSACTIONS):
            persona = smalls[serial // 2 % SMALL_PERSONAS] if serial % 2 else big
            kind = "small" if serial % 2 else "big"
            code, reply = transaction(client, address(persona), message(HONEST_BYTES, serial))
            if code == 250:
                accepted[persona].append(reply.decode().rsplit(" ", 1)[1])
                if kind == "small" and "big" in first_refusal:
                    accepted_after_big_refused += 1
                continue
            assert (code, reply) == (452, STORAGE_FULL), (serial, code, reply)
            first_refusal.setdefault(kind, (serial, used_memory(small_client), reply))
            if len(first_refusal) == 2:
                break
    final = used_memory(small_client)
    high = MAXMEMORY * 85 // 100
    small_total = sum(map(len, accepted.values())) - len(accepted[big])
    print(
        f"\nmaxmemory {MAXMEMORY / 2**20:.1f} MiB, watermark 85% = {high / 2**20:.2f} MiB; used: "
        f"baseline {baseline / 2**20:.2f}, after the 3 MiB backlog {after_backlog / 2**20:.2f}, "
        f"at the big backlog's first 452 {first_refusal['big'][1] / 2**20:.2f} "
        f"(transaction {first_refusal['big'][0]}), "
        f"at the small inboxes' first 452 {first_refusal['small'][1] / 2**20:.2f} "
        f"(transaction {first_refusal['small'][0]}), final {final / 2**20:.2f} MiB; "
        f"250s: big {len(accepted[big])}, {SMALL_PERSONAS} small inboxes {small_total} "
        f"({accepted_after_big_refused} after the big backlog was refused)"
    )

    assert first_refusal["big"][0] < first_refusal["small"][0], "the largest backlog is refused first"
    assert accepted_after_big_refused >= 50, "small mail kept flowing while the big backlog was refused"
    assert first_refusal["small"][1] >= high * 0.9, "small mail is accepted until close to the watermark"
    assert final < MAXMEMORY, "refused before Redis itself was full"
    for persona, queue_ids in accepted.items():
        assert stored_queue_ids(small_client, persona) == queue_ids, "every 250 is in Redis, in order, once"


def test_a_write_redis_refuses_for_memory_is_452_never_250(
    start_ingress: StartIngress, small_client: redis.Redis
) -> None:
    ingress = start_ingress(**GENEROUS_LIMITS)
    persona = new_persona()
    mark_seen(small_client, persona)
    with smtplib.SMTP("127.0.0.1", ingress.port, timeout=30) as client:
        client.ehlo("sender.example")
        code, reply = transaction(client, address(persona), message(HONEST_BYTES, 1))
        assert code == 250, reply
        client.rset()
        assert client.mail("sender@example.org")[0] == 250
        assert client.rcpt(address(persona))[0] == 250  # admitted with the memory sample of a moment ago
        small_client.config_set("maxmemory", 512 * 1024)  # now Redis is over its limit
        assert used_memory(small_client) > 512 * 1024
        code, reply = client.data(message(HONEST_BYTES, 2))
    print(f"\nafter maxmemory dropped below used memory: {code} {reply.decode()}")
    # the enqueue script's OOM, or the watermark if the sample was refreshed meanwhile: never 250
    assert (code, reply) == (452, STORAGE_FULL)
    assert len(stored_queue_ids(small_client, persona)) == 1


def test_the_enqueue_reports_redis_out_of_memory(small_client: redis.Redis, small_redis: EmbeddedRedis) -> None:
    """The OOM refusal itself (the handler answers it 452 4.3.1): nothing written, flagged."""
    small_client.config_set("maxmemory", 512 * 1024)
    persona = new_persona()
    entry = InboxEntry(
        queue_id="q",
        recipient_index=0,
        mail_from="a@b",
        rcpt_to="c@d",
        data=b"x" * 100,
        received_at_ms=0,
        client_ip="127.0.0.1",
        auth_attestation=None,
    )

    async def attempt() -> EnqueueFailed:
        client = aioredis.Redis.from_url(small_redis.url)
        try:
            with pytest.raises(EnqueueFailed) as failed:
                await enqueue(
                    client,
                    message_digest("a@b", ["c@d"], b"x"),
                    new_queue_id(),
                    lambda _queue_id: [Delivery(persona, entry)],
                )
            return failed.value
        finally:
            await client.aclose()

    assert asyncio.run(attempt()).out_of_memory is True
    assert small_client.xlen(keys.inbox(persona)) == 0


def test_one_ip_cannot_queue_more_than_its_hourly_bytes_while_another_can(
    start_ingress: StartIngress, small_client: redis.Redis
) -> None:
    budget = 100_000
    ingress = start_ingress(RELAY_RATE_LIMITS_SMTP_QUEUED_BYTES_PER_HOUR_PER_IP=str(budget), **GENEROUS_LIMITS)
    persona = new_persona()
    mark_seen(small_client, persona)
    poll_until(lambda: 10 < time.time() % 3600 < 3590, timeout_s=25)  # the counter is per clock hour

    def send_until_refused(source_ip: str, count: int) -> list[int]:
        codes = []
        with smtplib.SMTP("127.0.0.1", ingress.port, timeout=30, source_address=(source_ip, 0)) as client:
            client.ehlo("sender.example")
            for serial in range(count):
                codes.append(transaction(client, address(persona), message(30_000, serial + hash(source_ip)))[0])
        return codes

    flood = send_until_refused("127.0.0.1", 5)
    honest = send_until_refused("127.0.0.2", 2)
    print(f"\nper-IP budget {budget} bytes/hour, 30 kB messages: flooding IP {flood}, other IP {honest}")
    assert flood == [250, 250, 250, 452, 452]
    assert honest == [250, 250]
    assert small_client.xlen(keys.inbox(persona)) == 5
