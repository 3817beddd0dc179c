"""The bare aiosmtpd server: the ingress-rate baseline and the egress figure's MX sink.

One process, the default asyncio event loop, a handler that answers `250 OK` and discards
the message — the cheapest SMTP server aiosmtpd can be. Runs until SIGTERM.

    python -m bench.baseline_smtp --port 2525
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class DiscardHandler:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


async def serve(port: int, reuse_port: bool = False) -> None:
    handler = DiscardHandler()
    loop = asyncio.get_running_loop()

    def factory() -> Any:
        # An explicit hostname: otherwise every session pays for socket.getfqdn().
        return SMTP(handler, hostname="baseline.bench", data_size_limit=64 * 1024 * 1024)

    server = await loop.create_server(factory, "127.0.0.1", port, reuse_port=reuse_port)
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="diagnostics only: the baseline is the default loop",
    )
    parser.add_argument("--reuse-port", action="store_true", help="diagnostics: several processes on one port")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.port, args.reuse_port))
    else:
        asyncio.run(serve(args.port, args.reuse_port))


if __name__ == "__main__":
    main()
