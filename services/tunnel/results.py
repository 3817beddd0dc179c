"""Forwarding delivery results from `results(pk)` to the persona's socket (DESIGN.md "Outbound" 4).

At least once: each result is deleted only after the send returned, so a socket dying in
between means the result is sent again on the next authentication (the gateway ignores a
result for a stream it is no longer waiting for).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgpack
import redis.asyncio as aioredis

from services.tunnel import metrics
from shared import keys, protocol
from shared.logs import log
from shared.payloads import DeliveryResult

logger = logging.getLogger("relay.tunnel.results")

RESULTS_BATCH = 100


def result_message(result: DeliveryResult) -> str:
    return protocol.delivery_result(
        result.stream_id,
        sent=result.status == "sent",
        message_id=result.message_id,
        error=result.error,
        extra=result.extra_fields(),
    )


async def forward_results(
    redis: aioredis.Redis, persona_key: str, send_text: Callable[[str], Awaitable[None]]
) -> int:
    """Send every pending result of the persona through `send_text`; the number sent."""
    stream = keys.results(persona_key)
    forwarded = 0
    while True:
        entries = await redis.xrange(stream, count=RESULTS_BATCH)
        for entry_id, fields in entries:
            try:
                result = DeliveryResult.unpack(fields[b"r"])
            except (KeyError, TypeError, ValueError, msgpack.UnpackException):
                log(logger, logging.WARNING, "unreadable delivery result dropped", persona=persona_key)
                await redis.xdel(stream, entry_id)
                continue
            await send_text(result_message(result))
            await redis.xdel(stream, entry_id)
            forwarded += 1
            metrics.RESULTS_FORWARDED.inc()
            log(
                logger, logging.INFO, "delivery result forwarded",
                persona=persona_key, stream_id=result.stream_id, status=result.status,
            )
        if len(entries) < RESULTS_BATCH:
            return forwarded
