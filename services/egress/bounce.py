"""Putting a DSN (dsn.py) into the sending persona's own inbox, the way inbound mail is stored.

When: the worker asks for a `failed` notice when a stream ends failed after at least one
deferral (a first attempt that fails is answered to the gateway inside its ~20 s window, so it
gets no bounce), and for a `delayed` notice when a stream is still deferred after
`egress.delayWarningSeconds`. Recipients that were delivered are not in the notice.

How: through `shared.enqueue`, the one inbox write the ingress uses, so a DSN is counted in the
inbox bytes, wakes the owning tunnel node and reaches the gateway like any message (stream id
`<queue id>.0`, null sender as RFC 5321 4.5.5 asks for notifications). Idempotent: a job runs
at least once, so the enqueue digest and the queue id are both derived from the outbound job
(persona and stream id) and the kind of notice. A re-run finds the accepted marker and writes
nothing; should the marker have expired, the same stream id lets the gateway drop the copy.

A DSN is written before the job's result is published: a crash between the two re-runs the job,
which notices the bounce was stored; the other order could lose the bounce for good.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from datetime import UTC, datetime

import redis.asyncio as aioredis

from services.egress import dsn, metrics
from services.egress.outcome import Outcome
from shared import enqueue
from shared.enqueue import Delivery
from shared.logs import get_logger, log
from shared.payloads import InboxEntry, OutboundJob

logger = get_logger(__name__)

NOTICE_RECIPIENT_INDEX = 0


class Bouncer:
    def __init__(self, redis: aioredis.Redis, *, reporting_mta: str, mail_domain: str, max_age_s: float) -> None:
        self._redis = redis
        self._reporting_mta = reporting_mta
        self._mail_domain = mail_domain
        self._max_age_s = max_age_s

    async def failed(self, job: OutboundJob, outcomes: dict[str, Outcome]) -> bool:
        """A `failed` DSN for every recipient not sent; True when this call stored it."""
        return await self._notify(dsn.Action.FAILED, job, outcomes)

    async def delayed(self, job: OutboundJob, outcomes: dict[str, Outcome]) -> bool:
        """A `delayed` DSN for the recipients still being retried; True when this call stored it."""
        open_only = {recipient: outcome for recipient, outcome in outcomes.items() if outcome.temporary}
        return await self._notify(dsn.Action.DELAYED, job, open_only)

    async def _notify(self, action: dsn.Action, job: OutboundJob, outcomes: dict[str, Outcome]) -> bool:
        recipients = [(r, outcomes[r]) for r in job.rcpt_to if r in outcomes and not outcomes[r].sent]
        persona_address = self._persona_address(job)
        ids = {"persona": job.persona_key, "stream_id": job.stream_id, "action": action.value}
        if not recipients or not persona_address:
            return False
        job_id = f"{job.persona_key}/{job.stream_id}"
        queue_id = notice_queue_id(action, job_id)
        domain = self._mail_domain or persona_address.rpartition("@")[2]
        arrival = datetime.fromtimestamp(job.enqueued_at_ms / 1000, UTC)

        def deliveries_for(chosen_queue_id: str) -> list[Delivery]:
            now = datetime.now(UTC)
            notice = dsn.Notice(
                action=action,
                reporting_mta=self._reporting_mta,
                mailer_daemon=f"MAILER-DAEMON@{domain}",
                persona_address=persona_address,
                message_id=f"<{chosen_queue_id}.dsn@{domain}>",
                stream_id=job.stream_id,
                arrival=arrival,
                now=now,
                recipients=recipients,
                original=job.data,
                retry_until=(
                    datetime.fromtimestamp(job.enqueued_at_ms / 1000 + self._max_age_s, UTC)
                    if action is dsn.Action.DELAYED
                    else None
                ),
            )
            entry = InboxEntry(
                queue_id=chosen_queue_id,
                recipient_index=NOTICE_RECIPIENT_INDEX,
                mail_from="",  # the null sender: nobody bounces a bounce
                rcpt_to=persona_address,
                data=dsn.build(notice),
                received_at_ms=int(time.time() * 1000),
                client_ip="",
            )
            return [Delivery(job.persona_key, entry)]

        digest = hashlib.sha256(f"egress-dsn:{action.value}:{job_id}".encode()).hexdigest()
        enqueued = await enqueue.enqueue(self._redis, digest, queue_id, deliveries_for)
        stored = enqueued.entries_written > 0
        metrics.DSNS.labels(action.value, "stored" if stored else "duplicate").inc()
        log(
            logger,
            logging.INFO,
            "delivery status notification stored" if stored else "delivery status notification existed already",
            **ids,
            queue_id=enqueued.queue_id,
            recipients=len(recipients),
        )
        return stored

    def _persona_address(self, job: OutboundJob) -> str:
        """The address the persona sent from (the tunnel checked it is its own), else its key at
        our first mail domain."""
        address = job.mail_from.strip().strip("<>").strip()
        if address:
            return address
        return f"{job.persona_key}@{self._mail_domain}" if self._mail_domain else ""


def notice_queue_id(action: dsn.Action, job_id: str) -> str:
    """A queue id shaped like `enqueue.new_queue_id()`'s, but the same for every run of a job."""
    seed = hashlib.sha256(f"egress-dsn-queue-id:{action.value}:{job_id}".encode()).digest()
    return "q" + base64.b32encode(seed[: enqueue.QUEUE_ID_RANDOM_BYTES]).decode("ascii").lower()
