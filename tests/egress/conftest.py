"""The egress: MX resolution against the local DNS server, delivery to local MX sinks, the arq
worker and PromptWorker against a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.dns_server import DnsServer

# Two MX hosts on two loopback addresses, a null MX, and a zone whose server fails.
MX_ZONES = {
    "example.test": {"MX": ["10 mx1.example.test.", "20 mx2.example.test."]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"]},
    "nullmx.test": {"MX": ["0 ."]},
}


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """The local authoritative DNS server with MX_ZONES; `broken.test` answers SERVFAIL."""
    with DnsServer(MX_ZONES, servfail={"broken.test"}) as server:
        yield server
