"""Redis command sends bounded without a task each.

With a `socket_timeout` (shared/redis.py `connect` sets 5 s, so a stalled Redis fails a call
instead of hanging it), redis-py sends every command inside `asyncio.wait_for`, which on Python
3.11 runs the send as a task of its own: under the auth load a fifth of the tunnel's CPU was in
that task and the write it wraps (bench/README.md, "Issue 11, session 3"). `bound_sends` gives
the client's pool a connection class that sends under `asyncio.timeout` instead (the same bound,
no task); reads keep redis-py's own timeout. The class is derived from the pool's own (plain,
TLS, Unix socket or Sentinel-managed), so nothing else about the connection changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError


class TimedSend:
    socket_timeout: float | None

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        timeout_s = self.socket_timeout
        if not timeout_s:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        # Without a socket_timeout for the call redis-py writes directly (no wait_for); a health
        # check's PING read inside it is bounded by the same deadline.
        self.socket_timeout = None
        try:
            async with asyncio.timeout(timeout_s):
                await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except TimeoutError:
            raise RedisTimeoutError("Timeout writing to socket") from None
        finally:
            self.socket_timeout = timeout_s


def bound_sends(client: aioredis.Redis) -> None:
    """Make `client`'s new connections send without a task per command (see the module doc)."""
    pool: Any = client.connection_pool
    base = pool.connection_class
    if not issubclass(base, TimedSend):
        pool.connection_class = type(f"TimedSend{base.__name__}", (TimedSend, base), {})
