"""Finding, fetching and caching a domain's MTA-STS policy (RFC 8461 sections 3 and 5).

`_mta-sts.<domain>` TXT says whether there is a policy and its id; the policy itself is
`https://mta-sts.<domain>/.well-known/mta-sts.txt`, fetched over HTTPS with a certificate valid
for that name, no redirects, at most `MAX_POLICY_BYTES` within `fetch_timeout_s`. The GET is a
few lines over `asyncio` streams and `ssl` (an HTTP/1.0 request, so the answer is never
chunked) rather than a new HTTP client dependency for one bounded request.

Cache (per process, LRU-bounded): a policy is kept for its `max_age`. A TXT id equal to the
cached policy's means the cached one is current; a new id means fetch again. When the TXT
record is gone, DNS fails or the fetch fails, a cached policy that has not expired still
applies (RFC 8461 5.1: that is what protects against an attacker who blocks the lookup), and
with no cached policy the domain has none. Concurrent deliveries to one domain share one fetch.

The policy host is resolved through the egress resolver and its addresses pass the same
private-destination rule as MX addresses (destinations.py). `policy_port` (443) exists for tests
that serve policies from a local HTTPS server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from services.egress import metrics
from services.egress.mta_sts import Mode, Policy, PolicyError, parse_policy, parse_txt
from services.egress.mx import LookupFailed, MailHost, MxResolver
from shared.logs import get_logger, log

logger = get_logger(__name__)

MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3 suggests 64 KiB
MAX_RESPONSE_HEAD_BYTES = 16 * 1024
POLICY_PATH = "/.well-known/mta-sts.txt"
CACHE_ENTRIES = 10_000
MAX_POLICY_ADDRESSES = 2


class FetchFailed(Exception):
    """The policy could not be fetched or is not a valid policy; the message says why."""


@dataclass(frozen=True, slots=True)
class _Cached:
    policy: Policy
    expires_at: float  # time.monotonic()


class PolicySource:
    def __init__(
        self,
        resolver: MxResolver,
        *,
        tls_context: ssl.SSLContext,
        address_allowed: Callable[[str], bool],
        policy_port: int = 443,
        fetch_timeout_s: float = 10.0,
    ) -> None:
        self._resolver = resolver
        self._tls_context = tls_context  # verifies against the system CAs (SSL_CERT_FILE honoured)
        self._address_allowed = address_allowed
        self._port = policy_port
        self._timeout_s = fetch_timeout_s
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Policy | None]] = {}

    async def policy(self, domain: str) -> Policy | None:
        """The policy to apply to `domain` now (mode `none` included), or None. Never raises."""
        domain = domain.lower().rstrip(".")
        pending = self._inflight.get(domain)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Policy | None] = asyncio.get_running_loop().create_future()
        self._inflight[domain] = future
        result: Policy | None = None
        try:
            result = await self._current(domain)
        except Exception:
            logger.exception("mta-sts policy lookup failed unexpectedly", extra={"domain": domain})
            result = self._cached(domain)
        finally:  # also when cancelled: the deliveries waiting on this lookup must not hang
            del self._inflight[domain]
            future.set_result(result if result is not None else self._cached(domain))
        return result

    def _cached(self, domain: str) -> Policy | None:
        cached = self._cache.get(domain)
        if cached is None:
            return None
        if cached.expires_at <= time.monotonic():
            del self._cache[domain]
            return None
        self._cache.move_to_end(domain)
        return cached.policy

    async def _current(self, domain: str) -> Policy | None:
        cached = self._cached(domain)
        try:
            policy_id = parse_txt(await self._resolver.txt(f"_mta-sts.{domain}"))
        except LookupFailed:
            return cached
        if policy_id is None:
            return cached
        if cached is not None and cached.policy_id == policy_id:
            return cached
        try:
            text = await self._fetch(domain)
            policy = parse_policy(text, policy_id)
        except (FetchFailed, PolicyError) as exc:
            metrics.MTA_STS_FETCHES.labels("failed").inc()
            log(logger, logging.WARNING, "mta-sts policy fetch failed", domain=domain, error=str(exc))
            return cached
        metrics.MTA_STS_FETCHES.labels("ok").inc()
        log(
            logger,
            logging.INFO,
            "mta-sts policy fetched",
            domain=domain,
            policy_id=policy_id,
            mode=policy.mode.value,
            max_age_s=policy.max_age_s,
            mx=list(policy.mx),
        )
        self._remember(domain, policy)
        return policy

    def _remember(self, domain: str, policy: Policy) -> None:
        self._cache[domain] = _Cached(policy, time.monotonic() + policy.max_age_s)
        self._cache.move_to_end(domain)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)

    async def _fetch(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        try:
            addresses = await self._resolver.addresses(MailHost(host, self._port))
        except LookupFailed as failure:
            raise FetchFailed(f"{host}: {failure.outcome.error}") from None
        allowed = [address for address in addresses if self._address_allowed(address)]
        if not allowed:
            raise FetchFailed(f"{host}: no public address")
        last_error = "no address"
        for address in allowed[:MAX_POLICY_ADDRESSES]:
            try:
                async with asyncio.timeout(self._timeout_s):
                    return await self._get(host, address)
            except TimeoutError:
                last_error = f"{address}: timeout"
            except (OSError, ssl.SSLError) as exc:
                last_error = f"{address}: {type(exc).__name__}: {exc}"[:200]
        raise FetchFailed(last_error)

    async def _get(self, host: str, address: str) -> str:
        reader, writer = await asyncio.open_connection(
            address, self._port, ssl=self._tls_context, server_hostname=host, limit=MAX_RESPONSE_HEAD_BYTES
        )
        try:
            request = (
                f"GET {POLICY_PATH} HTTP/1.0\r\nHost: {host}\r\nAccept: text/plain\r\n"
                "User-Agent: protege-relay\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode("ascii"))
            await writer.drain()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                raise FetchFailed(f"{host}: malformed or oversized response head") from None
            length = _check_head(host, head)
            body = await (_read_to_close(reader) if length is None else _read_exactly(reader, length))
            if len(body) > MAX_POLICY_BYTES:
                raise FetchFailed(f"{host}: policy larger than {MAX_POLICY_BYTES} bytes")
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise FetchFailed(f"{host}: policy is not UTF-8") from None


def _check_head(host: str, head: bytes) -> int | None:
    """Validates the status line and headers; the Content-Length, if any."""
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
        raise FetchFailed(f"{host}: HTTP status {lines[0][:80]!r} (redirects are not followed)")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "text/plain":
        raise FetchFailed(f"{host}: content type {content_type or 'missing'!r}, not text/plain")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise FetchFailed(f"{host}: chunked answer to an HTTP/1.0 request")
    length = headers.get("content-length")
    if length is None:
        return None
    if not length.isdigit() or int(length) > MAX_POLICY_BYTES:
        raise FetchFailed(f"{host}: content length {length[:20]!r} too large or invalid")
    return int(length)


async def _read_to_close(reader: asyncio.StreamReader) -> bytes:
    """The body up to EOF, but never more than one byte past the limit."""
    body = b""
    while len(body) <= MAX_POLICY_BYTES:
        more = await reader.read(MAX_POLICY_BYTES + 1 - len(body))
        if not more:
            break
        body += more
    return body


async def _read_exactly(reader: asyncio.StreamReader, length: int) -> bytes:
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise FetchFailed("policy shorter than its Content-Length") from None


__all__ = ["Mode", "Policy", "PolicySource"]
