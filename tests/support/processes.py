"""Real service processes for tests: the same `protege-relay <service>` command operators run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from protege_relay.embedded_redis import free_port, wait_for_port
from tests.support import launcher
from tests.support.launcher import REPO_ROOT
from tests.support.wait import poll_until

# Readiness probes connect from here, so they never count towards the per-IP limits a test
# measures from 127.0.0.1 (the probe's connection may or may not reach the rate check).
PROBE_IP = "127.0.0.254"


@dataclass
class ServiceProcess:
    service: str
    env: dict[str, str]
    port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    pass_fds: tuple[int, ...] = ()  # descriptors the child inherits (a listening socket)

    def start(self, timeout_s: float = 20.0) -> ServiceProcess:
        assert self.log_path is not None
        log_file = self.log_path.open("ab")
        self.process = launcher.popen(
            [sys.executable, "-m", "protege_relay.cli", self.service, *self.extra_args],
            env=self.env,
            cwd=REPO_ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            pass_fds=self.pass_fds,
        )
        if self.port is not None:
            try:
                wait_for_port(self.port, timeout_s=timeout_s, process=self.process, source_ip=PROBE_IP)
            except TimeoutError:
                raise AssertionError(f"{self.service} did not start:\n{self.logs()}") from None
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def terminate(self, timeout_s: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def service_env(redis_url: str, **overrides: str) -> dict[str, str]:
    """Environment for a service process: no inherited RELAY_* settings, loopback everything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_REDIS_URL=redis_url,
        RELAY_SMTP_HTTP_PORT="0",
        RELAY_EGRESS_HTTP_PORT="0",
        RELAY_LOGGING_LEVEL="debug",
        PYTHONPATH=str(REPO_ROOT),
    )
    env.update(overrides)
    return env


__all__ = ["PROBE_IP", "REPO_ROOT", "ServiceProcess", "free_port", "poll_until", "service_env", "wait_for_port"]
