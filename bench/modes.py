"""How long and how big each figure runs in full, quick and smoke modes.

Full mode is the issue's load (10 s windows, 25 MB, 1,000 jobs, 10,000 sockets); quick mode
keeps the same shapes at smaller sizes so `make bench QUICK=1` stays under two minutes; smoke
mode proves the harness end to end in seconds (the test suite runs it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    rounds: int
    ingress_seconds: float
    ingress_connections: int
    ingress_worker_counts: tuple[int, ...]
    latency_seconds: float
    latency_rate_per_s: float
    tunnel_message_bytes: int
    tunnel_rounds: int
    egress_messages: int
    idle_connections: int
    idle_rounds: int
    auth_seconds: float
    auth_concurrency: int
    nacl_seconds: float


_CORES = os.cpu_count() or 1
_WORKERS = tuple(sorted({1, max(2, _CORES)}))

FULL = Mode(
    name="full",
    rounds=3,
    ingress_seconds=10.0,
    ingress_connections=50,
    ingress_worker_counts=_WORKERS,
    latency_seconds=10.0,
    latency_rate_per_s=100.0,
    tunnel_message_bytes=25 * 1000 * 1000,
    tunnel_rounds=5,
    egress_messages=1000,
    idle_connections=10_000,
    idle_rounds=2,  # 10,000 handshakes per round take minutes on a busy 2-core machine
    auth_seconds=5.0,
    auth_concurrency=64,
    nacl_seconds=2.0,
)

QUICK = Mode(
    name="quick",
    rounds=2,
    ingress_seconds=3.0,
    ingress_connections=50,
    ingress_worker_counts=_WORKERS,
    latency_seconds=3.0,
    latency_rate_per_s=100.0,
    tunnel_message_bytes=25 * 1000 * 1000,
    tunnel_rounds=2,
    egress_messages=300,
    idle_connections=1000,
    idle_rounds=2,
    auth_seconds=2.0,
    auth_concurrency=64,
    nacl_seconds=1.0,
)

SMOKE = Mode(
    name="smoke",
    rounds=1,
    ingress_seconds=0.5,
    ingress_connections=10,
    ingress_worker_counts=(1,),
    latency_seconds=0.5,
    latency_rate_per_s=40.0,
    tunnel_message_bytes=1_000_000,
    tunnel_rounds=1,
    egress_messages=20,
    idle_connections=20,
    idle_rounds=1,
    auth_seconds=0.5,
    auth_concurrency=8,
    nacl_seconds=0.2,
)

MODES = {mode.name: mode for mode in (FULL, QUICK, SMOKE)}
