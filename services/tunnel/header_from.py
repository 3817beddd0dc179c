"""The outbound message's own `From` and `Sender` must be the persona (issue 9, item 1).

The envelope check (`outbound.check_sender`) only covers MAIL FROM; what a reader sees, and
what DMARC aligns and our DKIM signature vouches for, is the header `From`. So before an
outbound message is queued, its header section is parsed (RFC 5322, UTF-8 allowed as RFC 6532
allows it; stdlib `email` with `policy.default`) and every mailbox of `From` and of `Sender`
(when present) must be one of the persona's own addresses: its key as local part (any case,
`+tag` allowed as inbound routing allows it), at one of `mailDomains` (or any well-formed
domain when none are configured).
A display name is fine. Anything else, including a missing, repeated or unparsable `From`,
is refused with `header_from_not_allowed`.

The parse reads the header section only, at most `MAX_HEADER_BYTES`. Line endings are read as
the egress writes them on the wire (shared/normalize.py: CRLF, bare CR and bare LF
are each one line break), so the header this check sees is the header the recipient sees. A
header section with any parse defect is refused: a line another parser might read as a header
while ours ends the section there is exactly where a second `From` would hide.
"""

from __future__ import annotations

from email.errors import MessageDefect
from email.headerregistry import Address, Group
from email.message import EmailMessage
from email.parser import HeaderParser
from email.policy import default as default_policy

from services.tunnel.outbound import is_sender_domain
from shared.codes import OutboundRefusal
from shared.identity import InvalidKey, persona_key_of_local_part
from shared.normalize import lf_line_endings

# Far above any real header section (a gateway's is a few KiB), small enough to parse at once.
MAX_HEADER_BYTES = 64 * 1024
CHECKED_FIELDS = ("From", "Sender")


def header_section(message_head: bytes) -> bytes | None:
    """The header section (line endings as LF, without the blank line), or None when there is
    no end of it within `MAX_HEADER_BYTES` and the message goes on."""
    head = message_head[: MAX_HEADER_BYTES + 4]
    lines = lf_line_endings(head)
    if lines.startswith(b"\n"):
        return b""
    end = lines.find(b"\n\n")
    if end >= 0 and end <= MAX_HEADER_BYTES:
        return lines[: end + 1]
    if len(message_head) <= MAX_HEADER_BYTES:  # a message of headers only
        return lines
    return None


def check_header_from(message_head: bytes, persona_key: str, mail_domains: list[str]) -> OutboundRefusal | None:
    """None when every From/Sender mailbox is the persona's; else `header_from_not_allowed`.

    `message_head` is the start of the message (at least `MAX_HEADER_BYTES` + 4 bytes of it
    when the message is longer)."""
    section = header_section(message_head)
    if section is None:
        return OutboundRefusal.HEADER_FROM_NOT_ALLOWED
    headers = _parse(section.replace(b"\n", b"\r\n"))  # LF only by now: CRLF as on the wire
    if headers is None or len(headers.get_all("From") or []) != 1 or len(headers.get_all("Sender") or []) > 1:
        return OutboundRefusal.HEADER_FROM_NOT_ALLOWED
    for name in CHECKED_FIELDS:
        value = headers[name]
        if value is None:
            continue
        addresses: tuple[Address, ...] = getattr(value, "addresses", ())
        groups: tuple[Group, ...] = getattr(value, "groups", ())
        if getattr(value, "defects", ()) or not addresses or any(g.display_name is not None for g in groups):
            return OutboundRefusal.HEADER_FROM_NOT_ALLOWED  # From and Sender take mailboxes, never a group
        if not all(_is_persona_address(address, persona_key, mail_domains) for address in addresses):
            return OutboundRefusal.HEADER_FROM_NOT_ALLOWED
    return None


def _parse(section: bytes) -> EmailMessage | None:
    """Headers may be UTF-8 (RFC 6532: a raw `Café <key@…>` is a valid From); other 8-bit
    bytes are not text, so no reader would agree on what they say."""
    try:
        headers = HeaderParser(policy=default_policy).parsestr(section.decode("utf-8"))
        defects: list[MessageDefect] = list(headers.defects)
        for name in CHECKED_FIELDS:
            for value in headers.get_all(name) or []:  # parses the field: may raise on garbage
                defects.extend(getattr(value, "defects", ()))
    except (ValueError, TypeError, IndexError, AttributeError):  # UnicodeDecodeError is a ValueError
        return None
    if defects or not isinstance(headers, EmailMessage):
        return None
    return headers


def _is_persona_address(address: Address, persona_key: str, mail_domains: list[str]) -> bool:
    local_part, domain = address.username, address.domain
    if not local_part or not domain:
        return False
    try:
        if persona_key_of_local_part(local_part) != persona_key:
            return False
    except InvalidKey:
        return False
    if local_part.strip() != local_part or "\\" in local_part:
        return False
    return is_sender_domain(domain, mail_domains)
