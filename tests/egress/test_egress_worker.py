"""The egress service end to end without the tunnel: a job enqueued exactly as the tunnel does
it, a real arq worker (in-process `serve`, and real `protege-relay egress` processes), real
Redis, DNS and MX sinks; the outcome is read from the persona's results stream."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import dkim
import pytest
import redis.asyncio as aioredis
import trustme
from arq.connections import ArqRedis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from protege_relay.embedded_redis import EmbeddedRedis
from services.egress.main import serve
from shared import keys
from shared.config import RelayConfig, load_config
from shared.identity import Passport
from shared.payloads import DeliveryResult, InboxEntry, OutboundJob
from shared.redis import connect_arq
from shared.wakeup import Wakeup, WakeupKind
from tests.support.dns_server import DnsServer
from tests.support.dsn import status_groups
from tests.support.mx_sink import MxSink
from tests.support.policy_server import PolicyServer
from tests.support.processes import free_port
from tests.support.wait import eventually, poll_until

BARE_LF_MESSAGE = b"From: p@relay.test\nTo: user@example.test\nSubject: hi\n\nline one\r\n.dot line\rend\n"
CRLF_MESSAGE = b"From: p@relay.test\r\nTo: user@example.test\r\nSubject: hi\r\n\r\nline one\r\n.dot line\r\nend\r\n"


@pytest.fixture
def persona_key() -> str:
    return Passport.generate().persona_key


def egress_env(redis_server: EmbeddedRedis, dns_server: DnsServer, smtp_port: int, **overrides: str) -> dict[str, str]:
    env = {
        "RELAY_REDIS_URL": redis_server.url,
        "RELAY_EGRESS_NAMESERVERS": json.dumps([dns_server.nameserver]),
        "RELAY_EGRESS_ALLOW_PRIVATE_DESTINATIONS": "true",  # the sinks listen on loopback
        "RELAY_EGRESS_SMTP_PORT": str(smtp_port),
        "RELAY_EGRESS_HTTP_PORT": "0",
        "RELAY_EGRESS_RETRY_BASE_SECONDS": "1",
        "RELAY_EGRESS_CONNECT_TIMEOUT_SECONDS": "5",
        "RELAY_EGRESS_HELO_NAME": "egress.relay.test",
    }
    env.update(overrides)
    return env


def egress_config(tmp_path: Path, env: dict[str, str]) -> RelayConfig:
    config_file = tmp_path / "egress-config.json"
    config_file.write_text("{}")
    return load_config(environ={"RELAY_CONFIG": str(config_file), **env})


class Harness:
    """In-process egress plus the tunnel's side of the contract (enqueue, read results)."""

    def __init__(self, config: RelayConfig, pool: ArqRedis, redis: aioredis.Redis, persona_key: str) -> None:
        self.config, self.pool, self.redis, self.persona_key = config, pool, redis, persona_key

    def job(self, stream_id: str, rcpt_to: str = "user@example.test", data: bytes = BARE_LF_MESSAGE) -> OutboundJob:
        mail_from = f"{self.persona_key}@relay.test"
        return OutboundJob(self.persona_key, stream_id, mail_from, [rcpt_to], data, int(time.time() * 1000))

    async def enqueue(self, job: OutboundJob) -> Any:
        return await self.pool.enqueue_job(
            "deliver",
            job.pack(),
            _job_id=keys.egress_job_id(job.persona_key, job.stream_id),
            _queue_name=keys.EGRESS_QUEUE,
        )

    async def results(self) -> list[DeliveryResult]:
        entries = await self.redis.xrange(keys.results(self.persona_key))
        return [DeliveryResult.unpack(fields[b"r"]) for _, fields in entries]

    async def inbox(self) -> list[InboxEntry]:
        entries = await self.redis.xrange(keys.inbox(self.persona_key))
        return [InboxEntry.unpack(fields[b"m"]) for _, fields in entries]

    async def result(self, timeout_s: float = 15.0) -> DeliveryResult:
        results = await eventually(self.results, timeout_s, "no delivery result")
        assert len(results) == 1, results
        return results[0]


