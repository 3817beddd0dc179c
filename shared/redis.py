"""Redis client construction shared by every service, and the wait for Redis at startup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from arq.connections import RedisSettings
from redis.exceptions import RedisError

from shared.config import RelayConfig
from shared.logs import log

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
WAIT_LOG_INTERVAL_S = 10.0
WAIT_RETRY_CAP_S = 2.0
PING_TIMEOUT_S = 5.0


def redis_url(config: RelayConfig) -> str:
    return config.redis.url or DEFAULT_REDIS_URL


def redacted_url(url: str) -> str:
    """The Redis URL without its password, fit for a terminal or a log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(config: RelayConfig, *, timeout_s: float = 5.0) -> aioredis.Redis:
    """A pooled client that fails fast, so a request turns into `451`/retry instead of hanging."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        redis_url(config),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )
    return client


def arq_settings(config: RelayConfig) -> RedisSettings:
    """arq's connection settings from the same URL (tunnel enqueues, egress consumes)."""
    return RedisSettings.from_dsn(redis_url(config))


async def redis_answers(client: aioredis.Redis) -> bool:
    """One PING, bounded: True if Redis answered."""
    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            await client.ping()
    except (RedisError, OSError, TimeoutError):
        return False
    return True


async def wait_for_redis(
    client: aioredis.Redis, config: RelayConfig, logger: logging.Logger, stopping: asyncio.Event
) -> bool:
    """Block until `client` answers PING; False if `stopping` came first.

    A service reports ready only after this, so /readyz stays false while Redis is down. The
    URL it uses is logged once up front, and again every `WAIT_LOG_INTERVAL_S` while it waits,
    with where it came from: a service run without `RELAY_REDIS_URL` uses a default the
    operator may not know about."""
    url = redacted_url(redis_url(config))
    source = "redis.url / RELAY_REDIS_URL" if config.redis.url else "default: set RELAY_REDIS_URL to change it"
    log(logger, logging.INFO, "using redis", redis_url=url, source=source)
    delay_s = 0.05
    next_report = time.monotonic()
    while not stopping.is_set():
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                await client.ping()
            return True
        except (RedisError, OSError, TimeoutError) as exc:
            if time.monotonic() >= next_report:
                log(
                    logger,
                    logging.WARNING,
                    "waiting for redis: not ready until it answers",
                    redis_url=url,
                    source=source,
                    error=str(exc) or type(exc).__name__,
                )
                next_report = time.monotonic() + WAIT_LOG_INTERVAL_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay_s)
        delay_s = min(delay_s * 2, WAIT_RETRY_CAP_S)
    return False
