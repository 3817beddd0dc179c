"""Runs SPF, DKIM and DMARC for one message concurrently, on the event loop, inside a budget.

No evaluation holds a thread while it waits for DNS (resolver.py): lookups are asyncio, cached
by TTL and shared between sessions asking for the same name. The three mechanisms run at once:
SPF needs only the envelope (the handler starts it at the first accepted RCPT, so it overlaps
the rest of the transaction and the message upload), the DMARC policy record only the From
domain, DKIM the whole message; DMARC's alignment is decided when all three are in. Only the
CPU-heavy part, DKIM's body hash and signature check of a signed message, runs on a small
thread pool, and never waits for DNS there: names it misses are fetched on the loop and the
check run again (`replay`).

The deadline is fixed when the message arrives: every DNS lookup stops at it, and the SMTP side
stops waiting a moment later and carries on with every signal `unknown`. A slow nameserver
therefore never makes a sender wait more than `smtp.senderAuthTimeoutMs`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import dns.resolver

from services.ingress.sender_auth.dkim_check import check_dkim
from services.ingress.sender_auth.dmarc import PolicyLookup, check_dmarc, load_public_suffix_list, lookup_policy
from services.ingress.sender_auth.header import from_domains, header_section_end, strip_our_authentication_results
from services.ingress.sender_auth.resolver import MAX_TTL_S, AsyncDns, BoundedResolver, replay
from services.ingress.sender_auth.spf_check import check_spf
from services.ingress.sender_auth.spf_prefetch import SpfPrefetch
from services.ingress.sender_auth.verdict import UNEVALUATED, DkimResult, SenderAuthVerdict, SpfResult
from shared.logs import get_logger, log

logger = get_logger(__name__)

K = TypeVar("K", bound=tuple[str, ...])
V = TypeVar("V")

CPU_THREADS = 2  # DKIM hashing and RSA only; no thread ever waits for DNS
WAIT_GRACE_S = 0.5  # past the DNS deadline, for the CPU work (hashing, RSA) to finish
INLINE_HEADER_BYTES = 256 * 1024  # a larger header section is parsed on the pool, not the loop
_SIGNATURE_FIELD = re.compile(rb"^dkim-signature[ \t]*:", re.IGNORECASE | re.MULTILINE)
_RESULTS_FIELD = re.compile(rb"^authentication-results[ \t]*:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True)
class SenderFacts:
    """What the SMTP session tells us about the sender, plus the message as received."""

    client_ip: str
    helo: str
    mail_from: str  # "" for the null sender
    message: bytes


class ResultCache(Generic[K, V]):
    """Results derived from DNS answers, by key, until the first answer they used expires.

    A result that is a function of its key and DNS answers is, while every answer is still
    cached, the one a fresh evaluation would give. Results that met a DNS timeout or error are
    not kept (the caller does not offer them). Bounded: the oldest entry goes first."""

    ENTRIES = 4096
    MAX_KEY_CHARS = 600

    def __init__(self) -> None:
        self._results: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        found = self._results.get(key)
        if found is None:
            return None
        if found[0] <= time.monotonic():
            self._results.pop(key, None)
            return None
        return found[1]

    def put(self, key: K, result: V, expires: float) -> None:
        now = time.monotonic()
        expires = min(expires, now + MAX_TTL_S)  # no lookup at all (a malformed domain): an hour
        if expires <= now or sum(map(len, key)) > self.MAX_KEY_CHARS:
            return
        if len(self._results) >= self.ENTRIES:
            self._results.pop(next(iter(self._results)))
        self._results[key] = (expires, result)


class SpfCache(ResultCache[tuple[str, str, str], SpfResult]):
    """SPF results by (client IP, MAIL FROM, HELO): SPF is a function of those three and the DNS
    answers (macros may use the local part, so the whole address is the key)."""


class PolicyCache(ResultCache[tuple[str, ...], PolicyLookup]):
    """The DMARC policy lookup by the message's distinct From domains: a function of those and
    the `_dmarc` TXT answers, so a known author's policy is not parsed again per message."""


async def evaluate_spf(
    dns_client: AsyncDns, client_ip: str, mail_from: str, helo: str, deadline: float, cache: SpfCache | None = None
) -> SpfResult:
    key = (client_ip, mail_from, helo)
    if cache is not None and (cached := cache.get(key)) is not None:
        return cached
    resolver = BoundedResolver(dns_client, deadline, SpfPrefetch(client_ip))
    result = await replay(resolver, lambda: check_spf(resolver, client_ip, mail_from, helo))
    if cache is not None and not resolver.failed and not resolver.timed_out and not result.timed_out:
        cache.put(key, result, resolver.expires)
    return result


