"""DNS for one sender-authentication run: configured nameservers and one shared deadline.

SPF, DKIM and DMARC together may need a dozen lookups; a slow or silent nameserver must not
hold an SMTP session for minutes. Every lookup of one evaluation draws on the same deadline
(`smtp.senderAuthTimeoutMs`), each at most `LOOKUP_TIMEOUT_S`. A lookup that runs out of time
raises `DnsTimedOut` and records it in `timed_out`, which the evaluation turns into the
signal `unknown`; a nameserver that answers SERVFAIL or REFUSED raises `DnsFailed` (a DNS
temperror in the SPF/DKIM/DMARC sense).

`smtp.authNameservers` lists "ip", "ip:port" or "[ipv6]:port"; empty means the system resolver
(/etc/resolv.conf). A machine without resolver configuration makes every lookup a
`DnsTimedOut`: we could not look, so we do not claim a failure.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import dns.exception
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver

from shared.hostport import parse_host_port

DNS_PORT = 53
LOOKUP_TIMEOUT_S = 2.0


class DnsTimedOut(Exception):
    """No answer before the evaluation's deadline (or no resolver at all)."""


class DnsFailed(Exception):
    """The nameservers answered with an error (SERVFAIL, REFUSED): a DNS temperror."""


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


class BoundedResolver:
    """Lookups for one evaluation, all inside `deadline` (a `time.monotonic()` value)."""

    def __init__(self, resolver: dns.resolver.Resolver | None, deadline: float) -> None:
        self._resolver = resolver
        self._deadline = deadline
        self.timed_out = False
        self.lookups = 0

    def remaining_s(self) -> float:
        return self._deadline - time.monotonic()

    def resolve(self, name: str, rtype: str, timeout_s: float = LOOKUP_TIMEOUT_S) -> list[dns.rdata.Rdata]:
        """The records of `rtype` at `name`; [] for NXDOMAIN or no data."""
        lifetime_s = min(timeout_s, LOOKUP_TIMEOUT_S, self.remaining_s())
        if self._resolver is None or lifetime_s <= 0:
            self.timed_out = True
            raise DnsTimedOut(name)
        self.lookups += 1
        try:
            answer = self._resolver.resolve(
                name, dns.rdatatype.from_text(rtype), lifetime=lifetime_s, raise_on_no_answer=False, search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.Timeout:
            self.timed_out = True
            raise DnsTimedOut(name) from None
        except dns.exception.DNSException as exc:  # SERVFAIL/REFUSED from all servers, bad names
            raise DnsFailed(f"{name}: {type(exc).__name__}") from None
        return list(answer.rrset or [])

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record at `name` as one byte string (its character-strings joined)."""
        return [b"".join(record.strings) for record in self.resolve(name, "TXT")]  # type: ignore[attr-defined]
