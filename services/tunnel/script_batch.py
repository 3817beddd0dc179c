"""Lua script calls of every socket on the node, sent together: one pipeline per event-loop turn.

Each handshake makes three script calls (consume the challenge, claim the persona, release it on
close) and each acknowledged inbound message one (remove the entry); one round trip each means
one socket write and one read per call, which the profiles show as the tunnel's largest cost
after the event loop itself (bench/README.md, "Issue 11, session 3"). Calls made while the loop
handles one batch of ready sockets are queued and leave together at the end of that turn, as
one pipeline of EVALSHA (no SCRIPT EXISTS first; a Redis without a script answers NOSCRIPT, the
script is loaded and those calls, which did not run, are sent again).

Nothing waits longer than before: the pipeline goes out in the same loop turn the first call
was queued. Each caller gets its own reply or its own error; a connection error fails every call
of that pipeline, as it would have failed each alone. A caller that is cancelled before the
pipeline leaves is left out of it (as a cancelled command that was never sent).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from shared.lua import LuaScript
from shared.replication import ScriptCall

_BATCHES: weakref.WeakKeyDictionary[aioredis.Redis, ScriptBatch] = weakref.WeakKeyDictionary()


def batch_for(redis: aioredis.Redis) -> ScriptBatch:
    """The one batch of `redis`: every user of the same client shares its pipelines."""
    batch = _BATCHES.get(redis)
    if batch is None:
        batch = _BATCHES[redis] = ScriptBatch(redis)
    return batch


# Queues plain commands on the shared pipeline (e.g. a rate count and a challenge record); the
# caller gets their replies, in order, as one list.
QueueCommands = Callable[[Pipeline], object]


@dataclass(slots=True)
class _Queued:
    call: ScriptCall | QueueCommands
    reply: asyncio.Future[Any]


class ScriptBatch:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._queue: list[_Queued] = []
        self._scheduled = False
        self._flushing: set[asyncio.Task[None]] = set()
        self.pipelines = 0  # pipelines sent (for tests and profiles)
        self.calls = 0

    def bind(self, script: LuaScript) -> BatchedScript:
        return BatchedScript(self, script)

    async def run(self, call: ScriptCall) -> Any:
        """The call's reply, sent with whatever else is queued in this loop turn."""
        return await self._queued(call)

    async def run_commands(self, queue: QueueCommands) -> list[Any]:
        """The replies of the commands `queue` puts on the pipeline, sent with whatever else is
        queued in this loop turn; an error reply is raised (as `Pipeline.execute` would)."""
        replies: list[Any] = await self._queued(queue)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _queued(self, call: ScriptCall | QueueCommands) -> Any:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Queued(call, reply))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._send_queued)
        return await reply

    async def run_all(self, calls: list[ScriptCall]) -> list[Any]:
        """Every call's reply (queued together, so in one pipeline); the first error raised."""
        return list(await asyncio.gather(*(self.run(call) for call in calls)))

    def _send_queued(self) -> None:
        self._scheduled = False
        queued = [item for item in self._queue if not item.reply.done()]
        self._queue = []
        if queued:
            task = asyncio.get_running_loop().create_task(self._send(queued))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _send(self, queued: list[_Queued]) -> None:
        self.pipelines += 1
        self.calls += len(queued)
        try:
            replies = await self._pipeline([item.call for item in queued])
            missing = [
                index
                for index, reply in enumerate(replies)
                if isinstance(reply, NoScriptError) and isinstance(queued[index].call, ScriptCall)
            ]
            if missing:
                calls = [queued[index].call for index in missing]
                for script in {call.script for call in calls if isinstance(call, ScriptCall)}:
                    await self._redis.script_load(script.source)
                again = await self._pipeline(calls)
                for index, reply in zip(missing, again, strict=True):
                    replies[index] = reply
        except BaseException as exc:  # a connection error (or shutdown) fails each call of the pipeline
            for item in queued:
                if item.reply.done():
                    continue
                if isinstance(exc, Exception):
                    item.reply.set_exception(exc)
                else:
                    item.reply.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for item, reply in zip(queued, replies, strict=True):
            if item.reply.done():
                continue
            if isinstance(reply, Exception):
                item.reply.set_exception(reply)
            else:
                item.reply.set_result(reply)

    async def _pipeline(self, calls: list[ScriptCall | QueueCommands]) -> list[Any]:
        """One reply per call: a script's reply, or the list of a `QueueCommands`' replies."""
        sizes: list[int | None] = []  # None: a script call (one reply, not a list)
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in calls:
                if isinstance(call, ScriptCall):
                    pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
                    sizes.append(None)
                else:
                    before = len(pipe.command_stack)
                    call(pipe)
                    sizes.append(len(pipe.command_stack) - before)
            flat: list[Any] = await pipe.execute(raise_on_error=False)
        replies: list[Any] = []
        offset = 0
        for size in sizes:
            if size is None:
                replies.append(flat[offset])
                offset += 1
            else:
                replies.append(flat[offset : offset + size])
                offset += size
        return replies


@dataclass(frozen=True, slots=True)
class BatchedScript:
    """A script called like redis-py's `AsyncScript` (keys=, args=), through the node's batch."""

    batch: ScriptBatch
    script: LuaScript

    async def __call__(self, *, keys: list[Any], args: list[Any]) -> Any:
        return await self.batch.run(ScriptCall(self.script, keys, args))
