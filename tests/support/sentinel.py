"""A Sentinel-monitored Redis group of real processes: a primary, a replica and three sentinels,
all the `redis-server` binary the relay bundles (`--sentinel` for the sentinels), on loopback.

Timings are shortened so a failover takes seconds: a primary silent for `DOWN_AFTER_MS` is
subjectively down, two sentinels agreeing make it objectively down, one of them is elected and
promotes the replica. A killed node is started again the way deploy/ starts a Redis pod: it
asks the sentinels for the current primary and starts as its replica (`restart_as_replica`),
never as a primary with stale data.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from protege_relay.embedded_redis import RedisChild, free_port

LOOPBACK = "127.0.0.1"
MASTER_NAME = "relay"
QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
START_TIMEOUT_S = 10.0


@dataclass
class RedisProcess(RedisChild):
    """One redis-server (data node or sentinel) with its own directory and log; started, stopped
    and killed as the embedded Redis is (`RedisChild`)."""

    name: str
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def client(self, timeout_s: float = 2.0) -> redis.Redis:
        return redis.Redis(LOOPBACK, self.port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def launch(self, args: list[str], timeout_s: float = START_TIMEOUT_S) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            super().launch(args, timeout_s)
        except RuntimeError as exc:
            raise AssertionError(f"{self.name} did not start: {exc}\n{self.logs()[-2000:]}") from exc

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class DataNode(RedisProcess):
    def start(self, replica_of: int | None = None) -> DataNode:
        args = [
            "--bind",
            LOOPBACK,
            "--port",
            str(self.port),
            "--dir",
            str(self.directory.resolve()),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--logfile",
            str(self.log_path.resolve()),
            "--loglevel",
            "notice",
        ]
        if replica_of is not None:
            args += ["--replicaof", LOOPBACK, str(replica_of)]
        self.launch(args)
        if replica_of is not None:
            self.wait_linked()
        return self

    def wait_linked(self, timeout_s: float = 30.0) -> None:
        """A replica that answers PING may still be syncing: until its link is up the primary's
        WAIT counts no replica, so a test that needs the replica must wait for the link."""
        deadline = time.monotonic() + timeout_s
        while self.link_status() != "up":
            if not self.alive() or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} never linked to its primary:\n{self.logs()[-2000:]}")
            time.sleep(0.02)

    def link_status(self) -> str | None:
        try:
            with self.client(0.5) as client:
                return str(client.info("replication").get("master_link_status"))
        except redis.RedisError:
            return None

    def role(self) -> str | None:
        try:
            with self.client(0.5) as client:
                return str(client.info("replication")["role"])
        except redis.RedisError:
            return None


class SentinelNode(RedisProcess):
    def start(self, primary_port: int) -> SentinelNode:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "sentinel.conf"  # sentinels rewrite their file: one each
        config.write_text(
            f"port {self.port}\n"
            f"bind {LOOPBACK}\n"
            f"dir {self.directory.resolve()}\n"
            f"logfile {self.log_path.resolve()}\n"
            f"sentinel monitor {MASTER_NAME} {LOOPBACK} {primary_port} {QUORUM}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        self.launch([str(config.resolve()), "--sentinel"])
        return self


class SentinelGroup:
    """primary + replica + 3 sentinels under `directory`; `nodes[0]` starts as the primary."""

    def __init__(self, directory: Path) -> None:
        self.nodes = [DataNode("redis-a", directory / "redis-a"), DataNode("redis-b", directory / "redis-b")]
        self.sentinels = [SentinelNode(f"sentinel-{i}", directory / f"sentinel-{i}") for i in range(3)]

    def start(self, timeout_s: float = 30.0) -> SentinelGroup:
        primary, replica = self.nodes
        primary.start()
        replica.start(replica_of=primary.port)
        for sentinel in self.sentinels:
            sentinel.start(primary.port)
        self.wait_settled(timeout_s)
        return self

    @property
    def addresses(self) -> str:
        """`redis.sentinels` as a RELAY_REDIS_SENTINELS value."""
        return ",".join(f"{LOOPBACK}:{sentinel.port}" for sentinel in self.sentinels)

    def relay_env(self) -> dict[str, str]:
        return {"RELAY_REDIS_SENTINELS": self.addresses, "RELAY_REDIS_SENTINEL_MASTER": MASTER_NAME}

    def primary_port(self) -> int | None:
        """The primary as the sentinels' majority names it now."""
        ports: list[int] = []
        for sentinel in self.sentinels:
            try:
                with sentinel.client(0.5) as client:
                    address = client.sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis.RedisError:
                continue
            if address:
                ports.append(int(address[1]))
        for port in set(ports):
            if ports.count(port) >= QUORUM:
                return port
        return None

    def primary(self) -> DataNode:
        port = self.primary_port()
        matches = [node for node in self.nodes if node.port == port]
        assert matches, f"no sentinel majority names a primary (got port {port})"
        return matches[0]

    def wait_settled(self, timeout_s: float = 30.0) -> None:
        """Until every sentinel knows the other two and a replica with a live link, so that a
        failover can be authorised and has somewhere to go."""
        deadline = time.monotonic() + timeout_s
        while not self._settled():
            if time.monotonic() > deadline:
                raise AssertionError("sentinel group did not settle:\n" + self.logs())
            time.sleep(0.1)

    def _settled(self) -> bool:
        port = self.primary_port()
        if port is None:
            return False
        for sentinel in self.sentinels:
            try:
                with sentinel.client(0.5) as client:
                    state = client.sentinel_master(MASTER_NAME)
                    replicas = client.sentinel_slaves(MASTER_NAME)
            except redis.RedisError:
                return False
            if int(state.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return False
            if not any(r["master-link-status"] == "ok" and not r["is_sdown"] for r in replicas):
                return False
        return True

    def restart_as_replica(self, node: DataNode) -> None:
        """Start a stopped node as the replica of the primary the sentinels name now."""
        port = self.primary_port()
        assert port is not None and port != node.port, "start a node again only after the failover"
        node.start(replica_of=port)

    def stop(self) -> None:
        for process in [*self.sentinels, *self.nodes]:
            process.stop()

    def logs(self, tail_chars: int = 1500) -> str:
        return "\n".join(
            f"--- {process.name} ---\n{process.logs()[-tail_chars:]}" for process in [*self.nodes, *self.sentinels]
        )


__all__ = ["DataNode", "SentinelGroup", "SentinelNode"]
