"""MX resolution against a real (local) authoritative DNS server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from services.egress.mx import LookupFailed, MailHost, MxResolver
from shared.hostport import parse_host_port
from tests.support.dns_server import DnsServer

ZONES = {
    "example.test": {"MX": ["20 mx2.example.test.", "10 mx1.example.test."]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"], "AAAA": ["::1"]},
    "implicit.test": {"A": ["127.0.0.4"]},
    "nomail.test": {"TXT": ['"no mail here"']},
    "nullmx.test": {"MX": ["0 ."]},
    "equal.test": {"MX": ["10 a.equal.test.", "10 b.equal.test.", "10 c.equal.test.", "5 first.equal.test."]},
    "ghostmx.test": {"MX": ["10 ghost.ghostmx.test."]},
}


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(ZONES, servfail={"servfail.test"}, silent={"silent.test"}) as server:
        yield server


def resolver(dns_server: DnsServer, **kwargs: object) -> MxResolver:
    return MxResolver(nameservers=[dns_server.nameserver], smtp_port=2525, lifetime_s=1.0, **kwargs)  # type: ignore[arg-type]


async def failure_of(coro: object) -> tuple[str | None, bool]:
    with pytest.raises(LookupFailed) as caught:
        await coro  # type: ignore[misc]
    return caught.value.outcome.error, not caught.value.outcome.temporary


async def test_mx_hosts_come_in_preference_order_with_addresses(dns_server: DnsServer) -> None:
    mx = resolver(dns_server)
    hosts = await mx.mail_hosts("Example.TEST")
    assert [host.name for host in hosts] == ["mx1.example.test", "mx2.example.test"]
    assert all(host.port == 2525 for host in hosts)
    assert await mx.addresses(hosts[0]) == ["127.0.0.2"]
    assert await mx.addresses(hosts[1]) == ["127.0.0.3", "::1"]  # IPv4 first


async def test_equal_preferences_are_shuffled_after_lower_ones(dns_server: DnsServer) -> None:
    mx = resolver(dns_server)
    orders = {tuple(h.name for h in await mx.mail_hosts("equal.test")) for _ in range(30)}
    assert all(order[0] == "first.equal.test" for order in orders)
    assert all(sorted(order[1:]) == ["a.equal.test", "b.equal.test", "c.equal.test"] for order in orders)
    assert len(orders) > 1


async def test_domain_without_mx_is_its_own_mail_host(dns_server: DnsServer) -> None:
    mx = resolver(dns_server)
    hosts = await mx.mail_hosts("implicit.test")
    assert [host.name for host in hosts] == ["implicit.test"]
    assert await mx.addresses(hosts[0]) == ["127.0.0.4"]


async def test_domain_without_mx_or_address_is_a_permanent_failure(dns_server: DnsServer) -> None:
    mx = resolver(dns_server)
    hosts = await mx.mail_hosts("nomail.test")
    assert await failure_of(mx.addresses(hosts[0])) == ("no_mail_host", True)


async def test_null_mx_is_a_permanent_failure(dns_server: DnsServer) -> None:
    assert await failure_of(resolver(dns_server).mail_hosts("nullmx.test")) == ("null_mx", True)


async def test_nxdomain_is_a_permanent_failure(dns_server: DnsServer) -> None:
    assert await failure_of(resolver(dns_server).mail_hosts("nowhere.test")) == ("nxdomain", True)


async def test_mx_host_that_does_not_exist_has_no_address(dns_server: DnsServer) -> None:
    mx = resolver(dns_server)
    hosts = await mx.mail_hosts("ghostmx.test")
    assert await failure_of(mx.addresses(hosts[0])) == ("no_mail_host", True)


async def test_servfail_is_temporary(dns_server: DnsServer) -> None:
    assert await failure_of(resolver(dns_server).mail_hosts("servfail.test")) == ("dns_temporary", False)


async def test_dns_timeout_is_temporary(dns_server: DnsServer) -> None:
    assert await failure_of(resolver(dns_server).mail_hosts("silent.test")) == ("dns_temporary", False)


async def test_routes_bypass_dns(dns_server: DnsServer) -> None:
    mx = resolver(dns_server, routes={"routed.test": "127.0.0.9:2600", "*": "smarthost.local"})
    assert await mx.mail_hosts("ROUTED.test") == [MailHost("127.0.0.9", 2600, ("127.0.0.9",), routed=True)]
    assert await mx.mail_hosts("nowhere.test") == [MailHost("smarthost.local", 2525, ("smarthost.local",), routed=True)]
    assert dns_server.queries == []


def test_host_port_parsing() -> None:
    assert parse_host_port("127.0.0.1:5353", 53) == ("127.0.0.1", 5353)
    assert parse_host_port("10.0.0.1", 53) == ("10.0.0.1", 53)
    assert parse_host_port("[::1]:5353", 53) == ("::1", 5353)
    assert parse_host_port("::1", 53) == ("::1", 53)


async def test_answers_are_cached_for_their_ttl_and_server_failures_are_not() -> None:
    zones = {"cached.test": {"MX": ["10 mx.cached.test."]}, "mx.cached.test": {"A": ["127.0.0.2"]}}
    with DnsServer(zones, servfail={"servfail.test"}, ttl_s=1) as server:
        mx = resolver(server)
        for _ in range(3):
            [host] = await mx.mail_hosts("cached.test")
            assert await mx.addresses(host) == ["127.0.0.2"]
        assert server.queries.count(("cached.test.", "MX")) == 1
        assert server.queries.count(("mx.cached.test.", "A")) == 1
        for _ in range(2):
            assert await failure_of(mx.mail_hosts("servfail.test")) == ("dns_temporary", False)
        assert server.queries.count(("servfail.test.", "MX")) >= 2
        for _ in range(2):
            assert await failure_of(mx.mail_hosts("missing.test")) == ("nxdomain", True)
        assert server.queries.count(("missing.test.", "MX")) == 1  # negative caching (RFC 2308)
        server.set_records("cached.test", {"MX": ["10 mx2.cached.test."]})
        deadline = time.monotonic() + 5
        while (await mx.mail_hosts("cached.test"))[0].name != "mx2.cached.test":
            assert time.monotonic() < deadline, "cached answer outlived its TTL"
            await asyncio.sleep(0.1)
