"""What sender authentication found, and how that maps to attestation signals.

Each mechanism keeps its RFC 8601 result token (`pass`, `fail`, `softfail`, `neutral`, `none`,
`temperror`, `permerror`, `policy`) for the Authentication-Results header, and the identity
it was about. `signals()` reduces them to the three values an attestation carries, exactly as
the original relay's `auth-evaluator.ts` did:

* spf, dmarc: `pass` -> pass; `fail`, `softfail`, `permerror`, `temperror`, `policy` -> fail;
  anything else (`none`, `neutral`) -> unknown;
* dkim: any signature `pass` -> pass, else any signature in the fail group -> fail, else unknown.

One addition: a mechanism that ran out of DNS time (`timed_out`) is `unknown`, not `fail`
(the original answered `unknown` for everything when its evaluation threw). Slow DNS must
neither stall the SMTP session nor brand a sender as forged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.attestation import Signal

FAIL_RESULTS = frozenset({"fail", "softfail", "permerror", "temperror", "temperr", "policy"})


def signal_of(result: str, *, timed_out: bool = False) -> Signal:
    lowered = result.lower()
    if timed_out:
        return "unknown"
    if lowered == "pass":
        return "pass"
    if lowered in FAIL_RESULTS:
        return "fail"
    return "unknown"


@dataclass(frozen=True, slots=True)
class SpfResult:
    result: str
    domain: str = ""  # the domain checked: MAIL FROM's, or the HELO name for the null sender
    identity: str = "mailfrom"  # "mailfrom" | "helo"
    mail_from: str = ""
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class DkimResult:
    result: str
    domain: str = ""  # the signature's d=
    selector: str = ""
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class DmarcResult:
    result: str
    from_domain: str = ""
    policy: str = ""  # p= (or sp= for a subdomain) of the record used
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class SenderAuthVerdict:
    spf: SpfResult
    dkim: list[DkimResult] = field(default_factory=list)
    dmarc: DmarcResult = DmarcResult("none")

    def signals(self) -> dict[str, Signal]:
        dkim_signals = [signal_of(item.result, timed_out=item.timed_out) for item in self.dkim]
        dkim: Signal = "pass" if "pass" in dkim_signals else "fail" if "fail" in dkim_signals else "unknown"
        return {
            "spf": signal_of(self.spf.result, timed_out=self.spf.timed_out),
            "dkim": dkim,
            "dmarc": signal_of(self.dmarc.result, timed_out=self.dmarc.timed_out),
        }


# The whole evaluation ran out of time: every mechanism is a DNS temperror, every signal unknown.
UNEVALUATED = SenderAuthVerdict(
    SpfResult("temperror", timed_out=True),
    [DkimResult("temperror", timed_out=True)],
    DmarcResult("temperror", timed_out=True),
)
