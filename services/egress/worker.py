"""The arq job `deliver`: one outbound stream from a gateway, delivered to the internet.

Steps: skip if a result was already published (a re-run after a crash); normalise line
endings; DKIM-sign when configured; per recipient domain resolve MX and send; remember final
per-recipient outcomes; then either publish one result or, for temporary failures, raise
`arq.Retry` with exponential backoff and full jitter until `egress.maxAttempts` tries or
`egress.maxAgeSeconds` since the tunnel accepted the message, after which the last temporary
error is published as a failed result with `permanent: false`. A stream that fails after at
least one deferral also gets a DSN in the persona's inbox (bounce.py), and one still deferred
after `egress.delayWarningSeconds` a `delayed` DSN.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dkim
import redis.asyncio as aioredis
from arq import Retry
from redis.exceptions import RedisError

from services.egress import metrics
from services.egress.bounce import Bouncer
from services.egress.delivery import Deliverer, SmtpSettings, split_recipient, tls_context
from services.egress.destinations import destination_allowed
from services.egress.mta_sts_fetch import PolicySource
from services.egress.mx import MxResolver
from services.egress.outcome import Outcome
from services.egress.prompt_worker import EndWrite, JobState
from services.egress.results import PriorState, ResultStore, prior_state_from
from services.egress.signing import DkimSigner
from services.egress.smtp_pool import SmtpPool
from shared.codes import DeliveryError
from shared.config import RelayConfig
from shared.enqueue import EnqueueFailed
from shared.logs import get_logger, log
from shared.normalize import normalize_line_endings
from shared.payloads import DeliveryResult, OutboundJob
from shared.replication import ReplicaAck

logger = get_logger(__name__)

MAX_BACKOFF_S = 3600.0
DNS_LIFETIME_S = 10.0
REDIS_RETRY_DEFER_S = 2.0
SMTP_CONNECTION_IDLE_S = 5.0  # cached MX connections: well inside RFC 5321's 5 min server timeout
SMTP_CONNECTION_MAX_USES = 100


def backoff_s(attempt: int, base_s: float, remaining_s: float) -> float:
    """Full jitter: uniform in [0, base * 2**(attempt-1)], capped, and never past the max age."""
    ceiling = min(MAX_BACKOFF_S, base_s * 2 ** max(attempt - 1, 0))
    return max(0.0, min(random.uniform(0, ceiling), remaining_s))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    max_age_s: float
    base_s: float

    def may_retry(self, attempt: int, age_s: float) -> bool:
        return attempt < self.max_attempts and age_s < self.max_age_s


class Egress:
    """Everything one `deliver` run needs; built once per worker process (`ctx["egress"]`)."""

    def __init__(
        self,
        *,
        deliverer: Deliverer,
        results: ResultStore,
        policy: RetryPolicy,
        attempt_budget_s: float,
        signer: DkimSigner | None = None,
        bouncer: Bouncer | None = None,
        delay_warning_s: float = 0.0,
    ) -> None:
        self._deliverer = deliverer
        self._results = results
        self._policy = policy
        self._attempt_budget_s = attempt_budget_s
        self._signer = signer
        self._bouncer = bouncer  # None: no DSNs
        self._delay_warning_s = delay_warning_s  # 0: no `delayed` DSN

    @classmethod
    def from_config(cls, config: RelayConfig, redis: aioredis.Redis) -> Egress:
        egress = config.egress
        resolver = MxResolver(
            nameservers=egress.nameservers,
            routes=egress.routes,
            smtp_port=egress.smtpPort,
            lifetime_s=DNS_LIFETIME_S,
        )
        helo_name = egress.heloName or socket.gethostname()
        settings = SmtpSettings(
            helo_name=helo_name,
            timeout_s=float(egress.connectTimeoutSeconds),
            data_timeout_s=float(egress.jobTimeoutSeconds),
            verify_tls=egress.tls.verify,
            allow_private_destinations=egress.allowPrivateDestinations,
        )
        mta_sts = None
        if egress.mtaSts.enabled:
            mta_sts = PolicySource(
                resolver,
                tls_context=tls_context(verify=True),
                address_allowed=(lambda _address: True) if egress.allowPrivateDestinations else destination_allowed,
                policy_port=egress.mtaSts.policyPort,
                fetch_timeout_s=float(egress.mtaSts.fetchTimeoutSeconds),
            )
        pool = SmtpPool(idle_s=SMTP_CONNECTION_IDLE_S, max_uses=SMTP_CONNECTION_MAX_USES)
        return cls(
            deliverer=Deliverer(resolver, settings, pool, mta_sts=mta_sts),
            results=ResultStore(redis, retention_s=config.queue.retentionSeconds, ack=ReplicaAck.from_config(config)),
            policy=RetryPolicy(egress.maxAttempts, float(egress.maxAgeSeconds), float(egress.retryBaseSeconds)),
            attempt_budget_s=float(egress.jobTimeoutSeconds),
            signer=DkimSigner.from_config(config.dkim),
            bouncer=(
                Bouncer(
                    redis,
                    reporting_mta=helo_name,
                    mail_domain=config.primary_mail_domain,
                    max_age_s=float(egress.maxAgeSeconds),
                )
                if egress.bounces
                else None
            ),
            delay_warning_s=float(egress.delayWarningSeconds),
        )

    async def close(self) -> None:
        """QUIT cached SMTP connections (shutdown, after the last job)."""
        await self._deliverer.close()

    async def run(
        self,
        job: OutboundJob,
        attempt: int,
        prior: PriorState | None = None,
        end_with: Callable[[EndWrite], None] | None = None,
    ) -> str:
        """`prior`: what earlier runs left, when the worker read it with the claim; else read here.
        `end_with`: hands the result's publish to the worker, to go out with the job's finish
        (unless replicas must confirm it first); without it the result is published here."""
        ids = {"persona": job.persona_key, "stream_id": job.stream_id, "attempt": attempt}
        if prior is None:
            prior = await self._results.prior_state(job.persona_key, job.stream_id)
        if prior.published:
            log(logger, logging.INFO, "result already published; not sending again", **ids)
            await self._results.confirm(job.persona_key, job.stream_id)
            metrics.JOBS.labels("duplicate").inc()
            return "duplicate"
        if attempt > self._policy.max_attempts:  # only re-runs after crashes get here
            exceeded = Outcome.failure(DeliveryError.MAX_ATTEMPTS_EXCEEDED)
            return await self._finish(job, attempt, {r: exceeded for r in job.rcpt_to}, ids, end_with)

        started = time.monotonic()
        recorded = dict(prior.final_outcomes)  # grows as this attempt records outcomes
        outcomes = await self._attempt(job, recorded, ids)
        metrics.ATTEMPT_SECONDS.observe(time.monotonic() - started)

        open_recipients = [recipient for recipient in job.rcpt_to if outcomes[recipient].temporary]
        age_s = time.time() - job.enqueued_at_ms / 1000
        if open_recipients and self._policy.may_retry(attempt, age_s):
            defer_s = backoff_s(attempt, self._policy.base_s, self._policy.max_age_s - age_s)
            await self._results.record_final(
                job.persona_key,
                job.stream_id,
                _unrecorded(outcomes, recorded),
                last_error=outcomes[open_recipients[0]].error,
            )
            if self._bouncer is not None and 0 < self._delay_warning_s <= age_s:
                await self._bouncer.delayed(job, outcomes)  # once: a later retry finds it stored
            log(
                logger,
                logging.INFO,
                "delivery deferred",
                **ids,
                defer_s=round(defer_s, 3),
                error=outcomes[open_recipients[0]].error,
            )
            metrics.JOBS.labels("retry").inc()
            raise Retry(defer=defer_s)
        return await self._finish(job, attempt, outcomes, ids, end_with)

    async def _attempt(self, job: OutboundJob, recorded: dict[str, Outcome], ids: dict[str, Any]) -> dict[str, Outcome]:
        """Final outcomes from earlier runs (`recorded`) plus this attempt's for the open recipients."""
        outcomes = dict(recorded)
        pending = [recipient for recipient in job.rcpt_to if recipient not in outcomes]
        if not pending:
            return outcomes
        try:
            async with asyncio.timeout(self._attempt_budget_s):
                await self._send(job, pending, outcomes, recorded, ids)
        except TimeoutError:
            log(logger, logging.WARNING, "delivery attempt timed out", **ids)
        except Exception:
            logger.exception("delivery attempt failed unexpectedly", extra=ids)
            for recipient in pending:
                outcomes.setdefault(recipient, Outcome.failure(DeliveryError.INTERNAL_ERROR))
        for recipient in pending:
            outcomes.setdefault(recipient, Outcome.failure(DeliveryError.CONNECTION_LOST))
        return outcomes

    async def _send(
        self,
        job: OutboundJob,
        pending: list[str],
        outcomes: dict[str, Outcome],
        recorded: dict[str, Outcome],
        ids: dict[str, Any],
    ) -> None:
        """Deliver to each domain in turn; final outcomes so far are recorded before the next
        domain's session starts (the caller records or publishes the last ones)."""
        by_domain: dict[str, list[str]] = defaultdict(list)
        for recipient in pending:
            parts = split_recipient(recipient)
            if parts is None:
                outcomes[recipient] = Outcome.failure(DeliveryError.INVALID_RECIPIENT)
            else:
                by_domain[parts[1]].append(recipient)
        if not by_domain:
            return
        message = self._prepare(job, ids)
        for domain, recipients in by_domain.items():
            unrecorded = _unrecorded(outcomes, recorded)
            await self._results.record_final(job.persona_key, job.stream_id, unrecorded)
            recorded.update(unrecorded)
            report = await self._deliverer.deliver(domain, job.mail_from, recipients, message)
            if report.host is not None:
                metrics.SMTP_SESSIONS.labels("true" if report.tls else "false").inc()
            outcomes.update(report.outcomes)
            log(
                logger,
                logging.INFO,
                "domain attempt finished",
                **ids,
                domain=domain,
                host=report.host,
                tls=report.tls,
                mta_sts=report.mta_sts,
                mta_sts_violations=report.mta_sts_violations or None,
                connections=report.connections,
                skipped=report.skipped,
                dispositions=sorted({o.disposition.value for o in report.outcomes.values()}),
            )

    def _prepare(self, job: OutboundJob, ids: dict[str, Any]) -> bytes:
        message = normalize_line_endings(job.data)
        if self._signer is None:
            return message
        try:
            return self._signer.sign(message)
        except dkim.DKIMException as exc:  # e.g. no From header: send it unsigned rather than never
            log(logger, logging.WARNING, "dkim signing failed; sending unsigned", **ids, error=str(exc))
            return message

    async def _finish(
        self,
        job: OutboundJob,
        attempt: int,
        outcomes: dict[str, Outcome],
        ids: dict[str, Any],
        end_with: Callable[[EndWrite], None] | None,
    ) -> str:
        result = summarize(job, outcomes, attempt)
        if result.status == "failed" and attempt > 1 and self._bouncer is not None:
            # after a deferral the gateway has stopped waiting for the result: tell the persona by
            # mail, before publishing (bounce.py: a crash in between must not lose the bounce)
            await self._bouncer.failed(job, outcomes)
        if end_with is not None and not self._results.needs_replicas:

            def on_reply(reply: Any) -> None:
                if isinstance(reply, Exception):  # the worker re-queues the job, as deliver() on a RedisError
                    _log_redis_retry(job, reply)
                else:
                    _report_published(result, bool(reply), ids)

            call = self._results.publish_call(job.persona_key, result)
            marker = self._results.published_marker(job.persona_key, job.stream_id)
            end_with(EndWrite(call, marker, REDIS_RETRY_DEFER_S, on_reply))
            return result.status
        _report_published(result, await self._results.publish(job.persona_key, result), ids)
        return result.status


