"""Idle-tunnel load (its own process): open and authenticate `--count` gateways, then hold them.

Prints one JSON line once every gateway is authenticated (or failed), then keeps the sockets
open, answering the relay's pings, until stdin closes; then prints how many were still open, closes them and exits.

    python -m bench.loadgen_idle --url ws://127.0.0.1:8080/ws --count 5000 --salt idle0
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import WebSocketException

from bench.gateway import AuthRefused, bench_passport, open_gateway
from bench.harness import raise_fd_limit


async def run(args: argparse.Namespace) -> None:
    raise_fd_limit()
    counters: collections.Counter[str] = collections.Counter()
    connections: list[ClientConnection] = []
    pending = iter(range(args.count))
    started = time.perf_counter()
    options: dict[str, Any] = {"compression": None} if args.no_compression else {}

    async def opener() -> None:
        for index in pending:
            try:
                connection, _ = await open_gateway(args.url, bench_passport(index, args.salt), **options)
            except AuthRefused as exc:
                counters[f"refused_{exc}"] += 1
                continue
            except (OSError, WebSocketException, TimeoutError) as exc:
                counters[f"error_{type(exc).__name__}"] += 1
                continue
            except AssertionError:
                # websockets' asyncio client can fail its own `close_deadline` assertion in
                # send_context when the connection goes away during its opening handshake (seen
                # once in a full run): a failed open, counted, not the end of this client process
                counters["error_client_handshake_assertion"] += 1
                continue
            connections.append(connection)

    await asyncio.gather(*(opener() for _ in range(args.concurrency)))
    open_s = time.perf_counter() - started
    sys.stdout.write(json.dumps({"authenticated": len(connections), "seconds": open_s, "other": dict(counters)}) + "\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    still_open = sum(1 for connection in connections if connection.close_code is None)
    sys.stdout.write(json.dumps({"still_open": still_open}) + "\n")
    sys.stdout.flush()
    await asyncio.gather(*(connection.close() for connection in connections), return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--salt", default="idle")
    parser.add_argument(
        "--no-compression",
        action="store_true",
        help="do not offer permessage-deflate (diagnostic: its per-socket zlib state)",
    )
    args = parser.parse_args()
    import uvloop

    uvloop.run(run(args))


if __name__ == "__main__":
    main()
