"""Processes of a benchmark run: one embedded Redis, service processes and load generators.

Everything is a real child process on loopback. Services are started with the same
`python -m protege_relay.cli <service>` command operators run; load generators are the
small `bench.*` programs, each printing one JSON object as its last stdout line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from protege_relay.embedded_redis import EmbeddedRedis, free_port, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE_START_TIMEOUT_S = 30.0
SERVICE_STOP_TIMEOUT_S = 15.0
HIGH_LIMIT = "100000000"

# Rate limits and queue caps out of the way: the benchmark measures throughput, not policy.
LOAD_ENV = {
    "RELAY_RATE_LIMITS_SMTP_CONNECTIONS_PER_MINUTE_PER_IP": HIGH_LIMIT,
    "RELAY_RATE_LIMITS_SMTP_MESSAGES_PER_MINUTE_PER_IP": HIGH_LIMIT,
    "RELAY_RATE_LIMITS_SMTP_CONCURRENT_CONNECTIONS_PER_IP": HIGH_LIMIT,
    "RELAY_RATE_LIMITS_WS_AUTH_ATTEMPTS_PER_MINUTE_PER_IP": HIGH_LIMIT,
    "RELAY_RATE_LIMITS_OUTBOUND_MESSAGES_PER_MINUTE_PER_PERSONA": HIGH_LIMIT,
    "RELAY_QUEUE_MAX_MESSAGES": HIGH_LIMIT,
    "RELAY_QUEUE_MAX_BYTES": str(64 * 1024**3),
    "RELAY_SMTP_HTTP_PORT": "0",
    "RELAY_EGRESS_HTTP_PORT": "0",
    "RELAY_LOGGING_LEVEL": "warning",
    "RELAY_MAIL_DOMAINS": '["relay.bench"]',
}
MAIL_DOMAIN = "relay.bench"


class BenchError(RuntimeError):
    """A process of the benchmark failed; the figure records it and the run goes on."""


def service_available(service: str) -> bool:
    """True once `services/<service>/main.py` exists (the service engineer has landed it)."""
    try:
        return importlib.util.find_spec(f"services.{service}.main") is not None
    except ModuleNotFoundError:
        return False


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (10,000 sockets need it); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_http_ok(
    port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None, path: str = "/readyz"
) -> None:
    """Poll a health endpoint until it answers 200 (a service's listeners are bound)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BenchError(f"process exited with {process.returncode} before {path} answered 200")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
                conn.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
                if conn.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"127.0.0.1:{port}{path} did not answer 200 within {timeout_s}s")


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=SERVICE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Bench:
    """One run's shared state: a scratch directory, one Redis, and every child started."""

    work_dir: Path
    redis_server: EmbeddedRedis
    children: list[Child] = field(default_factory=list)
    _counter: int = 0

    @property
    def redis_url(self) -> str:
        return self.redis_server.url

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def redis_version(self) -> str:
        with contextlib.closing(self.redis()) as client:
            info = client.info("server")
        return str(info.get("redis_version", "?")) if isinstance(info, dict) else "?"

    def flush(self) -> None:
        """Empty Redis between measurements and shrink the AOF, so no round inherits a backlog."""
        with contextlib.closing(self.redis()) as client:
            client.flushall()
            with contextlib.suppress(redis.ResponseError):
                client.execute_command("BGREWRITEAOF")  # type: ignore[no-untyped-call]

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(LOAD_ENV)
        env.update(RELAY_REDIS_URL=self.redis_url, PYTHONPATH=str(REPO_ROOT))
        env.update(overrides)
        return env

    def _log_path(self, name: str) -> Path:
        self._counter += 1
        return self.work_dir / f"{self._counter:03d}-{name}.log"

    def start_service(
        self,
        service: str,
        port: int | None = None,
        ready_http_port: int | None = None,
        pass_fds: Sequence[int] = (),
        inherited_env: dict[str, str] | None = None,
        **env: str,
    ) -> Child:
        """`protege-relay <service>`; waits until `port` accepts connections and/or
        `ready_http_port` answers /readyz with 200, when given. `pass_fds`: descriptors the
        child inherits (the SMTP socket several ingress workers share), named to it in
        `inherited_env`."""
        log_path = self._log_path(service)
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "protege_relay.cli", service],
                env=self.env(**env, **(inherited_env or {})),
                cwd=REPO_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=raise_fd_limit,
                pass_fds=tuple(pass_fds),
            )
        child = Child(service, process, log_path)
        self.children.append(child)
        try:
            if port is not None:
                wait_for_port(port, timeout_s=SERVICE_START_TIMEOUT_S, process=process)
            if ready_http_port is not None:
                wait_http_ok(ready_http_port, SERVICE_START_TIMEOUT_S, process)
        except (BenchError, TimeoutError) as exc:
            child.stop()
            raise BenchError(f"{service} did not start: {exc}\n{child.tail()}") from None
        return child

    def start_program(self, module: str, args: Sequence[str], *, ready_port: int | None = None) -> Child:
        """A long-running bench helper (a sink, a baseline server) in the background."""
        log_path = self._log_path(module.rsplit(".", 1)[-1])
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env=self.env(),
                cwd=REPO_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=raise_fd_limit,
            )
        child = Child(module, process, log_path)
        self.children.append(child)
        if ready_port is not None:
            try:
                wait_for_port(ready_port, timeout_s=SERVICE_START_TIMEOUT_S, process=process)
            except TimeoutError as exc:
                child.stop()
                raise BenchError(f"{module} did not start: {exc}\n{child.tail()}") from None
        return child

    def run_program(self, module: str, args: Sequence[str], timeout_s: float) -> dict[str, Any]:
        """Run a load generator to completion; its last stdout line is its JSON result."""
        return self.run_parallel([(module, args)], timeout_s)[0]

    def run_parallel(self, programs: Sequence[tuple[str, Sequence[str]]], timeout_s: float) -> list[dict[str, Any]]:
        """Several load generators at once (e.g. one per core); all must succeed."""
        running: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        for module, args in programs:
            log_path = self._log_path(module.rsplit(".", 1)[-1])
            with log_path.open("wb") as stderr_file:
                process = subprocess.Popen(
                    [sys.executable, "-m", module, *args],
                    env=self.env(),
                    cwd=REPO_ROOT,
                    stdout=subprocess.PIPE,
                    stderr=stderr_file,
                    preexec_fn=raise_fd_limit,
                )
            running.append((module, process, log_path))
        deadline = time.monotonic() + timeout_s
        results: list[dict[str, Any]] = []
        try:
            for module, process, log_path in running:
                try:
                    stdout, _ = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise BenchError(f"{module} did not finish within {timeout_s:.0f}s") from None
                lines = stdout.decode(errors="replace").strip().splitlines()
                if process.returncode != 0 or not lines:
                    tail = log_path.read_text(errors="replace")[-1500:]
                    raise BenchError(f"{module} exited with {process.returncode}: {tail}")
                result: dict[str, Any] = json.loads(lines[-1])
                if result.get("error"):
                    raise BenchError(f"{module}: {result['error']}")
                results.append(result)
        finally:
            for _, process, _ in running:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return results

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()


@contextlib.contextmanager
def bench_session(keep_dir: bool = False) -> Iterator[Bench]:
    raise_fd_limit()
    work_dir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    server = EmbeddedRedis(work_dir / "redis")
    server.start()
    bench = Bench(work_dir, server)
    try:
        yield bench
    finally:
        bench.stop_all()
        server.stop()
        if not keep_dir:
            import shutil

            shutil.rmtree(work_dir, ignore_errors=True)


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


__all__ = ["MAIL_DOMAIN", "Bench", "BenchError", "Child", "bench_session", "free_port", "rss_kib", "service_available"]
