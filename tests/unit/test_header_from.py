"""The outbound header From/Sender rule (services/tunnel/header_from.py): every mailbox of
`From` and `Sender` is the persona's own address; anything else, and anything unparsable, is
`header_from_not_allowed`."""

from __future__ import annotations

import pytest

from services.tunnel.header_from import MAX_HEADER_BYTES, check_header_from
from services.tunnel.outbound import check_sender
from shared.identity import Passport

KEY = Passport.from_seed(b"k" * 32).persona_key
OTHER = Passport.from_seed(b"o" * 32).persona_key
DOMAIN = "relay.test"
OWN = f"{KEY}@{DOMAIN}"
REFUSED = "header_from_not_allowed"


def check(head: str | bytes, domains: tuple[str, ...] = (DOMAIN,)) -> str | None:
    message = head.encode() if isinstance(head, str) else head
    return check_header_from(message, KEY, list(domains))


@pytest.mark.parametrize(
    "message",
    [
        f"From: {OWN}\r\n\r\nbody",
        f"From: <{OWN}>\r\nTo: a@example.org\r\n\r\nbody",
        f'From: "Agent Smith, the assistant" <{OWN}>\r\n\r\n',
        f"From: =?utf-8?q?Caf=C3=A9?= <{OWN}>\r\n\r\n",
        f"From: Café <{OWN}>\r\nSubject: naïve\r\n\r\n",  # RFC 6532 UTF-8 headers
        f"From: {KEY.upper()}@RELAY.TEST\r\n\r\n",
        f"From: {KEY}+newsletter@{DOMAIN}\r\n\r\n",
        f"From: Me <{OWN}>\nSubject: LF line endings, as the reference gateway sends\n\nbody\n",
        f"From: Me\r\n <{OWN}>\r\n\r\n",  # folded
        f"From: {OWN}, Me again <{KEY}+b@{DOMAIN}>\r\n\r\n",
        f"From: {OWN}\r\nSender: {KEY}+bot@{DOMAIN}\r\n\r\n",
        f"From: {OWN}\r\nSubject: headers only, no body",
        f"Subject: x\r\nFROM: {OWN}\r\n\r\nFrom: postmaster@{DOMAIN}\r\n",  # a From in the body is body
    ],
)
def test_own_addresses_are_allowed(message: str) -> None:
    assert check(message) is None


@pytest.mark.parametrize(
    "message",
    [
        f"From: {OTHER}@{DOMAIN}\r\n\r\n",
        f"From: postmaster@{DOMAIN}\r\n\r\n",
        "From: security@bank.example\r\n\r\n",
        f"From: {KEY}@bank.example\r\n\r\n",
        f'From: "{OWN}" <postmaster@{DOMAIN}>\r\n\r\n',
        f"From: {OWN}, security@bank.example\r\n\r\n",
        f"From: {OWN}\r\nFrom: security@bank.example\r\n\r\n",
        f"From: {OWN}\r\nSender: security@bank.example\r\n\r\n",
        f"From: {OWN}\r\nSender: {OWN}\r\nSender: {OWN}\r\n\r\n",
        "Subject: no From at all\r\n\r\nbody",
        f"\r\nFrom: {OWN}\r\n",  # no header section: that From is body
        "From: \r\n\r\n",
        "From: undisclosed:;\r\n\r\n",
        f"From: friends: {OWN}, security@bank.example;\r\n\r\n",
        f"From: only me: {OWN};\r\n\r\n",  # a group, which From never takes
        f"From: {KEY}@{DOMAIN}.\r\n\r\n",  # not an RFC 5322 addr-spec (the envelope may have it)
        f"From: <@bank.example:{OWN}>\r\n\r\n",
        f"From: {OWN}>\r\n\r\n",
        f"From: <{OWN}\r\n\r\n",
        f"From: {OWN}\r\nnot a header line\r\nFrom: security@bank.example\r\n\r\n",
        f"From: {OWN}\rFrom: security@bank.example\r\n\r\n",  # bare CR is a line break on the wire
        f"From: {KEY}@\r\n\r\n",
        f"From: +{KEY}@{DOMAIN}\r\n\r\n",
        f'From: "{KEY} "@{DOMAIN}\r\n\r\n',
        f"From: {OWN}\r\n\x00garbage\r\n\r\n",
        f"From: {KEY}\uff20{DOMAIN}\r\n\r\n",  # a fullwidth at sign is no at sign
        f"From: {OWN}\u2028From: security@bank.example\r\n\r\n",
    ],
)
def test_other_or_unparsable_addresses_are_refused(message: str) -> None:
    assert check(message) == REFUSED, message


def test_header_bytes_that_are_not_utf8_are_refused() -> None:
    assert check(f"From: Caf\xe9 <{OWN}>\r\n\r\n".encode("latin-1")) == REFUSED


def test_without_mail_domains_any_well_formed_domain_of_the_key() -> None:
    assert check(f"From: {KEY}@anything.example\r\n\r\n", domains=()) is None
    assert check(f"From: {OTHER}@anything.example\r\n\r\n", domains=()) == REFUSED
    assert check(f"From: {KEY}@[127.0.0.1]\r\n\r\n", domains=()) == REFUSED


def test_header_section_is_bounded() -> None:
    filler = b"X-Filler: " + b"a" * 70 + b"\r\n"
    within = f"From: {OWN}\r\n".encode() + filler * ((MAX_HEADER_BYTES - 200) // len(filler)) + b"\r\nbody"
    assert check(within) is None
    endless = f"From: {OWN}\r\n".encode() + filler * (2 * MAX_HEADER_BYTES // len(filler)) + b"\r\nbody"
    assert check(endless) == REFUSED
    big_body = f"From: {OWN}\r\n\r\n".encode() + b"x" * (4 * MAX_HEADER_BYTES)
    assert check(big_body) is None


@pytest.mark.parametrize("domains", [(), (DOMAIN,), ("Relay.Test.", "other.test")])
@pytest.mark.parametrize(
    "domain", [DOMAIN, "RELAY.TEST", "other.test", "bücher.example", "a..b", "-", "[127.0.0.1]", "evil.test"]
)
def test_header_from_and_envelope_sender_agree_on_the_domain(domain: str, domains: tuple[str, ...]) -> None:
    """One rule for which domains a persona sends from (outbound.is_sender_domain): the
    envelope check and the header check never disagree about a domain. (A trailing dot is not
    RFC 5322 header syntax, so the header refuses it before the domain rule.)"""
    envelope_ok = check_sender(f"{KEY}@{domain}", KEY, list(domains)) is None
    header_ok = check(f"From: <{KEY}@{domain}>\r\n\r\n", domains) is None
    assert envelope_ok == header_ok, (domain, domains, envelope_ok, header_ok)
