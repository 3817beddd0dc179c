"""Forwarding delivery results from `results(pk)` to the right socket (DESIGN.md "Outbound" 4).

Which socket: the one that sent the outbound stream, recorded in `outbound_origin(pk, stream)`
as `<node>/<socket>` when the stream was accepted (an unmodified gateway may send over a
separate `sessionRole:"outbound"` socket and waits for the result on that socket only, as the
original relay answers on the originating socket). While that socket is connected, only its
node sends the result; once it is gone (its close deletes the record, a dead node's liveness
record expires) any live socket of the persona gets it, the inbound one first.

At least once, and only deleted when the gateway has it: results are sent, then one ping
follows on each socket used, and a socket's results are deleted only on its pong (bytes handed
to `send` may still be in socket buffers when a node dies). A socket that closes before its
pong leaves its results for the next authentication; a duplicate is harmless (the gateway
ignores a result for a stream it is no longer waiting for).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from services.tunnel import metrics
from shared import keys, lua, protocol
from shared.logs import get_logger, log
from shared.payloads import DeliveryResult

logger = get_logger(__name__)

RESULTS_BATCH = 100
# A delivered result's origin record outlives it briefly rather than being deleted with it:
# another node that read the result just before the deletion then still sees the origin and
# leaves it alone, instead of taking it for orphaned and sending it again.
DELIVERED_ORIGIN_TTL_S = 60


class ResultTarget(Protocol):
    socket_id: str

    async def send_text(self, text: str) -> None: ...

    async def ping(self) -> Awaitable[Any]: ...


@dataclass(frozen=True, slots=True)
class Origin:
    node_id: str
    socket_id: str

    def encode(self) -> str:
        return f"{self.node_id}/{self.socket_id}"

    @classmethod
    def decode(cls, value: bytes | str | None) -> Origin | None:
        if value is None:
            return None
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        node_id, slash, socket_id = text.rpartition("/")
        return cls(node_id, socket_id) if slash and node_id and socket_id else None


@dataclass(frozen=True, slots=True)
class PendingResult:
    entry_id: bytes
    result: DeliveryResult | None  # None: unreadable, dropped
    origin: Origin | None


def result_message(result: DeliveryResult) -> str:
    return protocol.delivery_result(
        result.stream_id,
        sent=result.status == "sent",
        message_id=result.message_id,
        error=result.error,
        extra=result.extra_fields(),
    )


def _unpack(fields: dict[bytes, bytes]) -> DeliveryResult | None:
    try:
        return DeliveryResult.unpack(fields[b"r"])
    except (KeyError, TypeError, ValueError, msgpack.UnpackException):
        return None


async def read_batch(redis: aioredis.Redis, persona_key: str, after: bytes | None) -> list[PendingResult]:
    """Up to RESULTS_BATCH results after entry `after` (from the start if None), each with the
    socket that sent its stream."""
    start = "-" if after is None else b"(" + after
    entries = await redis.xrange(keys.results(persona_key), start, "+", count=RESULTS_BATCH)
    if not entries:
        return []
    results = [_unpack(fields) for _, fields in entries]
    origin_keys = [keys.outbound_origin(persona_key, r.stream_id) for r in results if r is not None]
    origins = iter(await redis.mget(origin_keys) if origin_keys else [])
    return [
        PendingResult(entry_id, result, Origin.decode(next(origins)) if result is not None else None)
        for (entry_id, _), result in zip(entries, results, strict=True)
    ]


async def live_nodes(redis: aioredis.Redis, node_ids: set[str]) -> set[str]:
    if not node_ids:
        return set()
    ordered = sorted(node_ids)
    async with redis.pipeline(transaction=False) as pipe:
        for node_id in ordered:
            pipe.exists(keys.node_alive(node_id))
        alive = await pipe.execute()
    return {node_id for node_id, exists in zip(ordered, alive, strict=True) if exists}


async def drop_unreadable(redis: aioredis.Redis, persona_key: str, entry_ids: list[bytes]) -> None:
    if entry_ids:
        log(logger, logging.WARNING, "unreadable delivery results dropped", persona=persona_key, count=len(entry_ids))
        await redis.xdel(keys.results(persona_key), *entry_ids)


async def deliver(
    redis: aioredis.Redis,
    persona_key: str,
    plan: dict[ResultTarget, list[PendingResult]],
    pong_timeout_s: float,
    on_delivered: Callable[[ResultTarget, str], None] = lambda target, stream_id: None,
) -> int:
    """Send each target its results, one ping per target, and on each pong delete that target's
    results (their origin records expire soon after); the number delivered."""
    pongs: dict[ResultTarget, Awaitable[Any]] = {}
    for target, pending in plan.items():
        try:
            for item in pending:
                assert item.result is not None
                await target.send_text(result_message(item.result))
            pongs[target] = await target.ping()
        except (ConnectionClosed, OSError) as exc:  # the rest waits for the next socket
            log(
                logger,
                logging.INFO,
                "result forwarding stopped",
                persona=persona_key,
                socket_id=target.socket_id,
                error=repr(exc),
            )
    delivered = 0
    for target, pong in pongs.items():
        try:
            await asyncio.wait_for(asyncio.ensure_future(pong), pong_timeout_s)
        except (TimeoutError, ConnectionClosed, OSError):
            log(logger, logging.INFO, "no pong after results", persona=persona_key, socket_id=target.socket_id)
            continue
        pending = plan[target]
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xdel(keys.results(persona_key), *(item.entry_id for item in pending))
            for item in pending:
                assert item.result is not None
                pipe.expire(keys.outbound_origin(persona_key, item.result.stream_id), DELIVERED_ORIGIN_TTL_S)
            await pipe.execute()
        for item in pending:
            assert item.result is not None
            delivered += 1
            metrics.RESULTS_FORWARDED.inc()
            on_delivered(target, item.result.stream_id)
            log(
                logger,
                logging.INFO,
                "delivery result forwarded",
                persona=persona_key,
                stream_id=item.result.stream_id,
                status=item.result.status,
                socket_id=target.socket_id,
            )
    return delivered


class OriginRecords:
    """The `outbound_origin` records a node writes (on acceptance) and forgets (on close)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._forget = lua.FORGET_ORIGINS.on(redis)

    async def forget(self, persona_key: str, origin: Origin, stream_ids: list[str]) -> int:
        if not stream_ids:
            return 0
        origin_keys = [keys.outbound_origin(persona_key, stream_id) for stream_id in stream_ids]
        return int(await self._forget(keys=origin_keys, args=[origin.encode()]))
