"""DKIM (RFC 6376) with dkimpy: every signature on the message, up to `MAX_SIGNATURES`.

Each signature gets its own result (RFC 8601 reports one `dkim=` per signature, and DMARC
needs the `d=` of each passing one). Key lookups go through the evaluation's
`BoundedResolver`; a lookup that timed out makes that signature `temperror` with
`timed_out`, which the signals treat as unknown rather than forged.
"""

from __future__ import annotations

import dkim

from services.ingress.sender_auth.resolver import BoundedResolver, DnsFailed, DnsTimedOut
from services.ingress.sender_auth.verdict import DkimResult
from shared.logs import get_logger

logger = get_logger(__name__)

MAX_SIGNATURES = 5
MIN_RSA_KEY_BITS = 1024
SIGNATURE_HEADER = b"dkim-signature"


def check_dkim(resolver: BoundedResolver, message: bytes) -> list[DkimResult]:
    """One result per DKIM-Signature header (none: an empty list, reported `dkim=none`)."""
    try:
        verifier = dkim.DKIM(message, minkey=MIN_RSA_KEY_BITS, timeout=int(resolver.remaining_s()) + 1)
    except Exception as exc:  # dkimpy's message parser on hostile input
        logger.debug("dkim parse error", exc_info=exc)
        return [DkimResult("permerror")]
    count = sum(1 for name, _ in verifier.headers if name.lower() == SIGNATURE_HEADER)
    return [_check_one(resolver, verifier, index) for index in range(min(count, MAX_SIGNATURES))]


def _check_one(resolver: BoundedResolver, verifier: dkim.DKIM, index: int) -> DkimResult:
    timed_out_before = resolver.timed_out
    resolver.timed_out = False

    def txt_record(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            records = resolver.txt(name.decode("ascii", "replace"))
        except DnsTimedOut:
            raise dkim.DnsTimeoutError(name) from None
        except DnsFailed:
            return None
        return records[0] if records else None

    verifier.domain = verifier.selector = None
    try:
        verified = bool(verifier.verify(idx=index, dnsfunc=txt_record))
        result = "pass" if verified else "fail"
    except dkim.DKIMException as exc:  # malformed signature, bad key record, body hash mismatch
        logger.debug("dkim signature error", exc_info=exc)
        result = "permerror" if isinstance(exc, dkim.MessageFormatError | dkim.KeyFormatError) else "fail"
    except Exception as exc:
        logger.debug("dkim verification error", exc_info=exc)
        result = "permerror"
    timed_out = resolver.timed_out
    resolver.timed_out = timed_out_before or timed_out
    return DkimResult(
        "temperror" if timed_out else result,
        _text(verifier.domain),
        _text(verifier.selector),
        timed_out=timed_out,
    )


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value or ""
