"""Auth-rate load (its own process): concurrent full handshakes against one tunnel, fixed window.

Each of `--concurrency` tasks loops: open a WebSocket, ask for a challenge, sign it, wait for
`auth_ok`, close — every time with the next of `--keys` persona keys. Handshakes whose auth_ok
arrives inside the window count. Prints one JSON line.

    python -m bench.loadgen_auth --url ws://127.0.0.1:8080/ws --seconds 5 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from bench.gateway import AuthRefused, bench_passport, open_gateway

WARMUP_S = 0.3


async def run(args: argparse.Namespace) -> dict[str, object]:
    passports = [bench_passport(i, args.salt) for i in range(args.keys)]
    next_passport = itertools.cycle(passports)
    counters: collections.Counter[str] = collections.Counter()
    started = time.perf_counter()
    window_start = started + WARMUP_S
    window_end = window_start + args.seconds

    async def client() -> None:
        while time.perf_counter() < window_end:
            passport = next(next_passport)
            try:
                if args.raw:
                    connection = await connect(args.url, open_timeout=30)
                else:
                    connection, _ = await open_gateway(args.url, passport)
            except AuthRefused as exc:
                counters[f"refused_{exc}"] += 1
                continue
            except (OSError, WebSocketException, TimeoutError) as exc:
                counters[f"error_{type(exc).__name__}"] += 1
                await asyncio.sleep(0.01)
                continue
            finished = time.perf_counter()
            if window_start <= finished <= window_end:
                counters["auth_ok"] += 1
            await connection.close()

    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    accepted = counters.pop("auth_ok", 0)
    return {
        "auth_ok": accepted,
        "seconds": args.seconds,
        "rate": accepted / args.seconds,
        "concurrency": args.concurrency,
        "other": dict(counters),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument(
        "--raw", action="store_true", help="only open and close a WebSocket (a bare websockets server's ceiling)"
    )
    parser.add_argument("--salt", default="auth", help="key family; differ per process so keys never collide")
    args = parser.parse_args()
    import uvloop

    sys.stdout.write(json.dumps(uvloop.run(run(args))) + "\n")


if __name__ == "__main__":
    main()
