"""Clocks: challenge expiry and retention are decided on server time only. A gateway whose
clock is hours off still authenticates (it never sends a time, and any time it adds is
ignored), a challenge expires by the server's clock whatever the gateway claims, and inbox
retention follows the stream entry ids Redis assigned, not the timestamps inside entries."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest
import redis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.identity import Passport
from shared.payloads import InboxEntry
from tests.support.cluster import Cluster, Node
from tests.support.wait import poll_until
from tests.support.ws_client import GatewayClient

CHALLENGE_TTL_S = 1
RETENTION_S = 60
SKEWS = [timedelta(hours=3), timedelta(hours=-3), timedelta(days=-3650)]


@pytest.fixture
def tunnel(tmp_path: Path, redis_server: EmbeddedRedis) -> Iterator[Node]:
    env = {"RELAY_AUTH_CHALLENGE_TTL_SECONDS": str(CHALLENGE_TTL_S), "RELAY_QUEUE_RETENTION_SECONDS": str(RETENTION_S)}
    cluster = Cluster(redis_server.url, tmp_path / "cluster", env)
    try:
        yield cluster.start(ingress=0, tunnel=1, egress=0).of("tunnel")[0]
    finally:
        cluster.stop()


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@pytest.mark.parametrize("skew", SKEWS, ids=["ahead-3h", "behind-3h", "behind-10y"])
async def test_gateway_with_a_wrong_clock_still_authenticates(tunnel: Node, skew: timedelta) -> None:
    passport = Passport.generate()
    client = await GatewayClient.open(tunnel.url)
    challenge = await client.request_challenge(passport.persona_key)
    gateway_now = datetime.now(UTC) + skew
    expires_at = parse_iso(challenge["expiresAt"])
    # By its own clock the gateway thinks the challenge is long expired, or not due for hours;
    # it answers anyway, and even tells the relay its (wrong) time.
    assert (gateway_now >= expires_at) == (skew > timedelta(0))
    await client.send_json(
        {
            "type": "auth_challenge_response",
            "publicKeyBase32": passport.persona_key,
            "challengeId": challenge["challengeId"],
            "signatureBase64": passport.sign_base64(challenge["challengeText"].encode()),
            "sessionRole": "inbound",
            "clientTime": iso(gateway_now),
            "expiresAt": iso(gateway_now),
        }
    )
    reply = await client.next_text()
    assert reply["type"] == "auth_ok", reply
    await client.close()


async def test_challenge_expires_by_server_time_whatever_the_gateway_claims(tunnel: Node) -> None:
    passport = Passport.generate()
    client = await GatewayClient.open(tunnel.url)
    asked_at = datetime.now(UTC)
    challenge = await client.request_challenge(passport.persona_key)
    expires_at = parse_iso(challenge["expiresAt"])
    lifetime_s = (expires_at - asked_at).total_seconds()
    assert CHALLENGE_TTL_S - 0.5 < lifetime_s <= CHALLENGE_TTL_S + 0.5  # set from the server's clock
    poll_until(lambda: datetime.now(UTC) > expires_at + timedelta(milliseconds=100), CHALLENGE_TTL_S + 2)
    claimed = asked_at  # the gateway claims it is still the moment the challenge was issued
    await client.send_json(
        {
            "type": "auth_challenge_response",
            "publicKeyBase32": passport.persona_key,
            "challengeId": challenge["challengeId"],
            "signatureBase64": passport.sign_base64(challenge["challengeText"].encode()),
            "sessionRole": "inbound",
            "clientTime": iso(claimed),
            "expiresAt": iso(claimed + timedelta(hours=1)),
        }
    )
    assert await client.next_text() == {"type": "auth_error", "code": "challenge_expired"}
    assert await client.closed() == (4401, "challenge_expired")


async def test_retention_follows_redis_entry_ids_not_timestamps_in_entries(
    tunnel: Node, redis_client: redis.Redis
) -> None:
    passport = Passport.generate()
    pk = passport.persona_key
    now_ms = int(time.time() * 1000)

    def add(name: str, received_at_ms: int, entry_id: str = "*") -> None:
        entry = InboxEntry(name, 0, "s@example.org", f"{pk}@relay.test", name.encode() + b"\r\n", received_at_ms, "")
        redis_client.xadd(keys.inbox(pk), {b"m": entry.pack()}, id=entry_id)
        redis_client.incrby(keys.inbox_bytes(pk), len(entry.data))

    # Queued by Redis twice the retention ago, though its own timestamp claims "just now".
    add("qexpired", now_ms, entry_id=f"{now_ms - 2 * RETENTION_S * 1000}-0")
    add("qepoch", 0)  # an ingress whose clock said 1970
    add("qfuture", now_ms + 10 * 365 * 86400 * 1000)  # an ingress ten years ahead
    client = await GatewayClient.open(tunnel.url)
    await client.authenticate(passport, capabilities=["inbound_ack"])
    delivered = []
    for _ in range(2):
        message = await client.next_inbound()
        delivered.append(message.stream_id)
        await client.ack(message.stream_id)
    poll_until(lambda: redis_client.xlen(keys.inbox(pk)) == 0, 10, message="inbox not emptied")
    seen_ttl_s = cast(int, redis_client.ttl(keys.seen(pk)))
    await client.close()
    assert delivered == ["qepoch.0", "qfuture.0"]  # the expired one was trimmed, never sent
    assert redis_client.get(keys.inbox_bytes(pk)) == b"0"
    assert RETENTION_S - 5 <= seen_ttl_s <= RETENTION_S  # a Redis TTL: server time
