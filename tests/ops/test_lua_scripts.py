"""Every script in shared/lua.py compiles in a real redis-server (SCRIPT LOAD), under the SHA
its callers send with EVALSHA; the runner recovers from NOSCRIPT after a SCRIPT FLUSH; and every
path that wakes tunnel nodes follows the one wake-up rule."""

from __future__ import annotations

import time
from typing import cast

import redis
import redis.asyncio as aioredis

from protege_relay.embedded_redis import EmbeddedRedis
from services.egress.results import ResultStore
from shared import keys, lua
from shared.enqueue import Delivery, enqueue
from shared.payloads import DeliveryResult, InboxEntry
from shared.wakeup import Wakeup, WakeupKind, wake_owner


def test_every_script_loads_under_its_sha(redis_client: redis.Redis) -> None:
    scripts = lua.all_scripts()
    loaded = {name: redis_client.script_load(script.source) for name, script in scripts.items()}
    assert loaded == {name: script.sha for name, script in scripts.items()}
    assert all(cast(list[bool], redis_client.script_exists(*(script.sha for script in scripts.values()))))
    print(f"{len(scripts)} scripts loaded: {', '.join(sorted(scripts))}")


def test_a_bound_script_reloads_itself_after_a_flush(redis_client: redis.Redis) -> None:
    redis_client.script_flush()
    assert redis_client.script_exists(lua.RENEW_OWNER.sha) == [False]
    # the owner keys name another socket: RENEW_OWNER refuses, whatever the script cache held
    redis_client.set(keys.socket("pk"), "other")
    renewed = lua.RENEW_OWNER.on(redis_client)(keys=[keys.owner("pk"), keys.socket("pk")], args=["n", "s", 30])
    assert renewed == 0
    assert redis_client.script_exists(lua.RENEW_OWNER.sha) == [True]


async def test_every_waking_path_wakes_the_same_nodes(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> None:
    """`wake_owner`, the enqueue and the result publish share one wake-up rule: the owner for a
    new inbox entry; the owner and each live outbound holder, once, for a result."""
    pk = "persona"
    now_ms = int(time.time() * 1000)
    redis_client.set(keys.owner(pk), "node-a")
    redis_client.zadd(
        keys.outbound_holders(pk), {"node-a": now_ms + 60_000, "node-b": now_ms + 60_000, "node-gone": now_ms - 1}
    )
    listener = redis_client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    listener.subscribe(*(keys.node_channel(node) for node in ("node-a", "node-b", "node-gone", "end")))

    def woken() -> list[tuple[str, str]]:
        """Wake-ups received up to the end marker published after them (same connection order)."""
        redis_client.publish(keys.node_channel("end"), b"end")
        received: list[tuple[str, str]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = listener.get_message(timeout=1)
            if message is None:
                continue
            if message["data"] == b"end":
                return received
            wakeup = Wakeup.decode(message["data"])
            assert wakeup is not None and wakeup.persona_key == pk
            received.append((message["channel"].decode().removeprefix(keys.NODE_CHANNEL_PREFIX), wakeup.kind))
        raise AssertionError("the end marker never arrived")

    woken()  # the subscriptions are in place
    inbox = [("node-a", WakeupKind.INBOX)]
    result = [("node-a", WakeupKind.RESULT), ("node-b", WakeupKind.RESULT)]
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await wake_owner(client, pk, WakeupKind.INBOX)
        assert woken() == inbox
        assert await wake_owner(client, pk, WakeupKind.RESULT)
        assert woken() == result
        entry = InboxEntry("q1", 0, "s@example.org", f"{pk}@relay.test", b"hi", now_ms, "192.0.2.1")
        await enqueue(client, "digest", "q1", lambda queue_id: [Delivery(pk, entry)])
        assert woken() == inbox
        assert await ResultStore(client, retention_s=60).publish(pk, DeliveryResult("stream-1", "sent"))
        assert woken() == result
        redis_client.delete(keys.owner(pk), keys.outbound_holders(pk))
        assert not await wake_owner(client, pk, WakeupKind.RESULT)
        assert woken() == []
    finally:
        await client.aclose()
        listener.close()
