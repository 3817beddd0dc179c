"""Tunnel-throughput baseline server (its own process): raw `websockets`, 64 KiB messages.

On a text message `send <n>` it sends n bytes of the message it was started with, as binary
messages of at most 64 KiB, then the text `done`. No compression, no framing of ours, no
Redis: the ceiling the tunnel's inbound path is compared with. Runs until SIGTERM.

    python -m bench.baseline_ws --port 8090 --bytes 25000000
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from websockets.asyncio.server import ServerConnection, serve

from bench.smtp_client import make_message
from shared.protocol import MAX_CHUNK_BYTES


async def main_async(port: int, message: bytes) -> None:
    chunks = [message[i : i + MAX_CHUNK_BYTES] for i in range(0, len(message), MAX_CHUNK_BYTES)]

    async def handle(connection: ServerConnection) -> None:
        async for request in connection:
            if isinstance(request, str) and request.startswith("send"):
                for chunk in chunks:
                    await connection.send(chunk)
                await connection.send("done")

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    async with serve(handle, "127.0.0.1", port, compression=None, max_size=None):
        await stopping.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bytes", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.run(main_async(args.port, make_message(args.bytes)))


if __name__ == "__main__":
    main()
