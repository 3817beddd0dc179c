"""Sender authentication on ingress: SPF, DKIM, DMARC against a local authoritative DNS
server, the signal mapping of the original relay, and the Authentication-Results header
over real SMTP sessions."""

from __future__ import annotations

import json
import smtplib
import time
from collections.abc import Callable

import pytest
import redis

from services.ingress.sender_auth import SenderFacts, authentication_results, evaluate
from services.ingress.sender_auth.dmarc import aligned, organizational_domain, parse_record
from services.ingress.sender_auth.header import strip_our_authentication_results
from services.ingress.sender_auth.resolver import build_resolver, parse_nameserver
from services.ingress.sender_auth.verdict import (
    DkimResult,
    DmarcResult,
    SenderAuthVerdict,
    SpfResult,
    signal_of,
)
from tests.support.dns_server import DnsServer
from tests.support.ingress import (
    InProcessIngress,
    address,
    inbox_entries,
)
from tests.support.sender_auth import (
    FOREIGN_IP,
    HONEST_IP,
    SENDER_DOMAIN,
    dkim_key,
    message_from,
    sender_zones,
    txt,
)

AUTHSERV_ID = "mx.relay.test"
StartIngress = Callable[..., InProcessIngress]


# --- signal mapping (relay/src/auth-evaluator.ts) ------------------------------------------


@pytest.mark.parametrize(
    ("result", "signal"),
    [
        ("pass", "pass"),
        ("PASS", "pass"),
        ("fail", "fail"),
        ("softfail", "fail"),
        ("permerror", "fail"),
        ("temperror", "fail"),
        ("policy", "fail"),
        ("none", "unknown"),
        ("neutral", "unknown"),
        ("", "unknown"),
    ],
)
def test_result_tokens_map_to_signals_as_the_original_did(result: str, signal: str) -> None:
    assert signal_of(result) == signal


def test_a_timed_out_mechanism_is_unknown_not_fail() -> None:
    assert signal_of("temperror", timed_out=True) == "unknown"


@pytest.mark.parametrize(
    ("dkim_results", "signal"),
    [
        (["fail", "pass"], "pass"),
        (["fail", "neutral"], "fail"),
        ([], "unknown"),
        (["neutral"], "unknown"),
        (["permerror"], "fail"),
    ],
)
def test_dkim_is_pass_if_any_signature_passes_else_fail_if_any_fails(dkim_results: list[str], signal: str) -> None:
    verdict = SenderAuthVerdict(SpfResult("none"), [DkimResult(result) for result in dkim_results], DmarcResult("none"))
    assert verdict.signals()["dkim"] == signal


# --- Authentication-Results header ---------------------------------------------------------


def test_authentication_results_header_is_folded_rfc_8601() -> None:
    verdict = SenderAuthVerdict(
        SpfResult("pass", SENDER_DOMAIN, "mailfrom", f"bob@{SENDER_DOMAIN}"),
        [DkimResult("pass", SENDER_DOMAIN, "sel1")],
        DmarcResult("pass", SENDER_DOMAIN, "reject"),
    )
    assert authentication_results(AUTHSERV_ID, verdict) == (
        b"Authentication-Results: mx.relay.test;\r\n"
        b"\tspf=pass smtp.mailfrom=bob@sender.test;\r\n"
        b"\tdkim=pass header.d=sender.test header.s=sel1;\r\n"
        b"\tdmarc=pass (p=reject) header.from=sender.test\r\n"
    )


def test_sender_controlled_values_cannot_add_results_or_lines() -> None:
    verdict = SenderAuthVerdict(
        SpfResult("fail", "evil.test", "mailfrom", "x;dkim=pass@evil.test"),
        [DkimResult("fail", "evil.test;\r\nX-Injected: 1", "s")],
        DmarcResult("fail", "evil.test\r\nX: y"),
    )
    header = authentication_results(AUTHSERV_ID, verdict)
    assert header.count(b"dkim=") == 1
    assert b"dkim=pass" not in header
    assert b"X-Injected" not in header and b"X: y" not in header
    assert b"smtp.mailfrom=evil.test;" in header  # only the (safe) domain of the odd address


