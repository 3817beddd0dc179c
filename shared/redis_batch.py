"""The services' Redis client: pipelines of concurrent callers (SMTP sessions, sockets) leave in one write.

Every RCPT check and every enqueue was its own pipeline: its own pooled connection (the pool's
lock and unread-data probe around it), `send`, reply read and event-loop wake-up, with
redis-py's general packing and reply handling per command. `BatchingRedis.pipeline(transaction=False)`
returns a pipeline whose `execute` does not send at once: the pipelines executed during one
turn of the event loop (sessions whose commands arrived together) are concatenated, each one's
commands kept together and in order, written to one connection with one `send`, and their
replies read back in that order and handed to each caller. The busier the process, the more
sessions share a write; a lone session's pipeline leaves one loop turn later than before. A
caller cancelled before its batch leaves is left out of it.

Both the ingress (RCPT checks, enqueues) and the tunnel (every script call of its handshakes
and acknowledgements, `shared.replication.call_scripts`) use it.

What each caller sees is what redis-py's own pipeline gives: its replies in order, a reply that
is an error in its place (raised if `raise_on_error`), a connection failure as the exception.
Nothing about durability changes: a caller still awaits its own replies (the enqueue script's,
and WAIT's when `redis.minReplicasToAck` is set) before it answers 250. WAIT counts the writes
of its connection, so on a shared connection it also covers the writes queued before it —
more than it must confirm, never less. A failure of the shared connection fails every
pipeline in the batch, each of which then answers 451 or is retried (`shared.replication`) as
after a failure of its own connection.

Transactions, WATCH and pipelines holding `Script` objects (redis-py loads those first) are
left to redis-py as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import Connection
from redis.exceptions import ResponseError

_REDIS_PY_PATH = {"WATCH", "UNWATCH", "EXEC", "DISCARD"}  # Pipeline.parse_response tracks these
_UNKNOWN = object()
LARGE_VALUE_BYTES = 6000  # redis-py's buffer cutoff: larger values are written without a copy
HEADER_CACHE = 512  # RESP length headers below this are built once (bytes %-formatting is slow)
_ARRAY_HEADERS = [b"*%d\r\n" % count for count in range(HEADER_CACHE)]
_BULK_HEADERS = [b"$%d\r\n" % size for size in range(HEADER_CACHE)]
BATCH_TIMEOUT_S = 15.0  # longer than any caller waits (enqueue: 10 s); frees a stuck connection

CommandStack = list[tuple[tuple[str | bytes, ...], Mapping[str, Any]]]  # redis-py's CommandStackT
Waiting = tuple[Pipeline, CommandStack, "asyncio.Future[list[Any]]"]


class PipelineBatcher:
    """Collects the pipelines executed in one loop turn and sends them as one.

    Connections come from the client's pool and are kept here between batches: a batch reads
    every reply it asked for, so a connection it hands back is known clean, without the pool's
    lock and its unread-data probe per use. One that failed is disconnected and returned to
    the pool, which reconnects it (with Sentinel: to the primary named then)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._waiting: list[Waiting] = []
        self._idle: list[Connection] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._callbacks: dict[Any, Any] = {}  # command name -> redis-py's response callback or None
        self.writes = 0  # batches sent, and the pipelines in them (for tests and profiles)
        self.pipelines = 0

    async def run(self, pipe: Pipeline, stack: CommandStack) -> list[Any]:
        """`stack`'s replies, errors in place; raises when the connection failed."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if not self._waiting:  # the first of this turn starts the sender; it runs after the turn
            task = asyncio.create_task(self._send())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        self._waiting.append((pipe, stack, future))
        return await future

    async def _send(self) -> None:
        # a caller cancelled (or timed out) before the batch leaves is left out of it, as a
        # command that was never sent
        batch = [waiting for waiting in self._waiting if not waiting[2].done()]
        self._waiting = []
        if not batch:
            return
        self.writes += 1
        self.pipelines += len(batch)
        connection: Connection | None = None
        task = asyncio.current_task()
        assert task is not None
        # the callers' own timeouts answer them; this only frees a connection Redis never
        # answers on (a plain timer: asyncio.timeout costs several times more per batch)
        watchdog = asyncio.get_running_loop().call_later(BATCH_TIMEOUT_S, task.cancel)
        try:
            connection = await self._connection()
            await _exchange(connection, batch, self._callbacks)
        except BaseException as exc:
            _fail(batch, exc)
            if connection is not None:
                # a reply stream cut part way cannot be reused: the pool reconnects it
                with contextlib.suppress(Exception):
                    await connection.disconnect()
                await self._client.connection_pool.release(connection)
            if not isinstance(exc, Exception):
                raise
        else:
            self._idle.append(connection)
        finally:
            watchdog.cancel()

    async def _connection(self) -> Connection:
        """An idle connection of ours that Redis has not closed meanwhile (a restart, CLIENT KILL,
        its idle timeout: the loop has seen the EOF, so no system call is needed to tell), else
        one from the pool."""
        pool = self._client.connection_pool
        while self._idle:
            connection = self._idle.pop()
            reader = getattr(connection, "_reader", None)  # redis-py 5's StreamReader
            if connection.is_connected and isinstance(reader, asyncio.StreamReader) and not reader.at_eof():
                return connection
            await connection.disconnect()
            await pool.release(connection)
        fresh: Connection = await pool.get_connection()
        return fresh

    async def aclose(self) -> None:
        for task in list(self._sending):
            task.cancel()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._client.connection_pool.release(connection)


async def _exchange(connection: Connection, batch: list[Waiting], callbacks: dict[Any, Any]) -> None:
    await connection.send_packed_command(
        pack_commands(connection, [args for _, stack, _ in batch for args, _ in stack]), check_health=True
    )
    for pipe, stack, future in batch:
        replies: list[Any] = []
        for args, options in stack:
            try:
                replies.append(await _reply(connection, pipe, args[0], options, callbacks))
            except ResponseError as exc:
                replies.append(exc)
        if not future.done():  # its caller may have given up (timeout)
            future.set_result(replies)


async def _reply(
    connection: Connection, pipe: Pipeline, name: Any, options: Mapping[str, Any], callbacks: dict[Any, Any]
) -> Any:
    """One reply as redis-py's `parse_response` makes it, for a plain command without its
    per-call lookups (the response callback is found once per command name); anything else
    (undecoded or empty-response options, WATCH state) goes through redis-py's own path."""
    if (options and options.keys() != {"keys"}) or name in _REDIS_PY_PATH:
        return await pipe.parse_response(connection, name, **options)
    response = await connection.read_response()
    callback = callbacks.get(name, _UNKNOWN)
    if callback is _UNKNOWN:
        callback = callbacks[name] = pipe.response_callbacks.get(name)
    if callback is None:
        return response
    result = callback(response)
    return await result if inspect.isawaitable(result) else result


