"""`protege-relay status`: the relay's state as an operator needs it, read from Redis alone.

Every service records itself in Redis (`shared.nodeinfo`) and all queues live there, so one
read-only pass over Redis answers "which nodes are up, who is connected where, how much mail
is waiting and for how long" without reaching any node. The only write is pruning dead nodes
from the node set, which their expired liveness hashes already declared dead.

Keys are found with SCAN over the patterns `shared.keys` produces, so this works on a single
Redis or a Sentinel-managed primary; on Redis Cluster it would have to visit every primary.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from arq.constants import in_progress_key_prefix

from protege_relay.embedded_redis import running_embedded_url
from shared import keys
from shared.config import RelayConfig
from shared.redis import redis_url

SCAN_BATCH = 1000
REDIS_TIMEOUT_S = 5.0
NODE_FIELDS = ("role", "updated_ms")


@dataclasses.dataclass(frozen=True)
class NodeStatus:
    node_id: str
    role: str
    last_seen_age_s: float
    personas_owned: int
    counters: dict[str, int | str]


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


@dataclasses.dataclass(frozen=True)
class RelayStatus:
    redis: str
    generated_ms: int
    nodes: list[NodeStatus]
    pruned_nodes: list[str]
    personas_connected: int
    owners_on_unknown_nodes: dict[str, int]
    inbox: StreamBacklog
    egress: EgressQueue
    results: StreamBacklog


def run_status(config: RelayConfig, as_json: bool = False) -> int:
    """Print the status table (or JSON); 1 when Redis cannot be read."""
    url = config.redis.url or running_embedded_url() or redis_url(config)
    client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
    try:
        status = collect_status(client, redacted_url(url), now_ms=int(time.time() * 1000))
    except redis.RedisError as exc:
        print(f"protege-relay status: cannot read Redis at {redacted_url(url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(status_document(status), indent=2, sort_keys=True) if as_json else render(status))
    return 0


def redacted_url(url: str) -> str:
    """The Redis URL without its password, fit for a terminal or a log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# --- reading Redis ---------------------------------------------------------------------------


def collect_status(client: redis.Redis, redis_label: str, now_ms: int) -> RelayStatus:
    owners = _owners_by_node(client)
    nodes, pruned = _live_nodes(client, owners, now_ms)
    live_ids = {node.node_id for node in nodes}
    return RelayStatus(
        redis=redis_label,
        generated_ms=now_ms,
        nodes=nodes,
        pruned_nodes=pruned,
        personas_connected=sum(owners.values()),
        owners_on_unknown_nodes={node: count for node, count in owners.items() if node not in live_ids},
        inbox=_stream_backlog(client, keys.inbox("*"), now_ms, group=keys.INBOX_GROUP),
        egress=_egress_queue(client, now_ms),
        results=_stream_backlog(client, keys.results("*"), now_ms, group=None),
    )


def _live_nodes(client: redis.Redis, owners: dict[str, int], now_ms: int) -> tuple[list[NodeStatus], list[str]]:
    """Nodes whose liveness hash still exists; the others are removed from the node set."""
    members = cast(set[bytes], client.smembers(keys.NODES_KEY))  # sync client: never an Awaitable
    node_ids = sorted(_text(member) for member in members)
    pipe = client.pipeline(transaction=False)
    for node_id in node_ids:
        pipe.hgetall(keys.node_alive(node_id))
    records: list[dict[bytes, bytes]] = pipe.execute()
    nodes: list[NodeStatus] = []
    pruned: list[str] = []
    for node_id, record in zip(node_ids, records, strict=True):
        if not record:
            pruned.append(node_id)
            continue
        fields = {_text(name): _text(value) for name, value in record.items()}
        nodes.append(
            NodeStatus(
                node_id=node_id,
                role=fields.get("role", "?"),
                last_seen_age_s=_age_s(now_ms, _int_or_none(fields.get("updated_ms"))) or 0.0,
                personas_owned=owners.get(node_id, 0),
                counters={
                    name: _int_or_text(value) for name, value in sorted(fields.items()) if name not in NODE_FIELDS
                },
            )
        )
    if pruned:
        # A node re-adds itself on its next heartbeat, so pruning one that just came back is harmless.
        client.srem(keys.NODES_KEY, *pruned)
    return nodes, pruned


def _owners_by_node(client: redis.Redis) -> dict[str, int]:
    counts: Counter[str] = Counter()
    pattern = keys.owner("*")
    for batch in _batched(_scan(client, pattern, suffix=_tail(pattern))):
        for owner_node in cast(list[bytes | None], client.mget(batch)):
            if owner_node is not None:  # expired between SCAN and MGET
                counts[_text(owner_node)] += 1
    return dict(counts)


