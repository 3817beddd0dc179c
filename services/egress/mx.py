"""Where to deliver mail for a domain (RFC 5321 section 5.1, RFC 7505).

MX records are tried by preference, equal preferences in random order (spreading load as the
RFC asks). A domain without MX records is its own mail host (implicit MX from A/AAAA). A
single MX of "." is a null MX: the domain accepts no mail, a permanent failure. A domain that
does not exist is a permanent failure; SERVFAIL or a timeout is temporary.

`egress.routes` maps a domain (or "*" for every domain) to a fixed "host:port" and skips DNS:
the way to send through a smarthost, and how tests reach local sinks (a routed host is exempt
from the private-destination rule, `destinations.py`). `egress.nameservers`
("ip" or "ip:port") replaces the system resolver. Answers, "no such domain" included
(RFC 2308), are cached for their TTL; SERVFAIL and timeouts are not. A busy worker asks once
per TTL per domain and MX host.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import groupby

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TXT
import dns.resolver

from services.egress.outcome import Outcome
from shared.codes import DeliveryError
from shared.hostport import parse_host_port

DNS_PORT = 53
DNS_CACHE_ENTRIES = 10_000  # answers kept for their TTL: many messages go to the same few domains
ROUTE_ANY_DOMAIN = "*"


class LookupFailed(Exception):  # a failure value, raised only to unwind
    """DNS gave no usable answer; `outcome` says whether retrying can help."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class MailHost:
    """One host to try: the name (for TLS and logs), the port, and addresses if already known."""

    name: str
    port: int
    addresses: tuple[str, ...] = ()
    routed: bool = False  # from `egress.routes`: the operator chose it, so private addresses are fine


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class MxResolver:
    def __init__(
        self,
        *,
        nameservers: Iterable[str] = (),
        routes: dict[str, str] | None = None,
        smtp_port: int = 25,
        lifetime_s: float = 10.0,
    ) -> None:
        servers = [parse_host_port(server, DNS_PORT) for server in nameservers]
        self._resolver = dns.asyncresolver.Resolver(configure=not servers)
        if servers:
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
        self._resolver.cache = dns.resolver.LRUCache(DNS_CACHE_ENTRIES)
        self._resolver.lifetime = lifetime_s
        self._resolver.timeout = min(lifetime_s, 3.0)
        self._routes = {domain.lower().rstrip("."): target for domain, target in (routes or {}).items()}
        self._smtp_port = smtp_port

    async def mail_hosts(self, domain: str) -> list[MailHost]:
        """Hosts to try in order for `domain`; raises `LookupFailed`."""
        domain = domain.lower().rstrip(".")
        route = self._routes.get(domain) or self._routes.get(ROUTE_ANY_DOMAIN)
        if route is not None:
            host, port = parse_host_port(route, self._smtp_port)
            return [MailHost(host, port, (host,), routed=True)]
        name = self._name(domain)
        try:
            answer = await self._resolver.resolve(name, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            raise LookupFailed(Outcome.failure(DeliveryError.NXDOMAIN)) from None
        except dns.resolver.NoAnswer:
            return [MailHost(domain, self._smtp_port)]  # implicit MX
        except dns.exception.DNSException:
            raise LookupFailed(Outcome.failure(DeliveryError.DNS_TEMPORARY)) from None
        records = [record for record in answer if isinstance(record, dns.rdtypes.ANY.MX.MX)]
        if len(records) == 1 and records[0].exchange == dns.name.root:
            raise LookupFailed(Outcome.failure(DeliveryError.NULL_MX))
        records = [record for record in records if record.exchange != dns.name.root]
        if not records:
            raise LookupFailed(Outcome.failure(DeliveryError.NO_MAIL_HOST))
        return [
            MailHost(record.exchange.to_text(omit_final_dot=True).lower(), self._smtp_port)
            for record in _by_preference(records)
        ]

    async def addresses(self, host: MailHost) -> list[str]:
        """IPv4 first, then IPv6 (many senders have no IPv6 route); raises `LookupFailed`."""
        if host.addresses:
            return list(host.addresses)
        if _is_ip(host.name):
            return [host.name]
        name = self._name(host.name)
        found: list[str] = []
        temporary = False
        for record_type in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, record_type, search=False)
            except dns.resolver.NXDOMAIN:
                break
            except dns.resolver.NoAnswer:
                continue
            except dns.exception.DNSException:
                temporary = True
                continue
            found.extend(record.to_text() for record in answer)
        if found:
            return found
        if temporary:
            raise LookupFailed(Outcome.failure(DeliveryError.DNS_TEMPORARY))
        raise LookupFailed(Outcome.failure(DeliveryError.NO_MAIL_HOST))

    def routed(self, domain: str) -> bool:
        """True when `egress.routes` decides where mail for `domain` goes (no DNS, no MTA-STS)."""
        domain = domain.lower().rstrip(".")
        return domain in self._routes or ROUTE_ANY_DOMAIN in self._routes

    async def txt(self, name: str) -> list[bytes]:
        """The TXT records of `name`, each one's strings joined (RFC 7208 3.3 style); [] when the
        name or the type does not exist; raises `LookupFailed` (temporary) on other failures."""
        try:
            answer = await self._resolver.resolve(self._name(name), "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException:
            raise LookupFailed(Outcome.failure(DeliveryError.DNS_TEMPORARY)) from None
        return [b"".join(record.strings) for record in answer if isinstance(record, dns.rdtypes.ANY.TXT.TXT)]

    @staticmethod
    def _name(domain: str) -> dns.name.Name:
        try:
            return dns.name.from_text(domain)
        except (dns.exception.DNSException, UnicodeError):
            raise LookupFailed(Outcome.failure(DeliveryError.NXDOMAIN)) from None


def _by_preference(records: list[dns.rdtypes.ANY.MX.MX]) -> list[dns.rdtypes.ANY.MX.MX]:
    ordered: list[dns.rdtypes.ANY.MX.MX] = []
    for _, group in groupby(
        sorted(records, key=lambda record: record.preference), key=lambda record: record.preference
    ):
        same_preference = list(group)
        random.shuffle(same_preference)
        ordered.extend(same_preference)
    return ordered
