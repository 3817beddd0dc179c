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
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis

from protege_relay.embedded_redis import running_embedded_url
from shared import keys
from shared.backlog import (
    EgressQueue,
    StreamBacklog,
    age_s,
    as_text,
    batched,
    egress_queue,
    inbox_backlog,
    int_or_none,
    key_tail,
    results_backlog,
    scan_keys,
)
from shared.config import RelayConfig
from shared.redis import connect_sync, redis_url

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
    client = connect_sync(config, url, timeout_s=REDIS_TIMEOUT_S)
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
        inbox=inbox_backlog(client, now_ms),
        egress=egress_queue(client, now_ms),
        results=results_backlog(client, now_ms),
    )


def _live_nodes(client: redis.Redis, owners: dict[str, int], now_ms: int) -> tuple[list[NodeStatus], list[str]]:
    """Nodes whose liveness hash still exists; the others are removed from the node set."""
    members = cast(set[bytes], client.smembers(keys.NODES_KEY))  # sync client: never an Awaitable
    node_ids = sorted(as_text(member) for member in members)
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
        fields = {as_text(name): as_text(value) for name, value in record.items()}
        nodes.append(
            NodeStatus(
                node_id=node_id,
                role=fields.get("role", "?"),
                last_seen_age_s=age_s(now_ms, int_or_none(fields.get("updated_ms"))) or 0.0,
                personas_owned=owners.get(node_id, 0),
                counters={
                    name: _int_oras_text(value) for name, value in sorted(fields.items()) if name not in NODE_FIELDS
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
    for batch in batched(scan_keys(client, pattern, suffix=key_tail(pattern))):
        for owner_node in cast(list[bytes | None], client.mget(batch)):
            if owner_node is not None:  # expired between SCAN and MGET
                counts[as_text(owner_node)] += 1
    return dict(counts)


def _int_oras_text(value: str) -> int | str:
    parsed = int_or_none(value)
    return value if parsed is None else parsed


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
