"""The `Authentication-Results:` header (RFC 8601) we add, and the forged ones we remove.

Placement: the ingress prepends its `Received:` header first and this header directly below
it, both before the sender's first header line; the two are our hop's trace (RFC 8601 §2.1
treats Authentication-Results as trace information added by the receiving ADMD).

RFC 8601 §5: a header claiming OUR authserv-id can only be a forgery (we add ours after
evaluating, so any such header already in the message came from the sender), and downstream
readers would trust it. We delete every `Authentication-Results:` field in the sender's
header section whose authserv-id equals ours (case-insensitive). That is the one change to
the sender's bytes beyond prepending; every other byte, including other hosts'
Authentication-Results, is kept.

Values taken from the sender (MAIL FROM, HELO, d=, From domain) are printed only when they
are plain atoms/domains, so a crafted address cannot add properties, a `;` or a new line.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from email.utils import getaddresses

from services.ingress.sender_auth.verdict import SenderAuthVerdict

HEADER_NAME = b"authentication-results"
_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9\-_.]{0,252}[A-Za-z0-9])?$")
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]{1,64}$")
_COMMENT_OR_SPACE = re.compile(r"^(?:\s+|\([^()]*\))*")
_AUTHSERV_ID = re.compile(r'^"([^"]*)"|^[^\s;()]+')
_RESULTS_FIELD = re.compile(rb"^authentication-results[ \t]*:", re.IGNORECASE | re.MULTILINE)
_FIELD_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+$")


def header_fields(message: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """(start, end, lowercased name, unfolded value) of each field of the header section.

    The header section ends at the first empty line (CRLF or bare LF); the body is never
    scanned. A line that is neither a field nor a continuation is yielded with an empty name,
    so callers keep it untouched.
    """
    lines = _line_spans(message)
    current = next(lines, None)
    while current is not None:
        field_start, field_end = current
        if message[field_start:field_end] in (b"\r\n", b"\n"):
            return
        current = next(lines, None)
        while current is not None and message[current[0] : current[0] + 1] in (b" ", b"\t"):
            field_end = current[1]
            current = next(lines, None)
        field = message[field_start:field_end]
        name, colon, value = field.partition(b":")
        name = name.rstrip(b" \t")  # obsolete syntax allows WSP before the colon (RFC 5322 §4.5)
        if not colon or not _FIELD_NAME.match(name):
            yield field_start, field_end, b"", b""
            continue
        unfolded = re.sub(rb"\r?\n(?=[ \t])", b"", value).strip()
        yield field_start, field_end, name.lower(), unfolded


def header_section_end(message: bytes) -> int:
    """Offset of the empty line that ends the header section (or the message's length)."""
    crlf_blank = message.find(b"\n\r\n")
    limit = crlf_blank if crlf_blank >= 0 else len(message)
    lf_blank = message.find(b"\n\n", 0, limit + 1)  # only before it: never scan a whole body
    ends = [index for index in (crlf_blank, lf_blank) if index >= 0]
    return min(ends) + 1 if ends else len(message)


def _line_spans(message: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of each line, its LF included."""
    position = 0
    while position < len(message):
        newline = message.find(b"\n", position)
        end = len(message) if newline < 0 else newline + 1
        yield position, end
        position = end


def authserv_id_of(value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    text = _COMMENT_OR_SPACE.sub("", text)
    match = _AUTHSERV_ID.match(text)
    if match is None:
        return ""
    return match.group(1) if match.group(1) is not None else match.group()


def strip_our_authentication_results(message: bytes, authserv_id: str) -> bytes:
    """`message` without Authentication-Results fields that claim `authserv_id`."""
    if not _RESULTS_FIELD.search(message, 0, header_section_end(message)):
        return message  # the common case, found by one C-speed scan
    ours = authserv_id.lower()
    forged = [
        (start, end)
        for start, end, name, value in header_fields(message)
        if name == HEADER_NAME and authserv_id_of(value).lower() == ours
    ]
    if not forged:
        return message
    kept: list[bytes] = []
    position = 0
    for start, end in forged:
        kept.append(message[position:start])
        position = end
    kept.append(message[position:])
    return b"".join(kept)


def from_domains(message: bytes) -> list[str]:
    """The domains of every address in every From: field (RFC 5322 author), lowercased."""
    domains: list[str] = []
    for _, _, name, value in header_fields(message):
        if name != b"from":
            continue
        domains.extend(_cached_author_domains(value) if len(value) <= CACHED_FROM_BYTES else _author_domains(value))
    return domains


CACHED_FROM_BYTES = 512  # bounds the cache's memory: 1,024 entries of at most this


@functools.lru_cache(maxsize=1024)  # `email.utils.getaddresses` is slow; senders repeat their From
def _cached_author_domains(value: bytes) -> tuple[str, ...]:
    return _author_domains(value)


def _author_domains(value: bytes) -> tuple[str, ...]:
    return tuple(
        addr.rpartition("@")[2].strip().rstrip(".").lower()
        for _, addr in getaddresses([value.decode("utf-8", "replace")])
    )


def authentication_results(authserv_id: str, verdict: SenderAuthVerdict) -> bytes:
    """The folded header, CRLF-terminated, one method result per continuation line."""
    results = [_spf_result(verdict), *_dkim_results(verdict), _dmarc_result(verdict)]
    server = safe_domain(authserv_id) or "unknown"
    return (f"Authentication-Results: {server};\r\n\t" + ";\r\n\t".join(results) + "\r\n").encode("ascii")


def safe_domain(text: str) -> str:
    text = text.strip().rstrip(".")
    return text if _DOMAIN.match(text) else ""


def safe_address(text: str) -> str:
    local_part, at_sign, domain = text.rpartition("@")
    if at_sign and _LOCAL_PART.match(local_part) and safe_domain(domain):
        return f"{local_part}@{domain}"
    return safe_domain(domain) if at_sign else ""


def _token(result: str, timed_out: bool) -> str:
    return "temperror" if timed_out else result


def _spf_result(verdict: SenderAuthVerdict) -> str:
    spf = verdict.spf
    text = f"spf={_token(spf.result, spf.timed_out)}"
    if spf.identity == "helo":
        helo = safe_domain(spf.domain)
        return f"{text} smtp.helo={helo}" if helo else text
    mail_from = safe_address(spf.mail_from) or safe_domain(spf.domain)
    return f"{text} smtp.mailfrom={mail_from}" if mail_from else text


def _dkim_results(verdict: SenderAuthVerdict) -> list[str]:
    if not verdict.dkim:
        return ["dkim=none"]
    results = []
    for item in verdict.dkim:
        text = f"dkim={_token(item.result, item.timed_out)}"
        if safe_domain(item.domain):
            text += f" header.d={safe_domain(item.domain)}"
        if safe_domain(item.selector):
            text += f" header.s={safe_domain(item.selector)}"
        results.append(text)
    return results


def _dmarc_result(verdict: SenderAuthVerdict) -> str:
    dmarc = verdict.dmarc
    text = f"dmarc={_token(dmarc.result, dmarc.timed_out)}"
    if dmarc.policy in ("none", "quarantine", "reject"):
        text += f" (p={dmarc.policy})"
    from_domain = safe_domain(dmarc.from_domain)
    return f"{text} header.from={from_domain}" if from_domain else text
