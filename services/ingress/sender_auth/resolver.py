"""DNS for sender authentication: one asyncio resolver per process, a TTL cache, a deadline per
evaluation.

SPF, DKIM and DMARC together may need a dozen lookups, and the nameserver may be slow. No
lookup ever holds a thread: `AsyncDns` resolves with dnspython's asyncio resolver, any number
in flight at once, one query for a name however many sessions ask for it at the same moment,
and keeps every answer (and NXDOMAIN / no-data, for the SOA minimum) for its TTL, so the
common case of mail from a domain seen a moment ago asks no nameserver at all.

pyspf and dkimpy want a blocking lookup function. `BoundedResolver` gives them one that never
blocks: it answers from what this evaluation has fetched (or the cache); on a miss it records
the name in `pending` and raises `NeedLookup`. `replay` runs the library check, fetches what
it missed (all pending names concurrently), and runs it again until nothing is missing. The
checks are pure functions of the DNS answers, so the last run is exactly the run a blocking
resolver would have made; each run either finishes or adds an answer, so it converges.

Every lookup of one evaluation draws on the same deadline (`smtp.senderAuthTimeoutMs`). A
lookup that runs out of time raises `DnsTimedOut` and records it in `timed_out`, which the
evaluation turns into the signal `unknown`; a nameserver that answers SERVFAIL or REFUSED raises
`DnsFailed` (a DNS temperror in the SPF/DKIM/DMARC sense). Neither is cached.

`smtp.authNameservers` lists "ip", "ip:port" or "[ipv6]:port"; empty means the system resolver
(/etc/resolv.conf). A machine without resolver configuration makes every lookup a
`DnsTimedOut`: we could not look, so we do not claim a failure.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.message
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver

from shared.hostport import parse_host_port

DNS_PORT = 53
LOOKUP_TIMEOUT_S = 2.0
CACHE_ENTRIES = 10_000  # bounded: a sender naming random domains only churns it
MAX_TTL_S = 3600
MAX_RUNS = 128  # a library check is replayed at most this often (each run adds an answer)

T = TypeVar("T")
Records = list[dns.rdata.Rdata]
Key = tuple[str, str]
# given an answer (name, type, records): the names the check will ask next (spf_prefetch.py)
Prefetch = Callable[[str, str, Records], list[Key]]


class DnsTimedOut(Exception):
    """No answer before the evaluation's deadline (or no resolver at all)."""


class DnsFailed(Exception):
    """The nameservers answered with an error (SERVFAIL, REFUSED): a DNS temperror."""


class NeedLookup(Exception):
    """Raised inside a library check for a name not fetched yet (see `replay`)."""


def parse_nameserver(text: str) -> tuple[str, int]:
    """("192.0.2.1", 53) from "192.0.2.1", "192.0.2.1:5353" or "[2001:db8::1]:5353"."""
    return parse_host_port(text, DNS_PORT)


def build_resolver(nameservers: Sequence[str]) -> dns.resolver.Resolver | None:
    """A dnspython resolver for `nameservers`, the system's when empty, None if there is none."""
    if not nameservers:
        try:
            return dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            return None
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(server)) for server in nameservers]
    return resolver


def _key(name: str, rtype: str) -> Key:
    return name.lower().rstrip("."), rtype.upper()


