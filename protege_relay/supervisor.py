"""`protege-relay run`: the whole relay on one machine, each service its own process.

Runs the same `protege-relay ingress|tunnel|egress` commands a deployment runs, so what
works here works in docker-compose and Kubernetes. Redis is embedded (AOF on, data under
`$RELAY_DATA_DIR`, default `./var`) unless `redis.url` / `RELAY_REDIS_URL` is set.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from protege_relay.embedded_redis import EmbeddedRedis, data_dir
from shared.config import RelayConfig
from shared.logs import get_logger, log

logger = get_logger(__name__)
SHUTDOWN_GRACE_S = 30.0


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
    url_file = state_dir / "redis.url"
    if not config.redis.url:
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
        for service, index in plan:
            child_env = dict(env, RELAY_NODE_ID=f"{node_base}-{service}-{index}")
            if index > 0:
                child_env["RELAY_SMTP_HTTP_PORT"] = "0"
            children.append(subprocess.Popen(service_command(service), env=child_env))
        exit_code = 0
        while not stopping:
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
        lock_file.close()
        log(logger, logging.INFO, "relay stopped")
