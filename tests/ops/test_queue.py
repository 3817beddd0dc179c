"""`protege-relay queue` against a real Redis holding real queued mail: inbound messages sent with
smtplib through a real `protege-relay ingress` process, outbound jobs queued by the tunnel's own
enqueue code and attempted by a real `protege-relay egress` process against a loopback MX that
defers them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aioredis
from arq.constants import in_progress_key_prefix, job_key_prefix

from protege_relay.embedded_redis import EmbeddedRedis
from services.tunnel.outbound import OutboundQueue
from shared import keys, lua
from shared.inbox_entries import StoredEntry
from shared.payloads import DeliveryResult, OutboundJob
from tests.support import launcher
from tests.support.ingress import address, mark_seen, new_persona, send_raw
from tests.support.mx_sink import MxSink
from tests.support.processes import REPO_ROOT, ServiceProcess, free_port, poll_until, service_env

pytestmark = pytest.mark.timeout(120)

Spawn = Callable[..., ServiceProcess]
CLI_TIMEOUT_S = 30
GREYLISTED = "451 4.7.1 greylisted, try again later"


def queue_cli(redis_url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return launcher.run(
        [sys.executable, "-m", "protege_relay.cli", "queue", *args],
        env=service_env(redis_url),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        input=stdin,
    )


def queue_json(redis_url: str, *args: str) -> dict[str, Any]:
    completed = queue_cli(redis_url, "list", "--json", *args)
    assert completed.returncode == 0, completed.stderr
    document: dict[str, Any] = json.loads(completed.stdout)
    return document


def by_persona(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {inbox["persona"]: inbox for inbox in document["inbound"]}


def counted_bytes(client: redis.Redis, persona_key: str) -> int:
    return int(cast(bytes | None, client.get(keys.inbox_bytes(persona_key))) or 0)


def stored_bytes(client: redis.Redis, persona_key: str) -> int:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.inbox(persona_key)))
    return sum(StoredEntry.parse(entry_id, fields).size_bytes for entry_id, fields in entries)


# --- inbound ---------------------------------------------------------------------------------


@pytest.fixture
def ingress_port(spawn: Spawn) -> int:
    port = free_port()
    spawn(
        "ingress", port=port, RELAY_SMTP_PORT=str(port), RELAY_MAIL_DOMAINS="relay.test", RELAY_SMTP_MAX_RECIPIENTS="10"
    )
    return port


def message(subject: str, body: str = "the body stays private") -> bytes:
    return f"From: sender@example.org\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()


def queue_id_of(reply: bytes) -> str:
    assert reply.startswith(b"2.0.0"), reply
    return reply.decode().rsplit(" ", 1)[1]


def test_list_shows_every_inbound_message_with_its_ids_sizes_and_deliveries(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, ingress_port: int
) -> None:
    alice, bob = new_persona(), new_persona()
    mark_seen(redis_client, alice)
    mark_seen(redis_client, bob)
    _, first = send_raw(ingress_port, "one@example.org", [address(alice)], message("first"))
    _, both = send_raw(ingress_port, "two@example.org", [address(alice), address(bob)], message("both"))
    # The tunnel reads alice's first message and sends it to her gateway (not yet acknowledged).
    redis_client.xgroup_create(keys.inbox(alice), keys.INBOX_GROUP, id="0")
    redis_client.xreadgroup(keys.INBOX_GROUP, "tunnel-1", {keys.inbox(alice): ">"}, count=1)

    document = queue_json(redis_server.url)

    assert document["outbound"] == []
    inboxes = by_persona(document)
    assert sorted(inboxes) == sorted([alice, bob])
    assert inboxes[alice]["messages"] == 2 and inboxes[bob]["messages"] == 1
    assert inboxes[alice]["bytes"] == stored_bytes(redis_client, alice) == counted_bytes(redis_client, alice)
    assert inboxes[alice]["oldestAgeSeconds"] >= inboxes[alice]["entries"][1]["ageSeconds"] >= 0
    first_entry, both_entry = inboxes[alice]["entries"]
    assert set(first_entry) == {"streamId", "queueId", "mailFrom", "bytes", "ageSeconds", "deliveries"}
    assert (first_entry["queueId"], first_entry["streamId"]) == (queue_id_of(first), queue_id_of(first) + ".0")
    assert (first_entry["mailFrom"], first_entry["deliveries"]) == ("one@example.org", 1)
    assert (both_entry["streamId"], both_entry["deliveries"]) == (queue_id_of(both) + ".0", 0)
    assert inboxes[bob]["entries"][0]["streamId"] == queue_id_of(both) + ".1"
    assert sum(entry["bytes"] for entry in inboxes[alice]["entries"]) == inboxes[alice]["bytes"]

    only_bob = queue_json(redis_server.url, "--persona", bob)
    assert [inbox["persona"] for inbox in only_bob["inbound"]] == [bob]

    table = queue_cli(redis_server.url, "list")
    assert table.returncode == 0, table.stderr
    print(table.stdout)
    assert "Inbound: 3 messages for 2 persona(s)" in table.stdout
    assert queue_id_of(first) + ".0" in table.stdout and "Outbound: 0 jobs" in table.stdout


def test_show_prints_envelope_and_escaped_headers_but_never_the_body(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, ingress_port: int
) -> None:
    alice = new_persona()
    mark_seen(redis_client, alice)
    hostile = "hi \x1b[2Jthere"  # a terminal escape in a header must not reach the terminal
    _, reply = send_raw(ingress_port, "one@example.org", [address(alice)], message(hostile, "secret body"))
    stream_id = queue_id_of(reply) + ".0"

    shown = queue_cli(redis_server.url, "show", stream_id)

    assert shown.returncode == 0, shown.stderr
    print(shown.stdout)
    assert f"streamId: {stream_id}" in shown.stdout
    assert "mailFrom: one@example.org" in shown.stdout
    assert f"rcptTo: {address(alice)}" in shown.stdout
    assert "Subject: hi \\x1b[2Jthere" in shown.stdout and "\x1b" not in shown.stdout
    assert "Received: from" in shown.stdout
    assert "secret body" not in shown.stdout

    as_json = json.loads(queue_cli(redis_server.url, "show", stream_id, "--json").stdout)
    assert (as_json["persona"], as_json["clientIp"]) == (alice, "127.0.0.1")
    assert "secret body" not in json.dumps(as_json)

    missing = queue_cli(redis_server.url, "show", "qnosuchmessage.0")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "no queued inbound message" in missing.stderr


def test_delete_removes_one_message_and_the_byte_counter_stays_right_when_the_gateway_acks_it_later(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, ingress_port: int
) -> None:
    alice = new_persona()
    mark_seen(redis_client, alice)
    _, doomed = send_raw(
        ingress_port, "one@example.org", [address(alice)], message("doomed", ("y" * 70 + "\r\n") * 1500)
    )
    send_raw(ingress_port, "two@example.org", [address(alice)], message("kept"))
    redis_client.xgroup_create(keys.inbox(alice), keys.INBOX_GROUP, id="0")
    [(_, [(doomed_entry_id, doomed_fields)])] = cast(
        list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]],
        redis_client.xreadgroup(keys.INBOX_GROUP, "tunnel-1", {keys.inbox(alice): ">"}, count=1),
    )
    before = counted_bytes(redis_client, alice)
    body_key = keys.inbox_body(alice, queue_id_of(doomed) + ".0")
    assert redis_client.exists(body_key)  # over 64 KiB: stored apart from its entry

    shown = queue_cli(redis_server.url, "show", queue_id_of(doomed) + ".0")
    assert "Subject: doomed" in shown.stdout and "yyyy" not in shown.stdout

    deleted = queue_cli(redis_server.url, "delete", queue_id_of(doomed) + ".0")

    assert deleted.returncode == 0, deleted.stderr
    assert "deleted " + queue_id_of(doomed) + ".0" in deleted.stdout
    assert redis_client.xlen(keys.inbox(alice)) == 1
    assert cast(dict[str, Any], redis_client.xpending(keys.inbox(alice), keys.INBOX_GROUP))["pending"] == 0
    after = counted_bytes(redis_client, alice)
    assert before - after > 100_000
    assert not redis_client.exists(body_key)
    assert after == stored_bytes(redis_client, alice)

    # The gateway acknowledges the message it had already received: the tunnel removes it
    # through the same script, which must not count it a second time.
    script_keys, args = StoredEntry.parse(doomed_entry_id, doomed_fields).remove_call(alice)
    assert lua.INBOX_REMOVE.on(redis_client)(keys=script_keys, args=args) == 0
    assert counted_bytes(redis_client, alice) == after == stored_bytes(redis_client, alice)

    again = queue_cli(redis_server.url, "delete", queue_id_of(doomed) + ".0")
    assert again.returncode == 1 and "no queued inbound message" in again.stderr


def test_delete_by_queue_id_removes_every_copy_of_the_message(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, ingress_port: int
) -> None:
    alice, bob = new_persona(), new_persona()
    mark_seen(redis_client, alice)
    mark_seen(redis_client, bob)
    _, reply = send_raw(ingress_port, "two@example.org", [address(alice), address(bob)], message("both"))

    deleted = queue_cli(redis_server.url, "delete", queue_id_of(reply))

    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.count("deleted ") == 2
    assert redis_client.xlen(keys.inbox(alice)) == redis_client.xlen(keys.inbox(bob)) == 0
    assert counted_bytes(redis_client, alice) == counted_bytes(redis_client, bob) == 0


def test_purge_asks_first_refuses_without_a_terminal_and_empties_only_that_persona(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, ingress_port: int
) -> None:
    alice, bob = new_persona(), new_persona()
    mark_seen(redis_client, alice)
    mark_seen(redis_client, bob)
    for index in range(5):
        send_raw(ingress_port, "one@example.org", [address(alice)], message(f"m{index}"))
    send_raw(ingress_port, "one@example.org", [address(bob)], message("bob's"))
    bob_bytes = counted_bytes(redis_client, bob)

    refused = queue_cli(redis_server.url, "purge", "--persona", alice, stdin="y\n")
    assert refused.returncode == 1
    assert "add --yes" in refused.stderr and refused.stderr.count("\n") == 1
    assert redis_client.xlen(keys.inbox(alice)) == 5

    purged = queue_cli(redis_server.url, "purge", "--persona", alice, "--yes")

    assert purged.returncode == 0, purged.stderr
    assert "purged 5 message(s)" in purged.stdout
    assert redis_client.xlen(keys.inbox(alice)) == 0 and counted_bytes(redis_client, alice) == 0
    assert redis_client.xlen(keys.inbox(bob)) == 1 and counted_bytes(redis_client, bob) == bob_bytes
    # The inbox still takes mail, and counts it from zero.
    send_raw(ingress_port, "one@example.org", [address(alice)], message("after"))
    assert counted_bytes(redis_client, alice) == stored_bytes(redis_client, alice) > 0


# --- outbound --------------------------------------------------------------------------------


@pytest.fixture
def greylisting_mx() -> Iterator[MxSink]:
    sink = MxSink("127.0.0.1", free_port(), rcpt_reply=GREYLISTED).start()
    yield sink
    sink.stop()


async def enqueue_outbound(redis_url: str, persona_key: str, stream_ids: list[str]) -> list[str]:
    """Queue jobs exactly as the tunnel does for an accepted outbound stream."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        outbound = OutboundQueue(client, messages_per_minute=100, origin_ttl_s=60)
        for stream_id in stream_ids:
            job = OutboundJob(
                persona_key,
                stream_id,
                f"{persona_key}@relay.test",
                ["user@example.test"],
                b"From: p@relay.test\r\nSubject: out\r\n\r\nhi\r\n",
                int(time.time() * 1000),
            )
            assert await outbound.enqueue(job)
        return [keys.egress_job_id(persona_key, stream_id) for stream_id in stream_ids]
    finally:
        await client.aclose()


