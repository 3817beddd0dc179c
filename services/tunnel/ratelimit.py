"""Per-IP limit on WebSocket auth attempts (`rateLimits.wsAuthAttemptsPerMinutePerIp`).

Counted in Redis so the limit holds across tunnel nodes behind one load balancer. An IP over
the limit is denied for `rateLimits.denyWindowMs`, not just until the minute ends. Behind a
proxy the client is the right-most `X-Forwarded-For` hop that is not itself a trusted proxy;
the header is ignored unless the peer is one of `ws.trustedProxies` (IPs or CIDRs), because
anyone can write it.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from shared import ratelimit

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_trusted_proxies(entries: Iterable[str]) -> list[_Network]:
    networks: list[_Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            continue
    return networks


def is_trusted(address: str, trusted: list[_Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_ip(peer_ip: str, forwarded_for: str | None, trusted: list[_Network]) -> str:
    if not forwarded_for or not is_trusted(peer_ip, trusted):
        return peer_ip
    for hop in reversed([part.strip() for part in forwarded_for.split(",") if part.strip()]):
        if not is_trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer_ip
    return peer_ip


class AuthRateLimiter:
    """`rateLimits.wsAuthAttemptsPerMinutePerIp`, on the shared Redis rate limiter."""

    def __init__(
        self,
        redis: aioredis.Redis,
        attempts_per_minute: int,
        deny_window_ms: int,
        clock: ratelimit.Clock = time.time,
    ) -> None:
        self._redis = redis
        self._limit = ratelimit.RateLimit(ratelimit.RateKind.WS_AUTH, attempts_per_minute, deny_window_ms, clock)

    async def allow(self, ip: str) -> bool:
        """Count one attempt from `ip`; False when it is over the limit or denied."""
        return await ratelimit.allow(self._redis, self._limit, ip)

    def count(self, pipe: Pipeline, ip: str) -> None:
        """Queue one attempt on `pipe` (three replies, for `judge`)."""
        ratelimit.count(pipe, self._limit, ip)

    async def judge(self, ip: str, replies: list[Any]) -> bool:
        return await ratelimit.judge(self._redis, self._limit, ip, replies)
