"""The `Received:` trace header the ingress prepends (RFC 5321 §4.4, RFC 3848, RFC 6531).

    Received: from <helo> (<rdns> [<ip>])
        by <our hostname> with ESMTPS id <queue id>
        for <recipient>; <RFC 5322 date>

(continuation lines start with a TAB).

It is the only change we make to a message. Each recipient persona gets its own copy naming
only its own address in `for`, so one recipient never learns another's (Bcc) address.
Client-supplied text (HELO name, recipient) is reduced to safe characters: a CR or a stray
parenthesis there must not be able to forge header structure.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import format_datetime

MAX_HELO_CHARS = 255
_UNSAFE_HELO = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f<>]")


@dataclass(frozen=True, slots=True)
class TraceInfo:
    """Facts about the SMTP session that the trace header records."""

    helo: str
    client_ip: str
    reverse_name: str | None
    extended: bool
    tls: bool
    smtputf8: bool


def protocol_name(info: TraceInfo) -> str:
    """`with` keyword: SMTP / ESMTP / UTF8SMTP, plus `S` when under TLS (RFC 3848, 6531)."""
    if info.smtputf8:
        base = "UTF8SMTP"
    elif info.extended:
        base = "ESMTP"
    else:
        base = "SMTP"
    return base + ("S" if info.tls else "")


@functools.lru_cache(maxsize=1024)
def address_literal(client_ip: str) -> str:
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3); remembered per client IP
    (`ipaddress` parsing is ~10 us, once per message otherwise)."""
    try:
        parsed = ipaddress.ip_address(client_ip)
    except ValueError:
        return f"[{_safe_helo(client_ip)}]"
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return f"[{parsed.ipv4_mapped}]"
        return f"[IPv6:{parsed.compressed}]"
    return f"[{parsed}]"


_date_cache: tuple[tuple[int, timedelta | None], str] | None = None


def rfc5322_date(when: datetime) -> str:
    """`format_datetime`, computed once per second and offset (one per message otherwise)."""
    global _date_cache
    key = (int(when.timestamp() // 1), when.utcoffset())
    if _date_cache is None or _date_cache[0] != key:
        _date_cache = (key, format_datetime(when.replace(microsecond=0)))
    return _date_cache[1]


def received_header(info: TraceInfo, hostname: str, queue_id: str, recipient: str, when: datetime) -> bytes:
    """The complete folded header, CRLF-terminated, as bytes to prepend to the message."""
    tcp_info = address_literal(info.client_ip)
    if info.reverse_name:
        tcp_info = f"{_safe_helo(info.reverse_name)} {tcp_info}"
    helo = _safe_helo(info.helo) or "unknown"
    header = (
        f"Received: from {helo} ({tcp_info})\r\n"
        f"\tby {_safe_helo(hostname)} with {protocol_name(info)} id {queue_id}\r\n"
        f"\tfor <{_CONTROL.sub('', recipient)}>; {rfc5322_date(when)}\r\n"
    )
    return header.encode("utf-8", "replace")


def _safe_helo(text: str) -> str:
    return _UNSAFE_HELO.sub("_", text[:MAX_HELO_CHARS])