@pytest.fixture
async def start_egress(
    tmp_path: Path, redis_server: EmbeddedRedis, dns_server: DnsServer, smtp_port: int, persona_key: str
) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
    clients: list[Any] = []

    async def start(**overrides: str) -> Harness:
        config = egress_config(tmp_path, egress_env(redis_server, dns_server, smtp_port, **overrides))
        stopping = asyncio.Event()
        running.append((stopping, asyncio.create_task(serve(config, stopping))))
        pool = connect_arq(config)
        redis = aioredis.Redis.from_url(redis_server.url)
        clients.extend([pool, redis])
        return Harness(config, pool, redis, persona_key)

    yield start
    for stopping, task in running:
        stopping.set()
        await asyncio.wait_for(task, 30)
    for client in clients:
        await client.aclose()


async def test_message_is_delivered_with_crlf_and_the_sink_queue_id(
    start_egress: Callable[..., Awaitable[Harness]], smtp_port: int, persona_key: str
) -> None:
    egress = await start_egress()
    await egress.redis.set(keys.owner(persona_key), "node-a")
    wakeups = egress.redis.pubsub()
    await wakeups.subscribe(keys.node_channel("node-a"))
    with MxSink("127.0.0.2", smtp_port) as mx1:
        started = time.monotonic()
        await egress.enqueue(egress.job("stream-1"))
        result = await egress.result()
        elapsed = time.monotonic() - started
    [received] = mx1.received()
    assert received.data == CRLF_MESSAGE
    assert received.rcpt_tos == ["user@example.test"] and received.mail_from == f"{persona_key}@relay.test"
    assert (result.stream_id, result.status, result.message_id, result.error) == (
        "stream-1",
        "sent",
        received.queue_id,
        None,
    )
    assert (result.recipient, result.smtp_code, result.enhanced_code, result.attempts) == (
        "user@example.test",
        250,
        "2.0.0",
        1,
    )
    assert elapsed < 5
    message = await eventually(lambda: wakeups.get_message(ignore_subscribe_messages=True, timeout=0.1))
    assert Wakeup.decode(message["data"]) == Wakeup(WakeupKind.RESULT, persona_key)
    await wakeups.aclose()  # type: ignore[no-untyped-call]


async def test_result_wakes_the_owner_and_live_outbound_holders_once_each(
    start_egress: Callable[..., Awaitable[Harness]], smtp_port: int, persona_key: str
) -> None:
    egress = await start_egress()
    now_ms = int(time.time() * 1000)
    await egress.redis.set(keys.owner(persona_key), "node-a")
    await egress.redis.zadd(
        keys.outbound_holders(persona_key),
        {"node-a": now_ms + 60_000, "node-b": now_ms + 60_000, "node-gone": now_ms - 1},
    )
    wakeups = egress.redis.pubsub()
    await wakeups.subscribe(*(keys.node_channel(node) for node in ("node-a", "node-b", "node-gone")))
    await eventually(lambda: wakeups.get_message(timeout=0.1))  # subscribe confirmations
    with MxSink("127.0.0.2", smtp_port):
        await egress.enqueue(egress.job("stream-wake"))
        assert (await egress.result()).status == "sent"
    received: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + 1  # collect for a moment: a duplicate would arrive with the first
    while time.monotonic() < deadline:
        message = await wakeups.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            received.append((message["channel"], message["data"]))
    expected = Wakeup(WakeupKind.RESULT, persona_key).encode()
    assert sorted(received) == [
        (keys.node_channel("node-a").encode(), expected),
        (keys.node_channel("node-b").encode(), expected),
    ]
    await wakeups.aclose()  # type: ignore[no-untyped-call]


async def test_permanent_refusal_is_a_failed_result_without_retry(
    start_egress: Callable[..., Awaitable[Harness]], smtp_port: int
) -> None:
    egress = await start_egress()
    with MxSink("127.0.0.2", smtp_port, rcpt_reply="550 5.1.1 user unknown") as mx1:
        await egress.enqueue(egress.job("stream-5xx", rcpt_to="nobody@example.test"))
        result = await egress.result()
    assert (result.status, result.permanent, result.smtp_code, result.enhanced_code, result.attempts) == (
        "failed",
        True,
        550,
        "5.1.1",
        1,
    )
    assert result.error == "smtp_5xx: 550 5.1.1 user unknown" and result.recipient == "nobody@example.test"
    assert mx1.received() == []
    assert await egress.inbox() == []  # the gateway got this result in its window: no bounce


