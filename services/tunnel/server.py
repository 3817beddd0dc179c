"""The tunnel's one HTTP port: WebSocket upgrades on `/ws`, health and metrics on the rest
(PROTOCOL.md A1, B), and the handler that owns each connection's lifecycle.

Before a socket authenticates it costs a descriptor and memory and proves nothing, so each
client IP may hold at most `ws.maxUnauthenticatedPerIp` of them and the node
`ws.maxUnauthenticated`: one more upgrade is answered `429` (or closed 1013 if it raced past
that check). Until auth_ok a message may be at most `ws.maxUnauthenticatedMessageBytes` (close
1009), then `ws.maxMessageBytes`. Connections that have not finished the upgrade are capped
per peer IP and per node (services/tunnel/handshakes.py). Silent TCP connections are bounded by
the handshake timeout (TLS handshake included), upgraded silent sockets by `ws.authTimeoutMs`.
"""

from __future__ import annotations

import http
import socket
import ssl
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from services.tunnel import metrics
from services.tunnel.connection import TunnelConnection
from services.tunnel.handshakes import HandshakeGate, gated_connection_class
from services.tunnel.node import TunnelNode
from services.tunnel.ratelimit import client_ip, is_trusted, parse_trusted_proxies
from shared.backlog import refresh_backlog_metrics
from shared.codes import CLOSE_REASON_CODE, CloseReason
from shared.health import health_response, refresh_before_scrape
from shared.logs import get_logger
from shared.redis_metrics import refresh_redis_memory

logger = get_logger(__name__)

WS_PATH = "/ws"
WRITE_LIMIT_BYTES = 1024 * 1024
CLOSE_TIMEOUT_S = 5.0
MAX_QUEUED_MESSAGES = 16
# Pending TCP connections the kernel queues for accept (asyncio's default is 100): after a node
# restart every gateway reconnects at once. The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096


def http_response(status: int, content_type: str, body: bytes) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


async def start_server(
    node: TunnelNode, tls: ssl.SSLContext | None = None, *, sock: socket.socket | None = None
) -> Server:
    """Serve on `sock` when given (bound by the caller), else bind `host`/`port` from config."""
    config = node.config
    trusted_proxies = parse_trusted_proxies(config.ws.trustedProxies)
    gate = HandshakeGate(
        config.ws.maxPendingHandshakesPerIp,
        config.ws.maxPendingHandshakes,
        lambda ip: is_trusted(ip, trusted_proxies),
    )

    def request_client_ip(ws: ServerConnection, request: Request) -> str:
        peer = ws.remote_address[0] if ws.remote_address else ""
        return client_ip(str(peer), request.headers.get("X-Forwarded-For"), trusted_proxies)

    async def route(connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            if node.unauthenticated_full(request_client_ip(connection, request)):
                metrics.CONNECTIONS_REFUSED.labels(reason=CloseReason.TOO_MANY_UNAUTHENTICATED).inc()
                return http_response(429, "application/json", b'{"error":"too_many_unauthenticated"}')
            return None
        ready = await node.ready() if path == "/readyz" else None
        if path == "/metrics":
            await refresh_before_scrape(lambda: refresh_backlog_metrics(config, "tunnel"))
            await refresh_before_scrape(lambda: refresh_redis_memory(config))
        return http_response(*health_response(path, ready))

    async def handle(ws: ServerConnection) -> None:
        assert ws.request is not None
        connection = TunnelConnection(node.context, ws, request_client_ip(ws, ws.request))
        if not node.connected(connection):  # upgrades racing past `route`'s check
            refusal = CloseReason.TOO_MANY_UNAUTHENTICATED
            metrics.CONNECTIONS_REFUSED.labels(reason=refusal).inc()
            await ws.close(CLOSE_REASON_CODE[refusal], refusal)
            return
        await connection.run()

    # asyncio's own TLS handshake timeout (60 s) runs before websockets' open_timeout starts.
    listen_options: dict[str, Any] = {"backlog": LISTEN_BACKLOG}
    if sock is not None:
        listen_options["sock"] = sock
    if tls is not None:
        listen_options["ssl_handshake_timeout"] = config.ws.handshakeTimeoutMs / 1000
    server: Server = await serve(
        handle,
        None if sock is not None else config.host,
        None if sock is not None else config.port,
        process_request=route,
        ssl=tls,
        **listen_options,
        create_connection=gated_connection_class(gate),
        # Raised to ws.maxMessageBytes at auth_ok (TunnelConnection._authenticated_limits).
        max_size=min(config.ws.maxUnauthenticatedMessageBytes, config.ws.maxMessageBytes),
        max_queue=MAX_QUEUED_MESSAGES,
        write_limit=WRITE_LIMIT_BYTES,
        open_timeout=config.ws.handshakeTimeoutMs / 1000,
        close_timeout=CLOSE_TIMEOUT_S,
        # No permessage-deflate even when the gateway offers it (the reference gateway does), as
        # the original relay's node `ws` server (off by default there): zlib state costs ~43 KB
        # per socket and compressing mail (mostly base64 or already compressed) caps a transfer
        # at ~30 MB/s (bench/README.md, "Tunnel").
        compression=None,
        ping_interval=None,  # our own heartbeat: intervals from config, close code 1001
        ping_timeout=None,
        server_header=None,
    )
    return server


def bound_port(server: Server) -> int:
    port: int = next(iter(server.sockets)).getsockname()[1]
    return port
