"""Delivering one persona's inbox to its inbound socket (DESIGN.md "Inbound" 3-4, PROTOCOL.md A5, B).

An entry leaves Redis only when the gateway has it: on its `smtp_ack` (capability
`inbound_ack`), or, for legacy gateways, once the socket has stayed open `ws.legacyAckGraceMs`
after the pong of a ping sent after smtp_end. The pong alone proves nothing: the WebSocket
library answers pings by itself, before the application has stored anything, so a gateway that
dies right after receiving would lose the message; one that stays connected for the grace has
almost certainly stored it (the original relay trusts the pong alone). Until then an entry stays
pending in the consumer group, so a dropped socket or a dead node loses nothing: the next
authentication re-claims every pending entry (XAUTOCLAIM, min-idle 0) and sends it again under
the same stream id. Up to `WINDOW` messages are in flight; they are sent, and removed, in order.
Entries waiting out their grace do not count against the window (they are delivered).

With `redis.minReplicasToAck` (docs/HA.md) a read is sent on only once that many replicas
confirmed it (`shared.replication.confirmed_read`); else nothing of it is sent, the socket stays
open, and the entries (pending here) are claimed again on the next wake-up or sweep. A delivered
message's idempotency marker then stays `DELIVERED_MARKER_TTL_S`, marked delivered, so that an
ingress that answered 451 for it a moment ago can still keep it for the sender's retry.

An idle delivery costs no timer and no Redis call: it waits to be woken, by the pub/sub
wake-up (the fast path) or by the node's periodic sweep, which looks at every owned inbox in
one pipelined pass (`NodeDuties.sweep_once` in services/tunnel/duties.py), so a lost wake-up
only delays. A wake-up at least `RECLAIM_INTERVAL_S` after the last one also re-claims entries
stranded by another consumer and trims expired ones.

Memory: a socket holds at most `WINDOW` small entries and one body being streamed. A body
stored apart (shared/inbox_entries.py: anything over one chunk, as the ingress writes it) is
read with GETRANGE, `BODY_READ_BYTES` at a time with one read ahead, and sent as it arrives;
the send waits while the gateway does not read, so a slow or silent gateway holds about two
reads' worth, not whole messages. The frames are the same as for an inline body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from services.tunnel import metrics
from shared import keys, lua, protocol
from shared.enqueue import DELIVERED_MARKER_TTL_S
from shared.inbox_entries import StoredEntry, UnreadableEntry
from shared.logs import get_logger, log
from shared.replication import (
    NO_ACK,
    NotReplicated,
    ReplicaAck,
    ScriptCall,
    call_scripts,
    confirmed_read,
    script_replies,
)

logger = get_logger(__name__)

WINDOW = 8
RECLAIM_INTERVAL_S = 30.0
TRIM_BATCH = 16  # entries per XRANGE when trimming: inline bodies are at most one chunk each
BODY_READ_BYTES = 4 * protocol.MAX_CHUNK_BYTES  # one GETRANGE of a body stored apart

# Sends binary WebSocket messages in order, in one socket write where it can
# (services/tunnel/wsio.py `send_binary_messages`).
SendMessages = Callable[[Sequence[bytes]], Awaitable[None]]
Ping = Callable[[], Awaitable[Awaitable[Any]]]
IsOpen = Callable[[], bool]


class BodyVanished(RuntimeError):
    """A body stored apart disappeared while it was being sent: its entry was removed by another
    socket of the persona (a replacement race). The partial stream must not be completed."""


@dataclass(slots=True)
class _InFlight:
    stored: StoredEntry
    waiter: asyncio.Future[Any]
    sent_at: float


async def ensure_group(redis: aioredis.Redis, persona_key: str) -> None:
    try:
        await redis.xgroup_create(keys.inbox(persona_key), keys.INBOX_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def trim_expired(redis: aioredis.Redis, persona_key: str, retention_s: int) -> int:
    """Remove entries older than the retention window (XTRIM MINID semantics), with their bodies
    and markers, keeping the byte counter right; returns how many were removed."""
    stream = keys.inbox(persona_key)
    min_id = f"({int(time.time() * 1000) - retention_s * 1000}-0"
    remove = lua.INBOX_REMOVE.on(redis)
    removed = 0
    while True:
        entries = await redis.xrange(stream, "-", min_id, count=TRIM_BATCH)
        if not entries:
            return removed
        async with redis.pipeline(transaction=False) as pipe:
            for entry_id, fields in entries:
                try:
                    script_keys, args = StoredEntry.parse(entry_id, fields).remove_call(persona_key)
                except UnreadableEntry:
                    pipe.xack(stream, keys.INBOX_GROUP, entry_id)
                    pipe.xdel(stream, entry_id)
                    continue
                await remove(keys=script_keys, args=args, client=pipe)
            await pipe.execute()
        removed += len(entries)
        log(logger, logging.INFO, "expired inbox entries trimmed", persona=persona_key, count=len(entries))


def chunk_frames(stream_id: str, data: bytes) -> Iterator[bytes]:
    """`data` as smtp_chunk frames of `MAX_CHUNK_BYTES` (one empty chunk for empty data), each
    chunk copied once, from a memoryview slice of the stored bytes straight into its frame."""
    view = memoryview(data)
    for offset in range(0, len(data), protocol.MAX_CHUNK_BYTES) if data else [0]:
        yield protocol.encode_frame(
            protocol.FrameType.SMTP_CHUNK, stream_id, view[offset : offset + protocol.MAX_CHUNK_BYTES]
        )


def message_frames(stream_id: str, start: protocol.SmtpStart, message: bytes) -> Iterator[bytes]:
    """The frames of `protocol.encode_message_frames`, made one at a time, each chunk copied
    once (`chunk_frames`)."""
    yield protocol.encode_start(stream_id, start)
    yield from chunk_frames(stream_id, message)
    yield protocol.encode_frame(protocol.FrameType.SMTP_END, stream_id)


def settled_prefix(waiters: Sequence[asyncio.Future[Any]]) -> int:
    """How many of the oldest in-flight messages are settled, given that the first one is: it
    and every one right after it whose waiter already finished well. They are removed (or start
    their grace) together, in order, in one round trip; the first unsettled one stops the run."""
    count = 1
    for waiter in waiters[1:]:
        if not waiter.done() or waiter.cancelled() or waiter.exception() is not None:
            break
        count += 1
    return count


class InboxDelivery:
    def __init__(
        self,
        redis: aioredis.Redis,
        persona_key: str,
        consumer: str,
        send: SendMessages,
        ping: Ping,
        *,
        use_ack: bool,
        ack_timeout_s: float,
        retention_s: int,
        legacy_ack_grace_s: float = 5.0,
        is_open: IsOpen = lambda: True,
        ack: ReplicaAck = NO_ACK,
    ) -> None:
        self._redis = redis
        self._ack = ack
        # A late KEEP_MARKER of an ingress that answered 451 must still find the marker (docs/HA.md).
        self._delivered_marker_ttl_s = DELIVERED_MARKER_TTL_S if ack.replicas else 0
        self.persona_key = persona_key
        self._stream = keys.inbox(persona_key)
        self._consumer = consumer
        self._send = send
        self._ping = ping
        self._use_ack = use_ack
        self._ack_timeout_s = ack_timeout_s
        self._retention_s = retention_s
        self._legacy_ack_grace_s = legacy_ack_grace_s
        self._is_open = is_open
        self._remove = lua.INBOX_REMOVE.on(redis)
        self._wakeup = asyncio.Event()
        self._acks: dict[str, asyncio.Future[Any]] = {}
        self._in_flight: deque[_InFlight] = deque()
        self._in_grace: deque[tuple[float, _InFlight]] = deque()  # (removable at, delivered entry)
        self._to_remove: list[_InFlight] = []  # acknowledged, removed in the next round trip
        self._grace_started = asyncio.Event()
        self._claim_cursor: bytes | None = b"0-0"
        self._claim_min_idle_ms = 0
        self._reclaim_own = False  # a read no replica confirmed left entries pending here
        self._last_reclaim = time.monotonic()
        self._drained = False  # the last read returned fewer entries than asked for

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def unacknowledged(self) -> int:
        """Messages sent on this socket and not yet acknowledged (kept in Redis, sent again)."""
        return len(self._in_flight)

    def behind(self, stream_length: int) -> bool:
        """True when the inbox holds entries beyond those in flight here (the sweep's test)."""
        return stream_length > len(self._in_flight) + len(self._in_grace) + len(self._to_remove)

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
        confirm = None if self._use_ack else asyncio.get_running_loop().create_task(self._remove_after_grace())
        try:
            if known_empty:
                await self._idle()
            while True:
                if len(self._in_flight) < WINDOW and self._may_have_more():
                    entries = await self._next_entries(WINDOW - len(self._in_flight))
                    if entries:
                        for stored in entries:
                            in_flight = await self._deliver(stored)
                            if in_flight is not None:
                                self._in_flight.append(in_flight)
                        continue
                await self._flush_removals()  # nothing is read now: the settled go on their own
                if self._in_flight:
                    await self._settle_oldest()
                else:
                    await self._idle()
        finally:
            for waiter in self._acks.values():
                waiter.cancel()
            if confirm is not None:
                confirm.cancel()

    # --- reading -----------------------------------------------------------------------------

    def _may_have_more(self) -> bool:
        """False once a read came back short and nothing woke us since: every later entry
        brings a wake-up (or the sweep's), so reading again now would be a wasted round trip."""
        return not self._drained or self._wakeup.is_set() or self._claim_cursor is not None

    async def _next_entries(self, count: int) -> list[StoredEntry]:
        try:
            return await self._read_entries(count)
        except NotReplicated as exc:
            self._unconfirmed_read(exc)
            return []

    def _unconfirmed_read(self, exc: NotReplicated) -> None:
        """A read moved entries into this consumer's pending list, but too few replicas confirmed
        it, so a failover could take it back: nothing of it is sent. The socket stays open (closing
        it would only send the gateway into a reconnect loop, and into the auth rate limit); the
        entries are claimed again, min-idle 0 as they are our own, once something wakes the
        delivery: at the latest the node's sweep, which sees more in the inbox than is in flight."""
        if not self._reclaim_own:
            log(
                logger,
                logging.WARNING,
                "inbox read not confirmed by replicas; nothing sent, claimed again later",
                persona=self.persona_key,
                confirmed=exc.confirmed,
                required=exc.required,
            )
        self._reclaim_own = True
        self._claim_cursor = b"0-0"
        self._claim_min_idle_ms = 0

    async def _read_entries(self, count: int) -> list[StoredEntry]:
        self._wakeup.clear()
        while self._claim_cursor is not None:
            await self._flush_removals()
            entries = await self._claim(count)
            if entries:
                return entries
        try:
            if self._ack.replicas:
                await self._flush_removals()
                reply = await confirmed_read(
                    self._redis,
                    lambda pipe: pipe.xreadgroup(keys.INBOX_GROUP, self._consumer, {self._stream: ">"}, count=count),
                    self._ack,
                    is_empty=lambda reply: not any(entries for _, entries in reply or []),
                )
            else:
                reply = await self._remove_and_read(count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await ensure_group(self._redis, self.persona_key)
            return []
        raw = [item for _, stream_entries in reply or [] for item in stream_entries]
        self._drained = len(raw) < count
        return await self._parse(raw)

    async def _remove_and_read(self, count: int) -> Any:
        """XREADGROUP, after the removal of the entries settled since the last round trip, in one
        pipeline: an acknowledgement followed by a read (a wake-up came while the gateway was
        storing) costs one round trip, not two. The removals are checked before the read's reply
        is used; one failing raises, as `_removed` would."""
        if not self._to_remove:  # a plain command: no pipeline object to build and reset
            return await self._redis.xreadgroup(keys.INBOX_GROUP, self._consumer, {self._stream: ">"}, count=count)
        removing, self._to_remove = self._to_remove, []
        sent = await script_replies(
            self._redis,
            [self._remove_call(item) for item in removing],
            also=lambda pipe: pipe.xreadgroup(keys.INBOX_GROUP, self._consumer, {self._stream: ">"}, count=count),
        )
        for result in sent.replies:
            if isinstance(result, Exception):
                raise result
        self._acknowledged(removing)
        (reply,) = sent.also
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _claim(self, count: int) -> list[StoredEntry]:
        cursor = self._claim_cursor
        assert cursor is not None
        try:
            reply = await confirmed_read(
                self._redis,
                lambda pipe: pipe.xautoclaim(
                    self._stream,
                    keys.INBOX_GROUP,
                    self._consumer,
                    min_idle_time=self._claim_min_idle_ms,
                    start_id=cursor,
                    count=count,
                ),
                self._ack,
                is_empty=lambda reply: not reply[1],
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await ensure_group(self._redis, self.persona_key)
            reply = [b"0-0", []]
        next_cursor = reply[0]
        self._claim_cursor = None if next_cursor in (b"0-0", "0-0") else next_cursor
        if self._claim_cursor is None:
            self._reclaim_own = False  # every pending entry was claimed, and confirmed
        in_flight = {item.stored.entry_id for item in self._in_flight}
        in_flight.update(item.stored.entry_id for _, item in self._in_grace)
        claimed = [item for item in reply[1] if item and item[0] is not None and item[0] not in in_flight]
        return await self._parse(claimed)

    async def _parse(self, raw: list[Any]) -> list[StoredEntry]:
        """Decode entries; drop (ack and delete) ones that were deleted or cannot be read."""
        parsed: list[StoredEntry] = []
        for entry_id, fields in raw:
            try:
                parsed.append(StoredEntry.parse(entry_id, fields))
            except UnreadableEntry:
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
            self._claim_min_idle_ms = 0 if self._reclaim_own else int(self._ack_timeout_s * 2000)

    # --- sending and acknowledging -----------------------------------------------------------

    async def _deliver(self, stored: StoredEntry) -> _InFlight | None:
        """Send one message; None when its body is gone (the entry is then removed)."""
        entry = stored.entry
        stream_id = entry.stream_id
        start = protocol.SmtpStart(entry.mail_from, entry.rcpt_to, entry.auth_attestation)
        waiter: asyncio.Future[Any]
        if not stored.body_apart:
            if self._use_ack:
                waiter = self._ack_waiter(stream_id)
            await self._send(list(message_frames(stream_id, start, entry.data)))
        else:
            async with contextlib.aclosing(self._body_blocks(stored)) as blocks:
                first_block = await anext(blocks, None)
                if first_block is None:
                    await self._drop_without_body(stored)
                    return None
                if self._use_ack:
                    waiter = self._ack_waiter(stream_id)
                await self._send_streamed(stored, start, first_block, blocks)
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
            bytes=stored.size_bytes,
        )
        return _InFlight(stored, waiter, time.monotonic())

    def _ack_waiter(self, stream_id: str) -> asyncio.Future[Any]:
        """Registered before the first frame: the ack may be read before our send returns."""
        waiter = self._acks.get(stream_id) or asyncio.get_running_loop().create_future()
        self._acks[stream_id] = waiter
        return waiter

    async def _send_streamed(
        self,
        stored: StoredEntry,
        start: protocol.SmtpStart,
        first_block: bytes,
        blocks: AsyncGenerator[bytes, None],
    ) -> None:
        """A body stored apart: one write per block of smtp_chunk frames cut exactly as
        `message_frames` cuts an inline body (blocks are whole multiples of a chunk), smtp_start
        in the first block's write and smtp_end in the last's. A block is sent before the next
        one is awaited (that read is already in flight, `_body_blocks`)."""
        stream_id = stored.entry.stream_id
        frames = [protocol.encode_start(stream_id, start)]
        sent = 0
        block: bytes | None = first_block
        while block is not None:
            sent += len(block)
            frames.extend(chunk_frames(stream_id, block))
            if sent >= stored.size_bytes:
                frames.append(protocol.encode_frame(protocol.FrameType.SMTP_END, stream_id))
            await self._send(frames)
            frames = []
            block = await anext(blocks, None)

    async def _body_blocks(self, stored: StoredEntry) -> AsyncGenerator[bytes, None]:
        """The body stored apart, `BODY_READ_BYTES` per GETRANGE, the next read in flight while
        a block is sent. Ends early (nothing at all) if the body is missing before the first
        block; raises `BodyVanished` if it disappears after."""
        if not stored.body_apart:
            return
        body_key = stored.body_key(self.persona_key)
        size = stored.size_bytes
        offset = 0
        read = asyncio.ensure_future(self._redis.getrange(body_key, 0, min(BODY_READ_BYTES, size) - 1))
        try:
            while offset < size:
                block = await read
                expected = min(BODY_READ_BYTES, size - offset)
                if len(block) != expected:
                    if offset == 0:
                        return
                    raise BodyVanished(stored.entry.stream_id)
                offset += expected
                if offset < size:
                    end = offset + min(BODY_READ_BYTES, size - offset) - 1
                    read = asyncio.ensure_future(self._redis.getrange(body_key, offset, end))
                yield block
        finally:
            read.cancel()

    async def _drop_without_body(self, stored: StoredEntry) -> None:
        """An entry whose body is missing: removed by another socket meanwhile (the script then
        changes nothing), or damaged; either way there is nothing to deliver."""
        script_keys, args = stored.remove_call(self.persona_key)
        if await self._remove(keys=script_keys, args=args):
            log(
                logger,
                logging.WARNING,
                "inbox entry without its body dropped",
                persona=self.persona_key,
                stream_id=stored.entry.stream_id,
            )

    async def _settle_oldest(self) -> None:
        oldest = self._in_flight[0]
        stream_id = oldest.stored.entry.stream_id
        remaining_s = self._ack_timeout_s - (time.monotonic() - oldest.sent_at)
        try:
            await asyncio.wait_for(asyncio.shield(oldest.waiter), max(remaining_s, 0))
        except TimeoutError:
            log(
                logger,
                logging.WARNING,
                "inbound ack timed out, sending again",
                persona=self.persona_key,
                stream_id=stream_id,
            )
            self._in_flight.popleft()
            again = await self._deliver(oldest.stored)
            if again is not None:
                self._in_flight.appendleft(again)
            return
        settled = [self._in_flight.popleft() for _ in range(settled_prefix([item.waiter for item in self._in_flight]))]
        if not self._use_ack:
            removable_at = time.monotonic() + self._legacy_ack_grace_s
            self._in_grace.extend((removable_at, item) for item in settled)
            self._grace_started.set()
            return
        for item in settled:
            self._acks.pop(item.stored.entry.stream_id, None)
        self._to_remove.extend(settled)  # removed with the next read, or on their own before a wait

    async def _remove_after_grace(self) -> None:
        """Legacy gateways: remove entries whose pong came `legacy_ack_grace_s` ago, if the
        socket is still open. If it closed, stop: the entries stay pending and are sent again,
        under the same stream ids, to the persona's next socket."""
        while True:
            if not self._in_grace:
                self._grace_started.clear()
                await self._grace_started.wait()
                continue
            await asyncio.sleep(max(self._in_grace[0][0] - time.monotonic(), 0))
            if not self._is_open():
                return
            now = time.monotonic()
            due: list[_InFlight] = []
            while self._in_grace and self._in_grace[0][0] <= now:
                due.append(self._in_grace.popleft()[1])
            await self._removed(due)

    async def _removed(self, delivered: list[_InFlight]) -> None:
        """The gateway has these messages: remove them (entry, body, marker) in one round trip,
        shared with the other sockets' script calls of this loop turn (shared/redis_batch.py;
        EVALSHA straight away, where redis-py's pipelined `Script` would ask SCRIPT EXISTS
        first, a second round trip per acknowledgement)."""
        await call_scripts(self._redis, [self._remove_call(item) for item in delivered])
        self._acknowledged(delivered)

    async def _flush_removals(self) -> None:
        if self._to_remove:
            removing, self._to_remove = self._to_remove, []
            await self._removed(removing)

    def _remove_call(self, item: _InFlight) -> ScriptCall:
        return ScriptCall(lua.INBOX_REMOVE, *item.stored.remove_call(self.persona_key, self._delivered_marker_ttl_s))

    def _acknowledged(self, delivered: list[_InFlight]) -> None:
        now = time.monotonic()
        for item in delivered:
            metrics.INBOUND_ACKED.inc()
            metrics.INBOUND_ACK_SECONDS.observe(now - item.sent_at)
            log(
                logger,
                logging.INFO,
                "inbound stream acknowledged",
                persona=self.persona_key,
                stream_id=item.stored.entry.stream_id,
                queue_id=item.stored.entry.queue_id,
            )
