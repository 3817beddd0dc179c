"""Redis client construction shared by every service."""

from __future__ import annotations

import redis.asyncio as aioredis
from arq.connections import RedisSettings

from shared.config import RelayConfig

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url(config: RelayConfig) -> str:
    return config.redis.url or DEFAULT_REDIS_URL


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
