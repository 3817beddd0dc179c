"""Redis client construction shared by every service and `status`, and the wait for Redis at
startup.

Every client authenticates the same way: `redis.username` and the password that
`shared.config` resolved (from `redis.passwordFile` or `RELAY_REDIS_PASSWORD`), sent with
AUTH/HELLO on each new connection. Empty means the URL decides (no auth, or credentials in it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
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


def credentials(config: RelayConfig) -> dict[str, Any]:
    """`username`/`password` keyword arguments for redis-py, only those configured (so that a
    URL carrying its own credentials keeps them)."""
    given = {"username": config.redis.username, "password": config.redis.password}
    return {name: value for name, value in given.items() if value}


def connect(config: RelayConfig, *, timeout_s: float = 5.0) -> aioredis.Redis:
    """A pooled client that fails fast, so a request turns into `451`/retry instead of hanging."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        redis_url(config),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        **credentials(config),
    )
    return client


def connect_sync(config: RelayConfig, url: str | None = None, *, timeout_s: float = 5.0) -> redis.Redis:
    """A blocking client (status, backlog scans run off the event loop) with the same identity."""
    return redis.Redis.from_url(
        url or redis_url(config), socket_timeout=timeout_s, socket_connect_timeout=timeout_s, **credentials(config)
    )


def arq_settings(config: RelayConfig) -> RedisSettings:
    """arq's connection settings from the same URL and identity (tunnel enqueues, egress consumes)."""
    settings = RedisSettings.from_dsn(redis_url(config))
    if config.redis.username:
        settings.username = config.redis.username
    if config.redis.password:
        settings.password = config.redis.password
    return settings


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