def outbound_jobs(redis_url: str) -> dict[str, dict[str, Any]]:
    return {job["jobId"]: job for job in queue_json(redis_url, "--outbound")["outbound"]}


def results(client: redis.Redis, persona_key: str) -> list[DeliveryResult]:
    return [
        DeliveryResult.unpack(fields[b"r"])
        for _, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.results(persona_key)))
    ]


def test_outbound_jobs_are_listed_retried_now_and_cancelled_with_a_failed_result(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, spawn: Spawn, greylisting_mx: MxSink
) -> None:
    persona_key = new_persona()
    spawn(
        "egress",
        RELAY_EGRESS_ROUTES=json.dumps({"example.test": f"127.0.0.1:{greylisting_mx.port}"}),
        RELAY_EGRESS_RETRY_BASE_SECONDS="3600",
        RELAY_EGRESS_HELO_NAME="egress.relay.test",
    )
    retried, cancelled = asyncio.run(enqueue_outbound(redis_server.url, persona_key, ["out-retry", "out-cancel"]))

    jobs = poll_until(
        lambda: (
            (found := outbound_jobs(redis_server.url))
            and all(job["attempts"] == 1 and job["lastError"] for job in found.values())
            and found
        ),
        timeout_s=30,
        message="the egress did not attempt both jobs",
    )
    assert sorted(jobs) == sorted([retried, cancelled])
    for job in jobs.values():
        assert set(job) == {"jobId", "persona", "recipient", "attempts", "nextAttemptSeconds", "lastError"}
        assert (job["persona"], job["recipient"]) == (persona_key, "user@example.test")
        assert job["lastError"] == f"smtp_4xx: {GREYLISTED}"
        assert 0 <= job["nextAttemptSeconds"] <= 3600
    table = queue_cli(redis_server.url, "list", "--outbound")
    print(table.stdout)
    assert "Outbound: 2 jobs" in table.stdout and "greylisted" in table.stdout

    retry = queue_cli(redis_server.url, "retry", retried)
    assert retry.returncode == 0, retry.stderr
    poll_until(
        lambda: outbound_jobs(redis_server.url)[retried]["attempts"] == 2,
        timeout_s=30,
        message="retry did not make the job run again",
    )

    cancel = queue_cli(redis_server.url, "cancel", cancelled)
    assert cancel.returncode == 0, cancel.stderr
    [result] = results(redis_client, persona_key)
    assert (result.stream_id, result.status, result.error) == ("out-cancel", "failed", "cancelled_by_operator")
    assert (result.attempts, result.recipient, result.permanent) == (1, "user@example.test", True)
    assert sorted(outbound_jobs(redis_server.url)) == [retried]
    assert not redis_client.exists(job_key_prefix + cancelled)

    for action, job_id in (("retry", cancelled), ("cancel", cancelled), ("retry", "deliver:nobody:x")):
        refused = queue_cli(redis_server.url, action, job_id)
        assert refused.returncode == 1 and "no queued outbound job" in refused.stderr


def test_a_job_a_worker_is_running_is_neither_retried_nor_cancelled(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    persona_key = new_persona()
    [job_id] = asyncio.run(enqueue_outbound(redis_server.url, persona_key, ["out-busy"]))
    redis_client.set(in_progress_key_prefix + job_id, b"1", px=60_000)  # what a worker holds while it runs

    for action in ("retry", "cancel"):
        refused = queue_cli(redis_server.url, action, job_id)
        assert refused.returncode == 1 and "being delivered right now" in refused.stderr

    assert results(redis_client, persona_key) == []
    assert redis_client.zscore(keys.EGRESS_QUEUE, job_id) is not None
    assert outbound_jobs(redis_server.url)[job_id]["nextAttemptSeconds"] == 0


def test_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"

    completed = queue_cli(url, "list")

    assert completed.returncode == 1
    assert completed.stderr.count("\n") == 1 and "cannot use Redis" in completed.stderr
    assert "s3cret" not in completed.stderr
