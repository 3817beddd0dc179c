"""N ingress, N tunnel and N egress processes against one Redis, started the way operators run
them: the command (`protege-relay <args>`), the required environment variables, the bind
variables and the health paths all come from `deploy/service_matrix.json`, the one description
docker-compose and the Kubernetes manifests are tested to follow. Only the values differ:
tests bind loopback instead of 0.0.0.0 and use free ports instead of the container ports.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import env_variable_names
from tests.support.processes import REPO_ROOT, ServiceProcess, free_port, service_env

MATRIX_PATH = REPO_ROOT / "deploy" / "service_matrix.json"
LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0

# The config fields behind the matrix's `containerPort` and `healthPort` (shared/config.py).
PORT_ENV = {"ingress": "RELAY_SMTP_PORT", "tunnel": "RELAY_PORT"}
HEALTH_PORT_ENV = {"ingress": "RELAY_SMTP_HTTP_PORT", "tunnel": "RELAY_PORT", "egress": "RELAY_EGRESS_HTTP_PORT"}


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    args: list[str]
    required_env: list[str]
    bind_env: dict[str, str]
    readiness_path: str
    liveness_path: str
    has_port: bool


def load_matrix(path: Path = MATRIX_PATH) -> tuple[str, dict[str, ServiceSpec]]:
    """(node id variable, service name -> spec) from the service matrix."""
    document = json.loads(path.read_text())
    known_env = {name for name, _ in env_variable_names()}
    specs: dict[str, ServiceSpec] = {}
    for name, entry in document["services"].items():
        spec = ServiceSpec(
            name=name,
            args=list(entry["args"]),
            required_env=list(entry["requiredEnv"]),
            bind_env=dict(entry["bindEnv"]),
            readiness_path=entry["readinessPath"],
            liveness_path=entry["livenessPath"],
            has_port=entry["containerPort"] is not None,
        )
        unknown = [variable for variable in [*spec.required_env, *spec.bind_env] if variable not in known_env]
        assert not unknown, f"service matrix names variables the config does not know: {unknown}"
        specs[name] = spec
    node_id_env: str = document["nodeIdEnv"]
    return node_id_env, specs


def http_status(port: int, path: str, timeout_s: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=timeout_s) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


@dataclass
class Node:
    """One service process of the cluster; it can be killed, stopped and started again with
    the same ports, node id and environment."""

    spec: ServiceSpec
    node_id: str
    env: dict[str, str]
    port: int | None
    health_port: int
    log_path: Path
    process: ServiceProcess | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        assert self.spec.name == "tunnel" and self.port is not None
        return f"ws://{LOOPBACK}:{self.port}/ws"

    @property
    def pid(self) -> int:
        assert self.process is not None and self.process.process is not None
        return self.process.process.pid

    def start(self) -> Node:
        self.process = ServiceProcess(
            self.spec.args[0], self.env, port=None, log_path=self.log_path, extra_args=self.spec.args[1:]
        )
        self.process.start()
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.process is not None and self.process.process.poll() is None

    def ready(self) -> bool:
        return self.alive() and http_status(self.health_port, self.spec.readiness_path) == 200

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> Node:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if not self.alive():
                raise AssertionError(f"{self.node_id} exited before it was ready:\n{self.logs()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.node_id} not ready after {timeout_s}s:\n{self.logs()[-4000:]}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, as a crashed pod."""
        assert self.process is not None
        self.process.kill()

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait for the graceful exit; the exit status."""
        assert self.process is not None
        return self.process.terminate(timeout_s=timeout_s)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_kib(self) -> int:
        """Resident set size from /proc (VmRSS), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for {self.node_id}")


@dataclass
class Cluster:
    """Service processes sharing one Redis. `common_env` goes to every process."""

    redis_url: str
    log_dir: Path
    common_env: dict[str, str] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.node_id_env, self.specs = load_matrix()
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def add(
        self, service: str, node_id: str | None = None, *, start: bool = True, env: dict[str, str] | None = None
    ) -> Node:
        spec = self.specs[service]
        node_id = node_id or f"{service}-{sum(node.spec.name == service for node in self.nodes)}"
        port = free_port() if spec.has_port else None
        health_port = port if HEALTH_PORT_ENV[service] == PORT_ENV.get(service) and port else free_port()
        variables = {
            self.node_id_env: node_id,
            **{name: LOOPBACK for name in spec.bind_env},  # the matrix binds 0.0.0.0; tests stay on lo
            HEALTH_PORT_ENV[service]: str(health_port),
            "RELAY_LOGGING_LEVEL": "info",
            **self.common_env,
            **(env or {}),
        }
        if port is not None:
            variables[PORT_ENV[service]] = str(port)
        full_env = service_env(self.redis_url, **variables)
        missing = [name for name in spec.required_env if not full_env.get(name)]
        assert not missing, f"{service} started without its required variables {missing}"
        node = Node(spec, node_id, full_env, port, health_port, self.log_dir / f"{node_id}.log")
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def start(self, ingress: int = 1, tunnel: int = 1, egress: int = 1, **env: str) -> Cluster:
        """Start the given number of each service and wait until every one answers /readyz."""
        for service, count in (("ingress", ingress), ("tunnel", tunnel), ("egress", egress)):
            for _ in range(count):
                self.add(service, env=env)
        self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        for node in self.nodes:
            if node.alive():
                node.wait_ready(timeout_s)

    def of(self, service: str) -> list[Node]:
        return [node for node in self.nodes if node.spec.name == service]

    @property
    def tunnel_urls(self) -> list[str]:
        return [node.url for node in self.of("tunnel")]

    @property
    def smtp_ports(self) -> list[int]:
        return [node.port for node in self.of("ingress") if node.port is not None]

    def revive(self) -> None:
        """Start again every node that is not running, and wait for all to be ready."""
        for node in self.nodes:
            if not node.alive():
                node.start()
        self.wait_ready()

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                try:
                    node.terminate(timeout_s=10)
                except Exception:
                    node.kill()

    def logs(self, service: str | None = None, tail_chars: int = 3000) -> str:
        return "\n".join(
            f"--- {node.node_id} ---\n{node.logs()[-tail_chars:]}"
            for node in self.nodes
            if service is None or node.spec.name == service
        )


def soak_factor() -> int:
    """How many times the default message counts the load tests send: 1 normally; with
    `RELAY_SOAK=1` (or true/yes, as `make soak` sets) 10; with `RELAY_SOAK=<n>` for n >= 2, n."""
    raw = os.environ.get("RELAY_SOAK", "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return 1
    if raw.isdigit() and int(raw) >= 2:
        return int(raw)
    return 10


__all__ = ["Cluster", "Node", "ServiceSpec", "http_status", "load_matrix", "soak_factor"]
