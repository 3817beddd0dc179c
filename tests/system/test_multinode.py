"""Multi-node proof: one Redis, 2 ingress, 3 tunnel and 2 egress processes started as the
deployment runs them (tests/support/cluster.py reads deploy/service_matrix.json), 20 personas
spread round-robin over the tunnel nodes, mail in through both ingresses and out through the
personas' sockets; mid-run one tunnel node is SIGKILLed and another sent SIGTERM. Every
accepted message reaches its persona (a repeat only under the same stream id), every
outbound stream reaches the MX and its result reaches the sender.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.identity import Passport
from tests.support.cluster import Cluster, soak_factor
from tests.support.load import GatewayFleet, OutboundSend, SmtpLoad, make_message, reconcile, stream_header_of, token_of
from tests.support.mx_sink import MxSink
from tests.support.wait import eventually

DOMAIN = "relay.test"
REMOTE_DOMAIN = "example.test"
PERSONAS = 20
INBOUND_MESSAGES = 500 * soak_factor()
OUTBOUND_MESSAGES = 100 * soak_factor()
KILL_AT_FRACTION = 0.3  # SIGKILL tunnel-0 once this share of the inbound mail has arrived
TERM_AT_FRACTION = 0.6  # SIGTERM tunnel-1 here
SETTLE_TIMEOUT_S = 60.0 * soak_factor()
OUTBOUND_CONCURRENCY = 5

# Limits raised for load from one loopback address; timeouts shortened so the stranded
# entries of a killed node are re-sent within the test's budget.
CLUSTER_ENV = {
    "RELAY_MAIL_DOMAINS": DOMAIN,
    "RELAY_RATE_LIMITS_SMTP_CONNECTIONS_PER_MINUTE_PER_IP": "1000000",
    "RELAY_RATE_LIMITS_SMTP_MESSAGES_PER_MINUTE_PER_IP": "1000000",
    "RELAY_RATE_LIMITS_WS_AUTH_ATTEMPTS_PER_MINUTE_PER_IP": "1000000",
    "RELAY_RATE_LIMITS_OUTBOUND_MESSAGES_PER_MINUTE_PER_PERSONA": "1000000",
    "RELAY_WS_ACK_TIMEOUT_MS": "5000",
    "RELAY_EGRESS_RETRY_BASE_SECONDS": "1",
    "RELAY_EGRESS_JOB_TIMEOUT_SECONDS": "5",
    "RELAY_EGRESS_CONNECT_TIMEOUT_SECONDS": "5",
}


@pytest.fixture
def cluster(tmp_path: Path, redis_server: EmbeddedRedis, mx_sink: MxSink) -> Iterator[Cluster]:
    env = {**CLUSTER_ENV, "RELAY_EGRESS_ROUTES": json.dumps({REMOTE_DOMAIN: f"127.0.0.1:{mx_sink.port}"})}
    started = Cluster(redis_server.url, tmp_path / "cluster", env)
    try:
        yield started.start(ingress=2, tunnel=3, egress=2)
    finally:
        started.stop()


async def test_three_tunnel_nodes_lose_nothing_when_one_is_killed_and_one_stopped(
    cluster: Cluster, mx_sink: MxSink, redis_client: redis.Redis
) -> None:
    started_s = time.monotonic()
    tunnels = cluster.of("tunnel")
    passports = [Passport.generate() for _ in range(PERSONAS)]
    fleet = await GatewayFleet(cluster.tunnel_urls, passports).start()
    owners = Counter(redis_client.get(keys.owner(p.persona_key)) for p in passports)
    assert owners == {node.node_id.encode(): PERSONAS // 3 + (i < PERSONAS % 3) for i, node in enumerate(tunnels)}

    # Inbound: one recipient per message, alternating between the two ingress processes.
    smtp = SmtpLoad(cluster.smtp_ports, concurrency=10)
    plan = smtp.plan([f"{p.persona_key}@{DOMAIN}" for p in passports], INBOUND_MESSAGES)

    # Outbound: one stream per message over the personas' own sockets, as the gateway sends.
    outbound: list[OutboundSend] = []
    for index in range(OUTBOUND_MESSAGES):
        gateway = fleet.gateways[index % PERSONAS]
        stream_id = str(uuid.uuid4())
        token = f"out-{index:05d}"
        sender, recipient = f"{gateway.persona_key}@{DOMAIN}", f"user{index}@{REMOTE_DOMAIN}"
        headers = {"From": sender, "X-Load-Stream": stream_id}
        message = make_message(token, extra_headers=headers).replace(b"\r\n", b"\n")
        outbound.append(OutboundSend(stream_id, sender, recipient, message))

    async def send_outbound() -> None:
        """Paced by inbound progress, so outbound streams are in flight at both faults."""
        queue = list(enumerate(outbound))
        inbound_per_outbound = INBOUND_MESSAGES / OUTBOUND_MESSAGES

        async def worker() -> None:
            while queue:
                index, send = queue.pop(0)
                due = index * inbound_per_outbound * 0.9
                await eventually(lambda: fleet.received_count() >= due, SETTLE_TIMEOUT_S, "no progress")  # noqa: B023
                await fleet.send_outbound(fleet.gateways[index % PERSONAS], send)

        await asyncio.gather(*(worker() for _ in range(OUTBOUND_CONCURRENCY)))

    async def faults() -> tuple[int, int]:
        kill_at, term_at = INBOUND_MESSAGES * KILL_AT_FRACTION, INBOUND_MESSAGES * TERM_AT_FRACTION
        await eventually(lambda: fleet.received_count() >= kill_at, SETTLE_TIMEOUT_S, "no inbound progress")
        killed_at = fleet.received_count()
        tunnels[0].kill()
        await eventually(lambda: fleet.received_count() >= term_at, SETTLE_TIMEOUT_S, "stalled after SIGKILL")
        terminated_at = fleet.received_count()
        assert await asyncio.to_thread(tunnels[1].terminate) == 0
        return killed_at, terminated_at

    load_started = time.monotonic()
    ledger, _, (killed_at, terminated_at) = await asyncio.gather(smtp.send(plan), send_outbound(), faults())
    load_s = time.monotonic() - load_started

    expected = ledger.stream_ids
    outbound_ids = {send.stream_id for send in outbound}
    try:
        await eventually(
            lambda: (
                expected.keys() <= {sid for sid, _ in fleet.deliveries()} and outbound_ids <= fleet.results().keys()
            ),
            SETTLE_TIMEOUT_S,
            "mail or results still missing",
        )
        await eventually(
            lambda: all(redis_client.xlen(keys.inbox(p.persona_key)) == 0 for p in passports),
            SETTLE_TIMEOUT_S,
            "acknowledged entries still in the inbox streams",
        )
        # A result leaves Redis on the pong that follows it. One the gateway read just before its
        # node died without the pong is sent again by the survivor (at least once): once the dead
        # node's liveness record expires, at the next sweep. So this is asked while the gateways
        # are still connected; once they are gone a result stays for their next authentication.
        await eventually(
            lambda: all(redis_client.xlen(keys.results(p.persona_key)) == 0 for p in passports),
            SETTLE_TIMEOUT_S,
            "every delivered result is removed from its results stream",
        )
    finally:
        await fleet.stop()

    books = reconcile(ledger, fleet.deliveries())
    results = fleet.results()
    result_repeats = sum(len(results.get(sid, [])) - 1 for sid in outbound_ids if sid in results)
    at_mx = [(token_of(m.data), stream_header_of(m.data)) for m in mx_sink.received()]
    mx_streams = Counter(stream for _, stream in at_mx)
    moved = sum(len(set(g.connects)) > 1 for g in fleet.gateways)
    print(
        f"\nmultinode: {books.line()} results={len(outbound_ids & results.keys())}/{len(outbound_ids)}"
        f" result_repeats={result_repeats} outbound_resent={sum(s.times_sent > 1 for s in outbound)}"
        f" outbound_at_mx={len(mx_streams)} mx_duplicates={len(at_mx) - len(mx_streams)}"
        f" smtp_attempts={ledger.attempts} smtp_4xx={dict(ledger.temporary)} reconnected_personas={moved}"
        f" sigkill_at={killed_at} sigterm_at={terminated_at} load_s={load_s:.1f}"
        f" total_s={time.monotonic() - started_s:.1f}"
    )

    assert books.sent == INBOUND_MESSAGES
    books.assert_clean(ledger.ambiguous)
    assert books.received == books.sent
    assert all(results[sid][0]["status"] == "sent" for sid in outbound_ids), [
        results[sid] for sid in outbound_ids if results[sid][0]["status"] != "sent"
    ][:5]
    assert set(mx_streams) == outbound_ids  # every outbound stream reached the MX ...
    for mx_token, stream in at_mx:  # ... and a repeat there is the same stream, never a second one
        assert mx_token is not None and stream in outbound_ids
    # The personas of both stopped nodes moved to the survivor, and nothing is left over.
    survivor = tunnels[2].node_id.encode()
    assert {redis_client.get(keys.owner(p.persona_key)) for p in passports} <= {survivor, None}
    assert moved >= PERSONAS * 2 // 3
    assert redis_client.zcard(keys.EGRESS_QUEUE) == 0
