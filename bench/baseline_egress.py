"""Egress baseline (its own process): a plain aiosmtplib send loop, same concurrency, same sink.

`--concurrency` tasks share `--count` messages; each message is one `aiosmtplib.send` (its own
connection, EHLO, MAIL, RCPT, DATA, QUIT), as an egress worker does per job. Prints one JSON line
(rate, and this process's CPU seconds over the timed part).

    python -m bench.baseline_egress --port 2525 --count 1000 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time

import aiosmtplib

from bench.smtp_client import make_message


async def run(args: argparse.Namespace) -> dict[str, object]:
    message = make_message(args.size, {"From": "persona@relay.bench", "To": f"someone@{args.domain}"})
    numbers = itertools.count()
    sent = 0

    async def sender() -> None:
        nonlocal sent
        while (index := next(numbers)) < args.count:
            await aiosmtplib.send(
                message,
                sender="persona@relay.bench",
                recipients=[f"rcpt{index}@{args.domain}"],
                hostname="127.0.0.1",
                port=args.port,
                start_tls=False,
            )
            sent += 1

    await aiosmtplib.send(
        message,
        sender="persona@relay.bench",
        recipients=[f"warmup@{args.domain}"],
        hostname="127.0.0.1",
        port=args.port,
        start_tls=False,
    )
    started = time.perf_counter()
    cpu_started = time.process_time()
    await asyncio.gather(*(sender() for _ in range(args.concurrency)))
    elapsed_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    return {
        "count": args.count,
        "sent": sent,
        "seconds": elapsed_s,
        "rate": args.count / elapsed_s,
        "cpu_seconds": cpu_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--domain", default="bench.test")
    parser.add_argument("--size", type=int, default=10 * 1024)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(run(args))
    else:
        result = asyncio.run(run(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
