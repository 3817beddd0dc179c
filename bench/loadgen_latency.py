"""Inbound latency probe (its own process): SMTP sender and gateway on one clock.

A gateway authenticates (inbound_ack) and reads frames; 10 SMTP sessions send 10 KB messages
at a steady total rate, each carrying `X-Bench-Seq: <n>`. Latency of message n is from just
before writing its final `.` to the gateway receiving its smtp_end (`time.perf_counter_ns`
in both places). Prints one JSON line with p50/p99 in milliseconds.

    python -m bench.loadgen_latency --smtp-port 2526 --url ws://127.0.0.1:8080/ws --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import re
import sys
import time

from bench.gateway import INBOUND_ACK, ack_message, bench_passport, open_gateway
from bench.smtp_client import SmtpConnection, SmtpReplyError, make_message
from shared.identity import persona_address
from shared.protocol import FrameType, decode_frame

SEQ_HEADER = re.compile(rb"X-Bench-Seq: (\d+)\r\n")
DRAIN_TIMEOUT_S = 10.0
NS_PER_MS = 1e6


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


async def run(args: argparse.Namespace) -> dict[str, object]:
    passport = bench_passport(0, args.salt)
    rcpt_to = persona_address(passport.persona_key, "relay.bench")
    connection, _ = await open_gateway(args.url, passport, [INBOUND_ACK])
    sent_ns: dict[int, int] = {}
    latencies_ms: dict[int, float] = {}
    counters: collections.Counter[str] = collections.Counter()
    all_received = asyncio.Event()
    total = int(args.seconds * args.rate)
    template = make_message(args.size, {"X-Bench-Seq": "0" * 9})

    async def gateway() -> None:
        seq_of_stream: dict[str, int] = {}
        async for raw in connection:
            if isinstance(raw, str):
                continue
            frame = decode_frame(raw)
            if frame.frame_type is FrameType.SMTP_CHUNK and frame.stream_id not in seq_of_stream:
                found = SEQ_HEADER.search(frame.body)
                if found:
                    seq_of_stream[frame.stream_id] = int(found.group(1))
            elif frame.frame_type is FrameType.SMTP_END:
                arrived_ns = time.perf_counter_ns()
                seq = seq_of_stream.pop(frame.stream_id, None)
                if seq is not None and seq in sent_ns:
                    latencies_ms[seq] = (arrived_ns - sent_ns[seq]) / NS_PER_MS
                await connection.send(ack_message(frame.stream_id))
                if len(latencies_ms) >= counters["accepted"] and counters["sending_done"]:
                    all_received.set()

    async def sender(index: int, start_s: float) -> None:
        smtp = await SmtpConnection.open("127.0.0.1", args.smtp_port)
        for seq in range(index, total, args.connections):
            delay_s = start_s + seq / args.rate - time.perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            message = template.replace(b"X-Bench-Seq: 000000000", f"X-Bench-Seq: {seq:09d}".encode(), 1)
            try:
                await smtp.start_message("bench@sender.bench", rcpt_to)
                sent_ns[seq] = time.perf_counter_ns()
                smtp.write_message(message)
                await smtp.end_reply()
                counters["accepted"] += 1
            except SmtpReplyError as exc:
                sent_ns.pop(seq, None)
                counters[f"refused_{exc.code}"] += 1
                await smtp.command("RSET", 250)
        await smtp.quit()

    reader = asyncio.create_task(gateway())
    start_s = time.perf_counter() + 0.05
    await asyncio.gather(*(sender(i, start_s) for i in range(args.connections)))
    send_s = time.perf_counter() - start_s
    counters["sending_done"] = 1
    if len(latencies_ms) < counters["accepted"]:
        try:
            await asyncio.wait_for(all_received.wait(), DRAIN_TIMEOUT_S)
        except TimeoutError:
            pass
    reader.cancel()
    await connection.close()
    values = sorted(latencies_ms.values())
    if not values:
        return {"error": f"no smtp_end received: {dict(counters)}"}
    accepted = counters.pop("accepted")
    counters.pop("sending_done")
    return {
        "messages": accepted,
        "received": len(values),
        "lost": accepted - len(values),
        "achieved_rate": accepted / send_s,
        "p50_ms": percentile(values, 0.50),
        "p99_ms": percentile(values, 0.99),
        "max_ms": values[-1],
        "mean_ms": sum(values) / len(values),
        "other": dict(counters),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second, all sessions")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--size", type=int, default=10 * 1024)
    parser.add_argument("--salt", default="latency")
    args = parser.parse_args()
    import uvloop

    sys.stdout.write(json.dumps(uvloop.run(run(args))) + "\n")


if __name__ == "__main__":
    main()