def _stream_backlog(client: redis.Redis, pattern: str, now_ms: int, group: str | None) -> StreamBacklog:
    suffix = _tail(pattern)
    entries = personas = in_flight = total_bytes = 0
    oldest_ms: int | None = None
    for batch in _batched(_scan(client, pattern, suffix=suffix)):
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
                first_ms = int(_text(first[0][0]).split("-", 1)[0])
                oldest_ms = first_ms if oldest_ms is None else min(oldest_ms, first_ms)
            if group is not None:
                pending, stored_bytes = replies[offset + 2], replies[offset + 3]
                if isinstance(pending, dict):  # NOGROUP (no tunnel read it yet) is an exception
                    in_flight += int(pending.get("pending", 0))
                total_bytes += _int_or_none(stored_bytes) or 0
    return StreamBacklog(entries, personas, in_flight, total_bytes, _age_s(now_ms, oldest_ms))


def _egress_queue(client: redis.Redis, now_ms: int) -> EgressQueue:
    """arq keeps a job in the queue's sorted set (score = when it may run) until it finishes."""
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.EGRESS_QUEUE)
    pipe.zcount(keys.EGRESS_QUEUE, "-inf", now_ms)
    pipe.zrange(keys.EGRESS_QUEUE, 0, 0, withscores=True)
    queued, ready, oldest = pipe.execute()
    running = sum(1 for _ in _scan(client, f"{in_progress_key_prefix}*"))
    # Age of the job that has been runnable longest; a deferred retry's score lies in the future.
    oldest_ms = int(oldest[0][1]) if oldest and oldest[0][1] <= now_ms else None
    return EgressQueue(
        queued=int(queued),
        ready=int(ready),
        deferred=int(queued) - int(ready),
        running=running,
        oldest_age_s=_age_s(now_ms, oldest_ms),
    )


def _scan(client: redis.Redis, pattern: str, suffix: str = "") -> Iterator[bytes]:
    """Keys matching `pattern`; `suffix` drops keys whose `*` swallowed a longer tail."""
    for key in client.scan_iter(match=pattern, count=SCAN_BATCH):
        if not suffix or _text(key).endswith(suffix):
            yield key


def _tail(pattern: str) -> str:
    """What follows the hash tag in a per-persona key pattern: `relay:{*}:inbox` -> `}:inbox`."""
    return pattern[pattern.index("}") :]


def _batched(items: Iterable[bytes], size: int = SCAN_BATCH) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _persona_of(stream_key: bytes) -> str:
    text = _text(stream_key)
    return text[text.index("{") + 1 : text.index("}")]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _int_or_none(value: bytes | str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _int_or_text(value: str) -> int | str:
    parsed = _int_or_none(value)
    return value if parsed is None else parsed


def _age_s(now_ms: int, then_ms: int | None) -> float | None:
    return None if then_ms is None else round(max(0, now_ms - then_ms) / 1000, 3)


# --- presenting ------------------------------------------------------------------------------


def status_document(status: RelayStatus) -> dict[str, Any]:
    document: dict[str, Any] = dataclasses.asdict(status)
    document["nodes_alive"] = len(status.nodes)
    return document


def render(status: RelayStatus) -> str:
    lines = [f"Protege Relay status ({status.redis})", ""]
    node_rows = [
        [
            node.node_id,
            node.role,
            str(node.personas_owned),
            _duration(node.last_seen_age_s) + " ago",
            " ".join(f"{name}={value}" for name, value in node.counters.items()) or "-",
        ]
        for node in status.nodes
    ]
    lines.append(f"Nodes alive: {len(status.nodes)}")
    if node_rows:
        lines += _table(["NODE", "ROLE", "PERSONAS", "LAST SEEN", "COUNTERS"], node_rows, numeric={2})
    if status.pruned_nodes:
        lines.append(f"Pruned dead nodes: {', '.join(status.pruned_nodes)}")
    lines.append(f"Personas connected: {status.personas_connected}")
    for node_id, count in sorted(status.owners_on_unknown_nodes.items()):
        lines.append(f"  {count} owned by {node_id}, which has no liveness record (expires within 30 s)")
    lines.append("")
    inbox, egress, results = status.inbox, status.egress, status.results
    queue_rows = [
        ["inbox", str(inbox.entries), str(inbox.personas), str(inbox.in_flight), "-",
         _size(inbox.total_bytes), _duration(inbox.oldest_age_s)],
        ["egress", str(egress.queued), "-", str(egress.running), str(egress.deferred),
         "-", _duration(egress.oldest_age_s)],
        ["results", str(results.entries), str(results.personas), "-", "-",
         "-", _duration(results.oldest_age_s)],
    ]  # fmt: skip
    lines += _table(
        ["QUEUE", "WAITING", "PERSONAS", "IN FLIGHT", "DEFERRED", "BYTES", "OLDEST"],
        queue_rows,
        numeric={1, 2, 3, 4, 5},
    )
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> list[str]:
    """Columns padded to their widest cell; numbers right-aligned."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if column in numeric else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _size(total_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if total_bytes >= scale:
            return f"{total_bytes / scale:.1f} {unit}"
    return f"{total_bytes} B"
