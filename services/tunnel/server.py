"""The tunnel's one HTTP port: WebSocket upgrades on `/ws`, health and metrics on the rest
(PROTOCOL.md A1, B), and the handler that owns each connection's lifecycle.
"""

from __future__ import annotations

import http
import logging

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from services.tunnel.connection import TunnelConnection
from services.tunnel.node import TunnelNode
from services.tunnel.ratelimit import client_ip, parse_trusted_proxies
from shared.health import health_response

logger = logging.getLogger("relay.tunnel.server")

WS_PATH = "/ws"
WRITE_LIMIT_BYTES = 256 * 1024
CLOSE_TIMEOUT_S = 5.0
MAX_QUEUED_MESSAGES = 16


def http_response(status: int, content_type: str, body: bytes) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


async def start_server(node: TunnelNode) -> Server:
    config = node.config
    trusted_proxies = parse_trusted_proxies(config.ws.trustedProxies)

    async def route(connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            return None
        ready = await node.ready() if path == "/readyz" else None
        return http_response(*health_response(path, ready))

    async def handle(ws: ServerConnection) -> None:
        peer = ws.remote_address[0] if ws.remote_address else ""
        forwarded_for = ws.request.headers.get("X-Forwarded-For") if ws.request else None
        connection = TunnelConnection(node, ws, client_ip(str(peer), forwarded_for, trusted_proxies))
        node.connected(connection)
        await connection.run()

    server: Server = await serve(
        handle,
        config.host,
        config.port,
        process_request=route,
        max_size=config.ws.maxMessageBytes,
        max_queue=MAX_QUEUED_MESSAGES,
        write_limit=WRITE_LIMIT_BYTES,
        open_timeout=config.ws.handshakeTimeoutMs / 1000,
        close_timeout=CLOSE_TIMEOUT_S,
        ping_interval=None,  # our own heartbeat: intervals from config, close code 1001
        ping_timeout=None,
        server_header=None,
    )
    return server


def bound_port(server: Server) -> int:
    port: int = next(iter(server.sockets)).getsockname()[1]
    return port
