"""The ingress stores a message once however often the sender submits it (shared/enqueue.py).

A sender retries after a 451 even when Redis had committed (the reply was lost); the retry must
be answered with the first queue id and must not be stored again, or the gateway would get one
message under two stream ids. tests/system/test_faults.py::test_lost_exec_reply_then_retry_is_one_message_not_two
proves the lost-reply case itself through a TCP proxy; these tests pin down what "the same
message" means and the multi-persona and concurrent cases. The protection lasts only while the
first copy is undelivered (the tunnel removes the marker with the entry):
tests/system/test_e2e_inbound.py::test_identical_message_is_stored_once_while_queued_and_delivered_again_after_delivery.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Callable
from typing import cast

import pytest
import redis
import redis.asyncio as aioredis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys, lua
from shared.enqueue import (
    ACCEPTED_TTL_S,
    DELIVERED_MARKER_TTL_S,
    Delivery,
    EnqueueFailed,
    enqueue,
    keep_markers,
    message_digest,
    new_queue_id,
)
from shared.inbox_entries import DIGEST_FIELD, StoredEntry
from shared.payloads import InboxEntry
from tests.support.ingress import (
    InProcessIngress,
    address,
    inbox_entries,
    new_persona,
    send_raw,
    split_trace_header,
)

StartIngress = Callable[..., InProcessIngress]
MESSAGE = b"From: a@example.org\r\nSubject: once\r\nMessage-ID: <1@example.org>\r\n\r\nbody\r\n"


def queue_id_of(reply: bytes) -> str:
    return reply.decode().rsplit(" ", 1)[1]


def send_from(source_ip: str, port: int, mail_from: str, rcpt_to: list[str], message: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source_ip, 0)) as client:
        client.ehlo("other.sender.example")
        assert client.mail(mail_from)[0] == 250
        for recipient in rcpt_to:
            assert client.rcpt(recipient)[0] == 250
        return client.data(message)


# --- over SMTP -----------------------------------------------------------------------------


def test_the_same_message_again_gets_the_first_queue_id_and_is_stored_once(
    start_ingress: StartIngress, persona: str, redis_client: redis.Redis
) -> None:
    ingress = start_ingress()
    first = send_raw(ingress.port, "s@example.org", [address(persona)], MESSAGE)
    # the retry: another connection, another client port, another source address, later
    again = send_from("127.0.0.2", ingress.port, "s@example.org", [address(persona)], MESSAGE)

    assert first[0] == again[0] == 250
    assert queue_id_of(again[1]) == queue_id_of(first[1])
    [entry] = inbox_entries(redis_client, persona)
    assert entry.stream_id == f"{queue_id_of(first[1])}.0"
    assert f" id {entry.queue_id}\r\n".encode() in split_trace_header(entry.data)[0]
    assert int(cast(bytes, redis_client.get(keys.inbox_bytes(persona)))) == len(entry.data)
    digest = message_digest("s@example.org", [address(persona)], MESSAGE)
    marker = keys.accepted(persona, digest)
    assert redis_client.get(marker) == entry.queue_id.encode()
    assert 0 < cast(int, redis_client.ttl(marker)) <= ACCEPTED_TTL_S


@pytest.mark.parametrize(
    ("mail_from", "tag", "message"),
    [
        ("other@example.org", "", MESSAGE),  # another sender
        ("s@example.org", "news", MESSAGE),  # the same persona, written another way
        ("s@example.org", "", MESSAGE.replace(b"body", b"bodY")),  # one byte differs
        ("<>", "", MESSAGE),  # the null sender
    ],
)
def test_a_different_envelope_or_content_is_another_message(
    start_ingress: StartIngress, persona: str, redis_client: redis.Redis, mail_from: str, tag: str, message: bytes
) -> None:
    ingress = start_ingress()
    first = send_raw(ingress.port, "s@example.org", [address(persona)], MESSAGE)
    second = send_raw(ingress.port, mail_from, [address(persona, tag)], message)
    assert first[0] == second[0] == 250
    assert queue_id_of(first[1]) != queue_id_of(second[1])
    assert len(inbox_entries(redis_client, persona)) == 2


def test_the_marker_is_named_by_the_personas_last_entry_of_the_message(
    start_ingress: StartIngress, persona: str, redis_client: redis.Redis
) -> None:
    """The tunnel removes the marker with that entry (tests/system/test_e2e_inbound.py proves the resend)."""
    ingress = start_ingress()
    recipients = [address(persona), address(persona, "work")]
    assert send_raw(ingress.port, "s@example.org", recipients, MESSAGE)[0] == 250
    first, last = [
        fields for _, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], redis_client.xrange(keys.inbox(persona)))
    ]
    assert DIGEST_FIELD not in first
    assert last[DIGEST_FIELD].decode() == message_digest("s@example.org", recipients, MESSAGE)


def test_duplicates_are_counted_and_logged_apart_from_acceptances(start_ingress: StartIngress, persona: str) -> None:
    from prometheus_client import REGISTRY

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    ingress = start_ingress()
    accepted_before = sample("relay_ingress_messages_accepted_total")
    duplicates_before = sample("relay_ingress_duplicates_total")
    for _ in range(3):
        assert send_raw(ingress.port, "s@example.org", [address(persona)], MESSAGE)[0] == 250
    assert sample("relay_ingress_messages_accepted_total") - accepted_before == 1
    assert sample("relay_ingress_duplicates_total") - duplicates_before == 2


# --- enqueue() against Redis directly -------------------------------------------------------


def deliveries_builder(rcpt_to: list[tuple[str, str]], built: list[str]) -> Callable[[str], list[Delivery]]:
    """What the handler passes: entries naming the queue id they are built for."""

    def build(queue_id: str) -> list[Delivery]:
        built.append(queue_id)
        return [
            Delivery(
                persona_key,
                InboxEntry(
                    queue_id,
                    index,
                    "s@example.org",
                    rcpt,
                    f"id {queue_id}\r\n".encode() + MESSAGE,
                    0,
                    "192.0.2.1",
                    None,
                ),
            )
            for index, (persona_key, rcpt) in enumerate(rcpt_to)
        ]

    return build


async def test_a_retry_after_a_partial_multi_persona_commit_completes_it_under_the_first_queue_id(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    """One transaction per persona (Redis Cluster slots): if the first persona committed and the
    second did not, the 451's retry writes only the second, with the first attempt's queue id."""
    first, second = new_persona(), new_persona()
    recipients = [(first, address(first)), (second, address(second))]
    digest = message_digest("s@example.org", [rcpt for _, rcpt in recipients], MESSAGE)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        original_queue_id = new_queue_id()
        only_first = deliveries_builder(recipients[:1], [])
        assert (await enqueue(client, digest, original_queue_id, only_first)).entries_written == 1

        built: list[str] = []
        retry = await enqueue(client, digest, new_queue_id(), deliveries_builder(recipients, built))
    finally:
        await client.aclose()

    assert retry.queue_id == original_queue_id and retry.entries_written == 1
    assert built[-1] == original_queue_id  # rebuilt with the stored id before the second persona
    [entry_first] = inbox_entries(redis_client, first)
    [entry_second] = inbox_entries(redis_client, second)
    assert entry_first.stream_id == f"{original_queue_id}.0"
    assert entry_second.stream_id == f"{original_queue_id}.1"
    assert entry_second.data.startswith(f"id {original_queue_id}\r\n".encode())
    assert redis_client.get(keys.accepted(second, digest)) == original_queue_id.encode()


async def test_concurrent_submissions_of_one_message_store_it_once(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    persona_key = new_persona()
    recipients = [(persona_key, address(persona_key))]
    digest = message_digest("s@example.org", [address(persona_key)], MESSAGE)
    client = aioredis.Redis.from_url(redis_server.url, max_connections=32)
    try:
        outcomes = await asyncio.gather(
            *(enqueue(client, digest, new_queue_id(), deliveries_builder(recipients, [])) for _ in range(20)),
            return_exceptions=True,
        )
    finally:
        await client.aclose()

    [entry] = inbox_entries(redis_client, persona_key)
    answered = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert all(isinstance(failure, EnqueueFailed) for failure in failures)  # a 451, retried later
    assert answered and {outcome.queue_id for outcome in answered} == {entry.queue_id}
    assert sum(outcome.entries_written for outcome in answered) == 1


async def test_a_kept_marker_outlives_delivery_and_keeping_never_invents_one(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    """After a 451 for a write that happened (docs/HA.md), `keep_markers` keeps the marker past
    delivery, so the sender's retry gets the delivered copy's queue id and is not stored again.
    It keeps only what a write of this message left: no marker, no keeping; a marker left
    delivered (`redis.minReplicasToAck`) is revived only for the queue id it names, and is
    otherwise no marker at all, so a resend after delivery is still a new message."""
    persona_key = new_persona()
    recipients = [(persona_key, address(persona_key))]
    digest = message_digest("s@example.org", [address(persona_key)], MESSAGE)
    marker = keys.accepted(persona_key, digest)
    client = aioredis.Redis.from_url(redis_server.url)

    async def deliver(delivered_marker_ttl_s: int) -> str:
        """What the tunnel does once the gateway acknowledged: INBOX_REMOVE; the stream id."""
        [(entry_id, fields)] = cast(
            list[tuple[bytes, dict[bytes, bytes]]], redis_client.xrange(keys.inbox(persona_key))
        )
        stored = StoredEntry.parse(entry_id, fields)
        script_keys, args = stored.remove_call(persona_key, delivered_marker_ttl_s)
        assert await lua.INBOX_REMOVE.on(client)(keys=script_keys, args=args) == 1
        return stored.entry.queue_id

    try:
        await keep_markers(client, digest, {persona_key: new_queue_id()})
        assert redis_client.get(marker) is None  # nothing written, nothing kept

        first = await enqueue(client, digest, new_queue_id(), deliveries_builder(recipients, []))
        await keep_markers(client, digest, {persona_key: first.queue_id})  # answered 451 after all
        assert await deliver(DELIVERED_MARKER_TTL_S) == first.queue_id
        assert redis_client.get(marker) == f"{lua.MARKER_KEPT}{first.queue_id}".encode()
        assert 0 < cast(int, redis_client.ttl(marker)) <= ACCEPTED_TTL_S
        retry = await enqueue(client, digest, new_queue_id(), deliveries_builder(recipients, []))
        assert (retry.queue_id, retry.entries_written) == (first.queue_id, 0)
        assert not inbox_entries(redis_client, persona_key)

        redis_client.delete(marker)  # the kept marker expired: a day later the same bytes are new mail
        second = await enqueue(client, digest, new_queue_id(), deliveries_builder(recipients, []))
        assert second.entries_written == 1
        assert await deliver(DELIVERED_MARKER_TTL_S) == second.queue_id  # answered 250, delivered
        assert redis_client.get(marker) == f"{lua.MARKER_DELIVERED}{second.queue_id}".encode()
        assert 0 < cast(int, redis_client.ttl(marker)) <= DELIVERED_MARKER_TTL_S
        await keep_markers(client, digest, {persona_key: new_queue_id()})  # another attempt's 451
        assert redis_client.get(marker) == f"{lua.MARKER_DELIVERED}{second.queue_id}".encode()

        third = await enqueue(client, digest, new_queue_id(), deliveries_builder(recipients, []))
        assert third.queue_id != second.queue_id and third.entries_written == 1  # a resend is new mail
        assert await deliver(0) == third.queue_id  # without minReplicasToAck the marker goes at once
        assert redis_client.get(marker) is None
    finally:
        await client.aclose()


def test_the_digest_separates_fields_unambiguously() -> None:
    assert message_digest("a", ["b"], b"c") != message_digest("ab", [], b"c")
    assert message_digest("a", ["b", "c"], b"") != message_digest("a", ["bc"], b"")
    assert message_digest("a", ["b"], b"c") != message_digest("a", [], b"bc")
    assert message_digest("a", ["b"], b"c") == message_digest("a", ["b"], b"c")
    assert len(message_digest("", [], b"")) == 64