def test_forged_results_claiming_our_authserv_id_are_removed_and_others_kept() -> None:
    message = (
        b"Authentication-Results: mx.relay.test; spf=pass smtp.mailfrom=a@b.test\r\n"
        b"Authentication-Results: other.example; dkim=pass header.d=b.test\r\n"
        b"authentication-results : MX.RELAY.TEST;\r\n\tdkim=pass\r\n"
        b'Authentication-Results: "mx.relay.test"; dmarc=pass\r\n'
        b"Authentication-Results: (comment) mx.relay.test 1; dmarc=pass\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"Authentication-Results: mx.relay.test; in the body, not a header\r\n"
    )
    assert strip_our_authentication_results(message, AUTHSERV_ID) == (
        b"Authentication-Results: other.example; dkim=pass header.d=b.test\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"Authentication-Results: mx.relay.test; in the body, not a header\r\n"
    )


def test_bare_lf_messages_are_stripped_too_and_the_body_is_never_touched() -> None:
    message = (
        b"Authentication-Results: mx.relay.test; dkim=pass\nSubject: lf\n\n"
        b"Authentication-Results: mx.relay.test; body\r\n\r\nmore\n"
    )
    assert strip_our_authentication_results(message, AUTHSERV_ID) == (
        b"Subject: lf\n\nAuthentication-Results: mx.relay.test; body\r\n\r\nmore\n"
    )


def test_a_message_without_our_results_is_returned_unchanged() -> None:
    message = b"Subject: x\r\nAuthentication-Results: mx.relay.test.evil; spf=pass\r\n\r\nbody\r\n"
    assert strip_our_authentication_results(message, AUTHSERV_ID) is message


# --- DMARC pieces --------------------------------------------------------------------------


def test_organizational_domain_uses_the_public_suffix_list() -> None:
    assert organizational_domain("mail.news.example.co.uk") == "example.co.uk"
    assert organizational_domain("a.b.sender.test") == "sender.test"
    # "last two labels" would make these one organization and let a forger align
    assert not aligned("attacker.co.uk", "victim.co.uk", "r")


@pytest.mark.parametrize(
    ("identifier", "from_domain", "mode", "expected"),
    [
        ("bounce.sender.test", "sender.test", "r", True),
        ("bounce.sender.test", "sender.test", "s", False),
        ("SENDER.test.", "sender.test", "s", True),
        ("other.test", "sender.test", "r", False),
        ("", "x.test", "r", False),
    ],
)
def test_alignment_relaxed_and_strict(identifier: str, from_domain: str, mode: str, expected: bool) -> None:
    assert aligned(identifier, from_domain, mode) is expected


def test_dmarc_record_parsing() -> None:
    assert parse_record("v=DMARC1; p=reject; adkim=s") == {"v": "DMARC1", "p": "reject", "adkim": "s"}
    assert parse_record("v=spf1 -all") is None
    assert parse_record("p=reject; v=DMARC1") is None  # v= must come first