async def test_mx_on_loopback_is_refused_by_default_without_a_connection(
    start_egress: Callable[..., Awaitable[Harness]], smtp_port: int
) -> None:
    """Issue 9 item 6 through the worker: `egress.allowPrivateDestinations` off (its default)."""
    egress = await start_egress(RELAY_EGRESS_ALLOW_PRIVATE_DESTINATIONS="false")
    assert egress.config.egress.allowPrivateDestinations is False
    with MxSink("127.0.0.2", smtp_port) as mx1, MxSink("127.0.0.3", smtp_port) as mx2:
        await egress.enqueue(egress.job("stream-private"))
        result = await egress.result()
        assert (result.status, result.error, result.permanent, result.attempts) == (
            "failed",
            "destination_not_allowed",
            True,
            1,
        )
        assert mx1.accepted == 0 == mx2.accepted and mx1.data_payloads == [] == mx2.data_payloads


async def test_temporary_failures_are_retried_until_sent(
    start_egress: Callable[..., Awaitable[Harness]], smtp_port: int
) -> None:
    egress = await start_egress()
    deferrals = ["451 4.3.0 try again later"] * 2
    with MxSink("127.0.0.2", smtp_port, data_replies=deferrals) as mx1:
        await egress.enqueue(egress.job("stream-4xx"))
        result = await egress.result(timeout_s=20)
    assert (result.status, result.attempts, result.message_id) == ("sent", 3, mx1.received()[0].queue_id)
    assert len(mx1.data_payloads) == 3 and len(mx1.received()) == 1


async def test_failure_after_a_deferral_puts_one_dsn_in_the_persona_inbox(
    start_egress: Callable[..., Awaitable[Harness]], smtp_port: int, persona_key: str
) -> None:
    """Issue 14 item 1: 4xx, then 5xx on the retry -> failed, and an RFC 3464 bounce stored
    through the inbound enqueue path; a re-run of the same job does not bounce twice."""
    egress = await start_egress(RELAY_MAIL_DOMAINS="relay.test")
    replies = ["451 4.3.0 try again later", "550 5.7.1 message refused"]
    with MxSink("127.0.0.2", smtp_port, data_replies=replies) as mx1:
        job = egress.job("stream-bounce", data=b"Subject: report\nMessage-ID: <m1@relay.test>\n\nbody\n")
        await egress.enqueue(job)
        result = await egress.result(timeout_s=20)
        assert (result.status, result.permanent, result.attempts, result.smtp_code) == ("failed", True, 2, 550)
        assert mx1.received() == [] and len(mx1.data_payloads) == 2
    [notice] = await egress.inbox()
    assert (notice.mail_from, notice.rcpt_to, notice.recipient_index) == ("", f"{persona_key}@relay.test", 0)
    assert int(await egress.redis.get(keys.inbox_bytes(persona_key))) == len(notice.data)
    message = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert str(message["From"]) == "Mail Delivery System <MAILER-DAEMON@relay.test>"
    assert str(message["To"]) == f"{persona_key}@relay.test" and str(message["In-Reply-To"]) == "<m1@relay.test>"
    assert message.get_content_type() == "multipart/report" and message.get_param("report-type") == "delivery-status"
    _, status, headers = message.iter_parts()
    _, recipient = status_groups(status)
    assert (recipient["Final-Recipient"], recipient["Action"], recipient["Status"]) == (
        "rfc822; user@example.test",
        "failed",
        "5.7.1",
    )
    assert recipient["Diagnostic-Code"] == "smtp; 550 5.7.1 message refused"
    assert headers.get_payload(decode=True) == b"Subject: report\r\nMessage-ID: <m1@relay.test>\r\n"

    # a re-run of the same job (as after a crash right after the bounce): the bounce is not stored again
    await egress.redis.delete(keys.egress_result_published(persona_key, job.stream_id), keys.results(persona_key))
    await egress.pool.enqueue_job(
        "deliver",
        job.pack(),
        _job_id=keys.egress_job_id(job.persona_key, job.stream_id),
        _queue_name=keys.EGRESS_QUEUE,
        _job_try=egress.config.egress.maxAttempts + 1,  # a crashed re-run: no SMTP, max_attempts_exceeded
    )
    assert (await egress.result()).error == "max_attempts_exceeded"
    assert [entry.stream_id for entry in await egress.inbox()] == [notice.stream_id]


