"""The fault suite (issue 5): mail keeps flowing, nothing accepted is lost, and every repeat is
the same stream id, while in turn a tunnel process is SIGKILLed mid-stream, an egress worker is
SIGKILLed mid-delivery, Redis (AOF, appendfsync always) is SIGKILLed and restarted between
acceptance and delivery, Redis is unreachable during DATA, and gateways drop their socket
between smtp_end and their ack.

Each scenario sends `RELAY_FAULT_MESSAGES` (default 1,000) small messages through real
processes; `make soak` (RELAY_SOAK=10) multiplies that. Outbound counts are lower (egress
delivers one SMTP session per message). Each test prints `sent= received= lost= duplicates=`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.identity import Passport
from tests.support.cluster import Cluster, soak_factor
from tests.support.load import (
    FleetGateway,
    GatewayFleet,
    SmtpLoad,
    _Smtp,
    make_message,
    outbound_sends,
    reconcile,
    reconcile_outbound,
)
from tests.support.mx_sink import MxSink
from tests.support.wait import eventually

DOMAIN = "relay.test"
REMOTE_DOMAIN = "example.test"
PERSONAS = 10
MESSAGES = int(os.environ.get("RELAY_FAULT_MESSAGES", "1000")) * soak_factor()
OUTBOUND = int(os.environ.get("RELAY_FAULT_OUTBOUND", "200")) * soak_factor()
SETTLE_TIMEOUT_S = 60.0 * soak_factor()
EGRESS_JOB_TIMEOUT_S = 2  # a job of a killed worker runs again about this + 3 s later

CLUSTER_ENV = {
    "RELAY_MAIL_DOMAINS": DOMAIN,
    "RELAY_RATE_LIMITS_SMTP_CONNECTIONS_PER_MINUTE_PER_IP": "1000000",
    "RELAY_RATE_LIMITS_SMTP_MESSAGES_PER_MINUTE_PER_IP": "1000000",
    "RELAY_RATE_LIMITS_WS_AUTH_ATTEMPTS_PER_MINUTE_PER_IP": "1000000",
    "RELAY_RATE_LIMITS_OUTBOUND_MESSAGES_PER_MINUTE_PER_PERSONA": "1000000",
    "RELAY_QUEUE_MAX_MESSAGES": "100000",
    "RELAY_WS_ACK_TIMEOUT_MS": "5000",
    "RELAY_EGRESS_RETRY_BASE_SECONDS": "1",
    "RELAY_EGRESS_JOB_TIMEOUT_SECONDS": str(EGRESS_JOB_TIMEOUT_S),
    "RELAY_EGRESS_CONNECT_TIMEOUT_SECONDS": "2",
    "RELAY_EGRESS_MAX_JOBS": "20",
}


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """AOF with appendfsync always: a 250 is on disk before it is sent."""
    server = EmbeddedRedis(tmp_path / "redis-aof", appendfsync="always")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_sync(durable_redis: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(durable_redis.url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def make_cluster(tmp_path: Path, durable_redis: EmbeddedRedis, mx_sink: MxSink) -> Iterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def make(ingress: int = 1, tunnel: int = 2, egress: int = 0, **env: str) -> Cluster:
        common = {**CLUSTER_ENV, "RELAY_EGRESS_ROUTES": json.dumps({REMOTE_DOMAIN: f"127.0.0.1:{mx_sink.port}"}), **env}
        cluster = Cluster(durable_redis.url, tmp_path / "cluster", common)
        clusters.append(cluster)
        return cluster.start(ingress=ingress, tunnel=tunnel, egress=egress)

    yield make
    for cluster in clusters:
        cluster.stop()


def personas() -> list[Passport]:
    return [Passport.generate() for _ in range(PERSONAS)]


def addresses(passports: list[Passport]) -> list[str]:
    return [f"{p.persona_key}@{DOMAIN}" for p in passports]


async def settle_inbound(
    fleet: GatewayFleet, expected: dict[str, str], redis_client: redis.Redis, passports: list[Passport]
) -> None:
    """Every accepted stream id reached a gateway and every inbox stream is empty again."""
    await eventually(
        lambda: expected.keys() <= {sid for sid, _ in fleet.deliveries()},
        SETTLE_TIMEOUT_S,
        "accepted mail missing at the gateways",
    )
    await eventually(
        lambda: inbox_total(redis_client, passports) == 0, SETTLE_TIMEOUT_S, "acknowledged entries still queued"
    )


def inbox_total(client: redis.Redis, passports: list[Passport]) -> int:
    return sum(cast(int, client.xlen(keys.inbox(p.persona_key))) for p in passports)


def queued_jobs(client: redis.Redis) -> int:
    return cast(int, client.zcard(keys.EGRESS_QUEUE))


def report(name: str, line: str, **figures: object) -> None:
    extra = " ".join(f"{key}={value}" for key, value in figures.items())
    print(f"\n{name}: {line} {extra}".rstrip())


# --- a tunnel process SIGKILLed mid-stream ---------------------------------------------------


async def test_tunnel_sigkilled_mid_stream(make_cluster: Callable[..., Cluster], redis_sync: redis.Redis) -> None:
    cluster = make_cluster(ingress=1, tunnel=2)
    victim = cluster.of("tunnel")[0]
    passports = personas()
    cut: list[str] = []

    def kill_mid_stream(gateway: FleetGateway, stream_id: str) -> None:
        """Between two chunks of a stream from the victim, once enough mail has flowed."""
        if not cut and gateway.connects[-1] == victim.url and fleet.received_count() >= MESSAGES * 0.4:
            cut.append(stream_id)
            victim.kill()

    fleet = await GatewayFleet(cluster.tunnel_urls, passports, on_chunk=kill_mid_stream).start()
    smtp = SmtpLoad(cluster.smtp_ports, concurrency=8)
    # Every 25th message spans five 64 KiB chunks, so there are streams to cut mid-way.
    plan = smtp.plan(addresses(passports), MESSAGES, size_of=lambda n: 300_000 if n % 25 == 0 else 600)
    ledger = await smtp.send(plan)
    try:
        await settle_inbound(fleet, ledger.stream_ids, redis_sync, passports)
    finally:
        await fleet.stop()
    books = reconcile(ledger, fleet.deliveries())
    moved = sum(len(set(g.connects)) > 1 for g in fleet.gateways)
    report("tunnel SIGKILL", books.line(), personas_moved=moved, cut_stream=cut[0] if cut else None)
    assert cut, "the victim never sent a multi-chunk stream after 40 % of the load"
    assert books.sent == MESSAGES
    books.assert_clean(ledger.ambiguous)
    assert cut[0] in {sid for sid, _ in fleet.deliveries()}  # the cut stream came whole, from the survivor
    assert moved == PERSONAS // 2


# --- an egress worker SIGKILLed mid-delivery -------------------------------------------------


async def test_egress_sigkilled_mid_delivery(
    make_cluster: Callable[..., Cluster], mx_sink: MxSink, redis_sync: redis.Redis
) -> None:
    cluster = make_cluster(ingress=1, tunnel=2, egress=1)
    first_egress = cluster.of("egress")[0]
    passports = personas()
    fleet = await GatewayFleet(cluster.tunnel_urls, passports).start()
    sends = outbound_sends(fleet.gateways, OUTBOUND, DOMAIN, REMOTE_DOMAIN)
    mx_sink.hold_data = 1  # one delivery hangs after its final dot until released

    async def send_all() -> None:
        for index, send in enumerate(sends):
            await fleet.send_outbound(fleet.gateways[index % PERSONAS], send)

    async def kill_mid_delivery() -> int:
        await eventually(
            lambda: mx_sink.holding.is_set() and len(mx_sink.received()) >= OUTBOUND // 4,
            SETTLE_TIMEOUT_S,
            "egress made no progress",
        )
        busy = queued_jobs(redis_sync)
        first_egress.kill()
        mx_sink.release()  # the remote server answers 250 to a client that is gone
        cluster.add("egress", "egress-replacement")
        return busy

    smtp = SmtpLoad(cluster.smtp_ports, concurrency=8)
    plan = smtp.plan(addresses(passports), MESSAGES)
    ledger, _, queued_at_kill = await asyncio.gather(smtp.send(plan), send_all(), kill_mid_delivery())
    try:
        await settle_inbound(fleet, ledger.stream_ids, redis_sync, passports)
        await eventually(
            lambda: {s.stream_id for s in sends} <= fleet.results().keys(),
            SETTLE_TIMEOUT_S,
            lambda: "results missing:\n" + cluster.logs("egress"),
        )
    finally:
        await fleet.stop()
    books = reconcile(ledger, fleet.deliveries())
    out = reconcile_outbound(sends, [m.data for m in mx_sink.received()], fleet.results())
    report("egress SIGKILL inbound", books.line())
    report("egress SIGKILL outbound", out.line(), jobs_queued_at_kill=queued_at_kill)
    books.assert_clean(ledger.ambiguous)
    out.assert_clean()
    assert out.duplicates <= 20  # at most the jobs that were running in the killed worker


# --- Redis SIGKILLed and restarted between acceptance and delivery ---------------------------


async def test_redis_sigkilled_between_acceptance_and_delivery(
    make_cluster: Callable[..., Cluster], durable_redis: EmbeddedRedis, mx_sink: MxSink, redis_sync: redis.Redis
) -> None:
    cluster = make_cluster(ingress=1, tunnel=2, egress=1)
    egress = cluster.of("egress")[0]
    passports = personas()
    fleet = await GatewayFleet(cluster.tunnel_urls, passports).start()
    # Outbound accepted while egress is down, inbound accepted while the gateways are offline:
    # both only exist in Redis when it is killed.
    assert await asyncio.to_thread(egress.terminate) == 0
    sends = outbound_sends(fleet.gateways, OUTBOUND // 2, DOMAIN, REMOTE_DOMAIN)
    for index, send in enumerate(sends):
        await fleet.send_outbound(fleet.gateways[index % PERSONAS], send)
    await eventually(lambda: queued_jobs(redis_sync) == len(sends), 20, "outbound jobs not queued")
    await fleet.stop()
    smtp = SmtpLoad(cluster.smtp_ports, concurrency=8)
    before = await smtp.send(smtp.plan(addresses(passports), MESSAGES // 2, prefix="before"))
    queued = inbox_total(redis_sync, passports)
    assert queued == MESSAGES // 2

    durable_redis.kill()
    durable_redis.start()
    redis_sync.connection_pool.disconnect()
    survived = inbox_total(redis_sync, passports)
    jobs_survived = queued_jobs(redis_sync)

    await asyncio.to_thread(cluster.revive)  # egress back; the others reconnect to Redis by themselves
    await fleet.start()  # the gateways come back; outbound streams without a result are sent again
    after = SmtpLoad(cluster.smtp_ports, concurrency=8)
    ledger = await after.send(after.plan(addresses(passports), MESSAGES - MESSAGES // 2, prefix="after"))
    ledger.accepted.update(before.accepted)
    try:
        await settle_inbound(fleet, ledger.stream_ids, redis_sync, passports)
        await eventually(
            lambda: {s.stream_id for s in sends} <= fleet.results().keys(),
            SETTLE_TIMEOUT_S,
            "outbound results missing after the restart",
        )
    finally:
        await fleet.stop()
    books = reconcile(ledger, fleet.deliveries())
    out = reconcile_outbound(sends, [m.data for m in mx_sink.received()], fleet.results())
    report("redis SIGKILL inbound", books.line(), queued_at_kill=queued, survived_restart=survived)
    report("redis SIGKILL outbound", out.line(), jobs_at_kill=len(sends), jobs_survived=jobs_survived)
    assert (survived, jobs_survived) == (queued, len(sends))
    books.assert_clean()
    out.assert_clean()
    assert out.duplicates == 0


# --- Redis unreachable during DATA -----------------------------------------------------------


async def test_redis_unreachable_during_data_is_451_and_retried(
    make_cluster: Callable[..., Cluster], durable_redis: EmbeddedRedis, redis_sync: redis.Redis
) -> None:
    cluster = make_cluster(ingress=1, tunnel=2)
    [port] = cluster.smtp_ports
    passports = personas()
    fleet = await GatewayFleet(cluster.tunnel_urls, passports).start()
    # One session caught exactly in DATA: RCPT passed, the body arrives while Redis is gone.
    caught = await _Smtp.open(port)
    await caught.expect("MAIL", "MAIL FROM:<load@sender.test>", 250)
    await caught.expect("RCPT", f"RCPT TO:<{addresses(passports)[0]}>", 250)
    await caught.expect("DATA", "DATA", 354)

    smtp = SmtpLoad(cluster.smtp_ports, concurrency=8)
    plan = smtp.plan(addresses(passports), MESSAGES)

    async def outage() -> tuple[int, str]:
        await eventually(lambda: len(smtp.ledger.accepted) >= MESSAGES * 0.3, SETTLE_TIMEOUT_S, "no progress")
        durable_redis.kill()
        caught.writer.write(make_message("caught-in-data") + b".\r\n")
        code, text = await caught.reply()
        await eventually(
            lambda: sum(smtp.ledger.temporary.values()) >= 20, SETTLE_TIMEOUT_S, "no 4xx during the outage"
        )
        durable_redis.start()
        return code, text

    ledger, (caught_code, caught_text) = await asyncio.gather(smtp.send(plan), outage())
    caught.close()
    try:
        await settle_inbound(fleet, ledger.stream_ids, redis_sync, passports)
    finally:
        await fleet.stop()
    books = reconcile(ledger, fleet.deliveries())
    report(
        "redis unreachable",
        books.line(),
        smtp_4xx=dict(ledger.temporary),
        connection_errors=ledger.connection_errors,
        attempts=ledger.attempts,
        accepted_twice_after_451=len(books.split_tokens),
    )
    assert (caught_code, caught_text) == (451, "451 4.3.0 temporary failure, try again later")
    assert books.sent == MESSAGES  # every message got its 250 in the end, after retries
    # A 451 to the final dot can follow a MULTI/EXEC that Redis did commit (killed before its
    # reply left): the retry is then a second acceptance under a new queue id. Only those may
    # repeat under another stream id; see test_lost_exec_reply_... for the proof.
    books.assert_clean(ledger.ambiguous | ledger.refused_after_data)
    assert set(ledger.temporary) <= {"RCPT 451", "DATA-end 451", "MAIL 451", "DATA 451"}, ledger.temporary


# --- the gateway drops its socket between smtp_end and its ack -------------------------------


async def test_gateway_dropping_between_smtp_end_and_ack_gets_the_same_stream_again(
    make_cluster: Callable[..., Cluster], redis_sync: redis.Redis
) -> None:
    cluster = make_cluster(ingress=1, tunnel=2)
    passports = personas()
    counter = {"n": 0}

    def drop(gateway: FleetGateway, stream_id: str) -> bool:
        counter["n"] += 1
        return counter["n"] % 40 == 0  # 2.5 % of deliveries: the gateway dies before acking

    fleet = await GatewayFleet(cluster.tunnel_urls, passports, drop_before_ack=drop).start()
    smtp = SmtpLoad(cluster.smtp_ports, concurrency=8)
    ledger = await smtp.send(smtp.plan(addresses(passports), MESSAGES))
    try:
        await settle_inbound(fleet, ledger.stream_ids, redis_sync, passports)
    finally:
        await fleet.stop()
    books = reconcile(ledger, fleet.deliveries())
    dropped = [sid for g in fleet.gateways for sid in g.dropped_before_ack]
    delivered = [sid for sid, _ in fleet.deliveries()]
    report("gateway drops before ack", books.line(), dropped_before_ack=len(dropped))
    assert books.sent == MESSAGES
    books.assert_clean()
    assert len(dropped) >= MESSAGES // 40 - 1
    assert all(delivered.count(sid) >= 2 for sid in dropped)  # each came again, same stream id
    assert books.duplicates >= len(dropped)


# --- a 451 after Redis committed: the retry must find the first acceptance --------------------


class ExecReplyCutter:
    """A TCP proxy in front of Redis that forwards the ingress's enqueue (the EVALSHA of its
    script, which names the persona's inbox key), lets Redis answer it (so it is committed),
    and then cuts the client's connection instead of passing the reply on: what a Redis crash
    or a network cut right after the commit looks like. An error reply (nothing committed, e.g.
    NOSCRIPT) is passed on and the cutter stays armed."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.port = 0
        self.armed = True
        self.cut = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> ExecReplyCutter:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _client(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        cutting = asyncio.Event()

        async def upstream() -> None:
            while data := await client_reader.read(65536):
                if self.armed and b"EVALSHA" in data and b":inbox" in data:
                    self.armed = False
                    cutting.set()
                server_writer.write(data)
                await server_writer.drain()

        async def downstream() -> None:
            while data := await server_reader.read(65536):
                if cutting.is_set() and data.startswith(b"-"):  # refused: nothing committed
                    cutting.clear()
                    self.armed = True
                elif cutting.is_set():  # Redis has answered the enqueue: it is committed
                    self.cut += 1
                    client_writer.transport.abort()
                    server_writer.close()
                    return
                client_writer.write(data)
                await client_writer.drain()

        with contextlib.suppress(OSError, ConnectionError):
            await asyncio.gather(upstream(), downstream())
        client_writer.transport.abort()
        server_writer.close()


async def test_lost_exec_reply_then_retry_is_one_message_not_two(
    tmp_path: Path, durable_redis: EmbeddedRedis, redis_sync: redis.Redis
) -> None:
    cutter = await ExecReplyCutter(durable_redis.port).start()
    cluster = Cluster(f"redis://127.0.0.1:{cutter.port}/0", tmp_path / "cluster", dict(CLUSTER_ENV))
    try:
        await asyncio.to_thread(cluster.start, 1, 0, 0)
        passport = Passport.generate()
        redis_sync.set(keys.seen(passport.persona_key), "1", ex=600)
        message = make_message("sent-once")
        replies = []
        for _ in range(2):  # the sender's first try, and its retry after the 451
            smtp = await _Smtp.open(cluster.smtp_ports[0])
            await smtp.expect("MAIL", "MAIL FROM:<load@sender.test>", 250)
            await smtp.expect("RCPT", f"RCPT TO:<{passport.persona_key}@{DOMAIN}>", 250)
            await smtp.expect("DATA", "DATA", 354)
            smtp.writer.write(message + b".\r\n")
            replies.append(await smtp.reply())
            smtp.close()
        entries = cast(int, redis_sync.xlen(keys.inbox(passport.persona_key)))
        report("lost EXEC reply", f"replies={[code for code, _ in replies]} inbox_entries={entries}", cut=cutter.cut)
        assert cutter.cut == 1
        # The ingress retries an enqueue whose connection broke (shared/replication.py: the
        # script is idempotent), so the first try may already be answered 250; either way the
        # sender's retry names the same queue id and Redis holds one message.
        codes = [code for code, _ in replies]
        assert codes in ([451, 250], [250, 250]), replies
        if codes == [250, 250]:
            assert replies[0][1] == replies[1][1], replies
        assert entries == 1, "one message, accepted twice: the gateway gets it under two stream ids"
    finally:
        await asyncio.to_thread(cluster.stop)
        await cutter.close()