async def evaluate_dkim(
    dns_client: AsyncDns, message: bytes, deadline: float, executor: ThreadPoolExecutor | None
) -> list[DkimResult]:
    if not _SIGNATURE_FIELD.search(message, 0, header_section_end(message)):
        return []  # the common unsigned message: no parsing, no thread
    resolver = BoundedResolver(dns_client, deadline)
    loop = asyncio.get_running_loop()

    async def on_pool(check: Callable[[], list[DkimResult]]) -> list[DkimResult]:
        return await loop.run_in_executor(executor, check)

    return await replay(resolver, functools.partial(check_dkim, resolver, message), on_pool)


async def evaluate_async(
    dns_client: AsyncDns,
    facts: SenderFacts,
    deadline: float,
    executor: ThreadPoolExecutor | None = None,
    spf: asyncio.Future[SpfResult] | None = None,
    spf_cache: SpfCache | None = None,
    policy_cache: PolicyCache | None = None,
) -> SenderAuthVerdict:
    """SPF (or the one already running), DKIM and the DMARC policy at once, then DMARC."""
    spf_task = spf or asyncio.ensure_future(
        evaluate_spf(dns_client, facts.client_ip, facts.mail_from, facts.helo, deadline, spf_cache)
    )
    dkim_task = asyncio.ensure_future(evaluate_dkim(dns_client, facts.message, deadline, executor))
    try:
        if header_section_end(facts.message) > INLINE_HEADER_BYTES:
            loop = asyncio.get_running_loop()
            authors = await loop.run_in_executor(executor, from_domains, facts.message)
        else:
            authors = from_domains(facts.message)
        policy = await _policy(dns_client, authors, deadline, policy_cache)
        spf_result, dkim_results = await asyncio.gather(spf_task, dkim_task)
    finally:
        dkim_task.cancel()
    return SenderAuthVerdict(spf_result, dkim_results, check_dmarc(policy, spf_result, dkim_results))


async def _policy(dns_client: AsyncDns, authors: list[str], deadline: float, cache: PolicyCache | None) -> PolicyLookup:
    key = tuple(sorted(set(authors)))
    if cache is not None and (cached := cache.get(key)) is not None:
        return cached
    resolver = BoundedResolver(dns_client, deadline)
    policy = await lookup_policy(resolver, authors)
    if cache is not None and not resolver.failed:
        cache.put(key, policy, resolver.expires)
    return policy


def evaluate(resolver: dns.resolver.Resolver | None, facts: SenderFacts, deadline: float) -> SenderAuthVerdict:
    """Blocking form (tests, tools): the same evaluation on a private event loop and cache."""
    return asyncio.run(evaluate_async(AsyncDns(resolver), facts, deadline))


class SenderAuthenticator:
    """The ingress's evaluator: one asyncio resolver and cache (from `smtp.authNameservers`)."""

    def __init__(self, nameservers: list[str], budget_s: float) -> None:
        self._dns = AsyncDns.for_nameservers(nameservers)
        self._spf_cache = SpfCache()
        self._policy_cache = PolicyCache()
        self._budget_s = budget_s
        self._executor = ThreadPoolExecutor(CPU_THREADS, thread_name_prefix="sender-auth")
        load_public_suffix_list()

    def start_spf(self, client_ip: str, helo: str, mail_from: str) -> asyncio.Task[SpfResult]:
        """SPF from the envelope alone, started before the message arrives (its own budget)."""
        deadline = time.monotonic() + self._budget_s
        return asyncio.ensure_future(evaluate_spf(self._dns, client_ip, mail_from, helo, deadline, self._spf_cache))

    async def evaluate(self, facts: SenderFacts, spf: asyncio.Task[SpfResult] | None = None) -> SenderAuthVerdict:
        deadline = time.monotonic() + self._budget_s
        started_s = time.perf_counter()
        try:
            async with asyncio.timeout(self._budget_s + WAIT_GRACE_S):
                return await evaluate_async(
                    self._dns, facts, deadline, self._executor, spf, self._spf_cache, self._policy_cache
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
        """`strip_our_authentication_results`; on the pool only when the sender's header section
        holds an Authentication-Results field at all (a 10 MiB header section costs ~1 s)."""
        if not _RESULTS_FIELD.search(message, 0, header_section_end(message)):
            return message  # one C-speed scan, the common case
        work = functools.partial(strip_our_authentication_results, message, authserv_id)
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
