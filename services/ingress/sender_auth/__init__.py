"""Sender authentication on ingress: SPF, DKIM, DMARC, the Authentication-Results header and
the signals a relay attestation carries (PROTOCOL.md part E)."""

from services.ingress.sender_auth.evaluator import SenderAuthenticator, SenderFacts, evaluate
from services.ingress.sender_auth.header import authentication_results, strip_our_authentication_results
from services.ingress.sender_auth.verdict import UNEVALUATED, SenderAuthVerdict, SpfResult

__all__ = [
    "UNEVALUATED",
    "SenderAuthVerdict",
    "SenderAuthenticator",
    "SenderFacts",
    "SpfResult",
    "authentication_results",
    "evaluate",
    "strip_our_authentication_results",
]
