"""`/metrics` of `protege-relay run` with several ingress processes counts every process's work
(prometheus_client multiprocess mode, one directory per service, emptied at start)."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from shared import keys
from tests.support import launcher
from tests.support.processes import free_port, poll_until, wait_for_port

pytestmark = pytest.mark.timeout(180)

PERSONA = "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkena"
INGRESS_WORKERS = 2
MAX_MESSAGES = 200  # SO_REUSEPORT spreads connections by hash: both workers get mail long before this
ACCEPTED = "relay_ingress_messages_accepted_total"


class Relay:
    def __init__(self, tmp_path: Path) -> None:
        self.smtp_port, self.tunnel_port, self.ingress_http, self.egress_http = (free_port() for _ in range(4))
        self.data_dir = tmp_path / "var"
        self.log_path = tmp_path / "run.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(
            RELAY_DATA_DIR=str(self.data_dir),
            RELAY_SMTP_PORT=str(self.smtp_port),
            RELAY_PORT=str(self.tunnel_port),
            RELAY_SMTP_HTTP_PORT=str(self.ingress_http),
            RELAY_EGRESS_HTTP_PORT=str(self.egress_http),
            RELAY_MAIL_DOMAINS="relay.test",
            RELAY_RATE_LIMITS_SMTP_CONNECTIONS_PER_MINUTE_PER_IP=str(MAX_MESSAGES * 2),
            RELAY_RATE_LIMITS_SMTP_MESSAGES_PER_MINUTE_PER_IP=str(MAX_MESSAGES * 2),
        )
        with self.log_path.open("wb") as log_file:
            self.process = launcher.popen(
                [sys.executable, "-m", "protege_relay.cli", "run", "--ingress-workers", str(INGRESS_WORKERS)],
                cwd=tmp_path,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        for port in (self.smtp_port, self.tunnel_port, self.ingress_http, self.egress_http):
            wait_for_port(port, timeout_s=40, process=self.process)
        poll_until(
            lambda: sum(line.get("msg") == "ready" for line in self.log_lines()) == INGRESS_WORKERS + 2,
            timeout_s=30,
            message="every process logs ready",
        )

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    # A file left by a process of an earlier run: the supervisor must start from an empty directory.
    stale = tmp_path / "var" / "metrics" / "ingress"
    stale.mkdir(parents=True)
    (stale / "counter_999999.db").write_bytes(b"not a metrics file")
    started = Relay(tmp_path)
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def accepted_per_process(metrics_dir: Path) -> dict[str, float]:
    """pid -> messages accepted, read from each ingress process's own counter file."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
        counts[path.stem.split("_", 1)[1]] = sum(value for key, value, _, _ in values if json.loads(key)[1] == ACCEPTED)
    return counts


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_ingress_metrics_count_the_messages_of_every_worker(relay: Relay) -> None:
    metrics_dir = relay.data_dir / "metrics" / "ingress"
    assert not (metrics_dir / "counter_999999.db").exists()
    store = redis.Redis.from_url((relay.data_dir / "redis.url").read_text().strip())
    store.set(keys.seen(PERSONA), 1)

    sent = 0
    while sent < MAX_MESSAGES:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as smtp:  # one connection each
            message = f"Subject: message {sent}\r\n\r\nhello\r\n".encode()  # distinct: no duplicate
            smtp.sendmail("alice@example.com", [f"{PERSONA}@relay.test"], message)
        sent += 1
        per_process = accepted_per_process(metrics_dir)
        if sent >= 6 and len([count for count in per_process.values() if count > 0]) == INGRESS_WORKERS:
            break
    print(f"sent {sent} messages; accepted per ingress process: {per_process}")
    assert len(per_process) == INGRESS_WORKERS and all(per_process.values()), per_process

    samples = scrape(relay.ingress_http)

    assert samples[ACCEPTED] == [({}, float(sent))]
    assert samples["relay_ingress_connections_total"] == [({}, float(sent))]
    assert samples["relay_ingress_recipients_accepted_total"] == [({}, float(sent))]
    # Open connections are summed over the live processes: one series, not one per pid.
    [(labels, _)] = samples["relay_ingress_open_connections"]
    assert labels == {}
    assert sum(count for _, count in samples["relay_ingress_enqueue_seconds_count"]) == sent
    # The inbox backlog comes from the tunnel (the ingress' Redis user may not read inboxes),
    # refreshed at most every 2 s: poll until it has caught up.
    assert store.xlen(keys.inbox(PERSONA)) == sent
    poll_until(
        lambda: (
            max((value for _, value in scrape(relay.tunnel_port).get("relay_inbox_entries", [])), default=0) == sent
        ),
        timeout_s=15,
        interval_s=0.3,
        message="the tunnel's relay_inbox_entries never reached the messages sent",
    )

    # Each service exports only its own metrics.
    egress = scrape(relay.egress_http)
    assert ACCEPTED not in egress and "relay_egress_jobs_in_progress" in egress

    # Redis memory, for the alert rules in deploy/observability, comes from the tunnel.
    tunnel = scrape(relay.tunnel_port)
    [(_, used)] = tunnel["relay_redis_memory_used_bytes"]
    assert used == pytest.approx(cast(dict[str, Any], store.info("memory"))["used_memory"], rel=0.5)
    assert "relay_redis_memory_max_bytes" in tunnel