def test_nameserver_forms() -> None:
    assert parse_nameserver("192.0.2.1") == ("192.0.2.1", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[2001:db8::1]:5353") == ("2001:db8::1", 5353)


# --- evaluation against a local DNS server -------------------------------------------------


def run(
    server: DnsServer,
    client_ip: str,
    mail_from: str,
    message: bytes,
    budget_s: float = 3.0,
    helo: str = "mta.sender.test",
) -> SenderAuthVerdict:
    resolver = build_resolver([server.nameserver])
    return evaluate(resolver, SenderFacts(client_ip, helo, mail_from, message), time.monotonic() + budget_s)


SIGNED = dkim_key().sign(message_from(f"alice@{SENDER_DOMAIN}"))


def test_listed_ip_signed_and_aligned_passes_all_three(dns_server: DnsServer) -> None:
    verdict = run(dns_server, HONEST_IP, f"bounce@{SENDER_DOMAIN}", SIGNED)
    assert verdict.signals() == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    assert (verdict.dkim[0].domain, verdict.dkim[0].selector) == (SENDER_DOMAIN, "sel1")
    assert (verdict.dmarc.from_domain, verdict.dmarc.policy) == (SENDER_DOMAIN, "reject")


def test_unlisted_ip_fails_spf_but_aligned_dkim_still_passes_dmarc(dns_server: DnsServer) -> None:
    verdict = run(dns_server, FOREIGN_IP, f"bounce@{SENDER_DOMAIN}", SIGNED)
    assert verdict.spf.result == "fail"
    assert verdict.signals() == {"spf": "fail", "dkim": "pass", "dmarc": "pass"}


def test_forged_unsigned_mail_from_an_unlisted_ip_fails_dmarc(dns_server: DnsServer) -> None:
    verdict = run(dns_server, FOREIGN_IP, f"ceo@{SENDER_DOMAIN}", message_from(f"ceo@{SENDER_DOMAIN}"))
    assert verdict.dkim == []
    assert verdict.signals() == {"spf": "fail", "dkim": "unknown", "dmarc": "fail"}


def test_altered_body_fails_dkim(dns_server: DnsServer) -> None:
    tampered = SIGNED.replace(b"body line", b"pay me now")
    verdict = run(dns_server, HONEST_IP, f"bounce@{SENDER_DOMAIN}", tampered)
    assert verdict.dkim[0].result == "fail"
    assert verdict.signals() == {"spf": "pass", "dkim": "fail", "dmarc": "pass"}  # SPF still aligned


def test_signature_whose_key_is_not_published_fails_dkim(dns_server: DnsServer) -> None:
    signed = dkim_key().sign(message_from(f"alice@{SENDER_DOMAIN}"), selector="gone")
    verdict = run(dns_server, FOREIGN_IP, f"bounce@{SENDER_DOMAIN}", signed)
    assert verdict.signals() == {"spf": "fail", "dkim": "fail", "dmarc": "fail"}


def test_valid_signature_of_an_unaligned_domain_does_not_pass_dmarc(dns_server: DnsServer) -> None:
    dns_server.set_records("sel1._domainkey.thirdparty.test", {"TXT": [dkim_key().record()]})
    signed = dkim_key().sign(message_from(f"alice@{SENDER_DOMAIN}"), domain="thirdparty.test")
    verdict = run(dns_server, FOREIGN_IP, f"bounce@{SENDER_DOMAIN}", signed)
    assert verdict.signals() == {"spf": "fail", "dkim": "pass", "dmarc": "fail"}


@pytest.mark.parametrize(("spf_record", "expected"), [("v=spf1 ~all", "fail"), ("v=spf1 ?all", "unknown")])
def test_softfail_is_fail_and_neutral_is_unknown(dns_server: DnsServer, spf_record: str, expected: str) -> None:
    dns_server.set_records(SENDER_DOMAIN, {"TXT": [txt(spf_record)]})
    assert run(dns_server, HONEST_IP, f"b@{SENDER_DOMAIN}", SIGNED).signals()["spf"] == expected


def test_domain_without_spf_or_dmarc_records_is_unknown(dns_server: DnsServer) -> None:
    dns_server.set_records("plain.test", {"A": ["127.0.0.9"]})
    verdict = run(dns_server, HONEST_IP, "x@plain.test", message_from("x@plain.test"))
    assert (verdict.spf.result, verdict.dmarc.result) == ("none", "none")
    assert verdict.signals() == {"spf": "unknown", "dkim": "unknown", "dmarc": "unknown"}


def test_subdomain_uses_the_organizational_record_and_its_sp_policy(dns_server: DnsServer) -> None:
    dns_server.set_records(f"_dmarc.{SENDER_DOMAIN}", {"TXT": [txt("v=DMARC1; p=reject; sp=quarantine")]})
    dns_server.set_records(f"bounce.{SENDER_DOMAIN}", {"TXT": [txt(f"v=spf1 ip4:{HONEST_IP} -all")]})
    message = message_from(f"news@news.{SENDER_DOMAIN}")
    verdict = run(dns_server, HONEST_IP, f"b@bounce.{SENDER_DOMAIN}", message)
    assert (verdict.dmarc.result, verdict.dmarc.policy) == ("pass", "quarantine")
    assert (f"_dmarc.news.{SENDER_DOMAIN}.", "TXT") in dns_server.queries  # asked the From domain first


def test_strict_spf_alignment_refuses_a_subdomain(dns_server: DnsServer) -> None:
    dns_server.set_records(f"_dmarc.{SENDER_DOMAIN}", {"TXT": [txt("v=DMARC1; p=reject; aspf=s")]})
    dns_server.set_records(f"bounce.{SENDER_DOMAIN}", {"TXT": [txt(f"v=spf1 ip4:{HONEST_IP} -all")]})
    verdict = run(dns_server, HONEST_IP, f"b@bounce.{SENDER_DOMAIN}", message_from(f"a@{SENDER_DOMAIN}"))
    assert verdict.signals() == {"spf": "pass", "dkim": "unknown", "dmarc": "fail"}


def test_two_from_domains_are_a_dmarc_permerror(dns_server: DnsServer) -> None:
    message = b"From: a@sender.test, b@other.test\r\nSubject: x\r\n\r\nhi\r\n"
    verdict = run(dns_server, HONEST_IP, f"b@{SENDER_DOMAIN}", message)
    assert verdict.dmarc.result == "permerror"
    assert verdict.signals()["dmarc"] == "fail"


def test_null_sender_is_checked_against_the_helo_name(dns_server: DnsServer) -> None:
    dns_server.set_records("mta.sender.test", {"TXT": [txt(f"v=spf1 ip4:{HONEST_IP} -all")]})
    verdict = run(dns_server, HONEST_IP, "", SIGNED)
    assert (verdict.spf.result, verdict.spf.identity, verdict.spf.domain) == ("pass", "helo", "mta.sender.test")


def test_servfail_is_a_temperror_which_maps_to_fail() -> None:
    with DnsServer(sender_zones(), servfail={SENDER_DOMAIN}) as server:
        verdict = run(server, HONEST_IP, f"b@{SENDER_DOMAIN}", SIGNED)
    assert verdict.spf.result == "temperror" and not verdict.spf.timed_out
    assert verdict.signals()["spf"] == "fail"


def test_silent_dns_is_unknown_and_bounded_by_the_budget() -> None:
    zones = sender_zones()
    with DnsServer(zones, silent=set(zones)) as server:
        started = time.monotonic()
        verdict = run(server, HONEST_IP, f"b@{SENDER_DOMAIN}", SIGNED, budget_s=1.0)
        elapsed_s = time.monotonic() - started
    assert elapsed_s < 1.5
    assert verdict.signals() == {"spf": "unknown", "dkim": "unknown", "dmarc": "unknown"}
    assert verdict.spf.timed_out and verdict.dkim[0].timed_out and verdict.dmarc.timed_out


# --- over SMTP: the header the gateway receives --------------------------------------------


def auth_ingress(start_ingress: StartIngress, server: DnsServer, **env: str) -> InProcessIngress:
    return start_ingress(
        RELAY_SMTP_EVALUATE_SENDER_AUTH="true",
        RELAY_SMTP_AUTH_NAMESERVERS=json.dumps([server.nameserver]),
        **env,
    )


def send_from(port: int, source_ip: str, mail_from: str, recipient: str, message: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source_ip, 0)) as client:
        client.ehlo("mta.sender.test")
        assert client.mail(mail_from)[0] == 250
        assert client.rcpt(recipient)[0] == 250
        return client.data(message)


