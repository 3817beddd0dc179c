"""What one message costs Redis (docs/CAPACITY.md), measured on real processes: the commands
(INFO commandstats deltas), the bytes in and out of the primary, the replication stream a
replica receives, and the primary's CPU, per inbound and per outbound message; and what
`redis.minReplicasToAck=1` adds to an enqueue (docs/HA.md). Figures are printed, not asserted
(speed targets live in the bench); the assertions hold what must not drift: one inbox entry and
two scripts (enqueue, removal) per inbound message.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aioredis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.enqueue import Delivery, enqueue, message_digest, new_queue_id
from shared.identity import Passport
from shared.payloads import InboxEntry
from shared.replication import ReplicaAck
from tests.support.cluster import Cluster
from tests.support.load import GatewayFleet, SmtpLoad, outbound_sends, reconcile_outbound
from tests.support.mx_sink import MxSink
from tests.support.processes import free_port
from tests.support.sentinel import DataNode

DOMAIN = "relay.test"
REMOTE_DOMAIN = "example.test"
PERSONAS = 10
INBOUND = 300
OUTBOUND = 100
MESSAGE_BYTES = 600
ENQUEUES = 400
SETTLE_TIMEOUT_S = 60.0

CLUSTER_ENV = {
    "RELAY_MAIL_DOMAINS": DOMAIN,
    "RELAY_RATE_LIMITS_SMTP_CONNECTIONS_PER_MINUTE_PER_IP": "1000000",
    "RELAY_RATE_LIMITS_SMTP_MESSAGES_PER_MINUTE_PER_IP": "1000000",
    "RELAY_RATE_LIMITS_WS_AUTH_ATTEMPTS_PER_MINUTE_PER_IP": "1000000",
    "RELAY_RATE_LIMITS_OUTBOUND_MESSAGES_PER_MINUTE_PER_PERSONA": "1000000",
    "RELAY_EGRESS_RETRY_BASE_SECONDS": "1",
    "RELAY_LOGGING_LEVEL": "warning",
}


@pytest.fixture
def replica(tmp_path: Path, redis_server: EmbeddedRedis) -> Iterator[DataNode]:
    node = DataNode("replica", tmp_path / "replica").start(replica_of=redis_server.port)
    yield node
    node.stop()


class Snapshot:
    """INFO counters of the primary (and the replication offset) at one moment."""

    def __init__(self, client: redis.Redis) -> None:
        info: dict[str, Any] = client.info("all")  # type: ignore[assignment]
        self.calls = {
            name[len("cmdstat_") :]: int(v["calls"]) for name, v in info.items() if name.startswith("cmdstat_")
        }
        self.net_in = int(info["total_net_input_bytes"])
        self.net_out = int(info["total_net_output_bytes"])
        self.repl_offset = int(info["master_repl_offset"])
        self.cpu_s = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        self.at = time.monotonic()

    def per_message(self, later: Snapshot, messages: int) -> dict[str, Any]:
        calls = {name: later.calls.get(name, 0) - self.calls.get(name, 0) for name in later.calls}
        ignored = {"info", "ping", "command", "client|setname", "hello"}
        commands = {
            name: round(count / messages, 2) for name, count in sorted(calls.items()) if count and name not in ignored
        }
        cpu = later.cpu_s - self.cpu_s
        return {
            "commands": commands,
            "commands_total": round(sum(commands.values()), 1),
            "bytes_in": round((later.net_in - self.net_in) / messages),
            "bytes_out": round((later.net_out - self.net_out) / messages),
            "replication_bytes": round((later.repl_offset - self.repl_offset) / messages),
            "primary_cpu_ms": round(cpu * 1000 / messages, 3),
            "messages_per_primary_cpu_second": round(messages / cpu) if cpu > 0 else None,
            "wall_rate_per_s": round(messages / (later.at - self.at), 1),
        }


async def until(predicate: Any, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(0.05)


async def test_redis_cost_per_inbound_and_outbound_message(
    tmp_path: Path, redis_server: EmbeddedRedis, replica: DataNode
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    with MxSink("127.0.0.1", free_port()) as sink:
        routes = json.dumps({REMOTE_DOMAIN: f"127.0.0.1:{sink.port}"})
        cluster = Cluster(redis_server.url, tmp_path / "cluster", {**CLUSTER_ENV, "RELAY_EGRESS_ROUTES": routes})
        try:
            cluster.start(ingress=1, tunnel=1, egress=1)
            fleet = await GatewayFleet(cluster.tunnel_urls, [Passport.generate() for _ in range(PERSONAS)]).start()
            smtp = SmtpLoad(cluster.smtp_ports, concurrency=4)
            plan = smtp.plan(
                [f"{g.persona_key}@{DOMAIN}" for g in fleet.gateways], INBOUND, size_of=lambda _: MESSAGE_BYTES
            )
            before = Snapshot(client)
            ledger = await smtp.send(plan)
            await until(lambda: fleet.received_count() >= INBOUND, SETTLE_TIMEOUT_S, "inbound not delivered")
            await until(
                lambda: sum(cast(int, client.xlen(keys.inbox(g.persona_key))) for g in fleet.gateways) == 0,
                SETTLE_TIMEOUT_S,
                "inbox not emptied",
            )
            inbound = before.per_message(Snapshot(client), INBOUND)

            sends = outbound_sends(fleet.gateways, OUTBOUND, DOMAIN, REMOTE_DOMAIN)
            before = Snapshot(client)
            for index, send in enumerate(sends):
                await fleet.send_outbound(fleet.gateways[index % PERSONAS], send)
            ids = {send.stream_id for send in sends}
            await until(lambda: ids <= fleet.results().keys(), SETTLE_TIMEOUT_S, "outbound results missing")
            await until(
                lambda: all(cast(int, client.xlen(keys.results(g.persona_key))) == 0 for g in fleet.gateways),
                SETTLE_TIMEOUT_S,
                "results not removed",
            )
            outbound = before.per_message(Snapshot(client), OUTBOUND)
            books = reconcile_outbound(sends, [m.data for m in sink.received()], fleet.results())
            await fleet.stop()
        finally:
            cluster.stop()
    client.close()
    print(
        f"\nredis cost per inbound message ({MESSAGE_BYTES} B, 1 recipient, gateway connected): {json.dumps(inbound)}"
    )
    print(f"redis cost per outbound message ({MESSAGE_BYTES} B, 1 recipient): {json.dumps(outbound)}")
    assert len(ledger.accepted) == INBOUND
    books.assert_clean()
    assert inbound["commands"]["xadd"] == pytest.approx(1.0, abs=0.05)  # one inbox entry (commandstats counts
    assert 2.0 <= inbound["commands"]["evalsha"] < 2.2  # the commands scripts run): enqueue + removal scripts
    assert inbound["replication_bytes"] > MESSAGE_BYTES  # the message reached the replica
    assert outbound["commands"]["evalsha"] >= 1.0  # the job script (then the worker's and the publish)


async def test_redis_cost_of_min_replicas_to_ack(redis_server: EmbeddedRedis, replica: DataNode) -> None:
    """Sequential enqueues of one 600-byte message, with and without WAIT for the replica."""
    client = aioredis.Redis.from_url(redis_server.url)
    persona = Passport.generate().persona_key
    figures: dict[str, dict[str, float]] = {}
    try:
        for replicas in (0, 1):
            timings = []
            for index in range(ENQUEUES):
                queue_id = new_queue_id()
                data = f"Subject: {replicas}-{index}\r\n\r\n".encode() + b"x" * MESSAGE_BYTES
                entry = InboxEntry(
                    queue_id=queue_id,
                    recipient_index=0,
                    mail_from="a@b.test",
                    rcpt_to=f"{persona}@{DOMAIN}",
                    data=data,
                    received_at_ms=0,
                    client_ip="127.0.0.1",
                )

                def deliveries(chosen: str, entry: InboxEntry = entry) -> list[Delivery]:
                    return [Delivery(persona, entry)]

                started = time.perf_counter()
                await enqueue(
                    client,
                    message_digest("a@b.test", [entry.rcpt_to], data),
                    queue_id,
                    deliveries,
                    ReplicaAck(replicas, 1000),
                )
                timings.append((time.perf_counter() - started) * 1000)
            timings.sort()
            figures[f"minReplicasToAck={replicas}"] = {
                "p50_ms": round(statistics.median(timings), 3),
                "p99_ms": round(timings[int(len(timings) * 0.99)], 3),
                "per_second_one_client": round(1000 / statistics.mean(timings)),
            }
        stored = int(await client.xlen(keys.inbox(persona)))
    finally:
        await client.aclose()
    print(f"\nenqueue latency, loopback replica: {json.dumps(figures)}")
    assert stored == 2 * ENQUEUES
