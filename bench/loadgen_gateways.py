"""Connected gateways (their own process): N personas authenticated with inbound_ack, reading.

Each gateway reads frames and answers every smtp_end with smtp_ack, as the reference gateway
does with inbound_ack, so the tunnel deletes the entry. The process writes its counts to
`--status` (a small JSON file, replaced atomically every `STATUS_INTERVAL_S`) so the harness
can poll how many messages were delivered while other load runs; it stops on SIGTERM and
prints its final counts as one JSON line.

    python -m bench.loadgen_gateways --url ws://127.0.0.1:8080/ws --personas 10 --status s.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from bench.gateway import INBOUND_ACK, ack_message, bench_passport, open_gateway
from shared.protocol import FrameType, decode_frame

STATUS_INTERVAL_S = 0.02


class Counts:
    def __init__(self) -> None:
        self.connected = 0
        self.delivered = 0
        self.bytes = 0
        self.closed = 0

    def as_dict(self) -> dict[str, int]:
        return {"connected": self.connected, "delivered": self.delivered, "bytes": self.bytes, "closed": self.closed}


async def read_frames(connection: ClientConnection, counts: Counts) -> None:
    try:
        async for raw in connection:
            if isinstance(raw, str):
                continue
            frame = decode_frame(raw)
            if frame.frame_type is FrameType.SMTP_CHUNK:
                counts.bytes += len(frame.body)
            elif frame.frame_type is FrameType.SMTP_END:
                counts.delivered += 1
                await connection.send(ack_message(frame.stream_id))
    except ConnectionClosed:
        pass
    counts.closed += 1


def write_status(path: Path, counts: Counts) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(counts.as_dict()))
    os.replace(partial, path)


async def run(args: argparse.Namespace) -> dict[str, int]:
    counts = Counts()
    status = Path(args.status)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    connections = []
    for index in range(args.personas):
        connection, _ = await open_gateway(args.url, bench_passport(index, args.salt), [INBOUND_ACK])
        connections.append(connection)
        counts.connected += 1
    readers = [asyncio.create_task(read_frames(connection, counts)) for connection in connections]
    while not stopping.is_set():
        write_status(status, counts)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), STATUS_INTERVAL_S)
    for connection in connections:
        await connection.close()
    await asyncio.gather(*readers, return_exceptions=True)
    write_status(status, counts)
    return counts.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--personas", type=int, default=10)
    parser.add_argument("--salt", default="delivering")
    parser.add_argument("--status", required=True, help="JSON file rewritten with the counts")
    args = parser.parse_args()
    import uvloop

    sys.stdout.write(json.dumps(uvloop.run(run(args))) + "\n")


if __name__ == "__main__":
    main()
