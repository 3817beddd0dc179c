"""Tunnel-throughput client (its own process): one big message, relay path or raw baseline.

`--target relay`: authenticate a gateway (inbound_ack), XADD one inbox entry of `--bytes` as
ingress does, then start the clock and wake the owner; stop it when smtp_end of that stream
arrives and check every byte arrived. `--target raw`: connect to `bench.baseline_ws`, start the
clock, ask for the same bytes, stop at `done`. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from bench.gateway import (
    INBOUND_ACK,
    MAX_MESSAGE_BYTES,
    ack_message,
    bench_passport,
    negotiated_extensions,
    open_gateway,
)
from bench.smtp_client import make_message
from shared import inbox_entries, keys
from shared.identity import persona_address
from shared.payloads import InboxEntry
from shared.protocol import FrameType, decode_frame
from shared.wakeup import WakeupKind, wake_owner


async def run_relay(args: argparse.Namespace) -> dict[str, object]:
    passport = bench_passport(0, args.salt)
    persona_key = passport.persona_key
    message = make_message(args.bytes)
    options: dict[str, Any] = {"compression": None} if args.no_compression else {}
    connection, _ = await open_gateway(args.url, passport, [INBOUND_ACK], **options)
    redis = aioredis.Redis.from_url(args.redis_url)
    try:
        queue_id = f"qbench{time.time_ns()}"
        entry = InboxEntry(
            queue_id,
            0,
            "bench@sender.bench",
            persona_address(persona_key, "relay.bench"),
            message,
            int(time.time() * 1000),
            "127.0.0.1",
        )
        # Stored as the enqueue script stores it (a large body apart, streamed by the tunnel),
        # without its wake-up: the clock starts at ours.
        packed, body = inbox_entries.stored_form(entry)
        fields = {inbox_entries.ENTRY_FIELD: packed}
        async with redis.pipeline(transaction=True) as pipe:
            if body:
                pipe.set(keys.inbox_body(persona_key, entry.stream_id), body)
                fields[inbox_entries.BODY_SIZE_FIELD] = str(len(body)).encode()
            pipe.xadd(keys.inbox(persona_key), fields)
            pipe.incrby(keys.inbox_bytes(persona_key), len(message))
            await pipe.execute()
        started = time.perf_counter()
        await wake_owner(redis, persona_key, WakeupKind.INBOX)
        received = 0
        frames = 0
        while True:
            raw = await connection.recv()
            if isinstance(raw, str):
                continue
            frame = decode_frame(raw)
            if frame.stream_id != entry.stream_id:
                continue
            frames += 1
            if frame.frame_type is FrameType.SMTP_CHUNK:
                received += len(frame.body)
            elif frame.frame_type is FrameType.SMTP_END:
                break
        elapsed_s = time.perf_counter() - started
        await connection.send(ack_message(entry.stream_id))
        extensions = negotiated_extensions(connection)
    finally:
        await connection.close()
        await redis.aclose()
    if received != len(message):
        return {"error": f"received {received} of {len(message)} bytes"}
    return {
        "bytes": received,
        "frames": frames,
        "seconds": elapsed_s,
        "mb_per_s": received / elapsed_s / 1e6,
        "extensions": extensions,
    }


async def run_raw(args: argparse.Namespace) -> dict[str, object]:
    async with connect(args.url, compression=None, max_size=MAX_MESSAGE_BYTES) as connection:
        started = time.perf_counter()
        await connection.send(f"send {args.bytes}")
        received = 0
        while True:
            raw = await connection.recv()
            if isinstance(raw, str):
                break
            received += len(raw)
        elapsed_s = time.perf_counter() - started
    if received != args.bytes:
        return {"error": f"received {received} of {args.bytes} bytes"}
    return {"bytes": received, "seconds": elapsed_s, "mb_per_s": received / elapsed_s / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=("relay", "raw"), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--bytes", type=int, default=25_000_000)
    parser.add_argument("--salt", default="throughput")
    parser.add_argument("--no-compression", action="store_true", help="gateway does not offer permessage-deflate")
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(run_relay(args) if args.target == "relay" else run_raw(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
