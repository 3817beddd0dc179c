"""Delivering one persona's inbox to its inbound socket (DESIGN.md "Inbound" 3-4, PROTOCOL.md A5, B).

An entry leaves Redis only when the gateway has it: on its `smtp_ack` (capability
`inbound_ack`) or on the pong of a ping sent after smtp_end (legacy gateways). Until then it
stays pending in the consumer group, so a dropped socket or a dead node loses nothing: the next
authentication re-claims every pending entry (XAUTOCLAIM, min-idle 0) and sends it again under
the same stream id. Up to `WINDOW` messages are in flight; they are sent, and removed, in order.

An idle delivery costs no timer and no Redis call: it waits to be woken, by the pub/sub
wake-up (the fast path) or by the node's periodic sweep, which looks at every owned inbox in
one pipelined pass (`TunnelNode.sweep_once`), so a lost wake-up only delays. A wake-up at least
`RECLAIM_INTERVAL_S` after the last one also re-claims entries stranded by another consumer and
trims expired ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from services.tunnel import metrics
from shared import keys, protocol
from shared.logs import get_logger, log
from shared.payloads import InboxEntry

logger = get_logger(__name__)

WINDOW = 8
RECLAIM_INTERVAL_S = 30.0
TRIM_BATCH = 100

SendBytes = Callable[[bytes], Awaitable[None]]
Ping = Callable[[], Awaitable[Awaitable[Any]]]


@dataclass(slots=True)
class _InFlight:
    entry_id: bytes
    entry: InboxEntry
    waiter: asyncio.Future[Any]
    sent_at: float


async def ensure_group(redis: aioredis.Redis, persona_key: str) -> None:
    try:
        await redis.xgroup_create(keys.inbox(persona_key), keys.INBOX_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def trim_expired(redis: aioredis.Redis, persona_key: str, retention_s: int) -> int:
    """Remove entries older than the retention window (XTRIM MINID semantics), keeping the byte
    counter right; returns how many were removed."""
    stream = keys.inbox(persona_key)
    min_id = f"({int(time.time() * 1000) - retention_s * 1000}-0"
    removed = 0
    while True:
        entries = await redis.xrange(stream, "-", min_id, count=TRIM_BATCH)
        if not entries:
            return removed
        ids = [entry_id for entry_id, _ in entries]
        size_bytes = sum(_entry_size(fields) for _, fields in entries)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, keys.INBOX_GROUP, *ids)
            pipe.xdel(stream, *ids)
            pipe.decrby(keys.inbox_bytes(persona_key), size_bytes)
            await pipe.execute()
        removed += len(ids)
        log(logger, logging.INFO, "expired inbox entries trimmed", persona=persona_key, count=len(ids))


def _entry_size(fields: dict[bytes, bytes]) -> int:
    try:
        return len(InboxEntry.unpack(fields[b"m"]).data)
    except (KeyError, TypeError, ValueError, msgpack.UnpackException):
        return 0


def message_frames(stream_id: str, start: protocol.SmtpStart, message: bytes) -> Iterator[bytes]:
    """The frames of `protocol.encode_message_frames`, made one at a time as they are sent, each
    chunk copied once (from a memoryview slice straight into its frame): a large message is
    not held a second and third time in memory before its first byte goes out."""
    yield protocol.encode_start(stream_id, start)
    view = memoryview(message)
    for offset in range(0, len(message), protocol.MAX_CHUNK_BYTES) if message else [0]:
        yield protocol.encode_frame(
            protocol.FrameType.SMTP_CHUNK,
            stream_id,
            view[offset : offset + protocol.MAX_CHUNK_BYTES],  # type: ignore[arg-type]
        )
    yield protocol.encode_frame(protocol.FrameType.SMTP_END, stream_id)


class InboxDelivery:
    def __init__(
        self,
        redis: aioredis.Redis,
        persona_key: str,
        consumer: str,
        send: SendBytes,
        ping: Ping,
        *,
        use_ack: bool,
        ack_timeout_s: float,
        retention_s: int,
    ) -> None:
        self._redis = redis
        self.persona_key = persona_key
        self._stream = keys.inbox(persona_key)
        self._consumer = consumer
        self._send = send
        self._ping = ping
        self._use_ack = use_ack
        self._ack_timeout_s = ack_timeout_s
        self._retention_s = retention_s
        self._wakeup = asyncio.Event()
        self._acks: dict[str, asyncio.Future[Any]] = {}
        self._in_flight: deque[_InFlight] = deque()
        self._claim_cursor: bytes | None = b"0-0"
        self._claim_min_idle_ms = 0
        self._last_reclaim = time.monotonic()
        self._drained = False  # the last read returned fewer entries than asked for

    def wake(self) -> None:
        self._wakeup.set()

    def behind(self, stream_length: int) -> bool:
        """True when the inbox holds entries beyond those in flight here (the sweep's test)."""
        return stream_length > len(self._in_flight)

    def acked(self, stream_id: str) -> None:
        waiter = self._acks.get(stream_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self, *, known_empty: bool = False) -> None:
        """Deliver until cancelled. `known_empty`: the auth-time claim created the group and saw
        an empty inbox, so nothing is read until a wake-up."""
        if known_empty:
            self._claim_cursor = None  # an empty stream has no pending entries either
        else:
            await ensure_group(self._redis, self.persona_key)
            await trim_expired(self._redis, self.persona_key, self._retention_s)
        try:
            if known_empty:
                await self._idle()
            while True:
                if len(self._in_flight) < WINDOW and self._may_have_more():
                    entries = await self._next_entries(WINDOW - len(self._in_flight))
                    if entries:
                        for entry_id, entry in entries:
                            self._in_flight.append(await self._deliver(entry_id, entry))
                        continue
                if self._in_flight:
                    await self._settle_oldest()
                else:
                    await self._idle()
        finally:
            for waiter in self._acks.values():
                waiter.cancel()

    # --- reading -----------------------------------------------------------------------------

    def _may_have_more(self) -> bool:
        """False once a read came back short and nothing woke us since: every later entry
        brings a wake-up (or the sweep's), so reading again now would be a wasted round trip."""
        return not self._drained or self._wakeup.is_set() or self._claim_cursor is not None

    async def _next_entries(self, count: int) -> list[tuple[bytes, InboxEntry]]:
        self._wakeup.clear()
        while self._claim_cursor is not None:
            entries = await self._claim(count)
            if entries:
                return entries
        try:
            reply = await self._redis.xreadgroup(keys.INBOX_GROUP, self._consumer, {self._stream: ">"}, count=count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await ensure_group(self._redis, self.persona_key)
            return []
        raw = [item for _, stream_entries in reply or [] for item in stream_entries]
        self._drained = len(raw) < count
        return await self._parse(raw)

    async def _claim(self, count: int) -> list[tuple[bytes, InboxEntry]]:
        assert self._claim_cursor is not None
        try:
            reply = await self._redis.xautoclaim(
                self._stream,
                keys.INBOX_GROUP,
                self._consumer,
                min_idle_time=self._claim_min_idle_ms,
                start_id=self._claim_cursor,
                count=count,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await ensure_group(self._redis, self.persona_key)
            reply = [b"0-0", []]
        next_cursor = reply[0]
        self._claim_cursor = None if next_cursor in (b"0-0", "0-0") else next_cursor
        in_flight = {item.entry_id for item in self._in_flight}
        claimed = [item for item in reply[1] if item and item[0] is not None and item[0] not in in_flight]
        return await self._parse(claimed)

    async def _parse(self, raw: list[Any]) -> list[tuple[bytes, InboxEntry]]:
        """Decode entries; drop (ack and delete) ones that were deleted or cannot be read."""
        parsed: list[tuple[bytes, InboxEntry]] = []
        for entry_id, fields in raw:
            try:
                entry = InboxEntry.unpack(fields[b"m"])
                if len(entry.stream_id.encode("utf-8")) > protocol.MAX_STREAM_ID_BYTES:
                    raise ValueError("stream id too long for a frame")
                parsed.append((entry_id, entry))
            except (KeyError, TypeError, ValueError, msgpack.UnpackException):
                log(logger, logging.WARNING, "unreadable inbox entry dropped", persona=self.persona_key)
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.xack(self._stream, keys.INBOX_GROUP, entry_id)
                    pipe.xdel(self._stream, entry_id)
                    await pipe.execute()
        return parsed

    async def _idle(self) -> None:
        await self._wakeup.wait()
        if time.monotonic() - self._last_reclaim >= RECLAIM_INTERVAL_S:
            self._last_reclaim = time.monotonic()
            await trim_expired(self._redis, self.persona_key, self._retention_s)
            # Entries a replaced socket on another node read after we claimed the persona.
            self._claim_cursor = b"0-0"
            self._claim_min_idle_ms = int(self._ack_timeout_s * 2000)

    # --- sending and acknowledging -----------------------------------------------------------

    async def _deliver(self, entry_id: bytes, entry: InboxEntry) -> _InFlight:
        stream_id = entry.stream_id
        start = protocol.SmtpStart(entry.mail_from, entry.rcpt_to, entry.auth_attestation)
        waiter: asyncio.Future[Any]
        if self._use_ack:
            # Registered before the first frame: the ack may be read before our send returns.
            waiter = self._acks.get(stream_id) or asyncio.get_running_loop().create_future()
            self._acks[stream_id] = waiter
        for frame in message_frames(stream_id, start, entry.data):
            await self._send(frame)
        if not self._use_ack:
            waiter = asyncio.ensure_future(await self._ping())
        metrics.INBOUND_DELIVERED.inc()
        log(
            logger,
            logging.INFO,
            "inbound stream delivered",
            persona=self.persona_key,
            stream_id=stream_id,
            queue_id=entry.queue_id,
            bytes=len(entry.data),
        )
        return _InFlight(entry_id, entry, waiter, time.monotonic())

    async def _settle_oldest(self) -> None:
        oldest = self._in_flight[0]
        remaining_s = self._ack_timeout_s - (time.monotonic() - oldest.sent_at)
        try:
            await asyncio.wait_for(asyncio.shield(oldest.waiter), max(remaining_s, 0))
        except TimeoutError:
            log(
                logger,
                logging.WARNING,
                "inbound ack timed out, sending again",
                persona=self.persona_key,
                stream_id=oldest.entry.stream_id,
            )
            self._in_flight.popleft()
            self._in_flight.appendleft(await self._deliver(oldest.entry_id, oldest.entry))
            return
        self._in_flight.popleft()
        self._acks.pop(oldest.entry.stream_id, None)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self._stream, keys.INBOX_GROUP, oldest.entry_id)
            pipe.xdel(self._stream, oldest.entry_id)
            pipe.decrby(keys.inbox_bytes(self.persona_key), len(oldest.entry.data))
            await pipe.execute()
        metrics.INBOUND_ACKED.inc()
        metrics.INBOUND_ACK_SECONDS.observe(time.monotonic() - oldest.sent_at)
        log(
            logger,
            logging.INFO,
            "inbound stream acknowledged",
            persona=self.persona_key,
            stream_id=oldest.entry.stream_id,
            queue_id=oldest.entry.queue_id,
        )
