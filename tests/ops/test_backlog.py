"""Backlog gauges: queue depth and oldest-entry age per tier, read from a real Redis."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from typing import Any, cast

import pytest
import redis
from arq import create_pool
from arq.connections import RedisSettings
from prometheus_client import REGISTRY

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.backlog import refresh_backlog_metrics, refresh_gauges
from shared.config import load_config
from shared.health import HealthServer
from tests.support.processes import free_port

PERSONA_A = "a" * 52
PERSONA_B = "b" * 52


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def fill(client: redis.Redis, now_ms: int) -> None:
    """Two inboxes (one entry read by a tunnel, not acked) and one pending result, as the services write them."""
    client.xadd(keys.inbox(PERSONA_A), {b"m": b"x"}, id=f"{now_ms - 90_000}-0")
    client.xadd(keys.inbox(PERSONA_A), {b"m": b"x"}, id=f"{now_ms - 10_000}-0")
    client.xadd(keys.inbox(PERSONA_B), {b"m": b"x"}, id=f"{now_ms - 30_000}-0")
    client.xgroup_create(keys.inbox(PERSONA_A), keys.INBOX_GROUP, id="0")
    client.xreadgroup(keys.INBOX_GROUP, "node-1", {keys.inbox(PERSONA_A): ">"}, count=1)
    client.xadd(keys.results(PERSONA_B), {b"r": b"x"}, id=f"{now_ms - 5_000}-0")


def test_tunnel_tier_reports_inbox_and_results(redis_client: redis.Redis) -> None:
    now_ms = int(time.time() * 1000)
    fill(redis_client, now_ms)
    refresh_gauges(redis_client, "tunnel", now_ms)
    assert sample("relay_inbox_entries") == 3
    assert sample("relay_inbox_in_flight") == 1
    assert sample("relay_inbox_oldest_age_seconds") == pytest.approx(90, abs=0.01)
    assert sample("relay_results_pending") == 1
    assert sample("relay_results_oldest_age_seconds") == pytest.approx(5, abs=0.01)


async def test_egress_tier_reports_the_arq_queue(redis_server: EmbeddedRedis) -> None:
    pool = await create_pool(RedisSettings.from_dsn(redis_server.url))
    try:
        await pool.enqueue_job("deliver", b"job-1", _job_id="j1", _queue_name=keys.EGRESS_QUEUE)
        await pool.enqueue_job("deliver", b"job-2", _job_id="j2", _queue_name=keys.EGRESS_QUEUE, _defer_by=600)
    finally:
        await pool.aclose()
    await refresh_backlog_metrics(load_config(environ={"RELAY_REDIS_URL": redis_server.url}), "egress")
    assert sample("relay_egress_queue_jobs", state="ready") == 1
    assert sample("relay_egress_queue_jobs", state="deferred") == 1
    assert sample("relay_egress_queue_jobs", state="running") == 0


async def test_metrics_scrape_refreshes_the_gauges_first(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url)
    now_ms = int(time.time() * 1000)
    fill(client, now_ms)

    async def ready() -> bool:
        return True

    server = HealthServer(
        "127.0.0.1",
        0,
        ready,
        lambda: refresh_backlog_metrics(load_config(environ={"RELAY_REDIS_URL": redis_server.url}), "tunnel"),
    )
    await server.start()
    try:
        client.xadd(keys.inbox(PERSONA_B), {b"m": b"x"})  # after start: only a refresh can count it
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10).read().decode()
        )
    finally:
        await server.close()
        client.close()
    assert "relay_inbox_entries 4.0" in body


def test_every_service_process_exports_its_backlogs(spawn, redis_client: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    now_ms = int(time.time() * 1000)
    fill(redis_client, now_ms)
    ingress_http, egress_http = free_port(), free_port()
    spawn("ingress", port=ingress_http, RELAY_SMTP_PORT=str(free_port()), RELAY_SMTP_HTTP_PORT=str(ingress_http))
    spawn("egress", port=egress_http, RELAY_EGRESS_HTTP_PORT=str(egress_http))
    tunnel_port = free_port()
    spawn("tunnel", port=tunnel_port, RELAY_PORT=str(tunnel_port))
    tunnel_metrics = urllib.request.urlopen(f"http://127.0.0.1:{tunnel_port}/metrics", timeout=10).read().decode()
    ingress_metrics = urllib.request.urlopen(f"http://127.0.0.1:{ingress_http}/metrics", timeout=10).read().decode()
    egress_metrics = urllib.request.urlopen(f"http://127.0.0.1:{egress_http}/metrics", timeout=10).read().decode()
    # the ingress' Redis user may not read inboxes, so it leaves the inbox backlog to the tunnel
    assert "relay_inbox_entries 3.0" not in ingress_metrics and "relay_ingress_connections_total" in ingress_metrics
    assert "relay_results_pending 1.0" in egress_metrics
    assert 'relay_egress_queue_jobs{state="ready"} 0.0' in egress_metrics
    assert "relay_inbox_entries 3.0" in tunnel_metrics and "relay_results_pending 1.0" in tunnel_metrics


def scan_calls(client: redis.Redis) -> int:
    return int(cast(dict[str, Any], client.info("commandstats")).get("cmdstat_scan", {}).get("calls", 0))


def scrape(port: int) -> str:
    body: bytes = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return body.decode()


async def test_scrapes_within_the_cache_window_share_one_scan(redis_server: EmbeddedRedis) -> None:
    """Each SCAN costs ~0.5 s at 300k keys: a second scrape within BACKLOG_CACHE_S reuses the
    gauges (Redis' own command counters prove it), a later one sees the new numbers."""
    client = redis.Redis.from_url(redis_server.url)
    fill(client, int(time.time() * 1000))
    config = load_config(environ={"RELAY_REDIS_URL": redis_server.url})
    window_s = {"value": 60.0}

    async def ready() -> bool:
        return True

    server = HealthServer(
        "127.0.0.1", 0, ready, lambda: refresh_backlog_metrics(config, "tunnel", max_age_s=window_s["value"])
    )
    await server.start()
    try:
        before = scan_calls(client)
        first = await asyncio.to_thread(scrape, server.port)
        after_first = scan_calls(client)
        client.xadd(keys.inbox(PERSONA_B), {b"m": b"x"})
        second, third = await asyncio.gather(
            asyncio.to_thread(scrape, server.port), asyncio.to_thread(scrape, server.port)
        )
        after_cached = scan_calls(client)
        window_s["value"] = 0.0  # the window has passed
        fresh = await asyncio.to_thread(scrape, server.port)
        after_fresh = scan_calls(client)
    finally:
        await server.close()
        client.close()
    print(
        f"\nSCAN calls: first scrape {after_first - before}, two cached scrapes {after_cached - after_first}, "
        f"after the window {after_fresh - after_cached}"
    )
    assert after_first > before
    assert after_cached == after_first, "no SCAN for scrapes inside the window"
    assert (
        "relay_inbox_entries 3.0" in first
        and "relay_inbox_entries 3.0" in second
        and "relay_inbox_entries 3.0" in third
    )
    assert "relay_inbox_entries 4.0" in fresh and after_fresh > after_cached
