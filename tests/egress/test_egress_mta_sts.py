"""MTA-STS (RFC 8461, issue 14 item 4): policies found through a real local DNS server, fetched
from a local HTTPS server with trustme certificates, applied to real SMTP sinks (with and
without STARTTLS)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator

import pytest
import trustme

from services.egress import metrics
from services.egress.delivery import Deliverer, DomainReport, SmtpSettings
from services.egress.mta_sts import Mode, Policy, PolicyError, mx_matches, parse_policy, parse_txt
from services.egress.mta_sts_fetch import MAX_POLICY_BYTES, PolicySource
from services.egress.mx import MxResolver
from services.egress.outcome import Disposition
from tests.support.dns_server import DnsServer
from tests.support.mx_sink import MxSink
from tests.support.policy_server import PolicyServer
from tests.support.processes import free_port

DOMAIN = "example.test"
MX = "mx1.example.test"
MESSAGE = b"From: p@relay.test\r\nTo: user@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
POLICY_HOST = "127.0.0.5"


def policy_text(mode: str = "enforce", mx: tuple[str, ...] = ("mx1.example.test",), max_age: int = 86400) -> str:
    return "version: STSv1\r\n" + f"mode: {mode}\r\n" + "".join(f"mx: {m}\r\n" for m in mx) + f"max_age: {max_age}\r\n"


# --- parsing and matching ------------------------------------------------------------------------


def test_policy_file_parsing() -> None:
    policy = parse_policy("version: STSv1\nmode: enforce\nmx: MX1.Example.test.\nmx: *.backup.test\nmax_age: 604800\n")
    assert policy == Policy(Mode.ENFORCE, 604800, ("mx1.example.test", "*.backup.test"))
    assert parse_policy("version: STSv1\r\nmode: none\r\nmax_age: 99999999\r\n").max_age_s == 31_557_600
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n").mode is Mode.NONE
    assert parse_policy("version: STSv1\nmode: testing\nmx: a.test\nmax_age: 5\nextension: ignored\n").max_age_s == 5
    for broken in (
        "mode: enforce\nmx: a.test\nmax_age: 1\n",  # no version
        "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: soon\n",
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\n<html>\n",
    ):
        with pytest.raises(PolicyError):
            parse_policy(broken)


def test_txt_record_parsing() -> None:
    assert parse_txt([b"v=STSv1; id=20250101T000000"]) == "20250101T000000"
    assert parse_txt([b"v=spf1 -all", b"v=STSv1;id=abc;"]) == "abc"
    assert parse_txt([]) is None
    assert parse_txt([b"v=STSv1; id=a", b"v=STSv1; id=b"]) is None  # two records: no policy
    assert parse_txt([b"v=STSv1; id=not-alnum"]) is None
    assert parse_txt([b"v=STSv1"]) is None


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mx1.example.test", "MX1.example.test.", True),
        ("mx1.example.test", "mx2.example.test", False),
        ("*.example.test", "mx1.example.test", True),
        ("*.example.test", "example.test", False),
        ("*.example.test", "a.b.example.test", False),
        ("*.example.test", "mx1.example.test.evil", False),
        ("*.example.test", "mx1example.test", False),
    ],
)
def test_mx_pattern_matching(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


# --- delivery against real servers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    zones = {
        DOMAIN: {"MX": [f"10 {MX}."]},
        MX: {"A": ["127.0.0.2"]},
        f"_mta-sts.{DOMAIN}": {"TXT": ['"v=STSv1; id=policy1"']},
        f"mta-sts.{DOMAIN}": {"A": [POLICY_HOST]},
    }
    with DnsServer(zones) as server:
        yield server


@pytest.fixture
def policy_server(ca: trustme.CA) -> Iterator[PolicyServer]:
    with PolicyServer(POLICY_HOST, free_port(), ca.issue_cert(f"mta-sts.{DOMAIN}"), policy_text()) as server:
        yield server


def policy_source(
    dns_server: DnsServer, smtp_port: int, policy_server: PolicyServer, client_context: ssl.SSLContext
) -> PolicySource:
    return PolicySource(
        MxResolver(nameservers=[dns_server.nameserver], smtp_port=smtp_port, lifetime_s=2),
        tls_context=client_context,
        address_allowed=lambda _address: True,  # everything listens on loopback here
        policy_port=policy_server.port,
        fetch_timeout_s=5,
    )


def deliverer(
    dns_server: DnsServer, smtp_port: int, policy_server: PolicyServer, client_context: ssl.SSLContext
) -> Deliverer:
    resolver = MxResolver(nameservers=[dns_server.nameserver], smtp_port=smtp_port, lifetime_s=2)
    source = policy_source(dns_server, smtp_port, policy_server, client_context)
    settings = SmtpSettings("egress.relay.test", 5, 5, allow_private_destinations=True)
    return Deliverer(resolver, settings, mta_sts=source, sts_tls_context=client_context)


async def send(deliverer: Deliverer) -> DomainReport:
    return await deliverer.deliver(DOMAIN, "p@relay.test", ["user@example.test"], MESSAGE)


def violations(mode: str, reason: str) -> float:
    value: float = metrics.MTA_STS_VIOLATIONS.labels(mode, reason)._value.get()
    return value


async def test_enforce_and_listed_mx_with_a_valid_certificate_is_sent_over_tls(
    dns_server: DnsServer, smtp_port: int, policy_server: PolicyServer, client_context: ssl.SSLContext, ca: trustme.CA
) -> None:
    with MxSink("127.0.0.2", smtp_port, tls_cert=ca.issue_cert(MX)) as sink:
        report = await send(deliverer(dns_server, smtp_port, policy_server, client_context))
        [received] = sink.received()
    assert report.outcomes["user@example.test"].sent and report.tls and received.tls
    assert (report.mta_sts, report.mta_sts_violations) == ("enforce", [])
    assert policy_server.requests == [f"mta-sts.{DOMAIN} /.well-known/mta-sts.txt"]


async def test_enforce_and_mx_not_listed_is_deferred_without_a_connection(
    dns_server: DnsServer, smtp_port: int, policy_server: PolicyServer, client_context: ssl.SSLContext, ca: trustme.CA
) -> None:
    policy_server.policy = policy_text(mx=("mail.example.test", "*.other.test"))
    before = violations("enforce", "mx_not_listed")
    with MxSink("127.0.0.2", smtp_port, tls_cert=ca.issue_cert(MX)) as sink:
        report = await send(deliverer(dns_server, smtp_port, policy_server, client_context))
        assert sink.accepted == 0
    outcome = report.outcomes["user@example.test"]
    assert (outcome.disposition, outcome.error) == (Disposition.TEMPORARY, "mta_sts_policy_violation: mx_not_listed")
    assert report.mta_sts_violations == [f"{MX}:mx_not_listed"]
    assert violations("enforce", "mx_not_listed") == before + 1


async def test_enforce_and_mx_without_starttls_is_deferred(
    dns_server: DnsServer, smtp_port: int, policy_server: PolicyServer, client_context: ssl.SSLContext
) -> None:
    with MxSink("127.0.0.2", smtp_port) as sink:  # no STARTTLS offered
        report = await send(deliverer(dns_server, smtp_port, policy_server, client_context))
        assert sink.received() == [] and sink.data_payloads == []
    outcome = report.outcomes["user@example.test"]
    assert (outcome.disposition, outcome.error) == (
        Disposition.TEMPORARY,
        "mta_sts_policy_violation: starttls_not_offered",
    )


async def test_enforce_and_certificate_for_another_name_is_deferred(
    dns_server: DnsServer, smtp_port: int, policy_server: PolicyServer, client_context: ssl.SSLContext, ca: trustme.CA
) -> None:
    with MxSink("127.0.0.2", smtp_port, tls_cert=ca.issue_cert("somewhere-else.test")) as sink:
        report = await send(deliverer(dns_server, smtp_port, policy_server, client_context))
        assert sink.received() == []
    assert report.outcomes["user@example.test"].error == "mta_sts_policy_violation: certificate_invalid"


async def test_enforce_and_certificate_from_an_untrusted_ca_is_deferred(
    dns_server: DnsServer, smtp_port: int, policy_server: PolicyServer, client_context: ssl.SSLContext
) -> None:
    with MxSink("127.0.0.2", smtp_port, tls_cert=trustme.CA().issue_cert(MX)) as sink:
        report = await send(deliverer(dns_server, smtp_port, policy_server, client_context))
        assert sink.received() == []
    assert report.outcomes["user@example.test"].error == "mta_sts_policy_violation: certificate_invalid"


async def test_testing_mode_delivers_and_reports(
    dns_server: DnsServer, smtp_port: int, policy_server: PolicyServer, client_context: ssl.SSLContext
) -> None:
    policy_server.policy = policy_text(mode="testing", mx=("mail.example.test",))
    before = violations("testing", "mx_not_listed"), violations("testing", "starttls_not_offered")
    with MxSink("127.0.0.2", smtp_port) as sink:  # not listed, and no STARTTLS
        report = await send(deliverer(dns_server, smtp_port, policy_server, client_context))
        [received] = sink.received()
    assert report.outcomes["user@example.test"].sent and not received.tls
    assert report.mta_sts == "testing"
    assert report.mta_sts_violations == [f"{MX}:mx_not_listed", f"{MX}:starttls_not_offered"]
    after = violations("testing", "mx_not_listed"), violations("testing", "starttls_not_offered")
    assert after == (before[0] + 1, before[1] + 1)


async def test_testing_mode_with_a_bad_certificate_reports_and_still_uses_tls(
    dns_server: DnsServer, smtp_port: int, policy_server: PolicyServer, client_context: ssl.SSLContext
) -> None:
    policy_server.policy = policy_text(mode="testing")
    with MxSink("127.0.0.2", smtp_port, tls_cert=trustme.CA().issue_cert(MX)) as sink:
        report = await send(deliverer(dns_server, smtp_port, policy_server, client_context))
        [received] = sink.received()
    assert report.outcomes["user@example.test"].sent and received.tls  # unverified TLS, as without a policy
    assert report.mta_sts_violations == [f"{MX}:certificate_invalid"]


async def test_mode_none_and_no_record_change_nothing(
    dns_server: DnsServer, smtp_port: int, policy_server: PolicyServer, client_context: ssl.SSLContext
) -> None:
    policy_server.policy = policy_text(mode="none", mx=())
    with MxSink("127.0.0.2", smtp_port) as sink:
        report = await send(deliverer(dns_server, smtp_port, policy_server, client_context))
        dns_server.set_records(f"_mta-sts.{DOMAIN}", {})
        no_record = await send(deliverer(dns_server, smtp_port, policy_server, client_context))
        assert len(sink.received()) == 2
    assert report.outcomes["user@example.test"].sent and report.mta_sts is None
    assert no_record.outcomes["user@example.test"].sent and policy_server.fetched() == 1


async def test_policy_is_cached_until_its_id_changes_and_outlives_a_missing_record(
    dns_server: DnsServer, smtp_port: int, policy_server: PolicyServer, client_context: ssl.SSLContext
) -> None:
    dns_server.ttl_s = 0  # every lookup reaches the server, so record changes are seen at once
    source = policy_source(dns_server, smtp_port, policy_server, client_context)
    first = await source.policy(DOMAIN)
    assert first is not None and (first.mode, first.policy_id) == (Mode.ENFORCE, "policy1")
    assert await source.policy(DOMAIN) is first and policy_server.fetched() == 1  # same id: cached

    # an attacker who strips the STS record (or makes DNS fail) does not remove the policy
    dns_server.set_records(f"_mta-sts.{DOMAIN}", {"TXT": ['"v=spf1 -all"']})
    assert await source.policy(DOMAIN) is first
    dns_server.servfail.add(f"_mta-sts.{DOMAIN}.")
    assert await source.policy(DOMAIN) is first and policy_server.fetched() == 1
    dns_server.servfail.clear()

    # a new id: fetched again
    policy_server.policy = policy_text(mx=("*.example.test",))
    dns_server.set_records(f"_mta-sts.{DOMAIN}", {"TXT": ['"v=STSv1; id=policy2"']})
    second = await source.policy(DOMAIN)
    assert second is not None and (second.policy_id, second.mx) == ("policy2", ("*.example.test",))
    assert policy_server.fetched() == 2


async def test_concurrent_deliveries_share_one_policy_fetch(
    dns_server: DnsServer, smtp_port: int, policy_server: PolicyServer, client_context: ssl.SSLContext
) -> None:
    source = policy_source(dns_server, smtp_port, policy_server, client_context)
    policies = await asyncio.gather(*(source.policy(DOMAIN) for _ in range(20)))
    assert all(policy is policies[0] for policy in policies) and policies[0] is not None
    assert policy_server.fetched() == 1


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (404, "text/plain", policy_text()),
        (302, "text/plain", policy_text()),
        (200, "text/html", policy_text()),
        (200, "text/plain", "version: STSv1\nmode: enforce\n"),
        (200, "text/plain", policy_text() + "x-pad: " + "y" * MAX_POLICY_BYTES + "\n"),
    ],
    ids=["404", "redirect", "html", "invalid", "too-large"],
)
async def test_a_policy_that_cannot_be_fetched_is_no_policy(
    dns_server: DnsServer,
    smtp_port: int,
    policy_server: PolicyServer,
    client_context: ssl.SSLContext,
    status: int,
    content_type: str,
    body: str,
) -> None:
    policy_server.status, policy_server.content_type, policy_server.policy = status, content_type, body
    with MxSink("127.0.0.2", smtp_port) as sink:  # no TLS at all: only sent when there is no policy
        report = await send(deliverer(dns_server, smtp_port, policy_server, client_context))
        assert len(sink.received()) == 1
    assert report.outcomes["user@example.test"].sent and report.mta_sts is None
    assert policy_server.fetched() == 1


async def test_a_policy_server_with_an_invalid_certificate_is_no_policy(
    dns_server: DnsServer, smtp_port: int, client_context: ssl.SSLContext
) -> None:
    untrusted = trustme.CA().issue_cert(f"mta-sts.{DOMAIN}")
    with (
        PolicyServer(POLICY_HOST, free_port(), untrusted, policy_text()) as impostor,
        MxSink("127.0.0.2", smtp_port) as sink,
    ):
        report = await send(deliverer(dns_server, smtp_port, impostor, client_context))
        assert len(sink.received()) == 1 and impostor.fetched() == 0
    assert report.mta_sts is None
