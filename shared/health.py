"""`/healthz`, `/readyz` and `/metrics` for services that have no HTTP server of their own.

The tunnel answers these paths on its WebSocket port; ingress and egress run this small
server on their `httpPort` (0 disables it). Deliberately minimal: GET only, one request per
connection, bounded request size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST

from shared.listen import ListenError, describe_failure
from shared.metrics_registry import metrics_text

ReadinessCheck = Callable[[], Awaitable[bool]]
MetricsRefresh = Callable[[], Awaitable[None]]
METRICS_REFRESH_TIMEOUT_S = 5.0
MAX_REQUEST_HEAD_BYTES = 8192


def health_response(path: str, ready: bool | None, *, starting: bool = False) -> tuple[int, str, bytes]:
    """(status, content type, body) for a health path; `ready` is None if not evaluated.
    `starting`: any other path answers 503 (try again), not 404 (wrong address)."""
    if path in ("/healthz", "/health"):
        return 200, "application/json", b'{"status":"ok"}'
    if path == "/readyz":
        status = 200 if ready else 503
        return status, "application/json", json.dumps({"ready": bool(ready)}).encode()
    if path == "/metrics":
        return 200, CONTENT_TYPE_LATEST, metrics_text()
    if starting:
        return 503, "application/json", b'{"error":"starting"}'
    return 404, "application/json", b'{"error":"not_found"}'


class HealthServer:
    """`field` names the config field of `port` in a bind error. With `sock` it serves on an
    already bound socket instead (the tunnel's port while it waits for Redis: `starting`)."""

    def __init__(
        self,
        host: str,
        port: int,
        readiness: ReadinessCheck,
        refresh_metrics: MetricsRefresh | None = None,
        *,
        field: str = "httpPort",
        sock: socket.socket | None = None,
        tls: ssl.SSLContext | None = None,
        starting: bool = False,
    ) -> None:
        self._host, self._port, self._readiness = host, port, readiness
        self._refresh_metrics = refresh_metrics
        self._field, self._sock, self._tls, self._starting = field, sock, tls, starting
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        if self._sock is not None:
            self._server = await asyncio.start_server(self._serve, sock=self._sock, ssl=self._tls)
            return
        try:
            self._server = await asyncio.start_server(self._serve, self._host, self._port, ssl=self._tls)
        except OSError as exc:
            raise ListenError(describe_failure(self._host, self._port, self._field, exc)) from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            parts = head[:MAX_REQUEST_HEAD_BYTES].split(b" ", 2)
            path = parts[1].decode("latin-1").split("?", 1)[0] if len(parts) > 1 else "/"
            ready = await self._check_ready() if path == "/readyz" else None
            if path == "/metrics":
                await refresh_before_scrape(self._refresh_metrics)
            status, content_type, body = health_response(path, ready, starting=self._starting)
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _check_ready(self) -> bool:
        try:
            return await asyncio.wait_for(self._readiness(), timeout=2)
        except Exception:
            return False


async def refresh_before_scrape(refresh: MetricsRefresh | None) -> None:
    """Bring computed gauges up to date; a slow or failing Redis leaves the last values."""
    if refresh is None:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(refresh(), timeout=METRICS_REFRESH_TIMEOUT_S)
