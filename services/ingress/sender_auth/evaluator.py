"""Runs SPF, DKIM and DMARC for one message, off the event loop and inside a time budget.

pyspf and dkimpy are blocking, so an evaluation runs on a small dedicated thread pool (not
the loop's default executor, which the reverse DNS lookups use). The deadline is fixed when
the message arrives, before it is queued for a thread: every DNS lookup stops at it, and the
SMTP side stops waiting for it a moment later and carries on with every signal `unknown`.
A backlog therefore never makes a sender wait more than `smtp.senderAuthTimeoutMs`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import dns.resolver

from services.ingress.sender_auth.dkim_check import check_dkim
from services.ingress.sender_auth.dmarc import check_dmarc
from services.ingress.sender_auth.header import from_domains, strip_our_authentication_results
from services.ingress.sender_auth.resolver import BoundedResolver, build_resolver
from services.ingress.sender_auth.spf_check import check_spf
from services.ingress.sender_auth.verdict import UNEVALUATED, SenderAuthVerdict
from shared.logs import get_logger, log

logger = get_logger(__name__)

EVALUATION_THREADS = 8
WAIT_GRACE_S = 0.5  # past the DNS deadline, for the CPU work (hashing, RSA) to finish


@dataclass(frozen=True, slots=True)
class SenderFacts:
    """What the SMTP session tells us about the sender, plus the message as received."""

    client_ip: str
    helo: str
    mail_from: str  # "" for the null sender
    message: bytes


def evaluate(resolver: dns.resolver.Resolver | None, facts: SenderFacts, deadline: float) -> SenderAuthVerdict:
    """Blocking: SPF, then DKIM, then DMARC over both, all lookups bounded by `deadline`."""
    spf = check_spf(BoundedResolver(resolver, deadline), facts.client_ip, facts.mail_from, facts.helo)
    dkim = check_dkim(BoundedResolver(resolver, deadline), facts.message)
    dmarc = check_dmarc(BoundedResolver(resolver, deadline), from_domains(facts.message), spf, dkim)
    return SenderAuthVerdict(spf, dkim, dmarc)


class SenderAuthenticator:
    """The ingress's evaluator: one resolver (from `smtp.authNameservers`) and thread pool."""

    def __init__(self, nameservers: list[str], budget_s: float) -> None:
        self._resolver = build_resolver(nameservers)
        self._budget_s = budget_s
        self._executor = ThreadPoolExecutor(EVALUATION_THREADS, thread_name_prefix="sender-auth")

    async def evaluate(self, facts: SenderFacts) -> SenderAuthVerdict:
        deadline = time.monotonic() + self._budget_s
        work = functools.partial(evaluate, self._resolver, facts, deadline)
        started_s = time.perf_counter()
        try:
            return await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(self._executor, work), self._budget_s + WAIT_GRACE_S
            )
        except TimeoutError:
            log(
                logger,
                logging.INFO,
                "sender authentication timed out",
                client_ip=facts.client_ip,
                elapsed_ms=int((time.perf_counter() - started_s) * 1000),
            )
            return UNEVALUATED
        except Exception as exc:  # a library bug must not cost the message: signals unknown
            logger.warning("sender authentication failed", exc_info=exc)
            return UNEVALUATED

    async def strip_forged_results(self, message: bytes, authserv_id: str) -> bytes:
        """`strip_our_authentication_results` on the pool: a 10 MiB header section costs ~1 s."""
        work = functools.partial(strip_our_authentication_results, message, authserv_id)
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