def pack_commands(connection: Connection, commands: list[tuple[Any, ...]]) -> list[bytes]:
    """The RESP bytes redis-py's `pack_commands` writes for `commands`, with less work per argument:
    keys and values are bytes, str or int nearly always, so redis-py's general encoder runs only
    for the rest (floats, memoryviews, and its errors for what cannot be sent). Values larger than
    redis-py's buffer cutoff are passed on as they are, not copied (tests/ops/test_redis_batch.py
    compares the two)."""
    encoder = connection.encoder
    encoding, errors = encoder.encoding, encoder.encoding_errors
    chunks: list[bytes] = []  # memoryviews too, as redis-py's
    pieces: list[bytes] = []
    for command in commands:
        name = command[0]
        if " " in name if isinstance(name, str) else b" " in name:  # "CLIENT KILL": two arguments
            command = (*(name.encode() if isinstance(name, str) else name).split(), *command[1:])
        count = len(command)
        pieces.append(_ARRAY_HEADERS[count] if count < HEADER_CACHE else b"*%d\r\n" % count)
        for arg in command:
            kind = type(arg)
            if kind is bytes:
                value: bytes = arg
            elif kind is str:
                value = arg.encode(encoding, errors)
            elif kind is int:
                value = str(arg).encode()  # what redis-py's repr() gives for an int
            else:
                value = encoder.encode(arg)  # type: ignore[no-untyped-call]
            size = len(value)
            header = _BULK_HEADERS[size] if size < HEADER_CACHE else b"$%d\r\n" % size
            if size > LARGE_VALUE_BYTES or isinstance(value, memoryview):
                pieces.append(header)
                chunks.append(b"".join(pieces))
                chunks.append(value)
                pieces = [b"\r\n"]
            else:
                pieces += (header, value, b"\r\n")
    chunks.append(b"".join(pieces))
    return chunks


def _fail(batch: list[Waiting], exc: BaseException) -> None:
    error = exc if isinstance(exc, Exception) else ConnectionError("redis batch cancelled")
    for _, _, future in batch:
        if not future.done():
            future.set_exception(error)


class BatchedPipeline(Pipeline):
    """redis-py's non-transactional pipeline, executed through the process's batcher."""

    def __init__(self, batcher: PipelineBatcher, client: aioredis.Redis, shard_hint: str | None) -> None:
        super().__init__(client.connection_pool, client.response_callbacks, False, shard_hint)
        self._batcher = batcher

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        stack = self.command_stack
        if not stack or self.watching or self.scripts or self.explicit_transaction:
            return await super().execute(raise_on_error)
        try:
            replies = await self._batcher.run(self, stack)
        finally:
            await self.reset()  # type: ignore[no-untyped-call]
        if raise_on_error:
            self.raise_first_error(stack, replies)
        return replies


class BatchingRedis(aioredis.Redis):
    """redis-py's client whose non-transactional pipelines share writes (module docstring)."""

    _batcher: PipelineBatcher | None = None

    @property
    def batcher(self) -> PipelineBatcher:
        if self._batcher is None:
            self._batcher = PipelineBatcher(self)
        return self._batcher

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        if transaction:
            return super().pipeline(transaction, shard_hint)
        return BatchedPipeline(self.batcher, self, shard_hint)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self._batcher is not None:
            await self._batcher.aclose()
        await super().aclose(close_connection_pool)
