"""Figure: memory per idle authenticated tunnel (RSS growth of one tunnel process / connections).

Client processes open and authenticate the gateways (different keys, default websockets client
settings as the reference gateway), then hold them; the tunnel's VmRSS is read before (after
one warm-up handshake) and once all are connected and RSS has settled.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import REPO_ROOT, Bench, BenchError, raise_fd_limit, rss_kib, service_available
from bench.modes import Mode
from bench.report import FigureResult, Target, print_line

FIGURE = "idle_tunnels"
TARGET_KB_PER_CONNECTION = 30.0
CONNECTIONS_PER_CLIENT = 5000
SETTLE_TIMEOUT_S = 10.0
SETTLE_STEP_S = 0.5


def settled_rss_kib(pid: int) -> int:
    """RSS once two reads half a second apart agree within 1% (allocations have caught up)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    previous = rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(SETTLE_STEP_S)
        current = rss_kib(pid)
        if abs(current - previous) <= previous * 0.01:
            return current
        previous = current
    return previous


@dataclass
class IdleClient:
    """One client process and the file its stderr goes to, so a client that dies says why."""

    process: subprocess.Popen[bytes]
    stderr_path: Path

    def said(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-1500:] if self.stderr_path.exists() else ""


def open_clients(bench: Bench, url: str, count: int, salt: str, *extra: str) -> list[IdleClient]:
    clients = []
    remaining, index = count, 0
    while remaining > 0:
        share = min(CONNECTIONS_PER_CLIENT, remaining)
        stderr_path = bench.work_dir / f"idle-client-{salt}-{index}.stderr"
        with stderr_path.open("wb") as stderr_file:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.loadgen_idle",
                    "--url",
                    url,
                    "--count",
                    str(share),
                    "--salt",
                    f"{salt}-{index}",
                    *extra,
                ],
                env=bench.env(),
                cwd=REPO_ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr_file,
                preexec_fn=raise_fd_limit,
            )
        clients.append(IdleClient(process, stderr_path))
        remaining -= share
        index += 1
    return clients


def read_json_line(client: IdleClient) -> dict[str, object]:
    assert client.process.stdout is not None
    line = client.process.stdout.readline()
    if not line:
        raise BenchError(f"idle client exited with {client.process.wait()} before reporting:\n{client.said()}")
    result: dict[str, object] = json.loads(line)
    return result


def measure(bench: Bench, count: int, round_index: int) -> tuple[float, dict[str, object]]:
    from bench.auth_rate import start_tunnel

    bench.flush()
    url, tunnel = start_tunnel(bench, "bench-idle")
    tunnel_pid = tunnel.pid
    warmup = open_clients(bench, url, 1, f"warm{round_index}")
    read_json_line(warmup[0])
    warmup[0].process.communicate(b"", timeout=30)
    before = settled_rss_kib(tunnel_pid)
    started = time.perf_counter()
    clients = open_clients(bench, url, count, f"idle{round_index}")
    try:
        reports = [read_json_line(client) for client in clients]
        open_s = time.perf_counter() - started
        after = settled_rss_kib(tunnel_pid)
        authenticated = sum(int(report["authenticated"]) for report in reports)  # type: ignore[call-overload]
        for client in clients:
            assert client.process.stdin is not None
            client.process.stdin.close()
        still_open = sum(int(read_json_line(client)["still_open"]) for client in clients)  # type: ignore[call-overload]
    finally:
        for client in clients:
            try:
                client.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                client.process.kill()
                client.process.wait()
        bench.stop_all()
    if authenticated == 0:
        raise BenchError(f"no gateway authenticated: {reports}")
    errors: dict[str, int] = {}
    for report in reports:
        for key, value in report["other"].items():  # type: ignore[attr-defined]
            errors[key] = errors.get(key, 0) + value
    details = {
        "authenticated": authenticated,
        "still_open_at_end": still_open,
        "open_seconds": round(open_s, 1),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "errors": errors,
    }
    return (after - before) / authenticated, details


def run(bench: Bench, mode: Mode) -> FigureResult:
    count = mode.idle_connections
    figure = FigureResult(
        FIGURE,
        "Idle tunnels",
        f"{count} authenticated idle gateways on one `protege-relay tunnel` process (clients in "
        f"processes of up to {CONNECTIONS_PER_CLIENT}); tunnel VmRSS growth divided by connections.",
    )
    if not service_available("tunnel"):
        figure.skipped = "services/tunnel/main.py not present yet"
        return figure
    metric = figure.metric(
        f"RSS per connection at {count}", "KB", target=Target("value_at_most", TARGET_KB_PER_CONNECTION)
    )
    rounds = []
    for round_index in range(mode.idle_rounds):
        per_connection_kib, details = measure(bench, count, round_index)
        # KiB from /proc reported as KB (x1.024) to compare with the "30 KB".
        metric.rounds.append(per_connection_kib * 1.024)
        rounds.append(details)
        print_line(f"  round {round_index + 1}: {per_connection_kib * 1.024:.1f} KB/connection {details}")
    figure.details["rounds"] = rounds
    bench.flush()
    return figure