def stored_headers(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(our Received, our Authentication-Results, the rest) of a stored message."""
    assert data.startswith(b"Received: from ")
    received_end = data.index(b"\r\n", data.index(b"\r\n\tfor <") + 2) + 2
    assert data[received_end:].startswith(b"Authentication-Results: ")
    results_end = data.index(b"\r\n", data.index(b"\tdmarc=", received_end)) + 2
    return data[:received_end], data[received_end:results_end], data[results_end:]


def test_honest_signed_mail_gets_a_passing_authentication_results_header(
    start_ingress: StartIngress, dns_server: DnsServer, persona: str, redis_client: redis.Redis
) -> None:
    ingress = auth_ingress(start_ingress, dns_server)
    code, _ = send_from(ingress.port, HONEST_IP, f"bounce@{SENDER_DOMAIN}", address(persona), SIGNED)
    assert code == 250
    [entry] = inbox_entries(redis_client, persona)
    _, results, original = stored_headers(entry.data)
    assert results == (
        b"Authentication-Results: mx.relay.test;\r\n"
        b"\tspf=pass smtp.mailfrom=bounce@sender.test;\r\n"
        b"\tdkim=pass header.d=sender.test header.s=sel1;\r\n"
        b"\tdmarc=pass (p=reject) header.from=sender.test\r\n"
    )
    assert original == SIGNED


def test_mail_from_an_unlisted_address_is_recorded_as_spf_fail(
    start_ingress: StartIngress, dns_server: DnsServer, persona: str, redis_client: redis.Redis
) -> None:
    ingress = auth_ingress(start_ingress, dns_server)
    forged = message_from(f"ceo@{SENDER_DOMAIN}")
    assert send_from(ingress.port, FOREIGN_IP, f"ceo@{SENDER_DOMAIN}", address(persona), forged)[0] == 250
    [entry] = inbox_entries(redis_client, persona)
    _, results, original = stored_headers(entry.data)
    assert b"\tspf=fail smtp.mailfrom=ceo@sender.test;\r\n\tdkim=none;\r\n\tdmarc=fail (p=reject)" in results
    assert entry.client_ip == FOREIGN_IP
    assert original == forged


def test_a_forged_header_with_our_authserv_id_is_stripped_before_ours_is_added(
    start_ingress: StartIngress, dns_server: DnsServer, persona: str, redis_client: redis.Redis
) -> None:
    ingress = auth_ingress(start_ingress, dns_server)
    forged_results = b"Authentication-Results: mx.relay.test; spf=pass; dkim=pass; dmarc=pass\r\n"
    theirs = b"Authentication-Results: mx.sender.test; spf=pass\r\n"
    message = forged_results + theirs + message_from(f"ceo@{SENDER_DOMAIN}")
    assert send_from(ingress.port, FOREIGN_IP, f"ceo@{SENDER_DOMAIN}", address(persona), message)[0] == 250
    [entry] = inbox_entries(redis_client, persona)
    _, results, rest = stored_headers(entry.data)
    assert b"dmarc=fail" in results
    assert entry.data.count(b"Authentication-Results: mx.relay.test;") == 1
    assert rest == theirs + message_from(f"ceo@{SENDER_DOMAIN}")


def test_unresponsive_dns_delays_the_reply_by_at_most_the_budget(
    start_ingress: StartIngress, persona: str, redis_client: redis.Redis
) -> None:
    zones = sender_zones()
    with DnsServer(zones, silent=set(zones)) as server:
        ingress = auth_ingress(start_ingress, server, RELAY_SMTP_SENDER_AUTH_TIMEOUT_MS="700")
        started = time.monotonic()
        code, _ = send_from(ingress.port, HONEST_IP, f"b@{SENDER_DOMAIN}", address(persona), SIGNED)
        elapsed_s = time.monotonic() - started
    assert code == 250
    assert elapsed_s < 2.5
    [entry] = inbox_entries(redis_client, persona)
    _, results, _ = stored_headers(entry.data)
    assert b"spf=temperror" in results and b"dkim=temperror" in results and b"dmarc=temperror" in results


def test_without_the_flag_no_header_is_added_and_no_dns_is_asked(
    start_ingress: StartIngress, dns_server: DnsServer, persona: str, redis_client: redis.Redis
) -> None:
    ingress = start_ingress(RELAY_SMTP_AUTH_NAMESERVERS=json.dumps([dns_server.nameserver]))
    assert send_from(ingress.port, HONEST_IP, f"b@{SENDER_DOMAIN}", address(persona), SIGNED)[0] == 250
    [entry] = inbox_entries(redis_client, persona)
    assert b"Authentication-Results" not in entry.data
    assert entry.data.endswith(SIGNED)
    assert dns_server.queries == []