def _report_published(result: DeliveryResult, published: bool, ids: dict[str, Any]) -> None:
    label = "sent" if result.status == "sent" else ("failed_permanent" if result.permanent else "failed_temporary")
    metrics.JOBS.labels(label if published else "duplicate").inc()
    log(
        logger,
        logging.INFO,
        "delivery result published" if published else "result existed already",
        **ids,
        status=result.status,
        error=result.error,
        smtp_code=result.smtp_code,
        message_id=result.message_id,
    )


def _log_redis_retry(job: OutboundJob, exc: Exception) -> None:
    log(
        logger,
        logging.WARNING,
        "redis error; job retried",
        persona=job.persona_key,
        stream_id=job.stream_id,
        error=type(exc).__name__,
    )
    metrics.JOBS.labels("retry").inc()


def _unrecorded(outcomes: dict[str, Outcome], recorded: dict[str, Outcome]) -> dict[str, Outcome]:
    """Final outcomes not yet in the per-recipient record."""
    return {r: o for r, o in outcomes.items() if not o.temporary and r not in recorded}


def summarize(job: OutboundJob, outcomes: dict[str, Outcome], attempt: int) -> DeliveryResult:
    """One result per stream: sent if every recipient was accepted, else the first failure."""
    recipients = job.rcpt_to or [""]
    missing = Outcome.failure(DeliveryError.INVALID_RECIPIENT)
    pairs = [(recipient, outcomes.get(recipient, missing)) for recipient in recipients]
    failed = [pair for pair in pairs if not pair[1].sent]
    recipient, outcome = failed[0] if failed else pairs[0]
    return DeliveryResult(
        stream_id=job.stream_id,
        status="sent" if outcome.sent else "failed",
        message_id=outcome.message_id if outcome.sent else None,
        error=None if outcome.sent else outcome.error,
        recipient=recipient or None,
        smtp_code=outcome.smtp_code,
        enhanced_code=outcome.enhanced_code,
        permanent=None if outcome.sent else not outcome.temporary,
        attempts=attempt,
    )


async def deliver(ctx: dict[str, Any], packed_job: bytes) -> str:
    """arq entry point (function name "deliver"); the argument is `OutboundJob(...).pack()`."""
    egress: Egress = ctx["egress"]
    try:
        job = OutboundJob.unpack(packed_job)
    except Exception:
        log(logger, logging.ERROR, "undecodable outbound job dropped", job_id=ctx.get("job_id"))
        metrics.JOBS.labels("invalid").inc()
        return "invalid"
    metrics.JOBS_IN_PROGRESS.inc()
    try:
        state: JobState | None = ctx.get("job_state")
        prior = prior_state_from(state) if state is not None else None
        end_writes: list[EndWrite] | None = ctx.get("end_writes")
        end_with = end_writes.append if end_writes is not None else None
        return await egress.run(job, attempt=int(ctx.get("job_try", 1)), prior=prior, end_with=end_with)
    except (RedisError, EnqueueFailed) as exc:  # final outcomes already recorded are not sent again on the retry
        _log_redis_retry(job, exc)
        raise Retry(defer=REDIS_RETRY_DEFER_S) from exc
    finally:
        metrics.JOBS_IN_PROGRESS.dec()
