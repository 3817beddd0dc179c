"""`protege-relay tunnel`: wires config, Redis and the tunnel server together.

The port is bound first (a port in use is a one-line error at once, `shared.listen`); while
Redis does not answer yet, the port serves only the health paths, with /readyz false and 503
for everything else (a gateway retries), and the WebSocket server takes over the same socket
once Redis is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time

from redis.asyncio import Redis

from services.tunnel.node import TunnelNode
from services.tunnel.server import LISTEN_BACKLOG, bound_port, start_server
from services.tunnel.startup import raise_open_files_limit, tls_context
from shared.config import RelayConfig
from shared.health import HealthServer
from shared.listen import bind_listener
from shared.logs import get_logger, log
from shared.ratelimit import Clock
from shared.redis import connect, redis_answers, wait_for_redis
from shared.redis_batch import BatchingRedis
from shared.secrets import SecretFileError
from shared.versions import require_tested

logger = get_logger(__name__)

SERVER_DRAIN_TIMEOUT_S = 10.0
SOCKET_READ_BYTES = 1024 * 1024


async def serve(config: RelayConfig, stopping: asyncio.Event, *, rate_clock: Clock = time.time) -> None:
    """Run one tunnel node until `stopping` is set; `rate_clock` cuts the rate windows (tests hold it still)."""
    require_tested("tunnel", "websockets", "redis")  # wsio.py frames through websockets' Protocol; redis_batch
    try:
        tls = tls_context(config.ws.tls)
    except SecretFileError as exc:
        log(logger, logging.ERROR, "cannot start: key file refused", error=str(exc))
        raise SystemExit(f"protege-relay tunnel: {exc}") from None
    soft_before, open_files = raise_open_files_limit()
    log(logger, logging.INFO, "open files limit", soft_before=soft_before, soft=open_files)
    listen_socket = bind_listener(config.host, config.port, field="port", backlog=LISTEN_BACKLOG)
    redis = connect(config, redis_class=BatchingRedis)  # pipelines of one loop turn share a write
    # Inbox entries are whole messages (up to smtp.maxMessageBytes): reading them 64 KiB per
    # socket read (redis-py's default) costs ~25% more time on a 25 MB entry than 1 MiB reads.
    redis.connection_pool.connection_kwargs["socket_read_size"] = SOCKET_READ_BYTES
    if not await _wait_for_redis_answering_health(config, redis, listen_socket, tls, stopping):
        listen_socket.close()
        await redis.aclose()
        return
    node = TunnelNode(config, redis, rate_clock)
    await node.start()
    server = await start_server(node, tls, sock=listen_socket)
    log(
        logger,
        logging.INFO,
        "ready",
        node_id=node.node_id,
        host=config.host,
        port=bound_port(server),
        tls=tls is not None,
    )
    try:
        await stopping.wait()
    finally:
        log(logger, logging.INFO, "stopping", node_id=node.node_id, connections=len(node.connections))
        server.close(close_connections=False)
        await node.shutdown()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), SERVER_DRAIN_TIMEOUT_S)
        await redis.aclose()
        log(logger, logging.INFO, "stopped", node_id=node.node_id)


async def _wait_for_redis_answering_health(
    config: RelayConfig, redis: Redis, listen_socket: socket.socket, tls: ssl.SSLContext | None, stopping: asyncio.Event
) -> bool:
    """`wait_for_redis`, serving /healthz and /readyz (false) on a duplicate of the tunnel's
    socket meanwhile; closing the duplicate leaves the socket itself listening. When Redis
    answers at once there is nothing to wait for: early connections just queue for the server."""
    if await redis_answers(redis):
        return await wait_for_redis(redis, config, logger, stopping)

    async def not_ready() -> bool:
        return False

    health = HealthServer(config.host, config.port, not_ready, sock=listen_socket.dup(), tls=tls, starting=True)
    await health.start()
    try:
        return await wait_for_redis(redis, config, logger, stopping)
    finally:
        await health.close()
