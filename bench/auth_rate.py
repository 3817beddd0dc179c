"""Figure: authentication handshakes per second on one tunnel process vs bare WebSocket opens.

The load comes from separate client processes, each with many concurrent gateways doing the
full PROTOCOL.md A3 handshake (WebSocket upgrade, challenge, signed response, auth_ok, close)
with a different persona key each time. The baseline is the same clients only opening and
closing a WebSocket on a bare websockets server (uvloop, no auth, no Redis) in the same round:
the most any Python tunnel could reach here. PyNaCl verifications/s stay as a diagnostic row
(no Python WebSocket server comes near it).
"""

from __future__ import annotations

from bench.harness import Bench, Child, free_port, service_available
from bench.modes import Mode
from bench.report import FigureResult, Target, print_line

FIGURE = "auth_rate"
TARGET_RATIO = 0.6
CLIENT_PROCESSES = 2


def start_tunnel(bench: Bench, node_id: str = "bench-tunnel") -> tuple[str, Child]:
    port = free_port()
    child = bench.start_service("tunnel", port=port, ready_http_port=port, RELAY_PORT=str(port), RELAY_NODE_ID=node_id)
    return f"ws://127.0.0.1:{port}/ws", child


def run(bench: Bench, mode: Mode) -> FigureResult:
    from bench.delivering import cpu_seconds  # bench.delivering imports start_tunnel from here

    figure = FigureResult(
        FIGURE,
        "Auth rate",
        f"{CLIENT_PROCESSES} client processes x {mode.auth_concurrency // CLIENT_PROCESSES} concurrent "
        "gateways, each looping connect / challenge / signed response / auth_ok / close with a new "
        f"persona key, against one `protege-relay tunnel` process, {mode.auth_seconds:g} s window. "
        "Baseline: the same clients opening and closing a WebSocket on a bare websockets server "
        "(uvloop, no auth, no Redis), same round.",
    )
    available = service_available("tunnel")
    if not available:
        figure.skipped = "services/tunnel/main.py not present yet"
    metric = figure.metric(
        "handshakes",
        "auth/s",
        baseline_name="bare websockets open+close/s",
        target=Target("ratio_at_least", TARGET_RATIO),
    )
    nacl = figure.metric(
        "PyNaCl verify/s, one process",
        "verify/s",
        notes="diagnostic: signature verifications per second alone (the original baseline)",
    )
    ws_port = free_port()
    bare = bench.start_program("bench.baseline_ws", ["--port", str(ws_port), "--bytes", "1"], ready_port=ws_port)
    other: dict[str, int] = {}
    # CPU per handshake of the tunnel and per open+close of the bare server: steadier than the
    # rates on a shared machine (a busy core slows both sides of a rate, not the CPU spent).
    cpu_us: list[int] = []
    bare_cpu_us: list[int] = []
    for round_index in range(mode.rounds):
        baseline = bench.run_program("bench.baseline_nacl", ["--seconds", str(mode.nacl_seconds)], 60)
        nacl.rounds.append(baseline["rate"])
        print_line(f"  round {round_index + 1}: baseline {baseline['rate']:.0f} verify/s")
        bare_cpu_before = cpu_seconds(bare.pid)
        raw = bench.run_parallel(
            [
                (
                    "bench.loadgen_auth",
                    [
                        "--url",
                        f"ws://127.0.0.1:{ws_port}/",
                        "--raw",
                        "--seconds",
                        str(mode.auth_seconds),
                        "--concurrency",
                        str(max(1, mode.auth_concurrency // CLIENT_PROCESSES)),
                    ],
                )
                for _ in range(CLIENT_PROCESSES)
            ],
            timeout_s=mode.auth_seconds + 90,
        )
        raw_rate = sum(result["rate"] for result in raw)
        opened = round(raw_rate * mode.auth_seconds)
        if opened:
            bare_cpu_us.append(round((cpu_seconds(bare.pid) - bare_cpu_before) / opened * 1e6))
        metric.baseline_rounds.append(raw_rate)
        print_line(f"  round {round_index + 1}: bare websockets {raw_rate:.0f} open+close/s")
        if not available:
            continue
        bench.flush()
        url, tunnel = start_tunnel(bench)
        cpu_before = cpu_seconds(tunnel.pid)
        per_process = max(1, mode.auth_concurrency // CLIENT_PROCESSES)
        results = bench.run_parallel(
            [
                (
                    "bench.loadgen_auth",
                    [
                        "--url",
                        url,
                        "--seconds",
                        str(mode.auth_seconds),
                        "--concurrency",
                        str(per_process),
                        "--keys",
                        "1000",
                        "--salt",
                        f"auth{index}",
                    ],
                )
                for index in range(CLIENT_PROCESSES)
            ],
            timeout_s=mode.auth_seconds + 90,
        )
        tunnel_cpu_s = cpu_seconds(tunnel.pid) - cpu_before
        bench.stop(tunnel)
        rate = sum(result["rate"] for result in results)
        handshakes = sum(result["auth_ok"] for result in results)
        if handshakes:
            cpu_us.append(round(tunnel_cpu_s / handshakes * 1e6))
        for result in results:
            for key, value in result["other"].items():
                other[key] = other.get(key, 0) + value
        metric.rounds.append(rate)
        print_line(f"  round {round_index + 1}: relay {rate:.0f} auth/s {results[0]['other'] or ''}")
    if other:
        figure.details["client errors/refusals"] = other
    if cpu_us:
        figure.details["tunnel CPU per handshake, us (per round)"] = cpu_us
    if bare_cpu_us:
        figure.details["bare websockets server CPU per open+close, us (per round)"] = bare_cpu_us
    bench.flush()
    return figure
