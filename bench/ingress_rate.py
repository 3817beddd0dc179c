"""Figure: ingress accept rate, relay (1 and N processes on one SO_REUSEPORT port) vs bare aiosmtpd.

Each round measures the baseline and then every ingress configuration back to back with the
same load generator: 50 sessions, 10 KB messages, one command at a time, a fixed window.
Recipients are 50 personas marked "seen" in Redis, so every RCPT passes the relay's checks
and every 250 is a durable XADD.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from bench.harness import MAIL_DOMAIN, Bench, BenchError, Child, free_port, service_available
from bench.modes import Mode
from bench.report import FigureResult, Target, print_line
from shared import keys
from shared.identity import Passport
from shared.listen import INHERITED_SMTP_FD_ENV, bind_listener

FIGURE = "ingress_rate"
PERSONAS = 50
MESSAGE_BYTES = 10 * 1024
TARGET_RATIO = 1.8
SEEN_TTL_S = 3600


def personas() -> list[str]:
    return [Passport.from_seed(bytes([i]) * 32).persona_key for i in range(1, PERSONAS + 1)]


def mark_seen(bench: Bench, persona_keys: list[str]) -> None:
    with bench.redis() as client:
        pipe = client.pipeline(transaction=False)
        for persona_key in persona_keys:
            pipe.set(keys.seen(persona_key), "1", ex=SEEN_TTL_S)
        pipe.execute()


def loadgen(bench: Bench, mode: Mode, port: int, recipients: list[str]) -> float:
    result = bench.run_program(
        "bench.loadgen_smtp",
        [
            "--port",
            str(port),
            "--connections",
            str(mode.ingress_connections),
            "--seconds",
            str(mode.ingress_seconds),
            "--size",
            str(MESSAGE_BYTES),
            "--recipients",
            ",".join(recipients),
        ],
        timeout_s=mode.ingress_seconds + 60,
    )
    if result["other"]:
        print_line(f"  loadgen refusals/errors: {result['other']}")
    if result["accepted"] == 0:
        raise BenchError(f"no message accepted: {result['other']}")
    return float(result["rate"])


def measure_baseline(bench: Bench, mode: Mode, recipients: list[str]) -> float:
    port = free_port()
    server = bench.start_program("bench.baseline_smtp", ["--port", str(port)], ready_port=port)
    try:
        return loadgen(bench, mode, port, recipients)
    finally:
        bench.stop(server)


def measure_ceiling(bench: Bench, mode: Mode, workers: int, recipients: list[str]) -> float:
    """Bare aiosmtpd on uvloop in `workers` SO_REUSEPORT processes: the most any aiosmtpd-based
    ingress could accept on this machine with no Redis work at all (diagnostic)."""
    port = free_port()
    servers = [
        bench.start_program("bench.baseline_smtp", ["--port", str(port), "--loop", "uvloop", "--reuse-port"])
        for _ in range(workers)
    ]
    try:
        for server in servers:
            wait_for_listener(bench, server, port)
        return loadgen(bench, mode, port, recipients)
    finally:
        for server in servers:
            bench.stop(server)


def wait_for_listener(bench: Bench, server: Child, port: int) -> None:
    """A process bound to a shared port: poll its listening sockets in /proc until it has one."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(f"baseline server exited: {server.tail()}")
        if listening_on(server.pid, port):
            return
        time.sleep(0.05)
    raise BenchError(f"baseline server {server.pid} did not listen on {port}")


def listening_on(pid: int, port: int) -> bool:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    wanted = f":{port:04X}"
    return any(
        fields[1].endswith(wanted) and fields[3] == "0A" and fields[9] in inodes
        for fields in (line.split() for line in table)
    )


def measure_relay(bench: Bench, mode: Mode, workers: int, persona_keys: list[str], recipients: list[str]) -> float:
    bench.flush()
    mark_seen(bench, persona_keys)
    # One socket bound here and inherited by every worker, as `protege-relay run` does.
    listener = bind_listener("127.0.0.1", 0, field="smtp.port")
    port = listener.getsockname()[1]
    processes = []
    try:
        for index in range(workers):
            http_port = free_port()
            processes.append(
                bench.start_service(
                    "ingress",
                    ready_http_port=http_port,
                    pass_fds=(listener.fileno(),),
                    RELAY_SMTP_PORT=str(port),
                    RELAY_SMTP_HTTP_PORT=str(http_port),
                    inherited_env={INHERITED_SMTP_FD_ENV: str(listener.fileno())},
                    RELAY_NODE_ID=f"bench-ingress-{index}",
                )
            )
        return loadgen(bench, mode, port, recipients)
    finally:
        listener.close()
        for process in processes:
            bench.stop(process)


def run(bench: Bench, mode: Mode) -> FigureResult:
    figure = FigureResult(
        FIGURE,
        "Ingress accept rate",
        f"{mode.ingress_connections} concurrent SMTP sessions (one command at a time), "
        f"{MESSAGE_BYTES // 1024} KB messages, {mode.ingress_seconds:g} s window; baseline: bare "
        "aiosmtpd (one process, default event loop, handler answers 250 and discards). Relay: N "
        "`protege-relay ingress` processes sharing one inherited listening socket (as `run` does), AOF on "
        "(appendfsync everysec), every 250 after the enqueue script.",
    )
    persona_keys = personas()
    recipients = [f"{pk}@{MAIL_DOMAIN}" for pk in persona_keys]
    available = service_available("ingress")
    if not available:
        figure.skipped = "services/ingress/main.py not present yet"
    metrics = {
        workers: figure.metric(
            f"{workers} ingress process{'es' if workers > 1 else ''}",
            "msg/s",
            baseline_name="bare aiosmtpd",
            target=Target("ratio_at_least", TARGET_RATIO),
        )
        for workers in mode.ingress_worker_counts
    }
    ceiling_workers = max(mode.ingress_worker_counts)
    ceiling = figure.metric(
        f"bare aiosmtpd x{ceiling_workers}, uvloop (ceiling)",
        "msg/s",
        baseline_name="bare aiosmtpd",
        notes="diagnostic: the baseline server on uvloop in as many SO_REUSEPORT processes as the "
        "largest relay configuration, no Redis: the most an aiosmtpd-based ingress can reach here",
    )
    for round_index in range(mode.rounds):
        baseline = measure_baseline(bench, mode, recipients)
        print_line(f"  round {round_index + 1}: baseline {baseline:.0f} msg/s")
        ceiling.baseline_rounds.append(baseline)
        ceiling.rounds.append(measure_ceiling(bench, mode, ceiling_workers, recipients))
        print_line(f"  round {round_index + 1}: ceiling {ceiling.rounds[-1]:.0f} msg/s")
        for workers, metric in metrics.items():
            metric.baseline_rounds.append(baseline)
            if not available:
                continue
            started = time.perf_counter()
            rate = measure_relay(bench, mode, workers, persona_keys, recipients)
            metric.rounds.append(rate)
            print_line(
                f"  round {round_index + 1}: relay x{workers} {rate:.0f} msg/s ({time.perf_counter() - started:.1f} s)"
            )
    if available and metrics and all(metric.rounds for metric in metrics.values()):
        best = max(metrics.items(), key=lambda item: sorted(item[1].rounds)[len(item[1].rounds) // 2])
        figure.details["best configuration"] = f"{best[0]} ingress process(es)"
    bench.flush()
    return figure
