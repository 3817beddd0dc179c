"""Redis client construction shared by every service and command (one Redis by URL, or the
primary of a Sentinel-monitored group: `redis.sentinels`, docs/HA.md), and the wait for Redis
at startup.

Every client authenticates the same way: `redis.username` and the password that
`shared.config` resolved (from `redis.passwordFile` or `RELAY_REDIS_PASSWORD`), sent with
AUTH/HELLO on each new connection. Empty means the URL decides (no auth, or credentials in it).
With `redis.sentinelAuth` the sentinels are sent the same credentials.

With Sentinel, each new connection asks the sentinels where the primary is; a connection to a
dead primary fails (ConnectionError) and one to a demoted primary is refused (redis-py turns
READONLY into ConnectionError and drops the connection), so the next attempt lands on the
promoted replica without a restart. What may be retried after such an error is the caller's
call: `shared.replication` retries the idempotent writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, cast
from urllib.parse import urlparse, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as async_sentinel
import redis.sentinel as sync_sentinel
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from shared.config import ConfigError, RelayConfig
from shared.hostport import parse_host_port
from shared.logs import log
from shared.redis_send import bound_sends

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SENTINEL_PORT = 26379
HEALTH_CHECK_INTERVAL_S = 30
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


def uses_sentinel(config: RelayConfig) -> bool:
    return bool(config.redis.sentinels)


def sentinel_addresses(config: RelayConfig) -> list[tuple[str, int]]:
    """`redis.sentinels` as (host, port); a malformed entry is a config error naming it."""
    addresses = []
    for entry in config.redis.sentinels:
        try:
            host, port = parse_host_port(entry, SENTINEL_PORT)
        except ValueError:
            raise ConfigError(f"config field redis.sentinels: {entry!r} is not host:port") from None
        if not host or not 0 < port < 65536:
            raise ConfigError(f"config field redis.sentinels: {entry!r} is not host:port")
        addresses.append((host, port))
    if addresses and not config.redis.sentinelMaster:
        raise ConfigError("config field redis.sentinelMaster: must name the monitored primary")
    return addresses


def _database(config: RelayConfig) -> int:
    """With Sentinel, `redis.url` (if set) still chooses the database number."""
    path = urlparse(redis_url(config)).path.lstrip("/")
    return int(path) if path.isdigit() else 0


def _timeouts(command_timeout_s: float | None, connect_timeout_s: float) -> dict[str, Any]:
    return {"socket_timeout": command_timeout_s, "socket_connect_timeout": connect_timeout_s}


def _sentinel_kwargs(config: RelayConfig, timeout_s: float) -> dict[str, Any]:
    kwargs = _timeouts(timeout_s, timeout_s)
    if config.redis.sentinelAuth:
        kwargs.update(credentials(config))
    return kwargs


def connect(
    config: RelayConfig,
    *,
    timeout_s: float | None = 5.0,
    connect_timeout_s: float = 5.0,
    redis_class: type[aioredis.Redis] = aioredis.Redis,
) -> aioredis.Redis:
    """A pooled client that fails fast, so a request turns into `451`/retry instead of hanging.

    `timeout_s=None` drops the per-command socket timeout (the ingress bounds each call with its
    own `asyncio.timeout`, see services/ingress/main.py); with one, sends are bounded without a
    task per command (`shared.redis_send.bound_sends`). `redis_class` is e.g. arq's ArqRedis or
    `shared.redis_batch.BatchingRedis`.
    """
    options = {
        **_timeouts(timeout_s, connect_timeout_s),
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        **credentials(config),
    }
    if uses_sentinel(config):
        sentinel = async_sentinel.Sentinel(  # type: ignore[no-untyped-call]
            sentinel_addresses(config), sentinel_kwargs=_sentinel_kwargs(config, connect_timeout_s)
        )
        client: aioredis.Redis = sentinel.master_for(
            config.redis.sentinelMaster, redis_class=redis_class, db=_database(config), **options
        )
    else:
        client = cast(aioredis.Redis, redis_class.from_url(redis_url(config), **options))
    if timeout_s is not None:
        bound_sends(client)
    return client


def connect_arq(config: RelayConfig) -> ArqRedis:
    """`connect` as arq's client class, for the egress worker's job queue. Without a per-command
    socket timeout, as arq's own pool: redis-py's timeout wrapper can swallow the cancellation
    arq's shutdown sends the worker loop (Python 3.11), which then never ends."""
    return cast(ArqRedis, connect(config, timeout_s=None, redis_class=ArqRedis))


