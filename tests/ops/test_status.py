"""`protege-relay status` against a real Redis holding keys as the services write them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from arq.constants import in_progress_key_prefix

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.config import load_config
from shared.nodeinfo import publish_node_info
from shared.payloads import DeliveryResult, InboxEntry, OutboundJob
from shared.redis import connect_arq
from tests.support import launcher
from tests.support.processes import REPO_ROOT, free_port, service_env

PK_A = "a" * 52
PK_B = "b" * 52
PK_C = "c" * 52
OLDEST_INBOX_AGE_S = 60
CLI_TIMEOUT_S = 30


def run_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return launcher.run(
        [sys.executable, "-m", "protege_relay.cli", "status", *args],
        env=service_env(redis_url),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def inbox_entry(persona_key: str, queue_id: str, body: bytes) -> dict[bytes, bytes]:
    entry = InboxEntry(
        queue_id=queue_id,
        recipient_index=0,
        mail_from="sender@example.org",
        rcpt_to=f"{persona_key}@relay.test",
        data=body,
        received_at_ms=int(time.time() * 1000),
        client_ip="192.0.2.1",
    )
    return {b"m": entry.pack()}


async def populate(redis_url: str) -> None:
    """Two live nodes, one dead one, three owned personas, inboxes, egress jobs and a result."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        await publish_node_info(client, "tunnel-a", "tunnel", connected=2)
        await publish_node_info(client, "egress-a", "egress", jobs_running=1)
        await client.sadd(keys.NODES_KEY, "dead-node")  # its liveness hash expired long ago

        await client.set(keys.owner(PK_A), "tunnel-a", ex=30)
        await client.set(keys.owner(PK_B), "tunnel-a", ex=30)
        await client.set(keys.owner(PK_C), "gone-node", ex=30)
        await client.set(keys.seen(PK_A), "1", ex=3600)

        old_id = f"{int(time.time() * 1000) - OLDEST_INBOX_AGE_S * 1000}-0"
        await client.xadd(keys.inbox(PK_A), inbox_entry(PK_A, "qold", b"x" * 100), id=old_id)
        await client.xadd(keys.inbox(PK_A), inbox_entry(PK_A, "qnew", b"y" * 50))
        await client.incrby(keys.inbox_bytes(PK_A), 150)
        await client.xgroup_create(keys.inbox(PK_A), keys.INBOX_GROUP, id="0", mkstream=True)
        await client.xreadgroup(keys.INBOX_GROUP, "tunnel-a", {keys.inbox(PK_A): ">"}, count=1)
        await client.xadd(keys.inbox(PK_B), inbox_entry(PK_B, "qother", b"z" * 10))
        await client.incrby(keys.inbox_bytes(PK_B), 10)

        result = DeliveryResult(stream_id="out-1", status="sent", message_id="<m1@relay.test>")
        await client.xadd(keys.results(PK_A), {b"r": result.pack()})
    finally:
        await client.aclose()

    config = load_config(environ={"RELAY_REDIS_URL": redis_url})
    pool = connect_arq(config)
    try:
        for stream_id, defer_s in (("out-2", 0), ("out-3", 3600)):
            job = OutboundJob(PK_A, stream_id, f"{PK_A}@relay.test", ["r@example.org"], b"hi", 0)
            enqueued = await pool.enqueue_job(
                "deliver",
                job.pack(),
                _job_id=keys.egress_job_id(PK_A, stream_id),
                _queue_name=keys.EGRESS_QUEUE,
                _defer_by=defer_s or None,
            )
            assert enqueued is not None
        # What an arq worker sets while it runs a job.
        await pool.set(in_progress_key_prefix + keys.egress_job_id(PK_A, "out-2"), b"1", px=60_000)
    finally:
        await pool.aclose()


