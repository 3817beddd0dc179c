"""Redis high availability (issue 13, docs/HA.md) with real processes: the bundled redis-server as
primary, replica and three sentinels, and the relay's ingress, tunnel and egress processes.

- With `redis.minReplicasToAck=1`, a `250` means a replica holds the message too: without a
  replica the ingress answers `451 4.3.0`, never `250`, and the sender's retry, once the replica
  is back, is stored once.
- The primary is SIGKILLed while 1,000 messages flow in (to connected and offline personas) and
  100 outbound streams flow out; the sentinels promote the replica, the services follow without
  a restart, the killed node comes back as a replica (as deploy/ restarts it). Every message that
  was answered `250` reaches its persona (a repeat only under the same stream id), every outbound
  stream reaches the MX (a repeat only of the same stream) and gets its result.

`pytest -k "sentinel or failover"` selects this module.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from shared import keys
from shared.identity import Passport
from tests.support.cluster import Cluster
from tests.support.load import (
    GatewayFleet,
    SmtpLoad,
    outbound_sends,
    reconcile,
    reconcile_outbound,
    stream_header_of,
)
from tests.support.mx_sink import MxSink
from tests.support.processes import REPO_ROOT, free_port, service_env
from tests.support.sentinel import DataNode, SentinelGroup

DOMAIN = "relay.test"
REMOTE_DOMAIN = "example.test"
ONLINE_PERSONAS = 10
OFFLINE_PERSONAS = 10
MESSAGES = 1000
OUTBOUND = 100
KILL_AT_FRACTION = 0.4  # SIGKILL the primary once this share of the mail was answered 250
SETTLE_TIMEOUT_S = 60.0
FAILOVER_TIMEOUT_S = 30.0
UNUSED_URL = "redis://127.0.0.1:1/0"  # with sentinels the URL's host is never used: proof by port 1

CLUSTER_ENV = {
    "RELAY_MAIL_DOMAINS": DOMAIN,
    "RELAY_RATE_LIMITS_SMTP_CONNECTIONS_PER_MINUTE_PER_IP": "1000000",
    "RELAY_RATE_LIMITS_SMTP_MESSAGES_PER_MINUTE_PER_IP": "1000000",
    "RELAY_RATE_LIMITS_WS_AUTH_ATTEMPTS_PER_MINUTE_PER_IP": "1000000",
    "RELAY_RATE_LIMITS_OUTBOUND_MESSAGES_PER_MINUTE_PER_PERSONA": "1000000",
    "RELAY_QUEUE_MAX_MESSAGES": "100000",
    "RELAY_WS_ACK_TIMEOUT_MS": "5000",
    "RELAY_EGRESS_RETRY_BASE_SECONDS": "1",
    "RELAY_EGRESS_JOB_TIMEOUT_SECONDS": "3",
    "RELAY_EGRESS_CONNECT_TIMEOUT_SECONDS": "2",
    "RELAY_EGRESS_MAX_JOBS": "20",
    "RELAY_REDIS_MIN_REPLICAS_TO_ACK": "1",
    "RELAY_REDIS_REPLICA_ACK_TIMEOUT_MS": "500",
    "RELAY_LOGGING_LEVEL": "warning",
}


@pytest.fixture
def mx_sink() -> Iterator[MxSink]:
    with MxSink("127.0.0.1", free_port()) as sink:
        yield sink


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path / "redis")
    try:
        yield group.start()
    finally:
        group.stop()


@pytest.fixture
def make_cluster(tmp_path: Path, mx_sink: MxSink) -> Iterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def make(redis_url: str, ingress: int = 1, tunnel: int = 1, egress: int = 1, **env: str) -> Cluster:
        routes = json.dumps({REMOTE_DOMAIN: f"127.0.0.1:{mx_sink.port}"})
        cluster = Cluster(redis_url, tmp_path / "cluster", {**CLUSTER_ENV, "RELAY_EGRESS_ROUTES": routes, **env})
        clusters.append(cluster)
        return cluster.start(ingress=ingress, tunnel=tunnel, egress=egress)

    yield make
    for cluster in clusters:
        cluster.stop()


async def until(predicate: Callable[[], object], timeout_s: float, message: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        await asyncio.sleep(0.05)


def addresses(passports: list[Passport]) -> list[str]:
    return [f"{p.persona_key}@{DOMAIN}" for p in passports]


# --- minReplicasToAck: no replica, no 250 ----------------------------------------------------


def submit(port: int, rcpt: str, body: bytes) -> tuple[int, str]:
    """One message over real SMTP (smtplib); the reply to the final dot."""
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.ehlo("sender.test")
        client.mail("someone@sender.test")
        code, text = client.rcpt(rcpt)
        assert code == 250, (code, text)
        code, text = client.data(body)
        return code, text.decode()


async def test_sentinel_min_replicas_to_ack_answers_451_without_a_replica(
    tmp_path: Path, make_cluster: Callable[..., Cluster]
) -> None:
    primary = DataNode("primary", tmp_path / "primary").start()
    replica = DataNode("replica", tmp_path / "replica").start(replica_of=primary.port)
    try:
        cluster = make_cluster(f"redis://127.0.0.1:{primary.port}/0", tunnel=0, egress=0)
        port = cluster.smtp_ports[0]
        persona = Passport.generate().persona_key
        client = redis.Redis("127.0.0.1", primary.port)
        client.set(keys.seen(persona), 1)  # authenticated recently, so mail for it is taken
        rcpt = f"{persona}@{DOMAIN}"

        code, _ = await asyncio.to_thread(submit, port, rcpt, b"Subject: with replica\r\n\r\nfirst\r\n")
        assert code == 250

        replica.kill()
        refused = [
            await asyncio.to_thread(submit, port, rcpt, f"Subject: n{i}\r\n\r\nx\r\n".encode()) for i in range(5)
        ]
        retry_body = b"Subject: n0\r\n\r\nx\r\n"
        # The first refused message was written on the primary, only not confirmed by a replica.
        on_primary = cast(int, client.xlen(keys.inbox(persona)))

        replica.start(replica_of=primary.port)
        retried = await asyncio.to_thread(submit, port, rcpt, retry_body)
        print(
            f"\nminReplicasToAck=1: with replica 250; without: {[c for c, _ in refused]};"
            f" retry after the replica is back: {retried[0]}; inbox entries {client.xlen(keys.inbox(persona))}"
        )
        assert all(code == 451 and "4.3.0" in text for code, text in refused), refused
        assert on_primary == 6  # 1 acknowledged + 5 written but answered 451 (the sender retries)
        assert retried[0] == 250
        assert cast(int, client.xlen(keys.inbox(persona))) == 6  # the retry was recognised, not stored twice
        client.close()
    finally:
        replica.stop()
        primary.stop()


async def test_sentinel_retry_of_a_451_message_delivered_meanwhile_is_not_delivered_again(
    tmp_path: Path, make_cluster: Callable[..., Cluster]
) -> None:
    """A 451 for lack of a replica leaves the message on the primary; once a replica is back the
    tunnel delivers it. The sender, told 451, retries: it must get `250` with the queue id the
    gateway already has, and the gateway must not get the message a second time under a new
    queue id (the failover test's "one message under several stream ids")."""
    primary = DataNode("primary", tmp_path / "primary").start()
    replica = DataNode("replica", tmp_path / "replica").start(replica_of=primary.port)
    fleet: GatewayFleet | None = None
    try:
        cluster = make_cluster(f"redis://127.0.0.1:{primary.port}/0", egress=0)
        passport = Passport.generate()
        fleet = await GatewayFleet(cluster.tunnel_urls, [passport]).start()
        rcpt = f"{passport.persona_key}@{DOMAIN}"
        body = b"Subject: told 451\r\nMessage-ID: <451@sender.test>\r\n\r\nonce\r\n"

        replica.kill()
        refused = await asyncio.to_thread(submit, cluster.smtp_ports[0], rcpt, body)
        assert refused[0] == 451 and "4.3.0" in refused[1], refused
        assert not fleet.deliveries()  # an unconfirmed entry is not handed on

        replica.start(replica_of=primary.port)
        await until(lambda: fleet.deliveries(), 30.0, "the unconfirmed message was never delivered")
        [(delivered_stream, _)] = fleet.deliveries()
        client = redis.Redis("127.0.0.1", primary.port)
        await until(
            lambda: cast(int, client.xlen(keys.inbox(passport.persona_key))) == 0, 30.0, "the delivered entry stayed"
        )
        gateway = fleet.gateways[0]
        sockets = (len(gateway.connects), sum(gateway.closes.values()))  # (opened, closed) so far

        await fleet.stop()  # offline now: a second copy would stay in the inbox, where it is counted
        retried = await asyncio.to_thread(submit, cluster.smtp_ports[0], rcpt, body)
        stored_again = cast(int, client.xlen(keys.inbox(passport.persona_key)))
        print(
            f"\n451 without replica: {refused[0]}; delivered once the replica was back as {delivered_stream};"
            f" the sender's retry: {retried[0]} {retried[1]!r}; inbox entries after the retry {stored_again}"
        )
        assert retried[0] == 250, retried
        assert f"queued as {delivered_stream.rsplit('.', 1)[0]}" in retried[1], (retried, delivered_stream)
        assert stored_again == 0
        assert [sid for sid, _ in fleet.deliveries()] == [delivered_stream]
        # the read no replica confirmed was claimed again later, on the same socket: no close, no reconnect
        assert sockets == (1, 0), sockets
        client.close()
    finally:
        if fleet is not None:
            await fleet.stop()
        replica.stop()
        primary.stop()


# --- the failover ----------------------------------------------------------------------------


async def test_sentinel_failover_loses_no_acknowledged_message(
    sentinel_group: SentinelGroup, make_cluster: Callable[..., Cluster], mx_sink: MxSink
) -> None:
    started_s = time.monotonic()
    cluster = make_cluster(UNUSED_URL, **sentinel_group.relay_env())
    online = [Passport.generate() for _ in range(ONLINE_PERSONAS)]
    offline = [Passport.generate() for _ in range(OFFLINE_PERSONAS)]
    away = await GatewayFleet(cluster.tunnel_urls, offline).start()  # seen once, then gone
    await away.stop()
    fleet = await GatewayFleet(cluster.tunnel_urls, online).start()

    smtp = SmtpLoad(cluster.smtp_ports, concurrency=8)
    plan = smtp.plan(addresses(online + offline), MESSAGES)
    accepted_at: list[float] = []
    smtp.on_accepted = lambda count: accepted_at.append(time.monotonic())
    sends = outbound_sends(fleet.gateways, OUTBOUND, DOMAIN, REMOTE_DOMAIN)

    async def send_outbound() -> None:
        """Paced by the inbound mail, so outbound streams are in flight when the primary dies."""
        for index, send in enumerate(sends):
            due = MESSAGES * 0.8 * index / OUTBOUND
            await until(lambda: len(accepted_at) >= due, SETTLE_TIMEOUT_S, "inbound stalled")  # noqa: B023
            await fleet.send_outbound(fleet.gateways[index % ONLINE_PERSONAS], send)

    async def failover() -> tuple[float, float, float]:
        await until(lambda: len(accepted_at) >= MESSAGES * KILL_AT_FRACTION, SETTLE_TIMEOUT_S, "no inbound progress")
        old = sentinel_group.primary()
        killed_at = time.monotonic()
        old.kill()
        while await asyncio.to_thread(sentinel_group.primary_port) in (None, old.port):
            if time.monotonic() - killed_at > FAILOVER_TIMEOUT_S:
                raise AssertionError("no failover:\n" + sentinel_group.logs())
            await asyncio.sleep(0.1)
        promoted_at = time.monotonic()
        await asyncio.to_thread(sentinel_group.restart_as_replica, old)  # as its pod restarts
        return killed_at, promoted_at, time.monotonic()

    ledger, _, (killed_at, promoted_at, rejoined_at) = await asyncio.gather(
        smtp.send(plan), send_outbound(), failover()
    )
    await away.start()  # the offline personas come back for their mail
    outbound_ids = {send.stream_id for send in sends}
    try:
        await until(
            lambda: (
                ledger.stream_ids.keys() <= {sid for sid, _ in fleet.deliveries() + away.deliveries()}
                and outbound_ids <= fleet.results().keys()
            ),
            SETTLE_TIMEOUT_S,
            lambda: (
                f"missing: {len(ledger.stream_ids.keys() - {sid for sid, _ in fleet.deliveries() + away.deliveries()})}"
                f" accepted messages, {len(outbound_ids - fleet.results().keys())} outbound results"
                f" ({len(outbound_ids - {stream_header_of(m.data) for m in mx_sink.received()})} not at the MX)\n"
                + cluster.logs(tail_chars=4000)
            ),
        )
    finally:
        await fleet.stop()
        await away.stop()

    books = reconcile(ledger, fleet.deliveries() + away.deliveries())
    outbound_books = reconcile_outbound(sends, [m.data for m in mx_sink.received()], fleet.results())
    after_failover = [t for t in accepted_at if t > promoted_at]
    flowing_again_s = (after_failover[0] - killed_at) if after_failover else float("nan")
    refused_451 = sum(count for step, count in ledger.temporary.items() if step.endswith(" 451"))
    print(
        f"\nsentinel failover: sent={len(plan)} answered_250={books.sent} delivered={books.received}"
        f" lost={len(books.lost)} duplicates={books.duplicates} (same stream id; split={len(books.split_tokens)})"
        f" 451s={refused_451} temporary={dict(ledger.temporary)} connection_errors={ledger.connection_errors}"
        f" failover_s={promoted_at - killed_at:.1f} replica_back_s={rejoined_at - killed_at:.1f}"
        f" mail_flows_again_s={flowing_again_s:.1f}"
        f" outbound: {outbound_books.line()} results={len(outbound_ids & fleet.results().keys())}/{OUTBOUND}"
        f" total_s={time.monotonic() - started_s:.1f}"
    )
    assert books.sent == MESSAGES
    books.assert_clean(ledger.ambiguous)
    assert not books.lost
    assert after_failover, "no mail was accepted after the failover"
    outbound_books.assert_clean()
    assert cluster.of("ingress")[0].alive() and cluster.of("tunnel")[0].alive() and cluster.of("egress")[0].alive()


# --- status ----------------------------------------------------------------------------------


def status_of(group: SentinelGroup, *args: str) -> subprocess.CompletedProcess[str]:
    env = service_env(UNUSED_URL, **group.relay_env(), RELAY_REDIS_MIN_REPLICAS_TO_ACK="1")
    command = [sys.executable, "-m", "protege_relay.cli", "status", *args]
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)


async def test_sentinel_status_shows_primary_replicas_and_lag(sentinel_group: SentinelGroup) -> None:
    primary, replica = sentinel_group.nodes
    shown = await asyncio.to_thread(status_of, sentinel_group)
    print("\n" + shown.stdout)
    assert shown.returncode == 0, shown.stderr
    assert "Redis master: 1 replica(s) connected, minReplicasToAck=1" in shown.stdout
    assert f"127.0.0.1:{replica.port}  online" in shown.stdout
    assert shown.stdout.count(f"127.0.0.1:{primary.port}") >= 3  # every sentinel names the primary

    document = json.loads((await asyncio.to_thread(status_of, sentinel_group, "--json")).stdout)
    replication = document["replication"]
    assert replication["role"] == "master"
    assert [r["address"] for r in replication["replicas"]] == [f"127.0.0.1:{replica.port}"]
    assert replication["replicas"][0]["lag_bytes"] is not None
    assert set(replication["sentinels"].values()) == {f"127.0.0.1:{primary.port}"}

    replica.kill()  # the primary notices the replica gone at once (its link closed)
    degraded = await asyncio.to_thread(status_of, sentinel_group)
    assert "fewer than minReplicasToAck: new mail gets 451" in degraded.stdout, degraded.stdout