def connect_sync(config: RelayConfig, url: str | None = None, *, timeout_s: float = 5.0) -> redis.Redis:
    """A blocking client (status, backlog scans run off the event loop) with the same identity;
    `url` (e.g. the embedded Redis of `protege-relay run`) overrides the configured one."""
    timeouts = _timeouts(timeout_s, timeout_s)
    if uses_sentinel(config) and url is None:
        sentinel = sync_sentinel.Sentinel(  # type: ignore[no-untyped-call]
            sentinel_addresses(config), sentinel_kwargs=_sentinel_kwargs(config, timeout_s)
        )
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            config.redis.sentinelMaster, db=_database(config), **timeouts, **credentials(config)
        )
        return client
    return redis.Redis.from_url(url or redis_url(config), **timeouts, **credentials(config))


def sentinel_for_status(config: RelayConfig, *, timeout_s: float = 5.0) -> sync_sentinel.Sentinel | None:
    """The sentinels themselves, for `status` to show the primary and its replicas."""
    if not uses_sentinel(config):
        return None
    return sync_sentinel.Sentinel(  # type: ignore[no-untyped-call]
        sentinel_addresses(config), sentinel_kwargs=_sentinel_kwargs(config, timeout_s)
    )


def redis_label(config: RelayConfig, url: str | None = None) -> str:
    """Where a client of `config` connects, fit for a terminal or a log (no password): `url`
    when given, else the Sentinel group or the configured URL. Checks `redis.sentinels`."""
    if url is None and uses_sentinel(config):
        sentinel_addresses(config)
        return f"sentinel primary {config.redis.sentinelMaster!r} via {', '.join(config.redis.sentinels)}"
    return redacted_url(url or redis_url(config))


async def _ping_error(client: aioredis.Redis) -> Exception | None:
    """One PING, bounded: None if Redis answered, else why not."""
    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            await client.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        return exc
    return None


async def redis_answers(client: aioredis.Redis) -> bool:
    """One PING, bounded: True if Redis answered."""
    return await _ping_error(client) is None


async def wait_for_redis(
    client: aioredis.Redis, config: RelayConfig, logger: logging.Logger, stopping: asyncio.Event
) -> bool:
    """Block until `client` answers PING; False if `stopping` came first.

    A service reports ready only after this, so /readyz stays false while Redis is down. The
    URL it uses is logged once up front, and again every `WAIT_LOG_INTERVAL_S` while it waits,
    with where it came from: a service run without `RELAY_REDIS_URL` uses a default the
    operator may not know about."""
    url = redis_label(config)
    if uses_sentinel(config):
        source = "redis.sentinels / RELAY_REDIS_SENTINELS"
    else:
        source = "redis.url / RELAY_REDIS_URL" if config.redis.url else "default: set RELAY_REDIS_URL to change it"
    log(logger, logging.INFO, "using redis", redis_url=url, source=source)
    delay_s = 0.05
    next_report = time.monotonic()
    while not stopping.is_set():
        error = await _ping_error(client)
        if error is None:
            return True
        if time.monotonic() >= next_report:
            log(
                logger,
                logging.WARNING,
                "waiting for redis: not ready until it answers",
                redis_url=url,
                source=source,
                error=str(error) or type(error).__name__,
            )
            next_report = time.monotonic() + WAIT_LOG_INTERVAL_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay_s)
        delay_s = min(delay_s * 2, WAIT_RETRY_CAP_S)
    return False
