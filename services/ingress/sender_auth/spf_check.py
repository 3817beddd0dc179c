"""SPF (RFC 7208) with pyspf, its DNS routed through this evaluation's `BoundedResolver`.

pyspf looks names up through the module-level function `spf.DNSLookup`. We replace it once
with `_lookup`, which uses the resolver of the evaluation running in the current thread
(a ContextVar; each evaluation runs in its own executor call) and falls back to pyspf's own
lookup when none is set, so other users of pyspf in the process are unaffected. It returns
the same shapes pyspf's dnspython lookup does.
"""

from __future__ import annotations

import contextvars
from typing import Any

import spf

from services.ingress.sender_auth.resolver import BoundedResolver, DnsFailed, DnsTimedOut
from services.ingress.sender_auth.verdict import SpfResult
from shared.logs import get_logger

logger = get_logger(__name__)

_current_resolver: contextvars.ContextVar[BoundedResolver | None] = contextvars.ContextVar("spf_resolver", default=None)
_pyspf_lookup = spf.DNSLookup


def _lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[tuple[tuple[str, str], Any]]:
    resolver = _current_resolver.get()
    if resolver is None:
        records: list[tuple[tuple[str, str], Any]] = _pyspf_lookup(name, qtype, strict, timeout)
        return records
    try:
        answers = resolver.resolve(name, qtype, timeout_s=timeout)
    except (DnsTimedOut, DnsFailed) as exc:
        raise spf.TempError(f"DNS {type(exc).__name__}") from None
    results: list[tuple[tuple[str, str], Any]] = []
    for rdata in answers:
        value: Any
        if qtype in ("A", "AAAA"):
            value = rdata.address  # type: ignore[attr-defined]
        elif qtype == "MX":
            value = (rdata.preference, rdata.exchange)  # type: ignore[attr-defined]
        elif qtype == "PTR":
            value = rdata.target.to_text(True)  # type: ignore[attr-defined]
        elif qtype in ("TXT", "SPF"):
            value = rdata.strings  # type: ignore[attr-defined]
        else:
            continue
        results.append(((name, qtype), value))
    return results


spf.DNSLookup = _lookup


def check_spf(resolver: BoundedResolver, client_ip: str, mail_from: str, helo: str) -> SpfResult:
    """SPF for MAIL FROM (or `postmaster@<helo>` for the null sender, RFC 7208 §2.4)."""
    token = _current_resolver.set(resolver)
    try:
        query = spf.query(i=client_ip, s=mail_from, h=helo, querytime=max(resolver.remaining_s(), 0.001))
        result, _, _ = query.check()
    except Exception as exc:  # pyspf raises assorted errors on hostile input; never fatal here
        logger.debug("spf evaluation error", exc_info=exc)
        return SpfResult("none", mail_from=mail_from, timed_out=resolver.timed_out)
    finally:
        _current_resolver.reset(token)
    identity = "helo" if query.ident == "helo" else "mailfrom"
    domain = str(query.o or "") if identity == "mailfrom" else helo
    # A timeout matters only where it decided the result (pyspf ignores some failed lookups).
    timed_out = resolver.timed_out and result == "temperror"
    return SpfResult(str(result), domain, identity, mail_from, timed_out=timed_out)
