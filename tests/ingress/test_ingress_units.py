"""The ingress's pieces without SMTP: recipient policy, reply table, trace header, queue ids,
and the Redis rate limiter (against a real redis-server)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from protege_relay.embedded_redis import EmbeddedRedis
from services.ingress import policy
from services.ingress.policy import InboxState, Reply
from services.ingress.received import TraceInfo, address_literal, protocol_name, received_header
from shared import keys, ratelimit
from shared.enqueue import new_queue_id
from shared.identity import Passport

KEY = "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkena"  # RFC 8032 test key 1
DOMAINS = ["relay.test", "Other.Example"]


# --- the reply table (PROTOCOL.md part C) --------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "line"),
    [
        (policy.CONNECTION_RATE_LIMITED, "421 4.7.0 relay_rejected_connection_rate_limited"),
        (policy.TOO_MANY_CONNECTIONS, "421 4.7.0 relay_rejected_too_many_connections"),
        (policy.RECIPIENT_INVALID, "550 5.1.1 relay_rejected_recipient_invalid"),
        (policy.RELAY_ACCESS_DENIED, "550 5.7.1 relay access denied"),
        (policy.RECIPIENT_NOT_CONNECTED, "450 4.2.1 relay_rejected_recipient_not_connected"),
        (policy.MAILBOX_FULL, "452 4.2.2 mailbox full"),
        (policy.TOO_MANY_RECIPIENTS, "452 4.5.3 relay_rejected_too_many_recipients"),
        (policy.MESSAGE_TOO_LARGE, "552 5.3.4 relay_rejected_message_too_large"),
        (policy.MESSAGE_RATE_LIMITED, "451 4.7.0 relay_rejected_rate_limited"),
        (policy.TEMPORARY_FAILURE, "451 4.3.0 temporary failure, try again later"),
        (policy.queued("qabc"), "250 2.0.0 queued as qabc"),
    ],
)
def test_reply_lines_match_the_protocol_table(reply: Reply, line: str) -> None:
    assert str(reply) == line


def test_every_refusal_has_a_distinct_metric_reason() -> None:
    refusals = [value for value in vars(policy).values() if isinstance(value, Reply) and value.code >= 400]
    reasons = [refusal.reason for refusal in refusals]
    assert all(reasons) and len(set(reasons)) == len(reasons)


# --- recipient routing --------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipient",
    [f"{KEY}@relay.test", f"{KEY}+tag@relay.test", f"{KEY.upper()}@RELAY.TEST", f"{KEY}+a+b@other.example"],
)
def test_key_addresses_route_to_the_persona_key(recipient: str) -> None:
    assert policy.route_recipient(recipient, DOMAINS) == KEY


@pytest.mark.parametrize(
    "recipient",
    [
        KEY,
        f"{KEY}",
        "postmaster@relay.test",
        f"{KEY[:-1]}@relay.test",
        f"{KEY}a@relay.test",
        f"{KEY[:-1]}1@relay.test",
        f"+{KEY}@relay.test",
        f"{KEY}+\udcff@relay.test",
        f"{KEY}+\x01@relay.test",
    ],
)
def test_anything_else_is_recipient_invalid(recipient: str) -> None:
    assert policy.route_recipient(recipient, DOMAINS) is policy.RECIPIENT_INVALID


def test_unconfigured_domain_is_relay_access_denied_unless_no_domain_is_configured() -> None:
    assert policy.route_recipient(f"{KEY}@elsewhere.example", DOMAINS) is policy.RELAY_ACCESS_DENIED
    assert policy.route_recipient(f"{KEY}@elsewhere.example", []) == KEY


def test_recipient_count_refuses_only_beyond_the_maximum() -> None:
    assert policy.check_recipient_count(0, 1) is None
    assert policy.check_recipient_count(1, 1) is policy.TOO_MANY_RECIPIENTS
    assert policy.check_recipient_count(9, 10) is None


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (InboxState(seen=False, message_count=0, byte_count=0), policy.RECIPIENT_NOT_CONNECTED),
        (InboxState(seen=True, message_count=0, byte_count=0), None),
        (InboxState(seen=True, message_count=9, byte_count=999), None),
        (InboxState(seen=True, message_count=10, byte_count=0), policy.MAILBOX_FULL),
        (InboxState(seen=True, message_count=0, byte_count=1000), policy.MAILBOX_FULL),
    ],
)
def test_inbox_state_decides_not_connected_and_mailbox_full(state: InboxState, expected: Reply | None) -> None:
    assert policy.check_inbox(state, max_messages=10, max_bytes=1000) is expected


def test_sender_must_be_valid_utf8() -> None:
    assert policy.check_sender("josé@exämple.org") is None
    assert policy.check_sender("\udcff@example.org") is policy.SENDER_INVALID


# --- trace header -------------------------------------------------------------------------


def trace(**changes: object) -> TraceInfo:
    fields: dict[str, object] = dict(
        helo="mta.example.org",
        client_ip="192.0.2.7",
        reverse_name="mta.example.org",
        extended=True,
        tls=False,
        smtputf8=False,
    )
    fields.update(changes)
    return TraceInfo(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"extended": False}, "SMTP"),
        ({}, "ESMTP"),
        ({"tls": True}, "ESMTPS"),
        ({"smtputf8": True}, "UTF8SMTP"),
        ({"smtputf8": True, "tls": True}, "UTF8SMTPS"),
    ],
)
def test_with_clause_names_the_protocol(changes: dict[str, object], name: str) -> None:
    assert protocol_name(trace(**changes)) == name


@pytest.mark.parametrize(
    ("client_ip", "literal"),
    [("192.0.2.7", "[192.0.2.7]"), ("2001:db8::1", "[IPv6:2001:db8::1]"), ("::ffff:192.0.2.7", "[192.0.2.7]")],
)
def test_client_address_is_an_rfc5321_address_literal(client_ip: str, literal: str) -> None:
    assert address_literal(client_ip) == literal


def test_received_header_has_the_rfc5321_shape() -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    header = received_header(trace(), "mx.relay.test", "qabc", f"{KEY}+x@relay.test", when)
    assert header == (
        b"Received: from mta.example.org (mta.example.org [192.0.2.7])\r\n"
        b"\tby mx.relay.test with ESMTP id qabc\r\n"
        b"\tfor <" + KEY.encode() + b"+x@relay.test>; Thu, 02 Jan 2025 03:04:05 +0000\r\n"
    )


def test_received_header_without_reverse_name_shows_only_the_literal() -> None:
    header = received_header(trace(reverse_name=None), "mx", "qabc", "r@x", datetime.now(UTC))
    assert header.startswith(b"Received: from mta.example.org ([192.0.2.7])\r\n")


def test_hostile_helo_cannot_inject_header_lines_or_close_the_comment() -> None:
    hostile = "evil)\rX-Injected: yes (\n"
    header = received_header(trace(helo=hostile, reverse_name=hostile), "mx", "q1", "r@x", datetime.now(UTC))
    assert header.count(b"\r") == 3 and header.count(b"\n") == 3
    assert header.count(b"(") == 1 and header.count(b")") == 1
    assert all(len(line) <= 998 for line in header.split(b"\r\n"))
    long_helo = received_header(trace(helo="h" * 5000), "mx", "q1", "r@x", datetime.now(UTC))
    assert all(len(line) <= 998 for line in long_helo.split(b"\r\n"))


def test_empty_helo_is_written_as_unknown() -> None:
    assert received_header(trace(helo=""), "mx", "q1", "r@x", datetime.now(UTC)).startswith(b"Received: from unknown (")


# --- queue ids ----------------------------------------------------------------------------


def test_queue_ids_are_q_plus_lowercase_base32_and_unique() -> None:
    queue_ids = {new_queue_id() for _ in range(1000)}
    assert len(queue_ids) == 1000
    assert all(re.fullmatch(r"q[a-z2-7]{24}", queue_id) for queue_id in queue_ids)


# --- rate limiter (real Redis) ------------------------------------------------------------


@pytest.fixture
async def redis_async(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


LIMIT = ratelimit.RateLimit(ratelimit.RateKind.SMTP_CONNECTION, per_minute=3, deny_window_ms=600_000)
MINUTE_MS = 60_000


async def test_rate_limit_allows_the_limit_then_denies_and_sets_the_deny_key(redis_async: aioredis.Redis) -> None:
    now_ms = 1_000 * MINUTE_MS + 5
    verdicts = [await ratelimit.allow(redis_async, LIMIT, "192.0.2.1", now_ms=now_ms) for _ in range(4)]
    assert verdicts == [True, True, True, False]
    assert 0 < await redis_async.pttl(keys.deny("smtp_conn", "192.0.2.1")) <= 600_000
    assert 0 < await redis_async.pttl(keys.rate_counter("smtp_conn", "192.0.2.1", 1_000)) <= 2 * MINUTE_MS


async def test_deny_window_outlasts_the_minute_window(redis_async: aioredis.Redis) -> None:
    now_ms = 2_000 * MINUTE_MS
    for _ in range(4):
        await ratelimit.allow(redis_async, LIMIT, "192.0.2.2", now_ms=now_ms)
    assert not await ratelimit.allow(redis_async, LIMIT, "192.0.2.2", now_ms=now_ms + MINUTE_MS)
    await redis_async.delete(keys.deny("smtp_conn", "192.0.2.2"))
    assert await ratelimit.allow(redis_async, LIMIT, "192.0.2.2", now_ms=now_ms + 2 * MINUTE_MS)


async def test_rate_limits_are_per_ip_and_per_kind(redis_async: aioredis.Redis) -> None:
    now_ms = 3_000 * MINUTE_MS
    for _ in range(4):
        await ratelimit.allow(redis_async, LIMIT, "192.0.2.3", now_ms=now_ms)
    assert await ratelimit.allow(redis_async, LIMIT, "2001:db8::3", now_ms=now_ms)
    messages = ratelimit.RateLimit(ratelimit.RateKind.SMTP_MESSAGE, per_minute=3, deny_window_ms=1000)
    assert await ratelimit.allow(redis_async, messages, "192.0.2.3", now_ms=now_ms)


def test_rfc8032_key_constant_is_the_test_vector() -> None:
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    assert Passport.from_seed(seed).persona_key == KEY
