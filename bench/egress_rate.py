"""Figure: egress delivery rate, relay (arq worker, 4 jobs) vs a plain aiosmtplib loop (4 tasks).

Both send the same 10 KB one-recipient messages to the same loopback sink (the bare aiosmtpd
server). The relay side enqueues `deliver` jobs exactly as the tunnel does and stops the clock
when every result is in the persona's results stream.
"""

from __future__ import annotations

import json

from bench.delivering import cpu_seconds
from bench.harness import Bench, BenchError, free_port, service_available
from bench.modes import Mode
from bench.report import FigureResult, Target, print_line

FIGURE = "egress_rate"
CONCURRENCY = 4
DOMAIN = "bench.test"
TARGET_RATIO = 0.9
US_PER_S = 1e6


def run(bench: Bench, mode: Mode) -> FigureResult:
    count = mode.egress_messages
    figure = FigureResult(
        FIGURE,
        "Egress rate",
        f"{count} one-recipient 10 KB messages to a loopback aiosmtpd sink, {CONCURRENCY} at a time. Relay: "
        f"`protege-relay egress` with RELAY_EGRESS_MAX_JOBS={CONCURRENCY} and a route to the sink, jobs "
        "enqueued as the tunnel does, clock stops when every result is in the results stream. Baseline: "
        f"{CONCURRENCY} tasks calling aiosmtplib.send (uvloop, as the service) against the same sink. "
        "CPU per message (/proc utime+stime, diagnostic): the egress process and redis-server vs the "
        "baseline's own process; the details split it per process, the sink's share included.",
    )
    available = service_available("egress")
    if not available:
        figure.skipped = "services/egress/main.py not present yet"
    metric = figure.metric(
        f"{CONCURRENCY} workers",
        "msg/s",
        baseline_name="aiosmtplib loop",
        target=Target("ratio_at_least", TARGET_RATIO),
    )
    cpu_metric = figure.metric(
        "CPU per message, egress + Redis (diagnostic)", "us/msg", baseline_name="aiosmtplib loop process"
    )
    parts: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> float:
        us = seconds / count * US_PER_S
        parts.setdefault(name, []).append(round(us))
        return us

    redis_process = bench.redis_server.process
    assert redis_process is not None
    sink_port = free_port()
    sink = bench.start_program("bench.baseline_smtp", ["--port", str(sink_port)], ready_port=sink_port)
    for round_index in range(mode.rounds):
        sink_before = cpu_seconds(sink.pid)
        baseline = bench.run_program(
            "bench.baseline_egress",
            ["--port", str(sink_port), "--count", str(count), "--concurrency", str(CONCURRENCY), "--domain", DOMAIN],
            timeout_s=120,
        )
        metric.baseline_rounds.append(baseline["rate"])
        cpu_metric.baseline_rounds.append(record("baseline: aiosmtplib loop", baseline["cpu_seconds"]))
        record("baseline: sink", cpu_seconds(sink.pid) - sink_before)
        print_line(f"  round {round_index + 1}: baseline {baseline['rate']:.0f} msg/s")
        if not available:
            continue
        bench.flush()
        http_port = free_port()
        worker = bench.start_service(
            "egress",
            ready_http_port=http_port,
            RELAY_EGRESS_HTTP_PORT=str(http_port),
            RELAY_EGRESS_MAX_JOBS=str(CONCURRENCY),
            RELAY_EGRESS_ROUTES=json.dumps({DOMAIN: f"127.0.0.1:{sink_port}"}),
            RELAY_NODE_ID="bench-egress",
        )
        before = [cpu_seconds(pid) for pid in (worker.pid, redis_process.pid, sink.pid)]
        try:
            relay = bench.run_program(
                "bench.loadgen_egress",
                ["--redis-url", bench.redis_url, "--count", str(count), "--domain", DOMAIN],
                timeout_s=180,
            )
            egress_s, redis_s, sink_s = (
                cpu_seconds(pid) - start
                for pid, start in zip((worker.pid, redis_process.pid, sink.pid), before, strict=True)
            )
        finally:
            bench.stop(worker)
        if relay["failed"]:
            raise BenchError(f"{relay['failed']} of {count} deliveries failed; see {worker.log_path}")
        metric.rounds.append(relay["rate"])
        cpu_metric.rounds.append(record("relay: egress", egress_s) + record("relay: redis-server", redis_s))
        record("relay: sink", sink_s)
        record("relay: load generator (enqueue + result polling)", relay["cpu_seconds"])
        print_line(
            f"  round {round_index + 1}: relay {relay['rate']:.0f} msg/s "
            f"(enqueue took {relay['enqueue_seconds']:.2f} s)"
        )
    figure.details["us per message by process (per round)"] = parts
    bench.flush()
    return figure
