"""Egress destinations (issue 9 item 6): an MX that resolves to loopback, private, link-local,
CGNAT, ULA, multicast or unspecified addresses is never connected to, unless `egress.routes`
names the domain or `egress.allowPrivateDestinations` is on. Real DNS server, real sinks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.egress.delivery import Deliverer, SmtpSettings
from services.egress.destinations import destination_allowed
from services.egress.mx import MxResolver
from services.egress.outcome import Disposition
from tests.support.dns_server import DnsServer
from tests.support.mx_sink import MxSink

MESSAGE = b"From: p@relay.test\r\nTo: user@victim.test\r\nSubject: hi\r\n\r\nhello\r\n"

REFUSED = [
    "127.0.0.1",
    "127.255.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # CGNAT
    "100.127.255.254",
    "192.0.0.8",
    "192.0.2.1",  # documentation
    "198.18.0.1",  # benchmarking
    "224.0.0.1",  # multicast
    "239.255.255.250",
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "::",
    "::1",
    "fe80::1",
    "fe80::1%eth0",
    "fc00::1",  # ULA
    "fd12:3456::1",
    "ff02::1",  # multicast
    "ff0e::1",  # global-scope multicast: still not a mail host
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.0.0.1",
    "::127.0.0.1",  # IPv4-compatible
    "2002:7f00:1::1",  # 6to4 around 127.0.0.1
    "2002:a00:1::1",  # 6to4 around 10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 around 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 around 169.254.169.254
    "64:ff9b:1::1",  # local-use NAT64
    "2001:db8::1",  # documentation
    "2001::1",  # Teredo
    "fec0::1",  # site-local (deprecated)
    "not-an-address",
]
ALLOWED = ["8.8.8.8", "93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001::1", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not destination_allowed(address)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_unicast_addresses_are_allowed(address: str) -> None:
    assert destination_allowed(address)


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    zones = {
        "victim.test": {"MX": ["10 mx.victim.test."]},
        "mx.victim.test": {"A": ["127.0.0.1"]},
        "mapped.test": {"MX": ["10 mx.mapped.test."]},
        "mx.mapped.test": {"AAAA": ["::ffff:127.0.0.1"]},
        "mixed.test": {"MX": ["10 private.mixed.test.", "20 public.mixed.test."]},
        "private.mixed.test": {"A": ["127.0.0.1"]},
        "public.mixed.test": {"A": ["192.0.2.10"]},  # documentation range: refused too
        "literal.test": {"MX": ["10 127.0.0.1."]},
    }
    with DnsServer(zones) as server:
        yield server


def deliverer(
    dns_server: DnsServer, smtp_port: int, *, allow_private: bool = False, routes: dict[str, str] | None = None
) -> Deliverer:
    resolver = MxResolver(nameservers=[dns_server.nameserver], routes=routes, smtp_port=smtp_port, lifetime_s=2)
    settings = SmtpSettings("egress.relay.test", 5, 5, allow_private_destinations=allow_private)
    return Deliverer(resolver, settings)


@pytest.mark.parametrize("domain", ["victim.test", "mapped.test", "mixed.test"])
async def test_mx_resolving_to_loopback_fails_permanently_without_a_connection(
    dns_server: DnsServer, smtp_port: int, domain: str
) -> None:
    with MxSink("127.0.0.1", smtp_port) as sink:
        report = await deliverer(dns_server, smtp_port).deliver(domain, "p@relay.test", [f"user@{domain}"], MESSAGE)
        outcome = report.outcomes[f"user@{domain}"]
        assert (outcome.disposition, outcome.error) == (Disposition.PERMANENT, "destination_not_allowed")
        assert report.connections == 0 and report.host is None
        assert all(skipped.endswith(":destination_not_allowed") for skipped in report.skipped), report.skipped
        assert sink.accepted == 0 and sink.received() == []
    print(f"{domain}: refused {report.skipped}")


async def test_the_setting_allows_a_loopback_mx(dns_server: DnsServer, smtp_port: int) -> None:
    with MxSink("127.0.0.1", smtp_port) as sink:
        report = await deliverer(dns_server, smtp_port, allow_private=True).deliver(
            "victim.test", "p@relay.test", ["user@victim.test"], MESSAGE
        )
        assert report.outcomes["user@victim.test"].sent and sink.accepted == 1
        assert [message.rcpt_tos for message in sink.received()] == [["user@victim.test"]]


async def test_a_route_names_the_domain_so_its_private_host_is_used(dns_server: DnsServer, smtp_port: int) -> None:
    routes = {"victim.test": f"127.0.0.1:{smtp_port}"}
    with MxSink("127.0.0.1", smtp_port) as sink:
        routed = await deliverer(dns_server, smtp_port, routes=routes).deliver(
            "victim.test", "p@relay.test", ["user@victim.test"], MESSAGE
        )
        not_routed = await deliverer(dns_server, smtp_port, routes=routes).deliver(
            "literal.test", "p@relay.test", ["user@literal.test"], MESSAGE
        )
        assert routed.outcomes["user@victim.test"].sent
        assert not_routed.outcomes["user@literal.test"].error == "destination_not_allowed"
        assert len(sink.received()) == 1
