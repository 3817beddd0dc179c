"""SMTP load generator (its own process): N sessions, one command at a time, fixed window.

Every session sends MAIL / RCPT / DATA / message / `.` and waits for each reply before the
next command, over and over, for `--seconds`. Only `250` replies to the final dot that arrive
inside the window count. Prints one JSON line: accepted, rate, refusals by code.

    python -m bench.loadgen_smtp --port 2526 --connections 50 --seconds 10 --size 10240 \
        --recipients pk1@relay.bench,pk2@relay.bench
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time

from bench.smtp_client import SmtpConnection, SmtpReplyError, make_message

CONNECT_TIMEOUT_S = 15.0
SEQ_PLACEHOLDER = b"0" * 9


async def session(
    index: int,
    args: argparse.Namespace,
    recipients: list[str],
    template: bytes,
    go: asyncio.Event,
    window: list[float],
    counters: collections.Counter[str],
) -> None:
    connection = await asyncio.wait_for(SmtpConnection.open("127.0.0.1", args.port), CONNECT_TIMEOUT_S)
    counters["connected"] += 1
    await go.wait()
    end = window[1]
    rcpt_to = recipients[index % len(recipients)]
    try:
        while time.perf_counter() < end:
            try:
                counters["sequence"] += 1
                await connection.start_message(args.mail_from, rcpt_to)
                # Every message distinct: the ingress stores a byte-identical retry only once.
                connection.write_message(template.replace(SEQ_PLACEHOLDER, b"%09d" % counters["sequence"], 1))
                await connection.end_reply()
            except SmtpReplyError as exc:
                counters[f"refused_{exc.code}"] += 1
                await connection.command("RSET", 250)
                continue
            if time.perf_counter() <= end:
                counters["accepted"] += 1
    except (ConnectionError, OSError) as exc:
        counters[f"connection_error_{type(exc).__name__}"] += 1
        return
    await connection.quit()


async def run(args: argparse.Namespace) -> dict[str, object]:
    recipients = [r for r in args.recipients.split(",") if r]
    message = make_message(args.size, {"X-Bench-Seq": SEQ_PLACEHOLDER.decode()})
    counters: collections.Counter[str] = collections.Counter()
    go = asyncio.Event()
    window = [0.0, 0.0]
    tasks = [
        asyncio.create_task(session(i, args, recipients, message, go, window, counters))
        for i in range(args.connections)
    ]
    deadline = time.perf_counter() + CONNECT_TIMEOUT_S
    while counters["connected"] < args.connections and time.perf_counter() < deadline:
        if any(task.done() for task in tasks):
            break
        await asyncio.sleep(0.01)
    failed = [task.exception() for task in tasks if task.done() and task.exception()]
    if failed:
        for task in tasks:
            task.cancel()
        return {"error": f"connect failed: {failed[0]!r}"}
    window[0] = time.perf_counter()
    window[1] = window[0] + args.seconds
    window_end_unix = time.time() + args.seconds
    go.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    accepted = counters.pop("accepted", 0)
    counters.pop("connected", None)
    counters.pop("sequence", None)
    return {
        "accepted": accepted,
        "seconds": args.seconds,
        "rate": accepted / args.seconds,
        "connections": args.connections,
        "message_bytes": len(message),
        "window_end_unix": window_end_unix,
        "other": dict(counters),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=10 * 1024)
    parser.add_argument("--recipients", required=True, help="comma-separated RCPT addresses")
    parser.add_argument("--mail-from", default="bench@sender.bench")
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
