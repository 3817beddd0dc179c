"""What a small authoritative nameserver answers to one query: the one home of that rule for
the two loopback DNS servers of this repository, `bench.dns_slow` (the sender-auth figure) and
tests/support/dns_server.py (the tests' resolver peer). Each keeps only its own serving (asyncio
with a delay, threads) and how it looks a name up; the wire parsing and the answer, NXDOMAIN or
NODATA built from that lookup live here.

It lives in bench/ because the bench must not import tests/ while tests/ may import bench/
(tests/system/test_bench.py already does), and because a test server has no place in the
packages the relay ships (shared, services, protege_relay: the image holds only those).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


@dataclass(frozen=True, slots=True)
class Records:
    """What a zone holds for one question: the asked type's rdata texts (none: NODATA), or an
    rcode that is not NOERROR (NXDOMAIN: no such name; SERVFAIL)."""

    texts: Sequence[str] = ()
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR


NO_SUCH_NAME = Records(rcode=dns.rcode.NXDOMAIN)

# (name as `name_key` spells it, type as "TXT") -> what to answer; None: no answer at all (a timeout)
Lookup = Callable[[str, str], Records | None]


def name_key(name: str) -> str:
    """`name` as the zones are keyed: lower case, one trailing dot."""
    return name.lower().rstrip(".") + "."


def parse_query(wire: bytes) -> dns.message.Message | None:
    """The query in `wire`, or None for bytes that are not one (they get no answer)."""
    try:
        return dns.message.from_wire(wire)
    except Exception:
        return None


def authoritative_answer(
    query: dns.message.Message, lookup: Lookup, ttl_s: int, *, negative_soa: dns.rrset.RRset | None = None
) -> bytes | None:
    """The response to `query` in wire format (AA set), or None to stay silent. A query without
    a question is FORMERR. `negative_soa`, when given, goes into the authority section of
    NXDOMAIN and NODATA answers, so resolvers may cache them (RFC 2308)."""
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    if not query.question:
        response.set_rcode(dns.rcode.FORMERR)
        return response.to_wire()
    question = query.question[0]
    records = lookup(name_key(question.name.to_text()), dns.rdatatype.to_text(question.rdtype))
    if records is None:
        return None
    response.set_rcode(records.rcode)
    if records.texts:
        response.answer.append(
            dns.rrset.from_text_list(question.name, ttl_s, dns.rdataclass.IN, question.rdtype, list(records.texts))
        )
    elif negative_soa is not None and records.rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        response.authority.append(negative_soa)
    return response.to_wire()
