"""Figure: inbound latency, SMTP final `.` to smtp_end at the gateway, at a steady rate.

One ingress process and one tunnel process share the embedded Redis; the sender and the
gateway live in one load-generator process so both timestamps come from one clock. Reported,
no baseline: the targets are absolute (p50 <= 1 ms, p99 <= 2 ms; the original relay
measured 0.93 / 1.61 ms on this machine).
"""

from __future__ import annotations

from bench.auth_rate import start_tunnel
from bench.harness import Bench, free_port, service_available
from bench.modes import Mode
from bench.report import FigureResult, Target, print_line

FIGURE = "inbound_latency"
CONNECTIONS = 10
P50_TARGET_MS = 1.0
P99_TARGET_MS = 2.0


def run(bench: Bench, mode: Mode) -> FigureResult:
    rate = mode.latency_rate_per_s
    figure = FigureResult(
        FIGURE,
        "Inbound latency",
        f"10 KB messages at a steady {rate:g} msg/s over {CONNECTIONS} SMTP sessions for "
        f"{mode.latency_seconds:g} s into one `protege-relay ingress` process; one gateway (inbound_ack) "
        "on one `protege-relay tunnel` process; latency from writing the final `.` to the gateway "
        "holding smtp_end, sender and gateway in one process (one clock).",
    )
    missing = [name for name in ("ingress", "tunnel") if not service_available(name)]
    if missing:
        figure.skipped = f"services not present yet: {', '.join(missing)}"
        return figure
    p50 = figure.metric("p50", "ms", target=Target("value_at_most", P50_TARGET_MS))
    p99 = figure.metric("p99", "ms", target=Target("value_at_most", P99_TARGET_MS))
    rounds = []
    for round_index in range(mode.rounds):
        bench.flush()
        url, _ = start_tunnel(bench, "bench-latency")
        smtp_port, http_port = free_port(), free_port()
        bench.start_service(
            "ingress",
            ready_http_port=http_port,
            RELAY_SMTP_PORT=str(smtp_port),
            RELAY_SMTP_HTTP_PORT=str(http_port),
            RELAY_NODE_ID="bench-latency-ingress",
        )
        try:
            result = bench.run_program(
                "bench.loadgen_latency",
                [
                    "--smtp-port",
                    str(smtp_port),
                    "--url",
                    url,
                    "--seconds",
                    str(mode.latency_seconds),
                    "--rate",
                    str(rate),
                    "--connections",
                    str(CONNECTIONS),
                    "--salt",
                    f"latency{round_index}",
                ],
                timeout_s=mode.latency_seconds + 60,
            )
        finally:
            bench.stop_all()
        p50.rounds.append(result["p50_ms"])
        p99.rounds.append(result["p99_ms"])
        rounds.append({key: round(value, 3) if isinstance(value, float) else value for key, value in result.items()})
        print_line(
            f"  round {round_index + 1}: p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
            f"max {result['max_ms']:.1f} ms, {result['received']}/{result['messages']} received, "
            f"{result['achieved_rate']:.0f} msg/s"
        )
    figure.details["rounds"] = rounds
    bench.flush()
    return figure
