"""`protege-relay run`: the README's first command, as a newcomer runs it."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import cast

import redis

from shared import keys
from tests.support import launcher
from tests.support.processes import free_port, wait_for_port
from tests.support.wait import poll_until

PERSONA = "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkena"


def test_run_starts_redis_and_all_three_services_and_stops_cleanly(tmp_path: Path) -> None:
    smtp_port, tunnel_port, ingress_http, egress_http = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_DATA_DIR=str(tmp_path / "var"),
        RELAY_SMTP_PORT=str(smtp_port),
        RELAY_PORT=str(tunnel_port),
        RELAY_SMTP_HTTP_PORT=str(ingress_http),
        RELAY_EGRESS_HTTP_PORT=str(egress_http),
    )
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log_file:
        relay = launcher.popen(
            [sys.executable, "-m", "protege_relay.cli", "run"],
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        for port in (smtp_port, tunnel_port, ingress_http, egress_http):
            wait_for_port(port, timeout_s=30, process=relay)
        poll_until(
            lambda: {line["service"] for line in ready_lines(log_path)} == {"ingress", "tunnel", "egress"},
            timeout_s=20,
            message="each service logs one ready line",
        )

        for port in (tunnel_port, ingress_http, egress_http):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                assert response.status == 200

        redis_url = (tmp_path / "var" / "redis.url").read_text().strip()
        store = redis.Redis.from_url(redis_url)
        store.set(keys.seen(PERSONA), 1)
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as smtp:
            smtp.sendmail("alice@example.com", [f"{PERSONA}@localhost"], b"Subject: hi\r\n\r\nhello\r\n")
        assert store.xlen(keys.inbox(PERSONA)) == 1
        assert cast(dict[str, str], store.config_get("appendonly"))["appendonly"] == "yes"

        status = launcher.run(
            [sys.executable, "-m", "protege_relay.cli", "status", "--json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        document = json.loads(status.stdout)
        assert document["inbox"]["entries"] == 1, document

        second = launcher.run(
            [sys.executable, "-m", "protege_relay.cli", "run"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1 and "another protege-relay run" in second.stderr

        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=45) == 0
        store.close()
        assert not (tmp_path / "var" / "redis.url").exists()
        assert '"relay stopped"' in log_path.read_text()
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()


def ready_lines(log_path: Path) -> list[dict[str, object]]:
    text = log_path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.startswith("{") and '"msg":"ready"' in line]
