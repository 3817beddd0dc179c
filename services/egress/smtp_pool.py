"""Open SMTP connections kept for the next message to the same MX host (connection caching,
as Postfix and Exim do): a reused connection skips connect, greeting, EHLO, STARTTLS and QUIT.

A connection is given back only after a transaction that ended cleanly (a final reply, not
421, still connected); the next transaction starts with MAIL FROM, which is allowed after a
completed DATA or a RSET (RFC 5321 section 4.1.4). A connection idle for `idle_s` is closed
with QUIT, and one that carried `max_uses` transactions is not given back, so a busy worker
still spreads over equal-preference MX hosts and picks up DNS changes. The pool only ever holds
connections no job is using: at most one idle connection per job that finished with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass

import aiosmtplib

QUIT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class PoolKey:
    address: str
    port: int
    host_name: str  # TLS server name: two MX names on one address are not interchangeable
    tls_policy: str = ""  # the MTA-STS mode it was opened under: an enforce session needs a verified one


@dataclass(eq=False, slots=True)
class PooledConnection:
    smtp: aiosmtplib.SMTP
    tls: bool
    uses: int = 0
    expiry: asyncio.TimerHandle | None = None


class SmtpPool:
    def __init__(self, *, idle_s: float, max_uses: int) -> None:
        self._idle_s = idle_s
        self._max_uses = max_uses
        self._idle: dict[PoolKey, list[PooledConnection]] = defaultdict(list)
        self._closing: set[asyncio.Task[None]] = set()

    def take(self, key: PoolKey) -> PooledConnection | None:
        """The most recently used idle connection to `key` that is still open, if any."""
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.expiry is not None:
                connection.expiry.cancel()
                connection.expiry = None
            if connection.smtp.is_connected:
                if not idle:
                    del self._idle[key]
                return connection
            connection.smtp.close()
        self._idle.pop(key, None)
        return None

    def give_back(self, key: PoolKey, connection: PooledConnection) -> None:
        """Keep `connection` (after a clean transaction) for the next message to `key`."""
        connection.uses += 1
        if connection.uses >= self._max_uses or not connection.smtp.is_connected:
            self._quit(connection)
            return
        loop = asyncio.get_running_loop()
        connection.expiry = loop.call_later(self._idle_s, self._expire, key, connection)
        self._idle[key].append(connection)

    def idle_count(self) -> int:
        return sum(len(connections) for connections in self._idle.values())

    async def close(self) -> None:
        """QUIT every idle connection (shutdown)."""
        for key in list(self._idle):
            for connection in self._idle.pop(key):
                if connection.expiry is not None:
                    connection.expiry.cancel()
                self._quit(connection)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _expire(self, key: PoolKey, connection: PooledConnection) -> None:
        idle = self._idle.get(key)
        if idle is None or connection not in idle:
            return
        idle.remove(connection)
        if not idle:
            del self._idle[key]
        self._quit(connection)

    def _quit(self, connection: PooledConnection) -> None:
        task = asyncio.ensure_future(_quit_politely(connection.smtp))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


async def _quit_politely(smtp: aiosmtplib.SMTP) -> None:
    try:
        if smtp.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit(timeout=QUIT_TIMEOUT_S)
    finally:
        smtp.close()
