"""`protege-relay ingress`: wires config, Redis, the SMTP listener and the health port.

Private keys (the STARTTLS key, the attestation signing key) are read through
`shared.secrets`, which refuses files others could read. A key that is configured but
missing, too open or malformed stops the start with a one-line reason and a non-zero exit:
running without it would silently drop TLS or attestation.

The SMTP socket is inherited from the `protege-relay run` supervisor when it started us, else
bound here without SO_REUSEPORT (`shared.listen`): a port in use is a one-line error, never a
silently shared port. Mail is taken only once Redis answers; until then /readyz says false.

Runs until `stopping` is set, then drains (DESIGN.md "Running it"): stop accepting, let
transactions in flight finish up to `DRAIN_TIMEOUT_S`, answer the rest `421`, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.ingress.handler import IngressHandler
from services.ingress.sender_auth import SenderAuthenticator
from services.ingress.server import SmtpListener
from shared.backlog import refresh_backlog_metrics
from shared.config import RelayConfig, SmtpConfig
from shared.enqueue import load_script
from shared.health import HealthServer
from shared.identity import Passport
from shared.listen import bind_listener, inherited_socket
from shared.logs import get_logger, log
from shared.nodeinfo import HEARTBEAT_INTERVAL_S, publish_node_info, remove_node_info
from shared.ratelimit import Clock
from shared.redis import connect, wait_for_redis
from shared.redis_batch import BatchingRedis
from shared.secrets import SecretFileError, load_signing_key, read_secret_file
from shared.versions import require_tested

logger = get_logger(__name__)

DRAIN_TIMEOUT_S = 20.0
ROLE = "ingress"
REDIS_CONNECT_TIMEOUT_S = 5.0
REDIS_CALL_TIMEOUT_S = 5.0


def redis_client(config: RelayConfig) -> aioredis.Redis:
    """The shared client (one Redis or Sentinel's primary) minus its per-command `socket_timeout`: with
    one set, redis-py wraps every command's send in `asyncio.wait_for`, a task per command on
    the hot path. Every call the ingress makes runs under its own `asyncio.timeout` instead
    (handler, enqueue, heartbeat, readiness), so a stalled Redis is still a 451, never a hang.
    Its pipelines are batched across sessions (shared/redis_batch.py)."""
    client: aioredis.Redis = connect(
        config, timeout_s=None, connect_timeout_s=REDIS_CONNECT_TIMEOUT_S, redis_class=BatchingRedis
    )
    return client


def tls_context(smtp: SmtpConfig) -> ssl.SSLContext | None:
    """Server context for STARTTLS when a certificate and key are configured.

    The key file passes the `shared.secrets` checks first; ssl then loads it by path (it takes
    no bytes), a window in which only the file's owner could swap it.
    """
    if not smtp.tls.enabled:
        return None
    read_secret_file(smtp.tls.keyPath, purpose="smtp.tls.keyPath")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(smtp.tls.certPath, smtp.tls.keyPath)
    except (OSError, ssl.SSLError) as exc:
        raise SecretFileError(f"smtp.tls: cannot load {smtp.tls.certPath} with its key: {exc}") from None
    return context


def attestation_signer(config: RelayConfig) -> Passport | None:
    """The relay's Ed25519 attestation key when `attestation.enabled`, else None."""
    if not config.attestation.enabled:
        return None
    if not config.attestation.keyId:
        raise SecretFileError("attestation.keyId: must be set when attestation is enabled")
    return load_signing_key(config.attestation.signingPrivateKeyPath, purpose="attestation.signingPrivateKeyPath")


def sender_authenticator(config: RelayConfig) -> SenderAuthenticator | None:
    """SPF/DKIM/DMARC evaluation when asked for, and always when attesting (it signs them)."""
    if not (config.smtp.evaluateSenderAuth or config.attestation.enabled):
        return None
    return SenderAuthenticator(config.smtp.authNameservers, config.smtp.senderAuthTimeoutMs / 1000)


async def serve(
    config: RelayConfig,
    stopping: asyncio.Event,
    *,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
    rate_clock: Clock = time.time,
) -> None:
    """Run the ingress until `stopping` is set; `rate_clock` cuts the rate windows (tests hold it still)."""
    require_tested("ingress", "aiosmtpd", "redis")  # server.py overrides aiosmtpd internals; redis_batch
    try:
        signer = attestation_signer(config)
        tls = tls_context(config.smtp)
    except SecretFileError as exc:
        log(logger, logging.ERROR, "cannot start: key file refused", error=str(exc))
        raise SystemExit(f"protege-relay ingress: {exc}") from None
    redis = redis_client(config)
    hostname = config.smtp.hostname or socket.gethostname()
    handler = IngressHandler(
        redis,
        config,
        hostname,
        sender_auth=sender_authenticator(config),
        attestation_signer=signer,
        rate_clock=rate_clock,
    )
    listener = SmtpListener(
        handler, config.smtp, hostname, tls, max_connections_per_ip=config.rateLimits.smtpConcurrentConnectionsPerIp
    )

    async def ready() -> bool:
        async with asyncio.timeout(REDIS_CALL_TIMEOUT_S):
            return (listener.listening or not config.smtp.enabled) and bool(await redis.ping())

    health: HealthServer | None = None
    heartbeat: asyncio.Task[None] | None = None
    try:
        if config.smtp.httpPort:
            health = HealthServer(
                config.smtp.host,
                config.smtp.httpPort,
                ready,
                refresh_metrics=lambda: refresh_backlog_metrics(config, "ingress"),
                field="smtp.httpPort",
            )
            await health.start()
        listen_socket = None
        if config.smtp.enabled:
            listen_socket = inherited_socket() or bind_listener(config.smtp.host, config.smtp.port, field="smtp.port")
        if not await wait_for_redis(redis, config, logger, stopping):
            if listen_socket is not None:
                listen_socket.close()
            return
        if listen_socket is not None:
            await listener.start(listen_socket)
        heartbeat = asyncio.create_task(_heartbeat(redis, config.node_id, listener))
        log(
            logger,
            logging.INFO,
            "ready",
            smtp_port=listener.port if config.smtp.enabled else None,
            http_port=health.port if health else None,
            node_id=config.node_id,
            tls=config.smtp.tls.enabled,
            sender_auth=config.smtp.evaluateSenderAuth or config.attestation.enabled,
            attestation_key_id=config.attestation.keyId if signer else None,
        )
        await stopping.wait()
        log(logger, logging.INFO, "stopping", open_connections=len(listener.connections))
        cut = await listener.drain(drain_timeout_s)
        log(logger, logging.INFO, "drained", connections_cut=cut)
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        if health is not None:
            await health.close()
        await handler.close()
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(remove_node_info(redis, config.node_id), timeout=2)
        await redis.aclose()


async def _heartbeat(redis: aioredis.Redis, node_id: str, listener: SmtpListener) -> None:
    """Liveness record for `protege-relay status`; Redis hiccups are logged, never fatal. Also
    (re)loads the enqueue script, so neither the first message nor the first after a Redis
    restart pays for a NOSCRIPT reply."""
    while True:
        try:
            async with asyncio.timeout(REDIS_CALL_TIMEOUT_S):
                await load_script(redis)
                await publish_node_info(redis, node_id, ROLE, connections=len(listener.connections))
        except (RedisError, OSError, TimeoutError) as exc:
            log(logger, logging.DEBUG, "heartbeat failed", error=type(exc).__name__)
        await asyncio.sleep(HEARTBEAT_INTERVAL_S)
