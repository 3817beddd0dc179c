"""Queue inbound mail the way the ingress does, through `shared.enqueue` (the one script that
writes inboxes), without an SMTP session: for tunnel tests that need many or large entries."""

from __future__ import annotations

import os

import redis.asyncio as aioredis

from shared import enqueue
from shared.enqueue import Delivery
from shared.payloads import InboxEntry


async def queue_message(
    redis_url: str,
    persona_key: str,
    data: bytes,
    *,
    domain: str = "relay.test",
    mail_from: str = "sender@example.org",
    digest: str | None = None,
) -> InboxEntry:
    """Enqueue one message for one persona; the entry as written (its body in `data`)."""
    entry = InboxEntry(
        queue_id=enqueue.new_queue_id(),
        recipient_index=0,
        mail_from=mail_from,
        rcpt_to=f"{persona_key}@{domain}",
        data=data,
        received_at_ms=1,
        client_ip="192.0.2.1",
    )
    client = aioredis.Redis.from_url(redis_url)
    try:
        enqueued = await enqueue.enqueue(
            client,
            digest or os.urandom(32).hex(),
            entry.queue_id,
            lambda queue_id: [Delivery(persona_key, entry)],
        )
    finally:
        await client.aclose()
    assert enqueued.entries_written == 1
    return entry