async def test_a_message_deferred_past_the_warning_time_gets_a_delayed_dsn(
    start_egress: Callable[..., Awaitable[Harness]], smtp_port: int
) -> None:
    egress = await start_egress(
        RELAY_MAIL_DOMAINS="relay.test", RELAY_EGRESS_DELAY_WARNING_SECONDS="1", RELAY_EGRESS_MAX_AGE_SECONDS="600"
    )
    with MxSink("127.0.0.2", smtp_port, data_replies=["452 4.2.2 mailbox full"]) as mx1:
        job = egress.job("stream-slow")
        aged = OutboundJob(
            job.persona_key, job.stream_id, job.mail_from, job.rcpt_to, job.data, job.enqueued_at_ms - 5000
        )
        await egress.enqueue(aged)
        result = await egress.result(timeout_s=20)
        assert (result.status, result.attempts) == ("sent", 2) and len(mx1.received()) == 1
    [notice] = await egress.inbox()
    message = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert str(message["Subject"]) == "Delayed Mail (still being retried)"
    _, status, _ = message.iter_parts()
    _, recipient = status_groups(status)
    assert (recipient["Action"], recipient["Status"]) == ("delayed", "4.2.2")
    assert recipient["Will-Retry-Until"]


async def test_enforced_mta_sts_policy_defers_an_unlisted_mx_until_it_fails(
    start_egress: Callable[..., Awaitable[Harness]],
    dns_server: DnsServer,
    smtp_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 14 item 4 through the worker: the policy comes from a local HTTPS server whose CA the
    process trusts (SSL_CERT_FILE, as an operator's CA bundle would), and allows only mail.example.test."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    dns_server.set_records("_mta-sts.example.test", {"TXT": ['"v=STSv1; id=one"']})
    dns_server.set_records("mta-sts.example.test", {"A": ["127.0.0.5"]})
    policy = "version: STSv1\nmode: enforce\nmx: mail.example.test\nmax_age: 86400\n"
    with (
        PolicyServer("127.0.0.5", free_port(), ca.issue_cert("mta-sts.example.test"), policy) as policy_server,
        MxSink("127.0.0.2", smtp_port, tls_cert=ca.issue_cert("mx1.example.test")) as mx1,
    ):
        egress = await start_egress(
            RELAY_EGRESS_MTA_STS_POLICY_PORT=str(policy_server.port),
            RELAY_EGRESS_MAX_ATTEMPTS="2",
            RELAY_EGRESS_RETRY_BASE_SECONDS="0",
        )
        await egress.enqueue(egress.job("stream-sts"))
        result = await egress.result()
        assert mx1.accepted == 0 and policy_server.fetched() == 1  # the second attempt used the cached policy
    assert (result.status, result.permanent, result.attempts) == ("failed", False, 2)
    assert result.error == "mta_sts_policy_violation: mx_not_listed"


async def test_retries_stop_at_max_attempts_with_the_last_temporary_error(
    start_egress: Callable[..., Awaitable[Harness]], smtp_port: int
) -> None:
    egress = await start_egress(RELAY_EGRESS_MAX_ATTEMPTS="2", RELAY_EGRESS_RETRY_BASE_SECONDS="0")
    with MxSink("127.0.0.2", smtp_port, data_replies=["452 4.2.2 mailbox full"] * 5) as mx1:
        await egress.enqueue(egress.job("stream-full"))
        result = await egress.result()
    assert (result.status, result.permanent, result.attempts, result.smtp_code) == ("failed", False, 2, 452)
    assert result.error == "smtp_4xx: 452 4.2.2 mailbox full"
    assert len(mx1.data_payloads) == 2


async def test_no_retry_past_the_max_age(start_egress: Callable[..., Awaitable[Harness]], smtp_port: int) -> None:
    egress = await start_egress(RELAY_EGRESS_MAX_AGE_SECONDS="60")
    with MxSink("127.0.0.2", smtp_port, data_replies=["421 4.4.2 closing"] * 5) as mx1:
        job = egress.job("stream-old")
        stale = OutboundJob(
            job.persona_key, job.stream_id, job.mail_from, job.rcpt_to, job.data, int((time.time() - 61) * 1000)
        )
        await egress.enqueue(stale)
        result = await egress.result()
    assert (result.status, result.permanent, result.attempts, result.smtp_code) == ("failed", False, 1, 421)
    assert len(mx1.data_payloads) == 1


async def test_rerun_beyond_max_attempts_publishes_a_failure_without_sending(
    start_egress: Callable[..., Awaitable[Harness]], smtp_port: int
) -> None:
    egress = await start_egress(RELAY_EGRESS_MAX_ATTEMPTS="2")
    job = egress.job("stream-crashed-often")
    with MxSink("127.0.0.2", smtp_port) as mx1:
        await egress.pool.enqueue_job(  # as if two earlier tries had died with their workers
            "deliver",
            job.pack(),
            _job_id=keys.egress_job_id(job.persona_key, job.stream_id),
            _queue_name=keys.EGRESS_QUEUE,
            _job_try=3,
        )
        result = await egress.result()
    assert (result.status, result.error, result.permanent, result.attempts) == (
        "failed",
        "max_attempts_exceeded",
        False,
        3,
    )
    assert mx1.data_payloads == []


async def test_retry_sends_only_to_the_domain_still_open_and_the_record_is_dropped_on_publish(
    start_egress: Callable[..., Awaitable[Harness]], smtp_port: int, persona_key: str
) -> None:
    egress = await start_egress(RELAY_EGRESS_ROUTES=json.dumps({"other.test": f"127.0.0.4:{smtp_port}"}))
    job = egress.job("stream-two-domains")
    # the deferring domain first: the last domain's acceptance is recorded only when the retry is scheduled
    job = OutboundJob(
        job.persona_key, job.stream_id, job.mail_from, ["b@other.test", "a@example.test"], job.data, job.enqueued_at_ms
    )
    with (
        MxSink("127.0.0.2", smtp_port) as mx1,
        MxSink("127.0.0.4", smtp_port, data_replies=["451 4.3.0 later"]) as other,
    ):
        await egress.enqueue(job)
        result = await egress.result(timeout_s=20)
    assert (result.status, result.attempts) == ("sent", 2)
    assert [m.rcpt_tos for m in mx1.received()] == [["a@example.test"]]  # not sent again on the retry
    assert len(other.data_payloads) == 2 and [m.rcpt_tos for m in other.received()] == [["b@other.test"]]
    assert not await egress.redis.exists(keys.egress_delivered(persona_key, job.stream_id))
    assert await egress.redis.exists(keys.egress_result_published(persona_key, job.stream_id))


async def test_first_mx_down_delivers_via_the_second(
    start_egress: Callable[..., Awaitable[Harness]], smtp_port: int
) -> None:
    egress = await start_egress()
    with MxSink("127.0.0.3", smtp_port) as mx2:
        await egress.enqueue(egress.job("stream-mx2"))
        result = await egress.result()
    assert result.status == "sent" and result.message_id == mx2.received()[0].queue_id


@pytest.mark.parametrize(
    ("domain", "error", "permanent"),
    [
        ("nullmx.test", "null_mx", True),
        ("nowhere.test", "nxdomain", True),
        ("broken.test", "dns_temporary", False),
    ],
)
async def test_dns_failures_become_failed_results(
    start_egress: Callable[..., Awaitable[Harness]], domain: str, error: str, permanent: bool
) -> None:
    egress = await start_egress(RELAY_EGRESS_MAX_ATTEMPTS="1")
    await egress.enqueue(egress.job("stream-dns", rcpt_to=f"user@{domain}"))
    result = await egress.result()
    assert (result.status, result.error, result.permanent, result.attempts) == ("failed", error, permanent, 1)


async def test_same_job_id_is_delivered_once(start_egress: Callable[..., Awaitable[Harness]], smtp_port: int) -> None:
    egress = await start_egress()
    with MxSink("127.0.0.2", smtp_port) as mx1:
        job = egress.job("stream-dup")
        await egress.enqueue(job)
        await egress.enqueue(job)  # while queued: arq refuses the duplicate id
        await egress.result()
        # After completion arq takes the id again... The result is published before arq clears
        # the job's keys, and while they exist an enqueue is refused (a no-op): poll until taken.
        await eventually(lambda: egress.enqueue(job), message="arq never took the job id again after its run")
        await eventually(lambda: _queue_empty(egress))
        assert len(await egress.results()) == 1  # ...but the job sees the published result
    assert len(mx1.received()) == 1


async def _queue_empty(egress: Harness) -> bool:
    queued: int = await egress.pool.zcard(keys.EGRESS_QUEUE)
    return queued == 0


async def test_dkim_signature_of_the_delivered_message_verifies(
    start_egress: Callable[..., Awaitable[Harness]], smtp_port: int, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path = tmp_path / "dkim.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    egress = await start_egress(
        RELAY_DKIM_ENABLED="true",
        RELAY_DKIM_DOMAIN_NAME="relay.test",
        RELAY_DKIM_KEY_SELECTOR="s1",
        RELAY_DKIM_PRIVATE_KEY_PATH=str(key_path),
        RELAY_DKIM_HEADER_FIELD_NAMES="from:to:subject",
    )
    with MxSink("127.0.0.2", smtp_port) as mx1:
        await egress.enqueue(egress.job("stream-dkim"))
        assert (await egress.result()).status == "sent"
    delivered = mx1.received()[0].data
    assert delivered.startswith(b"DKIM-Signature:") and delivered.endswith(CRLF_MESSAGE)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return record if name == b"s1._domainkey.relay.test." else b""

    assert dkim.verify(delivered, dnsfunc=dnsfunc)
    assert b"h=from : to : subject;" in delivered


# --- real `protege-relay egress` processes ---------------------------------------------------


def sync_results(redis_client: Any, persona_key: str) -> list[DeliveryResult]:
    return [DeliveryResult.unpack(f[b"r"]) for _, f in redis_client.xrange(keys.results(persona_key))]


async def enqueue_once(redis_url: str, job: OutboundJob) -> None:
    pool = connect_arq(load_config(environ={"RELAY_REDIS_URL": redis_url}))
    try:
        await pool.enqueue_job(
            "deliver",
            job.pack(),
            _job_id=keys.egress_job_id(job.persona_key, job.stream_id),
            _queue_name=keys.EGRESS_QUEUE,
        )
    finally:
        await pool.aclose()


def test_egress_process_delivers_and_serves_health(
    spawn: Any,
    redis_server: EmbeddedRedis,
    redis_client: Any,
    dns_server: DnsServer,
    smtp_port: int,
    persona_key: str,
) -> None:
    http_port = free_port()
    env = egress_env(redis_server, dns_server, smtp_port, RELAY_EGRESS_HTTP_PORT=str(http_port))
    process = spawn("egress", port=http_port, **env)
    job = OutboundJob(
        persona_key,
        "stream-proc",
        f"{persona_key}@relay.test",
        ["user@example.test"],
        BARE_LF_MESSAGE,
        int(time.time() * 1000),
    )
    with MxSink("127.0.0.2", smtp_port) as mx1:
        asyncio.run(enqueue_once(redis_server.url, job))
        [result] = poll_until(lambda: sync_results(redis_client, persona_key), 15, message="no result from the process")
        assert (result.status, result.message_id) == ("sent", mx1.received()[0].queue_id)
    assert mx1.received()[0].data == CRLF_MESSAGE
    ready = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5)
    assert ready.status == 200
    metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5).read().decode()
    assert 'relay_egress_jobs_total{outcome="sent"} 1.0' in metrics_text
    assert redis_client.sismember(keys.NODES_KEY, redis_client.smembers(keys.NODES_KEY).pop())
    assert process.terminate(timeout_s=15) == 0


