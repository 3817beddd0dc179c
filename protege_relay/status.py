"""`protege-relay status`: the relay's state as an operator needs it, read from Redis alone.

Every service records itself in Redis (`shared.nodeinfo`) and all queues live there, so one
read-only pass over Redis answers "which nodes are up, who is connected where, how much mail
is waiting and for how long" without reaching any node. The only write is pruning dead nodes
from the node set, which their expired liveness hashes already declared dead.

Keys are found with SCAN over the patterns `shared.keys` produces, so this works on a single
Redis or a Sentinel-managed primary; on Redis Cluster it would have to visit every primary.

Replication (docs/HA.md): the primary's replicas with their lag (bytes of replication stream
not yet acknowledged, seconds since their last acknowledgement) from INFO replication, and with
`redis.sentinels` which primary each sentinel names, so a split view or a lagging replica (which
`redis.minReplicasToAck` would turn into 451s) shows here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, cast

import redis
import redis.sentinel as sync_sentinel

from protege_relay.embedded_redis import data_dir, running_embedded_url
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
from shared.config import ConfigError, RelayConfig
from shared.redis import connect_sync, redis_label, sentinel_for_status, uses_sentinel

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
class ReplicaStatus:
    address: str
    state: str
    lag_bytes: int | None
    last_ack_s: int | None


@dataclasses.dataclass(frozen=True)
class ReplicationStatus:
    role: str
    replicas: list[ReplicaStatus]
    min_replicas_to_ack: int
    sentinel_master: str | None = None
    sentinels: dict[str, str] = dataclasses.field(default_factory=dict)  # sentinel -> primary it names


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
    replication: ReplicationStatus | None = None


class NoRelayFound(Exception):
    """Neither a configured Redis nor a running `protege-relay run` for this data directory."""


def relay_redis_url(config: RelayConfig) -> str | None:
    """The Redis of the relay an operator command means: `redis.url` / `RELAY_REDIS_URL` when
    set, else the embedded Redis a `protege-relay run` published in its data directory; None
    with `redis.sentinels` (`connect_sync(config, None)` then asks the sentinels for the primary)."""
    if uses_sentinel(config):
        return None
    if config.redis.url:
        return config.redis.url
    found = running_embedded_url()
    if found:
        return found
    where = data_dir()
    raise NoRelayFound(
        f"no running relay found for data directory {where} (no {where / 'redis.url'}): start one with "
        "`make run`, or point at one with RELAY_DATA_DIR=<its data directory> or RELAY_REDIS_URL=redis://HOST:PORT/0"
    )


def run_status(config: RelayConfig, as_json: bool = False) -> int:
    """Print the status table (or JSON); 1 when there is no relay to ask or Redis cannot be read."""
    try:
        url = relay_redis_url(config)
        label = redis_label(config, url)
    except (NoRelayFound, ConfigError) as exc:
        print(f"protege-relay status: {exc}", file=sys.stderr)
        return 1
    sentinels = sentinel_for_status(config, timeout_s=REDIS_TIMEOUT_S)
    client = connect_sync(config, url, timeout_s=REDIS_TIMEOUT_S)
    try:
        status = collect_status(client, label, now_ms=int(time.time() * 1000))
        status = dataclasses.replace(status, replication=collect_replication(client, config, sentinels))
    except redis.RedisError as exc:
        if url is None:
            source = "redis.sentinels / RELAY_REDIS_SENTINELS"
        else:
            source = "RELAY_REDIS_URL / redis.url" if config.redis.url else f"{data_dir() / 'redis.url'}"
        print(
            f"protege-relay status: cannot read Redis at {label} (from {source}): {exc}; is the relay running?",
            file=sys.stderr,
        )
        return 1
    finally:
        client.close()
    print(json.dumps(status_document(status), indent=2, sort_keys=True) if as_json else render(status))
    return 0


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


def collect_replication(
    client: redis.Redis, config: RelayConfig, sentinels: sync_sentinel.Sentinel | None
) -> ReplicationStatus:
    """The primary's replicas and their lag; with Sentinel, the primary each sentinel names."""
    info = cast(dict[str, Any], client.info("replication"))
    primary_offset = int_or_none(str(info.get("master_repl_offset", ""))) or 0
    replicas = []
    for index in range(int(info.get("connected_slaves", 0))):
        replica = info.get(f"slave{index}")
        if not isinstance(replica, dict):
            continue
        offset = int_or_none(str(replica.get("offset", "")))
        replicas.append(
            ReplicaStatus(
                address=f"{replica.get('ip')}:{replica.get('port')}",
                state=str(replica.get("state", "?")),
                lag_bytes=None if offset is None else max(0, primary_offset - offset),
                last_ack_s=int_or_none(str(replica.get("lag", ""))),
            )
        )
    named: dict[str, str] = {}
    if sentinels is not None:
        for sentinel in sentinels.sentinels:
            where = sentinel.connection_pool.connection_kwargs
            try:
                address = sentinel.sentinel_get_master_addr_by_name(  # type: ignore[no-untyped-call]
                    config.redis.sentinelMaster
                )
                named[f"{where['host']}:{where['port']}"] = f"{as_text(address[0])}:{address[1]}" if address else "none"
            except redis.RedisError as exc:
                named[f"{where['host']}:{where['port']}"] = f"unreachable ({type(exc).__name__})"
            finally:
                sentinel.close()
    return ReplicationStatus(
        role=str(info.get("role", "?")),
        replicas=replicas,
        min_replicas_to_ack=config.redis.minReplicasToAck,
        sentinel_master=config.redis.sentinelMaster if sentinels is not None else None,
        sentinels=named,
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
        try:
            client.srem(keys.NODES_KEY, *pruned)
        except redis.exceptions.NoPermissionError:  # the read-only `status` ACL user: report, don't prune
            return nodes, []
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
    if status.replication is not None:
        lines += ["", *_render_replication(status.replication)]
    return "\n".join(lines)


def _render_replication(replication: ReplicationStatus) -> list[str]:
    lines = [
        f"Redis {replication.role}: {len(replication.replicas)} replica(s) connected,"
        f" minReplicasToAck={replication.min_replicas_to_ack}"
    ]
    if replication.replicas:
        rows = [
            [
                replica.address,
                replica.state,
                "-" if replica.lag_bytes is None else str(replica.lag_bytes),
                "-" if replica.last_ack_s is None else f"{replica.last_ack_s}s",
            ]
            for replica in replication.replicas
        ]
        lines += _table(["REPLICA", "STATE", "LAG BYTES", "LAST ACK"], rows, numeric={2, 3})
    online = sum(replica.state == "online" for replica in replication.replicas)
    if online < replication.min_replicas_to_ack:
        lines.append(f"  WARNING: {online} replica(s) online, fewer than minReplicasToAck: new mail gets 451")
    if replication.sentinels:
        lines.append(f"Sentinels for {replication.sentinel_master!r}:")
        lines += _table(
            ["SENTINEL", "NAMES PRIMARY"], [[k, v] for k, v in sorted(replication.sentinels.items())], set()
        )
        if len(set(replication.sentinels.values())) > 1:
            lines.append("  WARNING: the sentinels disagree on the primary (a failover in progress, or a split)")
    return lines


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