class AsyncDns:
    """The process's sender-auth resolver: asyncio lookups, shared in-flight queries, TTL cache."""

    def __init__(self, resolver: dns.resolver.BaseResolver | None) -> None:
        self._resolver: dns.asyncresolver.Resolver | None = None
        if resolver is not None:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = resolver.nameservers
        self._cache: dict[Key, tuple[float, Records]] = {}
        self._in_flight: dict[Key, asyncio.Future[Records]] = {}
        self.queries = 0

    @classmethod
    def for_nameservers(cls, nameservers: Sequence[str]) -> AsyncDns:
        return cls(build_resolver(nameservers))

    def expiry(self, name: str, rtype: str) -> float:
        """When the cached answer for the name expires (`time.monotonic()`); now if not cached."""
        found = self._cache.get(_key(name, rtype))
        return found[0] if found is not None else time.monotonic()

    def cached(self, name: str, rtype: str) -> Records | None:
        key = _key(name, rtype)
        found = self._cache.get(key)
        if found is None:
            return None
        if found[0] <= time.monotonic():
            self._cache.pop(key, None)
            return None
        return found[1]

    async def lookup(self, name: str, rtype: str, timeout_s: float) -> Records:
        """The records (from the cache, a query in flight, or a new query), waiting at most
        `timeout_s`; a new query runs on for up to `LOOKUP_TIMEOUT_S` whoever stops waiting,
        so a slow answer still fills the cache for the next message."""
        found = self.cached(name, rtype)
        if found is not None:
            return found
        if self._resolver is None or timeout_s <= 0:
            raise DnsTimedOut(name)
        key = _key(name, rtype)
        future = self._in_flight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._query(key))
            self._in_flight[key] = future
            future.add_done_callback(functools.partial(self._forget, key))
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            raise DnsTimedOut(name) from None

    def _forget(self, key: Key, done: asyncio.Future[Records]) -> None:
        self._in_flight.pop(key, None)
        if not done.cancelled():
            done.exception()  # marks it retrieved: callers that stopped waiting leave no warning

    async def _query(self, key: Key) -> Records:
        name, rtype = key
        assert self._resolver is not None
        self.queries += 1
        try:
            answer = await self._resolver.resolve(
                name,
                dns.rdatatype.from_text(rtype),
                lifetime=LOOKUP_TIMEOUT_S,
                raise_on_no_answer=False,
                search=False,
            )
        except dns.resolver.NXDOMAIN as exc:
            responses: dict[object, dns.message.Message] = exc.kwargs.get("responses") or {}
            self._store(key, [], _negative_ttl(next(iter(responses.values()), None)))
            return []
        except dns.exception.Timeout:
            raise DnsTimedOut(name) from None
        except dns.exception.DNSException as exc:  # SERVFAIL/REFUSED from all servers, bad names
            raise DnsFailed(f"{name}: {type(exc).__name__}") from None
        if answer.rrset is None:
            self._store(key, [], _negative_ttl(answer.response))
            return []
        records = list(answer.rrset)
        self._store(key, records, answer.expiration - time.time())
        return records

    def _store(self, key: Key, records: Records, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))  # the oldest entry
        self._cache[key] = (time.monotonic() + min(ttl_s, MAX_TTL_S), records)


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308: a negative answer lives for min(SOA TTL, SOA minimum); no SOA, not cached."""
    if response is None:
        return 0.0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return 0.0


class BoundedResolver:
    """Lookups for one check of one evaluation, all inside `deadline` (a `time.monotonic()`
    value). Blocking-style calls (`resolve`, `txt`) never block: they answer from `answers` or
    raise `NeedLookup`; `fetch_pending` and the `*_async` calls do the waiting."""

    def __init__(self, dns_client: AsyncDns, deadline: float, prefetch: Prefetch | None = None) -> None:
        self._dns = dns_client
        self._deadline = deadline
        self._prefetch = prefetch
        self.answers: dict[Key, Records | DnsTimedOut | DnsFailed] = {}
        self.pending: list[Key] = []
        self.timed_out = False
        self.lookups = 0
        self.expires = float("inf")  # earliest expiry of the answers fetched (for result caches)
        self.failed = False  # some answer was a timeout or an error: nothing derived is cacheable

    def remaining_s(self) -> float:
        return self._deadline - time.monotonic()

    def resolve(self, name: str, rtype: str, timeout_s: float = LOOKUP_TIMEOUT_S) -> Records:
        """The records of `rtype` at `name`; [] for NXDOMAIN or no data."""
        key = _key(name, rtype)
        found = self.answers.get(key)
        if found is None and (cached := self._dns.cached(name, rtype)) is not None:
            # answered from the process's cache: no replay needed for a name asked before
            found = self.answers[key] = cached
            self.expires = min(self.expires, self._dns.expiry(name, rtype))
        if found is None:
            if self.remaining_s() <= 0:
                found = self.answers[key] = DnsTimedOut(name)
                self.failed = True
            else:
                self.pending.append(key)
                raise NeedLookup(name)
        if isinstance(found, DnsTimedOut):
            self.timed_out = True
            raise DnsTimedOut(name)
        if isinstance(found, DnsFailed):
            raise DnsFailed(str(found))
        return found

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record at `name` as one byte string (its character-strings joined)."""
        return [b"".join(record.strings) for record in self.resolve(name, "TXT")]  # type: ignore[attr-defined]

    async def fetch(self, name: str, rtype: str) -> None:
        key = _key(name, rtype)
        if key in self.answers:
            return
        self.lookups += 1
        try:
            self.answers[key] = await self._dns.lookup(name, rtype, self.remaining_s())
        except (DnsTimedOut, DnsFailed) as exc:
            self.answers[key] = exc
            self.failed = True
            return
        self.expires = min(self.expires, self._dns.expiry(name, rtype))
        answer = self.answers[key]
        if self._prefetch is not None and isinstance(answer, list):
            await self.fetch_all(self._prefetch(name, rtype, answer))

    async def fetch_pending(self) -> None:
        pending, self.pending = self.pending, []
        await self.fetch_all(pending)

    async def fetch_all(self, queries: Iterable[Key]) -> None:
        """`fetch` every (name, type) concurrently. Those this check or the process's cache
        already holds are answered first, in place: `gather` would wrap each in a task, and a
        known sender's evaluation asks only such names."""
        missing: list[Key] = []
        for name, rtype in dict.fromkeys(queries):
            if _key(name, rtype) in self.answers or self._dns.cached(name, rtype) is not None:
                await self.fetch(name, rtype)  # answered without waiting
            else:
                missing.append((name, rtype))
        if len(missing) == 1:
            await self.fetch(*missing[0])
        elif missing:
            await asyncio.gather(*(self.fetch(name, rtype) for name, rtype in missing))

    async def resolve_async(self, name: str, rtype: str) -> Records:
        await self.fetch(name, rtype)
        return self.resolve(name, rtype)

    async def txt_async(self, name: str) -> list[bytes]:
        await self.fetch(name, "TXT")
        return self.txt(name)


async def replay(
    resolver: BoundedResolver, check: Callable[[], T], run: Callable[[Callable[[], T]], Awaitable[T]] | None = None
) -> T:
    """`check()` (through `run`, e.g. on a thread pool) until it needed no name it did not have.

    Names a run missed are fetched together before the next run. Past the deadline a missing
    name is a `DnsTimedOut` answer, so a run can always finish."""
    result = check() if run is None else await run(check)
    for _ in range(MAX_RUNS):
        if not resolver.pending:
            return result
        await resolver.fetch_pending()
        resolver.timed_out = False
        result = check() if run is None else await run(check)
    resolver.timed_out = True
    return result