@pytest.mark.system  # a fault / flood run: left out of make test-fast
def test_job_of_a_killed_worker_runs_again_on_another_and_publishes_once(
    spawn: Any,
    redis_server: EmbeddedRedis,
    redis_client: Any,
    dns_server: DnsServer,
    smtp_port: int,
    persona_key: str,
) -> None:
    env = egress_env(redis_server, dns_server, smtp_port, RELAY_EGRESS_JOB_TIMEOUT_SECONDS="3")
    job = OutboundJob(
        persona_key,
        "stream-crash",
        f"{persona_key}@relay.test",
        ["user@example.test"],
        BARE_LF_MESSAGE,
        int(time.time() * 1000),
    )
    with MxSink("127.0.0.2", smtp_port, hold_data=1) as mx1:
        first = spawn("egress", **env, RELAY_NODE_ID="egress-first")
        asyncio.run(enqueue_once(redis_server.url, job))
        assert mx1.holding.wait(15), first.logs()
        first.kill()
        mx1.release()
        started = time.monotonic()
        spawn("egress", **env, RELAY_NODE_ID="egress-second")
        [result] = poll_until(lambda: sync_results(redis_client, persona_key), 20, message="no result after the re-run")
        rerun_s = time.monotonic() - started
        assert len(mx1.data_payloads) == 2  # at-least-once: the killed attempt had sent DATA
        assert (result.status, result.attempts) == ("sent", 2)
        assert result.message_id == mx1.received()[-1].queue_id
        poll_until(lambda: redis_client.zcard(keys.EGRESS_QUEUE) == 0, 10, message="job still queued")
        assert len(sync_results(redis_client, persona_key)) == 1
    assert rerun_s < 12


