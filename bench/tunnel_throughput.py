"""Figure: one 25 MB inbound message through the tunnel vs a raw websockets send of the same bytes.

Relay: the message is already durable in the persona's inbox (XADD as ingress writes it); the
clock runs from the wake-up until the gateway holds smtp_end, so it covers the tunnel reading
the entry from Redis, framing it in 64 KiB chunks and the WebSocket transfer. Baseline: a bare
websockets server sending the same bytes in 64 KiB binary messages, no compression.
"""

from __future__ import annotations

from bench.auth_rate import start_tunnel
from bench.harness import Bench, free_port, service_available
from bench.modes import Mode
from bench.report import FigureResult, Target, print_line

FIGURE = "tunnel_throughput"
TARGET_RATIO = 0.7


def run(bench: Bench, mode: Mode) -> FigureResult:
    from bench.delivering import cpu_seconds  # bench.delivering imports bench.auth_rate

    size = mode.tunnel_message_bytes
    figure = FigureResult(
        FIGURE,
        "Tunnel throughput",
        f"One {size / 1e6:g} MB message to a connected gateway (the bench gateway uses the websockets "
        "client defaults, as the reference gateway). Relay: clock from the inbox wake-up (entry already "
        "XADDed) to smtp_end at the gateway. Baseline: raw websockets (uvloop, no compression) sending the "
        "same bytes in 64 KiB messages over loopback, clock from request to last byte.",
    )
    available = service_available("tunnel")
    if not available:
        figure.skipped = "services/tunnel/main.py not present yet"
    metric = figure.metric(
        f"{size / 1e6:g} MB message",
        "MB/s",
        baseline_name="raw websockets",
        target=Target("ratio_at_least", TARGET_RATIO),
    )
    baseline_port = free_port()
    bench.start_program(
        "bench.baseline_ws", ["--port", str(baseline_port), "--bytes", str(size)], ready_port=baseline_port
    )
    url = ""
    if available:
        bench.flush()
        url, tunnel = start_tunnel(bench, "bench-throughput")
    plain = figure.metric(
        f"{size / 1e6:g} MB, gateway not offering deflate",
        "MB/s",
        baseline_name="raw websockets",
        target=Target("ratio_at_least", TARGET_RATIO),
        notes="diagnostic: the same transfer when the gateway connects with compression=None",
    )
    extensions: set[str] = set()
    # The tunnel's CPU per transfer (the load generator's connect and XADD included, the same for
    # every version): steadier than MB/s, which moves with whatever else holds the two cores.
    cpu_ms: list[int] = []
    for round_index in range(max(mode.rounds, mode.tunnel_rounds)):
        raw = bench.run_program(
            "bench.loadgen_tunnel",
            ["--target", "raw", "--bytes", str(size), "--url", f"ws://127.0.0.1:{baseline_port}/"],
            120,
        )
        metric.baseline_rounds.append(raw["mb_per_s"])
        line = f"  round {round_index + 1}: baseline {raw['mb_per_s']:.0f} MB/s"
        if available:
            cpu_before = cpu_seconds(tunnel.pid)
            relay = bench.run_program(
                "bench.loadgen_tunnel",
                [
                    "--target",
                    "relay",
                    "--bytes",
                    str(size),
                    "--url",
                    url,
                    "--redis-url",
                    bench.redis_url,
                    "--salt",
                    f"throughput{round_index}",
                ],
                120,
            )
            cpu_ms.append(round((cpu_seconds(tunnel.pid) - cpu_before) * 1000))
            metric.rounds.append(relay["mb_per_s"])
            extensions.add(relay["extensions"] or "none")
            line += f", relay {relay['mb_per_s']:.0f} MB/s ({relay['frames']} frames)"
            relay_plain = bench.run_program(
                "bench.loadgen_tunnel",
                [
                    "--target",
                    "relay",
                    "--bytes",
                    str(size),
                    "--url",
                    url,
                    "--redis-url",
                    bench.redis_url,
                    "--salt",
                    f"plain{round_index}",
                    "--no-compression",
                ],
                120,
            )
            plain.rounds.append(relay_plain["mb_per_s"])
            plain.baseline_rounds.append(raw["mb_per_s"])
            line += f", relay without deflate {relay_plain['mb_per_s']:.0f} MB/s"
        print_line(line)
    if cpu_ms:
        figure.details["tunnel CPU per transfer, ms (per round)"] = cpu_ms
    if extensions:
        figure.details["WebSocket extensions negotiated by the tunnel"] = ", ".join(sorted(extensions))
    bench.flush()
    return figure
