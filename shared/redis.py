"""Redis client construction shared by every service, and `status`.

Every client authenticates the same way: `redis.username` and the password that
`shared.config` resolved (from `redis.passwordFile` or `RELAY_REDIS_PASSWORD`), sent with
AUTH/HELLO on each new connection. Empty means the URL decides (no auth, or credentials in it).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from arq.connections import RedisSettings

from shared.config import RelayConfig

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url(config: RelayConfig) -> str:
    return config.redis.url or DEFAULT_REDIS_URL


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