async def test_json_status_reports_nodes_owners_backlog_and_queue(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    await populate(redis_server.url)

    completed = run_cli(redis_server.url, "--json")

    assert completed.returncode == 0, completed.stderr
    status: dict[str, Any] = json.loads(completed.stdout)
    nodes = {node["node_id"]: node for node in status["nodes"]}
    assert sorted(nodes) == ["egress-a", "tunnel-a"]
    assert status["nodes_alive"] == 2
    assert nodes["tunnel-a"]["role"] == "tunnel"
    assert nodes["tunnel-a"]["personas_owned"] == 2
    assert nodes["tunnel-a"]["counters"] == {"connected": 2}
    assert nodes["egress-a"]["counters"] == {"jobs_running": 1}
    assert 0 <= nodes["tunnel-a"]["last_seen_age_s"] < CLI_TIMEOUT_S

    assert status["pruned_nodes"] == ["dead-node"]
    assert redis_client.smembers(keys.NODES_KEY) == {b"tunnel-a", b"egress-a"}

    assert status["personas_connected"] == 3
    assert status["owners_on_unknown_nodes"] == {"gone-node": 1}

    inbox = status["inbox"]
    assert (inbox["entries"], inbox["personas"], inbox["in_flight"], inbox["total_bytes"]) == (3, 2, 1, 160)
    assert OLDEST_INBOX_AGE_S <= inbox["oldest_age_s"] < OLDEST_INBOX_AGE_S + CLI_TIMEOUT_S

    egress = status["egress"]
    assert (egress["queued"], egress["ready"], egress["deferred"], egress["running"]) == (2, 1, 1, 1)
    assert 0 <= egress["oldest_age_s"] < CLI_TIMEOUT_S

    results = status["results"]
    assert (results["entries"], results["personas"]) == (1, 1)


async def test_table_status_is_aligned_and_names_every_node(redis_server: EmbeddedRedis) -> None:
    await populate(redis_server.url)

    completed = run_cli(redis_server.url)

    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert "Nodes alive: 2" in lines
    assert "Pruned dead nodes: dead-node" in lines
    assert "Personas connected: 3" in lines
    node_header = next(index for index, line in enumerate(lines) if line.startswith("NODE"))
    node_rows = lines[node_header + 1 : node_header + 3]
    assert [row.split()[0] for row in node_rows] == ["egress-a", "tunnel-a"]
    # Right-aligned numbers: the PERSONAS column ends at the same offset on every row.
    personas_end = lines[node_header].index("PERSONAS") + len("PERSONAS")
    assert [row[personas_end - 1] for row in node_rows] == ["0", "2"]

    queue_header = next(index for index, line in enumerate(lines) if line.startswith("QUEUE"))
    queue_rows = {line.split()[0]: line for line in lines[queue_header + 1 : queue_header + 4]}
    waiting_end = lines[queue_header].index("WAITING") + len("WAITING")
    assert {name: row[:waiting_end].split()[-1] for name, row in queue_rows.items()} == {
        "inbox": "3",
        "egress": "2",
        "results": "1",
    }
    # The oldest entry was written 60 s in the past; the CLI may take a few seconds on a loaded machine.
    assert re.search(r" 1m0\ds$", queue_rows["inbox"].rstrip()), queue_rows["inbox"]


def test_empty_redis_reports_nothing_waiting(redis_server: EmbeddedRedis) -> None:
    completed = run_cli(redis_server.url, "--json")

    assert completed.returncode == 0, completed.stderr
    status = json.loads(completed.stdout)
    assert status["nodes"] == [] and status["personas_connected"] == 0
    assert status["inbox"]["entries"] == 0 and status["inbox"]["oldest_age_s"] is None
    assert status["egress"]["queued"] == 0 and status["results"]["entries"] == 0


@pytest.mark.timeout(60)
def test_unreachable_redis_exits_1_without_leaking_the_password() -> None:
    url = f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"

    completed = run_cli(url)

    assert completed.returncode == 1
    assert "cannot read Redis" in completed.stderr
    assert "hunter2secret" not in completed.stderr + completed.stdout
    assert ":***@127.0.0.1" in completed.stderr
