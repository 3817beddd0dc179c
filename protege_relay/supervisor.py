"""`protege-relay run`: the whole relay on one machine, each service its own process.

Runs the same `protege-relay ingress|tunnel|egress` commands a deployment runs, so what
works here works in docker-compose and Kubernetes. Redis is embedded (AOF on, data under
`$RELAY_DATA_DIR`, default `./var`) unless `redis.url` / `RELAY_REDIS_URL` is set.

The SMTP port is bound here, once, and the listening socket is inherited by every ingress
worker (`shared.listen`): the workers share it, nothing else can. Once every service answers
/readyz, one line on stdout says where the relay listens and what to run next.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType

from protege_relay.embedded_redis import EmbeddedRedis, data_dir
from protege_relay.metrics_dirs import MULTIPROC_DIR_ENV, prepare_metrics_dirs
from shared.config import RelayConfig
from shared.listen import INHERITED_SMTP_FD_ENV, ListenError, bind_listener, bound_port
from shared.logs import get_logger, log

logger = get_logger(__name__)
SHUTDOWN_GRACE_S = 30.0
READY_PROBE_TIMEOUT_S = 1.0
# Set in every child's environment: a supervised service leaves startup warnings about the
# shared config to the supervisor, which says them once.
SUPERVISED_ENV = "PROTEGE_RELAY_SUPERVISED"


def service_command(service: str) -> list[str]:
    """The command line of one service process (the container entrypoint runs the same)."""
    return [sys.executable, "-m", "protege_relay.cli", service]


def run_all(config: RelayConfig, *, config_path: str | None, ingress_workers: int = 1) -> int:
    redis: EmbeddedRedis | None = None
    env = dict(os.environ)
    if config_path:
        env["RELAY_CONFIG"] = str(Path(config_path).resolve())
    state_dir = data_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    lock_file = (state_dir / "relay.lock").open("w")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(logger, logging.ERROR, "another protege-relay run uses this data directory", data_dir=str(state_dir))
        return 1
    smtp_socket: socket.socket | None = None
    if config.smtp.enabled:
        try:
            smtp_socket = bind_listener(config.smtp.host, config.smtp.port, field="smtp.port")
        except ListenError as exc:
            print(f"protege-relay run: {exc}", file=sys.stderr)
            lock_file.close()
            return 1
    url_file = state_dir / "redis.url"
    if not config.redis.url:
        log(logger, logging.INFO, "starting embedded redis", data_dir=str(state_dir / "redis"))
        redis = EmbeddedRedis(state_dir / "redis")
        redis.start()
        env["RELAY_REDIS_URL"] = redis.url
        url_file.write_text(redis.url + "\n")
        log(logger, logging.INFO, "embedded redis ready", redis_url=redis.url, data_dir=str(redis.data_dir))
    node_base = config.node_id
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        plan = [("ingress", i) for i in range(max(1, ingress_workers))] + [("tunnel", 0), ("egress", 0)]
        log(logger, logging.INFO, "starting services", ingress_workers=max(1, ingress_workers))
        metrics_dirs = prepare_metrics_dirs(state_dir, {service for service, _ in plan})
        for service, index in plan:
            child_env = dict(env, RELAY_NODE_ID=f"{node_base}-{service}-{index}", **{SUPERVISED_ENV: "1"})
            child_env[MULTIPROC_DIR_ENV] = str(metrics_dirs[service])  # /metrics counts every worker
            inherited: tuple[int, ...] = ()
            if service == "ingress" and smtp_socket is not None:
                inherited = (smtp_socket.fileno(),)
                child_env[INHERITED_SMTP_FD_ENV] = str(smtp_socket.fileno())
            if index > 0:
                child_env["RELAY_SMTP_HTTP_PORT"] = "0"
            children.append(subprocess.Popen(service_command(service), env=child_env, pass_fds=inherited))
        exit_code = 0
        announced = False
        smtp_port = bound_port(smtp_socket) if smtp_socket is not None else None
        while not stopping:
            if not announced and relay_ready(config):
                print(ready_line(config, smtp_port), flush=True)
                announced = True
            for child in children:
                if child.poll() is not None:
                    log(
                        logger,
                        logging.ERROR,
                        "service exited; stopping the relay",
                        pid=child.pid,
                        returncode=child.returncode,
                    )
                    exit_code = 1
                    stopping = True
            time.sleep(0.2)
        return exit_code
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        if redis is not None:
            redis.stop()
            url_file.unlink(missing_ok=True)
        if smtp_socket is not None:
            smtp_socket.close()
        lock_file.close()
        log(logger, logging.INFO, "relay stopped")


def relay_ready(config: RelayConfig) -> bool:
    """Every service's /readyz answers 200 (those whose port is configured)."""
    scheme = "https" if config.ws.tls.enabled else "http"
    probes = [f"{scheme}://{reach_host(config.host)}:{config.port}/readyz"] if config.port else []
    if config.smtp.enabled and config.smtp.httpPort:
        probes.append(f"http://{reach_host(config.smtp.host)}:{config.smtp.httpPort}/readyz")
    if config.egress.httpPort:
        probes.append(f"http://{reach_host(config.host)}:{config.egress.httpPort}/readyz")
    return all(_answers_ready(url) for url in probes)


def _answers_ready(url: str) -> bool:
    context = ssl._create_unverified_context() if url.startswith("https") else None  # our own port
    try:
        with urllib.request.urlopen(url, timeout=READY_PROBE_TIMEOUT_S, context=context) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


def ready_line(config: RelayConfig, smtp_port: int | None) -> str:
    """The one human line `make run` ends its start with: where to send, where gateways go,
    and the next command of the README's walk-through."""
    smtp = f"SMTP {reach_host(config.smtp.host)}:{smtp_port}" if smtp_port is not None else "SMTP off"
    gateways = f"gateways connect to {tunnel_url(config)}"
    command = _command_path()
    domain = config.primary_mail_domain or "localhost"
    return (
        f"Protege Relay is ready: {smtp}, {gateways}. "
        f"Next, make a persona: {command} keygen --out passport.key --domain {domain}"
    )


def _command_path() -> str:
    """How to call `protege-relay` from here: relative below the working directory (as the
    README writes `.venv/bin/protege-relay`), else absolute."""
    executable = Path(sys.executable).with_name("protege-relay")
    if not executable.exists():
        return "protege-relay"
    relative = os.path.relpath(executable)
    return str(executable) if relative.startswith("..") else relative


def tunnel_url(config: RelayConfig) -> str:
    """The tunnel of the relay `config` describes, as a gateway on this machine reaches it
    (the default `--url` of `gateway` and `send`)."""
    scheme = "wss" if config.ws.tls.enabled else "ws"
    return f"{scheme}://{reach_host(config.host)}:{config.port}/ws"


def reach_host(host: str) -> str:
    """A host to reach a listener bound to `host` (a wildcard means loopback will do)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
