"""Inbound mail survives faults, end to end with real processes: an offline gateway, a gateway
that dies before acknowledging, a tunnel node killed mid-flight, and Redis going away."""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from pathlib import Path

import redis

from protege_relay.embedded_redis import EmbeddedRedis
from protege_relay.gateway.receive import EXIT_TEST_CRASH
from shared import keys
from tests.support.wait import poll_until
from tests.system.test_e2e_inbound import (
    DELIVERY_TIMEOUT_S,
    SENDER,
    Gateways,
    Relay,
    assert_delivered_intact,
    inbox_length,
    log_events,
    make_persona,
    sample_message,
    smtp_send,
    wait_connected,
    wait_stored,
)
from tests.system.test_e2e_inbound import gateways as gateways_fixture
from tests.system.test_e2e_inbound import start_relay as start_relay_fixture

gateways = gateways_fixture  # the same fixtures as the happy-path tests
start_relay = start_relay_fixture


def test_offline_persona_gets_its_mail_when_the_gateway_returns(
    tmp_path: Path, start_relay: Callable[..., Relay], gateways: Gateways, redis_client: redis.Redis
) -> None:
    relay = start_relay()
    persona = make_persona(tmp_path, "p")
    gateway = gateways.start(persona, relay.ws_url)
    assert gateway.terminate() == 0
    sent = sample_message("while offline")
    queue_id = smtp_send(relay.smtp_port, [persona.address], sent)
    assert inbox_length(redis_client, persona) == 1
    assert persona.stored() == []
    gateways.start(persona, relay.ws_url)
    [stored] = wait_stored(persona)
    assert_delivered_intact(stored, sent, queue_id, persona.address)
    poll_until(lambda: inbox_length(redis_client, persona) == 0, DELIVERY_TIMEOUT_S)


def test_gateway_dying_before_its_ack_gets_the_same_stream_again_and_stores_it_once(
    tmp_path: Path, start_relay: Callable[..., Relay], gateways: Gateways, redis_client: redis.Redis
) -> None:
    relay = start_relay(RELAY_WS_ACK_TIMEOUT_MS="3000")
    persona = make_persona(tmp_path, "p")
    crashing = gateways.start(persona, relay.ws_url, PROTEGE_GATEWAY_TEST_EXIT_BEFORE_ACK="1")
    sent = sample_message("crash before ack")
    queue_id = smtp_send(relay.smtp_port, [persona.address], sent)
    process = crashing.process
    assert process is not None
    poll_until(lambda: process.poll() is not None, DELIVERY_TIMEOUT_S, message=crashing.logs())
    assert process.returncode == EXIT_TEST_CRASH
    [first] = log_events(crashing, "message stored")
    assert first["stream_id"] == f"{queue_id}.0"
    assert inbox_length(redis_client, persona) == 1  # never acknowledged, so still queued

    restarted = gateways.start(persona, relay.ws_url)
    poll_until(lambda: log_events(restarted, "duplicate message skipped"), DELIVERY_TIMEOUT_S, message=restarted.logs())
    [again] = log_events(restarted, "duplicate message skipped")
    assert again["stream_id"] == first["stream_id"]
    poll_until(lambda: inbox_length(redis_client, persona) == 0, DELIVERY_TIMEOUT_S)
    [stored] = persona.stored()
    assert_delivered_intact(stored, sent, queue_id, persona.address)


def test_tunnel_killed_with_a_message_in_flight_delivers_it_through_another_tunnel(
    tmp_path: Path, start_relay: Callable[..., Relay], gateways: Gateways, redis_client: redis.Redis
) -> None:
    """The gateway gets two tunnel URLs (as behind a load balancer) and withholds its first ack,
    so the message is stored but still unacknowledged when its tunnel node is SIGKILLed."""
    relay = start_relay(tunnels=2, RELAY_WS_ACK_TIMEOUT_MS="3000")
    persona = make_persona(tmp_path, "p")
    gateway = gateways.start(persona, relay.ws_url, PROTEGE_GATEWAY_TEST_SKIP_ACKS="1")
    first_tunnel, second_tunnel = relay.tunnels
    [connected] = log_events(gateway, "gateway connected")
    assert connected["url"] == f"ws://127.0.0.1:{first_tunnel.port}/ws"
    sent = sample_message("tunnel dies")
    queue_id = smtp_send(relay.smtp_port, [persona.address], sent)
    poll_until(lambda: log_events(gateway, "test hook: ack withheld"), DELIVERY_TIMEOUT_S, message=gateway.logs())
    assert inbox_length(redis_client, persona) == 1

    first_tunnel.kill()
    wait_connected(gateway, count=2)
    assert log_events(gateway, "gateway connected")[1]["url"] == f"ws://127.0.0.1:{second_tunnel.port}/ws"
    poll_until(
        lambda: log_events(gateway, "duplicate message skipped"),
        DELIVERY_TIMEOUT_S,
        message=gateway.logs() + second_tunnel.logs(),
    )
    poll_until(lambda: inbox_length(redis_client, persona) == 0, DELIVERY_TIMEOUT_S)
    [stored] = persona.stored()
    assert_delivered_intact(stored, sent, queue_id, persona.address)


def test_redis_down_is_451_and_nothing_accepted_is_lost(
    tmp_path: Path,
    start_relay: Callable[..., Relay],
    gateways: Gateways,
    redis_server: EmbeddedRedis,
    redis_client: redis.Redis,
) -> None:
    relay = start_relay()
    persona = make_persona(tmp_path, "p")
    assert gateways.start(persona, relay.ws_url).terminate() == 0
    queued = sample_message("queued before the outage")
    queued_id = smtp_send(relay.smtp_port, [persona.address], queued)

    redis_server.stop()
    refused = sample_message("sent during the outage")
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.mail(SENDER)[0] == 250
        code, reply = client.rcpt(persona.address)
        if code == 250:
            code, reply = client.data(refused)
    assert code == 451, reply
    assert b"4.3.0" in reply

    redis_server.start()
    gateways.start(persona, relay.ws_url)
    [stored] = wait_stored(persona)
    assert_delivered_intact(stored, queued, queued_id, persona.address)
    retried_id = smtp_send(relay.smtp_port, [persona.address], refused)  # the sender's retry
    stored_both = wait_stored(persona, 2)
    assert len(stored_both) == 2
    [retried] = [m for m in stored_both if retried_id.encode() in m[:500]]
    assert_delivered_intact(retried, refused, retried_id, persona.address)
    poll_until(lambda: inbox_length(redis_client, persona) == 0, DELIVERY_TIMEOUT_S)
    assert redis_client.exists(keys.seen(persona.persona_key))
