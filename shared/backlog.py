"""How much work waits in Redis: inbox and result streams, the egress queue.

Read by `protege-relay status` and exported as Prometheus gauges by the services, so both
always agree. Synchronous redis-py on purpose: a status command and a metrics scrape are
rare, bounded scans; services call these through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterable, Iterator

import redis
from arq.constants import in_progress_key_prefix
from prometheus_client import Gauge

from shared import keys
from shared.config import RelayConfig
from shared.redis import connect_sync, redis_url

SCAN_BATCH = 1000


@dataclasses.dataclass(frozen=True)
class StreamBacklog:
    """Entries waiting in one family of per-persona streams (inboxes or results)."""

    entries: int = 0
    personas: int = 0
    in_flight: int = 0
    total_bytes: int = 0
    oldest_age_s: float | None = None


@dataclasses.dataclass(frozen=True)
class EgressQueue:
    queued: int
    ready: int
    deferred: int
    running: int
    oldest_age_s: float | None


def stream_backlog(client: redis.Redis, pattern: str, now_ms: int, group: str | None) -> StreamBacklog:
    suffix = key_tail(pattern)
    entries = personas = in_flight = total_bytes = 0
    oldest_ms: int | None = None
    for batch in batched(scan_keys(client, pattern, suffix=suffix)):
        pipe = client.pipeline(transaction=False)
        for stream_key in batch:
            pipe.xlen(stream_key)
            pipe.xrange(stream_key, count=1)
            if group is not None:
                pipe.xpending(stream_key, group)
                pipe.get(keys.inbox_bytes(_persona_of(stream_key)))
        replies = pipe.execute(raise_on_error=False)
        stride = 4 if group is not None else 2
        for offset in range(0, len(replies), stride):
            length, first = replies[offset], replies[offset + 1]
            if isinstance(length, Exception) or not length:
                continue  # not a stream (wrong type) or emptied meanwhile
            entries += int(length)
            personas += 1
            if first and not isinstance(first, Exception):
                first_ms = int(as_text(first[0][0]).split("-", 1)[0])
                oldest_ms = first_ms if oldest_ms is None else min(oldest_ms, first_ms)
            if group is not None:
                pending, stored_bytes = replies[offset + 2], replies[offset + 3]
                if isinstance(pending, dict):  # NOGROUP (no tunnel read it yet) is an exception
                    in_flight += int(pending.get("pending", 0))
                total_bytes += int_or_none(stored_bytes) or 0
    return StreamBacklog(entries, personas, in_flight, total_bytes, age_s(now_ms, oldest_ms))


def egress_queue(client: redis.Redis, now_ms: int) -> EgressQueue:
    """arq keeps a job in the queue's sorted set (score = when it may run) until it finishes."""
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.EGRESS_QUEUE)
    pipe.zcount(keys.EGRESS_QUEUE, "-inf", now_ms)
    pipe.zrange(keys.EGRESS_QUEUE, 0, 0, withscores=True)
    queued, ready, oldest = pipe.execute()
    running = sum(1 for _ in scan_keys(client, f"{in_progress_key_prefix}*"))
    # Age of the job that has been runnable longest; a deferred retry's score lies in the future.
    oldest_ms = int(oldest[0][1]) if oldest and oldest[0][1] <= now_ms else None
    return EgressQueue(
        queued=int(queued),
        ready=int(ready),
        deferred=int(queued) - int(ready),
        running=running,
        oldest_age_s=age_s(now_ms, oldest_ms),
    )


def scan_keys(client: redis.Redis, pattern: str, suffix: str = "") -> Iterator[bytes]:
    """Keys matching `pattern`; `suffix` drops keys whose `*` swallowed a longer tail."""
    for key in client.scan_iter(match=pattern, count=SCAN_BATCH):
        if not suffix or as_text(key).endswith(suffix):
            yield key


def key_tail(pattern: str) -> str:
    """What follows the hash tag in a per-persona key pattern: `relay:{*}:inbox` -> `}:inbox`."""
    return pattern[pattern.index("}") :]


def batched(items: Iterable[bytes], size: int = SCAN_BATCH) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _persona_of(stream_key: bytes) -> str:
    text = as_text(stream_key)
    return text[text.index("{") + 1 : text.index("}")]


