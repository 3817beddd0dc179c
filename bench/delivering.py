"""The whole inbound path for the end-to-end figures: ingress, tunnel and connected gateways.

`e2e_cpu`, `delivering_rate` and `sender_auth_rate` measure what an operator pays for: SMTP in,
the durable write, the tunnel and the gateway, all at once. This module starts one tunnel,
N ingress processes on one SO_REUSEPORT port and one process of 10 lean gateways (inbound_ack,
every smtp_end acknowledged, so the tunnel deletes the entry), reads the CPU time of every
relay process and redis-server from /proc, and waits for the inboxes to drain.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.auth_rate import start_tunnel
from bench.gateway import bench_passport
from bench.harness import MAIL_DOMAIN, Bench, BenchError, Child, free_port
from shared import keys
from shared.identity import persona_address
from shared.listen import INHERITED_SMTP_FD_ENV, bind_listener

PERSONAS = 10
MESSAGE_BYTES = 10 * 1024
CONNECT_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 120.0
POLL_S = 0.01
SAMPLE_INTERVAL_S = 0.02
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@dataclass
class DeliveringRelay:
    bench: Bench
    smtp_port: int
    salt: str
    services: list[Child]
    gateways: Child
    status_path: Path

    @property
    def persona_keys(self) -> list[str]:
        return [bench_passport(index, self.salt).persona_key for index in range(PERSONAS)]

    @property
    def recipients(self) -> list[str]:
        return [persona_address(persona_key, MAIL_DOMAIN) for persona_key in self.persona_keys]

    @property
    def cpu_pids(self) -> list[int]:
        """Every relay process and redis-server (not the gateways nor the SMTP client)."""
        redis_process = self.bench.redis_server.process
        assert redis_process is not None
        return [child.pid for child in self.services] + [redis_process.pid]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.cpu_pids)

    def status(self) -> dict[str, int]:
        with contextlib.suppress(OSError, ValueError):
            loaded: dict[str, int] = json.loads(self.status_path.read_text())
            return loaded
        return {}

    def queued(self) -> int:
        """Entries still in the personas' inboxes (the tunnel deletes an entry on smtp_ack)."""
        with self.bench.redis() as client:
            pipe = client.pipeline(transaction=False)
            for persona_key in self.persona_keys:
                pipe.xlen(keys.inbox(persona_key))
            return sum(int(length) for length in pipe.execute())

    def wait_drained(self, timeout_s: float = DRAIN_TIMEOUT_S) -> float:
        """Seconds until every inbox is empty (0.0 if it already was)."""
        started = time.perf_counter()
        deadline = started + timeout_s
        while self.queued():
            if time.perf_counter() > deadline:
                raise BenchError(f"{self.queued()} messages still queued after {timeout_s:.0f}s")
            if self.gateways.process.poll() is not None:
                raise BenchError(f"gateways exited: {self.gateways.tail()}")
            time.sleep(POLL_S)
        return time.perf_counter() - started

    def wait_delivered(self, count: int, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Until the gateways hold at least `count` smtp_end frames (acks may lag a little)."""
        deadline = time.perf_counter() + timeout_s
        while self.status().get("delivered", 0) < count:
            if time.perf_counter() > deadline:
                raise BenchError(f"gateways received {self.status().get('delivered', 0)} of {count}")
            time.sleep(POLL_S)


def start_gateways(bench: Bench, url: str, salt: str) -> tuple[Child, Path]:
    status_path = bench.work_dir / f"gateways-{salt}-{time.time_ns()}.json"
    child = bench.start_program(
        "bench.loadgen_gateways",
        ["--url", url, "--personas", str(PERSONAS), "--salt", salt, "--status", str(status_path)],
    )
    deadline = time.perf_counter() + CONNECT_TIMEOUT_S
    while True:
        connected = 0
        with contextlib.suppress(OSError, ValueError):
            connected = json.loads(status_path.read_text()).get("connected", 0)
        if connected >= PERSONAS:
            return child, status_path
        if child.process.poll() is not None or time.perf_counter() > deadline:
            raise BenchError(f"gateways did not connect: {child.tail()}")
        time.sleep(POLL_S)


@contextlib.contextmanager
def delivering_relay(bench: Bench, workers: int, salt: str, **ingress_env: str) -> Iterator[DeliveringRelay]:
    """Tunnel, `workers` ingress processes and the connected gateways, on an empty Redis."""
    bench.flush()
    services: list[Child] = []
    already_running = list(bench.children)
    # One socket bound here and inherited by every ingress worker, as `protege-relay run` does.
    listener = bind_listener("127.0.0.1", 0, field="smtp.port")
    smtp_port = listener.getsockname()[1]
    try:
        url, tunnel = start_tunnel(bench, f"bench-{salt}-tunnel")
        services.append(tunnel)
        for index in range(workers):
            http_port = free_port()
            services.append(
                bench.start_service(
                    "ingress",
                    ready_http_port=http_port,
                    pass_fds=(listener.fileno(),),
                    inherited_env={
                        INHERITED_SMTP_FD_ENV: str(listener.fileno()),
                        "RELAY_SMTP_PORT": str(smtp_port),
                        "RELAY_SMTP_HTTP_PORT": str(http_port),
                        "RELAY_NODE_ID": f"bench-{salt}-ingress-{index}",
                        **ingress_env,
                    },
                )
            )
        gateways, status_path = start_gateways(bench, url, salt)
        yield DeliveringRelay(bench, smtp_port, salt, services, gateways, status_path)
    finally:
        listener.close()
        for child in reversed(bench.children[:]):
            if child not in already_running:
                bench.stop(child)


def smtp_load(bench: Bench, port: int, recipients: list[str], connections: int, seconds: float) -> dict[str, Any]:
    """`bench.loadgen_smtp` against `port`: its JSON result (accepted, rate, refusals)."""
    result = bench.run_program(
        "bench.loadgen_smtp",
        [
            "--port",
            str(port),
            "--connections",
            str(connections),
            "--seconds",
            str(seconds),
            "--size",
            str(MESSAGE_BYTES),
            "--recipients",
            ",".join(recipients),
        ],
        timeout_s=seconds + 60,
    )
    if not result["accepted"]:
        raise BenchError(f"no message accepted: {result['other']}")
    return result


@contextlib.contextmanager
def bare_sink(bench: Bench) -> Iterator[tuple[Child, int]]:
    """The baseline: bare aiosmtpd (one process, default loop, 250 and discard), and its port."""
    port = free_port()
    server = bench.start_program("bench.baseline_smtp", ["--port", str(port)], ready_port=port)
    try:
        yield server, port
    finally:
        bench.stop(server)


@dataclass
class LoadOutcome:
    rate: float
    accepted: int
    queued_at_stop: int  # entries in the inboxes when the load window closed
    drain_s: float  # from the window's end until every inbox was empty
    other: dict[str, int]


def load_and_drain(relay: DeliveringRelay, connections: int, seconds: float) -> LoadOutcome:
    """SMTP load for `seconds` while a thread samples the inboxes; then wait for them to empty.

    The samples carry wall-clock times and the load generator reports when its window closed,
    so the backlog at that moment and the time to drain it come from one clock."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            queued = relay.queued()
            samples.append((time.time(), queued))
            stop.wait(SAMPLE_INTERVAL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = smtp_load(relay.bench, relay.smtp_port, relay.recipients, connections, seconds)
        relay.wait_drained()
    finally:
        stop.set()
        sampler.join()
    samples.append((time.time(), relay.queued()))
    window_end = float(result["window_end_unix"])
    after = [(at, queued) for at, queued in samples if at >= window_end]
    queued_at_stop = after[0][1] if after else 0
    drained_at = next((at for at, queued in after if queued == 0), samples[-1][0])
    return LoadOutcome(
        rate=float(result["rate"]),
        accepted=int(result["accepted"]),
        queued_at_stop=queued_at_stop,
        drain_s=max(0.0, drained_at - window_end) if queued_at_stop else 0.0,
        other=dict(result["other"]),
    )