@pytest.mark.system  # a fault / flood run: left out of make test-fast
def test_domain_delivered_before_a_crash_is_not_sent_again_by_the_rerun(
    spawn: Any,
    redis_server: EmbeddedRedis,
    redis_client: Any,
    dns_server: DnsServer,
    smtp_port: int,
    persona_key: str,
) -> None:
    env = egress_env(
        redis_server,
        dns_server,
        smtp_port,
        RELAY_EGRESS_JOB_TIMEOUT_SECONDS="3",
        RELAY_EGRESS_ROUTES=json.dumps({"other.test": f"127.0.0.4:{smtp_port}"}),
    )
    job = OutboundJob(
        persona_key,
        "stream-crash-2nd",
        f"{persona_key}@relay.test",
        ["a@example.test", "b@other.test"],
        BARE_LF_MESSAGE,
        int(time.time() * 1000),
    )
    with MxSink("127.0.0.2", smtp_port) as mx1, MxSink("127.0.0.4", smtp_port, hold_data=1) as other:
        first = spawn("egress", **env, RELAY_NODE_ID="egress-first")
        asyncio.run(enqueue_once(redis_server.url, job))
        assert other.holding.wait(15), first.logs()  # example.test done, other.test in DATA
        first.kill()
        other.release()
        spawn("egress", **env, RELAY_NODE_ID="egress-second")
        [result] = poll_until(lambda: sync_results(redis_client, persona_key), 20, message="no result after the re-run")
        assert (result.status, result.attempts) == ("sent", 2)
        assert len(mx1.data_payloads) == 1  # recorded before the second domain's session began
        assert len(other.data_payloads) == 2


def test_sigterm_lets_a_running_delivery_finish_before_exit(
    spawn: Any,
    redis_server: EmbeddedRedis,
    redis_client: Any,
    dns_server: DnsServer,
    smtp_port: int,
    persona_key: str,
) -> None:
    job = OutboundJob(
        persona_key,
        "stream-drain",
        f"{persona_key}@relay.test",
        ["user@example.test"],
        BARE_LF_MESSAGE,
        int(time.time() * 1000),
    )
    with MxSink("127.0.0.2", smtp_port, hold_data=1) as mx1:
        egress = spawn("egress", **egress_env(redis_server, dns_server, smtp_port))
        asyncio.run(enqueue_once(redis_server.url, job))
        assert mx1.holding.wait(15), egress.logs()
        assert egress.process is not None
        egress.process.send_signal(signal.SIGTERM)
        poll_until(lambda: '"running":1' in egress.logs(), 10, message="no drain started")
        assert egress.process.poll() is None  # still draining the held delivery
        mx1.release()
        assert egress.process.wait(timeout=15) == 0
    [result] = sync_results(redis_client, persona_key)
    assert (result.status, result.attempts, result.message_id) == ("sent", 1, mx1.received()[0].queue_id)