def as_text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def int_or_none(value: bytes | str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _int_oras_text(value: str) -> int | str:
    parsed = int_or_none(value)
    return value if parsed is None else parsed


def age_s(now_ms: int, then_ms: int | None) -> float | None:
    return None if then_ms is None else round(max(0, now_ms - then_ms) / 1000, 3)


def inbox_backlog(client: redis.Redis, now_ms: int) -> StreamBacklog:
    return stream_backlog(client, keys.inbox("*"), now_ms, group=keys.INBOX_GROUP)


def results_backlog(client: redis.Redis, now_ms: int) -> StreamBacklog:
    return stream_backlog(client, keys.results("*"), now_ms, group=None)


# --- Prometheus gauges -----------------------------------------------------------------------
# Cluster-wide values: every replica of a tier reports the same numbers (aggregate with max()).

INBOX_ENTRIES = Gauge("relay_inbox_entries", "Inbound messages in persona inboxes, all personas")
INBOX_IN_FLIGHT = Gauge("relay_inbox_in_flight", "Inbound messages sent to a gateway, not yet acknowledged")
INBOX_OLDEST_AGE = Gauge("relay_inbox_oldest_age_seconds", "Age of the oldest inbound message in any inbox")
RESULTS_PENDING = Gauge("relay_results_pending", "Delivery results not yet handed to a gateway")
RESULTS_OLDEST_AGE = Gauge("relay_results_oldest_age_seconds", "Age of the oldest undelivered result")
EGRESS_JOBS = Gauge("relay_egress_queue_jobs", "Outbound delivery jobs in the arq queue", ["state"])
EGRESS_OLDEST_AGE = Gauge("relay_egress_queue_oldest_age_seconds", "How long the oldest runnable job has waited")

# The ingress exports none: its Redis ACL user may count inboxes but not read them (no XRANGE,
# XPENDING: docs/SECURITY.md "Redis access"); the tunnel's scrape has the inbox backlog.
TIER_BACKLOGS = {"ingress": (), "tunnel": ("inbox", "results"), "egress": ("egress", "results")}


def refresh_gauges(client: redis.Redis, tier: str, now_ms: int) -> None:
    """Set the gauges of the backlogs `tier` feeds or drains (TIER_BACKLOGS)."""
    backlogs = TIER_BACKLOGS[tier]
    if "inbox" in backlogs:
        inbox = inbox_backlog(client, now_ms)
        INBOX_ENTRIES.set(inbox.entries)
        INBOX_IN_FLIGHT.set(inbox.in_flight)
        INBOX_OLDEST_AGE.set(inbox.oldest_age_s or 0)
    if "results" in backlogs:
        results = results_backlog(client, now_ms)
        RESULTS_PENDING.set(results.entries)
        RESULTS_OLDEST_AGE.set(results.oldest_age_s or 0)
    if "egress" in backlogs:
        queue = egress_queue(client, now_ms)
        for state in ("ready", "deferred", "running"):
            EGRESS_JOBS.labels(state=state).set(getattr(queue, state))
        EGRESS_OLDEST_AGE.set(queue.oldest_age_s or 0)


# A scrape within this long of the last refresh is answered from the gauges as they are: the
# SCAN behind them costs ~0.5 s at 300k keys, and several Prometheus servers or a dashboard
# refresh must not multiply it. Concurrent scrapes of a stale cache share one refresh.
BACKLOG_CACHE_S = 2.0
_refreshed_at: dict[tuple[str, str], float] = {}  # (Redis URL, tier) -> monotonic time
_refreshing: dict[tuple[str, str], asyncio.Future[None]] = {}


async def refresh_backlog_metrics(config: RelayConfig, tier: str, *, max_age_s: float = BACKLOG_CACHE_S) -> None:
    """Refresh the tier's backlog gauges before a scrape (a bounded SCAN, off the event loop),
    at most once per `max_age_s` per process, Redis and tier."""
    cache_key = (redis_url(config), tier)
    refreshed_at = _refreshed_at.get(cache_key)
    if refreshed_at is not None and time.monotonic() - refreshed_at < max_age_s:
        return
    running = _refreshing.get(cache_key)
    if running is None or running.get_loop() is not asyncio.get_running_loop():

        def scan() -> None:
            client = connect_sync(config)
            try:
                refresh_gauges(client, tier, int(time.time() * 1000))
            finally:
                client.close()
            _refreshed_at[cache_key] = time.monotonic()

        running = _refreshing[cache_key] = asyncio.ensure_future(asyncio.to_thread(scan))
    try:
        await asyncio.shield(running)
    finally:
        if running.done() and _refreshing.get(cache_key) is running:
            del _refreshing[cache_key]
