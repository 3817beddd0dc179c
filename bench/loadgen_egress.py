"""Egress load (its own process): enqueue `deliver` jobs exactly as the tunnel does, time the results.

The jobs are written by the tunnel's own code (`services.tunnel.outbound.OutboundQueue.enqueue`:
arq's job layout in one script, one round trip), not by arq's `enqueue_job` (WATCH, then
MULTI/EXEC: two round trips), so the figure charges Redis what the relay really spends.

One warm-up job first (its result proves the worker is consuming), then `--count` jobs, each
one recipient at `--domain`; the clock runs from the first enqueue until `--count` more
results are in the persona's results stream. Prints one JSON line (rate, and this process's CPU
seconds over the timed part: the enqueueing and the result polling).

    python -m bench.loadgen_egress --redis-url redis://... --count 1000 --domain bench.test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid

import redis.asyncio as aioredis

from bench.gateway import bench_passport
from bench.smtp_client import make_message
from services.tunnel.outbound import OutboundQueue
from shared import keys
from shared.identity import persona_address
from shared.payloads import DeliveryResult, OutboundJob

POLL_INTERVAL_S = 0.005
RESULT_TIMEOUT_S = 120.0


async def enqueue(queue: OutboundQueue, persona_key: str, mail_from: str, rcpt_to: str, message: bytes) -> None:
    stream_id = str(uuid.uuid4())
    job = OutboundJob(persona_key, stream_id, mail_from, [rcpt_to], message, int(time.time() * 1000))
    if not await queue.enqueue(job):
        raise RuntimeError("the job was refused (duplicate id)")


async def wait_for_results(redis: aioredis.Redis, persona_key: str, count: int) -> None:
    deadline = time.perf_counter() + RESULT_TIMEOUT_S
    while await redis.xlen(keys.results(persona_key)) < count:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"fewer than {count} results after {RESULT_TIMEOUT_S}s")
        await asyncio.sleep(POLL_INTERVAL_S)


async def run(args: argparse.Namespace) -> dict[str, object]:
    persona_key = bench_passport(0, "egress").persona_key
    mail_from = persona_address(persona_key, "relay.bench")
    message = make_message(args.size, {"From": mail_from, "To": f"someone@{args.domain}"})
    redis = aioredis.Redis.from_url(args.redis_url)
    queue = OutboundQueue(redis, messages_per_minute=0, origin_ttl_s=0)  # only `enqueue` is used
    try:
        await redis.delete(keys.results(persona_key))
        await enqueue(queue, persona_key, mail_from, f"warmup@{args.domain}", message)
        await wait_for_results(redis, persona_key, 1)
        started = time.perf_counter()
        cpu_started = time.process_time()
        for index in range(args.count):
            await enqueue(queue, persona_key, mail_from, f"rcpt{index}@{args.domain}", message)
        enqueued_s = time.perf_counter() - started
        await wait_for_results(redis, persona_key, args.count + 1)
        elapsed_s = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
        entries = await redis.xrange(keys.results(persona_key))
        statuses = [DeliveryResult.unpack(fields[b"r"]).status for _, fields in entries]
    finally:
        await redis.aclose()
    sent = statuses.count("sent")
    return {
        "count": args.count,
        "sent": sent,
        "failed": len(statuses) - sent,
        "seconds": elapsed_s,
        "enqueue_seconds": enqueued_s,
        "rate": args.count / elapsed_s,
        "cpu_seconds": cpu_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--domain", default="bench.test")
    parser.add_argument("--size", type=int, default=10 * 1024)
    args = parser.parse_args()
    import uvloop

    sys.stdout.write(json.dumps(uvloop.run(run(args))) + "\n")


if __name__ == "__main__":
    main()
