"""The tunnel over real WebSockets, in-process on a free port: endpoints, every auth path with
its close code, garbage before and after auth, oversize messages, replacement on one node."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any, cast

import pytest
import redis
import redis.asyncio as aioredis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.codes import CloseCode
from shared.identity import Passport
from tests.support.clock import ManualClock
from tests.support.wait import eventually
from tests.support.ws_client import GatewayClient, RawWsClient, RunningTunnel


@pytest.fixture
def tunnel_env() -> dict[str, str]:
    return {"RELAY_WS_MAX_MESSAGE_BYTES": "65536"}


def http_get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


async def get(port: int, path: str) -> tuple[int, str, bytes]:
    return await asyncio.to_thread(http_get, port, path)


# --- HTTP endpoints ----------------------------------------------------------------------------


async def test_health_is_200_json_status_ok(tunnel: RunningTunnel) -> None:
    status, content_type, body = await get(tunnel.port, "/health")
    assert (status, content_type, json.loads(body)) == (200, "application/json", {"status": "ok"})


async def test_healthz_readyz_and_metrics(tunnel: RunningTunnel) -> None:
    assert (await get(tunnel.port, "/healthz"))[0] == 200
    status, _, body = await get(tunnel.port, "/readyz")
    assert (status, json.loads(body)) == (200, {"ready": True})
    status, content_type, body = await get(tunnel.port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert b"relay_tunnel_connections_open" in body


async def test_other_paths_are_404_not_found(tunnel: RunningTunnel) -> None:
    for path in ("/nope", "/ws/extra", "/"):
        status, content_type, body = await get(tunnel.port, path)
        assert (status, content_type, json.loads(body)) == (404, "application/json", {"error": "not_found"})


async def test_websocket_upgrade_only_on_ws_path(tunnel: RunningTunnel) -> None:
    client = await GatewayClient.open(tunnel.url)
    await client.close()
    with pytest.raises(Exception, match="404"):
        await GatewayClient.open(f"ws://127.0.0.1:{tunnel.port}/other")


# --- authentication ----------------------------------------------------------------------------


async def test_auth_ok_sets_owner_socket_and_seen(tunnel: RunningTunnel, redis_client: redis.Redis) -> None:
    passport = Passport.generate()
    client = await GatewayClient.open(tunnel.url)
    auth_ok = await client.authenticate(passport)
    assert auth_ok == {
        "type": "auth_ok",
        "publicKeyBase32": passport.persona_key,
        "emailLocalPart": passport.persona_key,
        "sessionRole": "inbound",
        "replacedSocketId": None,
    }
    pk = passport.persona_key
    assert redis_client.get(keys.owner(pk)) == tunnel.config.node_id.encode()
    assert 0 < cast(int, redis_client.ttl(keys.owner(pk))) <= 30
    assert redis_client.get(keys.socket(pk)) is not None
    assert cast(int, redis_client.ttl(keys.seen(pk))) > 3600
    await client.close()


async def test_challenge_has_protocol_shape(tunnel: RunningTunnel) -> None:
    passport = Passport.generate()
    client = await GatewayClient.open(tunnel.url)
    challenge = await client.request_challenge(passport.persona_key.upper())
    assert challenge["publicKeyBase32"] == passport.persona_key
    assert challenge["challengeText"].startswith(f"relay-auth:{challenge['challengeId']}:")
    assert len(challenge["challengeText"]) == 84
    assert challenge["expiresAt"].endswith("Z") and len(challenge["expiresAt"]) == 24
    await client.close()


async def test_capabilities_are_echoed_when_requested(tunnel: RunningTunnel) -> None:
    client = await GatewayClient.open(tunnel.url)
    auth_ok = await client.authenticate(Passport.generate(), capabilities=["inbound_ack", "future_thing"])
    assert auth_ok["capabilities"] == ["inbound_ack"]
    await client.close()


async def expect_auth_error(client: GatewayClient, code: str, close_code: int = 4401) -> None:
    error = await client.next_text()
    assert error == {"type": "auth_error", "code": code}
    assert await client.closed() == (close_code, code)


async def signed_challenge(client: GatewayClient, passport: Passport) -> tuple[str, str]:
    challenge = await client.request_challenge(passport.persona_key)
    return challenge["challengeId"], passport.sign_base64(challenge["challengeText"].encode())


async def test_unknown_challenge_id_is_refused_with_4401(tunnel: RunningTunnel) -> None:
    passport = Passport.generate()
    client = await GatewayClient.open(tunnel.url)
    await client.send_json(
        {
            "type": "auth_challenge_response",
            "publicKeyBase32": passport.persona_key,
            "challengeId": "00000000-0000-4000-8000-000000000000",
            "signatureBase64": passport.sign_base64(b"x"),
        }
    )
    await expect_auth_error(client, "challenge_not_found")


async def test_challenge_for_another_key_is_a_mismatch(tunnel: RunningTunnel) -> None:
    passport, other = Passport.generate(), Passport.generate()
    client = await GatewayClient.open(tunnel.url)
    challenge_id, _ = await signed_challenge(client, passport)
    await client.send_json(
        {
            "type": "auth_challenge_response",
            "publicKeyBase32": other.persona_key,
            "challengeId": challenge_id,
            "signatureBase64": other.sign_base64(b"whatever"),
        }
    )
    await expect_auth_error(client, "challenge_mismatch")


async def test_replayed_challenge_is_refused_with_4401(tunnel: RunningTunnel) -> None:
    passport = Passport.generate()
    first = await GatewayClient.open(tunnel.url)
    challenge_id, signature = await signed_challenge(first, passport)
    assert (await first.respond(passport.persona_key, challenge_id, signature))["type"] == "auth_ok"
    replay = await GatewayClient.open(tunnel.url)
    await replay.send_json(
        {
            "type": "auth_challenge_response",
            "publicKeyBase32": passport.persona_key,
            "challengeId": challenge_id,
            "signatureBase64": signature,
        }
    )
    await expect_auth_error(replay, "challenge_already_used")
    await first.close()


async def test_bad_signature_does_not_use_the_challenge(tunnel: RunningTunnel) -> None:
    passport = Passport.generate()
    client = await GatewayClient.open(tunnel.url)
    challenge_id, signature = await signed_challenge(client, passport)
    await client.send_json(
        {
            "type": "auth_challenge_response",
            "publicKeyBase32": passport.persona_key,
            "challengeId": challenge_id,
            "signatureBase64": passport.sign_base64(b"something else"),
        }
    )
    await expect_auth_error(client, "invalid_signature")
    retry = await GatewayClient.open(tunnel.url)
    assert (await retry.respond(passport.persona_key, challenge_id, signature))["type"] == "auth_ok"
    await retry.close()


async def test_empty_signature_is_invalid_signature_encoding(tunnel: RunningTunnel) -> None:
    passport = Passport.generate()
    client = await GatewayClient.open(tunnel.url)
    challenge_id, _ = await signed_challenge(client, passport)
    await client.send_json(
        {
            "type": "auth_challenge_response",
            "publicKeyBase32": passport.persona_key,
            "challengeId": challenge_id,
            "signatureBase64": "",
        }
    )
    await expect_auth_error(client, "invalid_signature_encoding")


async def test_expired_challenge_is_refused(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> None:
    running = await RunningTunnel(redis_server.url, RELAY_AUTH_CHALLENGE_TTL_SECONDS="1").start()
    try:
        passport = Passport.generate()
        client = await GatewayClient.open(running.url)
        challenge_id, signature = await signed_challenge(client, passport)
        # Age the record in Redis instead of waiting: the relay compares against its expiry time.
        redis_client.hset(keys.challenge(challenge_id), "exp", "1")
        await client.send_json(
            {
                "type": "auth_challenge_response",
                "publicKeyBase32": passport.persona_key,
                "challengeId": challenge_id,
                "signatureBase64": signature,
            }
        )
        await expect_auth_error(client, "challenge_expired")
    finally:
        await running.stop()


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        "[]",
        '{"type":"hello"}',
        '{"type":"auth_challenge_request"}',
        '{"type":"auth_challenge_request","publicKeyBase32":42}',
        '{"type":"auth_challenge_request","publicKeyBase32":"abc"}',
        '{"type":"auth_challenge_response","publicKeyBase32":"x","challengeId":"y"}',
        '{"type":"smtp_ack","streamId":"s"}',
    ],
)
async def test_garbage_before_auth_is_invalid_message(tunnel: RunningTunnel, message: str) -> None:
    client = await GatewayClient.open(tunnel.url)
    await client.ws.send(message)
    await expect_auth_error(client, "invalid_message")


async def test_binary_garbage_before_auth_is_invalid_message(tunnel: RunningTunnel) -> None:
    client = await GatewayClient.open(tunnel.url)
    await client.ws.send(b"\xff\x00\x01")
    await expect_auth_error(client, "invalid_message")


async def test_auth_json_in_binary_messages_is_accepted(tunnel: RunningTunnel) -> None:
    passport = Passport.generate()
    client = await GatewayClient.open(tunnel.url)
    request = {"type": "auth_challenge_request", "publicKeyBase32": passport.persona_key}
    await client.ws.send(json.dumps(request).encode())
    challenge = await client.next_text()
    response = {
        "type": "auth_challenge_response",
        "publicKeyBase32": passport.persona_key,
        "challengeId": challenge["challengeId"],
        "signatureBase64": passport.sign_base64(challenge["challengeText"].encode()),
    }
    await client.ws.send(json.dumps(response).encode())
    assert (await client.next_text())["type"] == "auth_ok"
    await client.close()


async def test_auth_attempts_over_the_ip_limit_get_4408(redis_server: EmbeddedRedis, rate_clock: ManualClock) -> None:
    running = await RunningTunnel(
        redis_server.url, rate_clock=rate_clock, RELAY_RATE_LIMITS_WS_AUTH_ATTEMPTS_PER_MINUTE_PER_IP="2"
    ).start()
    try:
        passport = Passport.generate()
        for _ in range(2):
            client = await GatewayClient.open(running.url)
            assert (await client.request_challenge(passport.persona_key))["type"] == "auth_challenge"
            await client.close()
        limited = await GatewayClient.open(running.url)
        await limited.send_json({"type": "auth_challenge_request", "publicKeyBase32": passport.persona_key})
        await expect_auth_error(limited, "rate_limited", close_code=4408)
    finally:
        await running.stop()


# --- after auth --------------------------------------------------------------------------------


async def authenticated(tunnel: RunningTunnel, **options: Any) -> tuple[GatewayClient, Passport]:
    passport = Passport.generate()
    client = await GatewayClient.open(tunnel.url)
    await client.authenticate(passport, **options)
    return client, passport


async def test_text_after_auth_ping_unknown_and_malformed_keep_socket_open(tunnel: RunningTunnel) -> None:
    client, _ = await authenticated(tunnel)
    await client.send_json({"type": "ping"})
    assert await client.next_text() == {"type": "pong"}
    await client.send_json({"type": "mystery"})
    assert await client.next_text() == {"type": "error", "code": "unknown_type"}
    await client.ws.send("{{{")
    assert await client.next_text() == {"type": "error", "code": "invalid_message"}
    await client.send_json({"type": "ping"})
    assert await client.next_text() == {"type": "pong"}
    await client.close()


async def test_invalid_binary_frame_after_auth_closes_4401(tunnel: RunningTunnel) -> None:
    client, _ = await authenticated(tunnel)
    await client.ws.send(b"\x02\x01\x00\x00\x00\x00\x00")
    await expect_auth_error(client, "invalid_tunnel_frame")


async def test_oversize_message_closes_1009_and_server_keeps_serving(tunnel: RunningTunnel) -> None:
    client, _ = await authenticated(tunnel)
    await client.ws.send(b"\x00" * 70_000)
    code, _ = await client.closed()
    assert code == 1009
    other, _ = await authenticated(tunnel)
    await other.send_json({"type": "ping"})
    assert await other.next_text() == {"type": "pong"}
    await other.close()


# --- replacement on one node -------------------------------------------------------------------


async def test_second_inbound_socket_replaces_the_first_with_4400(
    tunnel: RunningTunnel, redis_client: redis.Redis
) -> None:
    passport = Passport.generate()
    first = await GatewayClient.open(tunnel.url)
    await first.authenticate(passport)
    first_socket_id = cast(bytes, redis_client.get(keys.socket(passport.persona_key)))
    second = await GatewayClient.open(tunnel.url)
    auth_ok = await second.authenticate(passport)
    assert auth_ok["replacedSocketId"] == first_socket_id.decode()
    assert await first.closed() == (4400, "replaced_by_new_session")
    assert first.texts.empty()  # no auth_error before a replacement close
    # The old socket's close must not release the new socket's ownership.
    assert redis_client.get(keys.owner(passport.persona_key)) == tunnel.config.node_id.encode()
    assert redis_client.get(keys.socket(passport.persona_key)) != first_socket_id
    await second.close()


async def test_outbound_role_socket_does_not_replace_inbound(tunnel: RunningTunnel) -> None:
    passport = Passport.generate()
    inbound = await GatewayClient.open(tunnel.url)
    await inbound.authenticate(passport)
    outbound = await GatewayClient.open(tunnel.url)
    auth_ok = await outbound.authenticate(passport, role="outbound")
    assert auth_ok["sessionRole"] == "outbound" and auth_ok["replacedSocketId"] is None
    await inbound.send_json({"type": "ping"})
    assert await inbound.next_text() == {"type": "pong"}
    await inbound.close()
    await outbound.close()


async def test_closing_the_socket_releases_ownership(tunnel: RunningTunnel, redis_client: redis.Redis) -> None:
    client, passport = await authenticated(tunnel)
    await client.close()
    await eventually(lambda: not redis_client.exists(keys.owner(passport.persona_key)), 5, "owner kept")
    assert not redis_client.exists(keys.socket(passport.persona_key))


async def test_raw_client_sees_the_same_auth_flow(tunnel: RunningTunnel) -> None:
    raw = await RawWsClient.open("127.0.0.1", tunnel.port)
    auth_ok = await raw.authenticate(Passport.generate())
    assert auth_ok["type"] == "auth_ok"
    raw.close()


def test_close_codes_match_the_protocol() -> None:
    assert (CloseCode.AUTH_FAILED, CloseCode.RATE_LIMITED, CloseCode.REPLACED) == (4401, 4408, 4400)


async def test_auth_rate_is_per_forwarded_client_behind_a_trusted_proxy(
    redis_server: EmbeddedRedis, rate_clock: ManualClock
) -> None:
    running = await RunningTunnel(
        redis_server.url,
        rate_clock=rate_clock,
        RELAY_RATE_LIMITS_WS_AUTH_ATTEMPTS_PER_MINUTE_PER_IP="1",
        RELAY_WS_TRUSTED_PROXIES="127.0.0.1",
    ).start()
    try:
        key = Passport.generate().persona_key
        for forwarded_for in ("198.51.100.1", "198.51.100.2"):
            client = await GatewayClient.open(running.url, additional_headers={"X-Forwarded-For": forwarded_for})
            assert (await client.request_challenge(key))["type"] == "auth_challenge"
            await client.close()
        again = await GatewayClient.open(running.url, additional_headers={"X-Forwarded-For": "198.51.100.1"})
        await again.send_json({"type": "auth_challenge_request", "publicKeyBase32": key})
        await expect_auth_error(again, "rate_limited", close_code=4408)
    finally:
        await running.stop()


async def test_a_handshake_costs_three_redis_round_trips_for_a_new_persona(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    """Challenge request: rate count + record (one pipeline); response: consume (script), then
    every post-auth write (one script), which also reports the empty inbox and results, so
    neither is read. Top-level commands seen by MONITOR (script-internal ones excluded)."""
    tunnel = await RunningTunnel(redis_server.url, RELAY_WS_RESULTS_SWEEP_INTERVAL_MS="600000").start()
    monitor_client = aioredis.Redis.from_url(redis_server.url)
    try:
        warm_up = await GatewayClient.open(tunnel.url)  # loads the scripts (SCRIPT LOAD once per process)
        warm_up_passport = Passport.generate()
        await warm_up.authenticate(warm_up_passport)
        await warm_up.close()
        # Its close (owner released) is over before MONITOR starts.
        await eventually(lambda: not redis_client.exists(keys.owner(warm_up_passport.persona_key)))
        async with monitor_client.monitor() as monitor:
            client = await GatewayClient.open(tunnel.url)
            await client.authenticate(Passport.generate())
            await client.send_json({"type": "ping"})
            await client.next_of_type("pong")
            marker = aioredis.Redis.from_url(redis_server.url)
            await marker.echo("end-of-handshake")
            await marker.aclose()
            commands: list[str] = []
            while True:
                info = await asyncio.wait_for(monitor.next_command(), 5)
                if "end-of-handshake" in info["command"]:
                    break
                background = ("HSET RELAY:NODEINFO", "EXPIRE RELAY:NODEINFO", "SADD RELAY:NODES", "PING")
                if info["client_type"] != "lua" and not info["command"].upper().startswith(background):
                    commands.append(info["command"].split(" ", 1)[0].upper())
        await client.close()
    finally:
        await monitor_client.aclose()
        await tunnel.stop()
    assert commands == ["EXISTS", "INCRBY", "PEXPIRE", "HSET", "PEXPIRE", "EVALSHA", "EVALSHA"], commands
