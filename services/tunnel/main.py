"""`protege-relay tunnel`: wires config, Redis, arq and the tunnel server together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from arq import create_pool

from services.tunnel.node import TunnelNode
from services.tunnel.server import bound_port, start_server
from services.tunnel.startup import raise_open_files_limit, tls_context
from shared.config import RelayConfig
from shared.logs import get_logger, log
from shared.ratelimit import Clock
from shared.redis import arq_settings, connect
from shared.secrets import SecretFileError

logger = get_logger(__name__)

SERVER_DRAIN_TIMEOUT_S = 10.0
SOCKET_READ_BYTES = 1024 * 1024


async def serve(config: RelayConfig, stopping: asyncio.Event, *, rate_clock: Clock = time.time) -> None:
    """Run one tunnel node until `stopping` is set; `rate_clock` cuts the rate windows (tests hold it still)."""
    try:
        tls = tls_context(config.ws.tls)
    except SecretFileError as exc:
        log(logger, logging.ERROR, "cannot start: key file refused", error=str(exc))
        raise SystemExit(f"protege-relay tunnel: {exc}") from None
    soft_before, open_files = raise_open_files_limit()
    log(logger, logging.INFO, "open files limit", soft_before=soft_before, soft=open_files)
    redis = connect(config)
    # Inbox entries are whole messages (up to smtp.maxMessageBytes): reading them 64 KiB per
    # socket read (redis-py's default) costs ~25% more time on a 25 MB entry than 1 MiB reads.
    redis.connection_pool.connection_kwargs["socket_read_size"] = SOCKET_READ_BYTES
    arq = await create_pool(arq_settings(config))
    node = TunnelNode(config, redis, arq, rate_clock)
    await node.start()
    server = await start_server(node, tls)
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
        await arq.aclose()
        await redis.aclose()
        log(logger, logging.INFO, "stopped", node_id=node.node_id)
