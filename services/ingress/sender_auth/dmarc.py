"""DMARC (RFC 7489): the From domain's policy record and identifier alignment.

* The policy record is the single `v=DMARC1` TXT record at `_dmarc.<From domain>`, else at
  `_dmarc.<organizational domain>` (§6.6.3). No record (or several): result `none`.
* The organizational domain is the registrable domain by the Public Suffix List
  (`publicsuffixlist`, which ships the list offline). A "last two labels" rule would make
  `victim.co.uk` and `attacker.co.uk` one organization and let relaxed alignment pass for a
  forger, so we pay for the list.
* Alignment: relaxed (default) compares organizational domains, strict (`adkim=s`,
  `aspf=s`) compares the domains exactly. DMARC passes when SPF passed for an aligned
  MAIL FROM (or HELO) domain, or any DKIM signature passed with an aligned `d=`; otherwise it
  fails (whatever `p=` says: the policy is the receiver's business, reported in a comment).
* A message with no From domain is `none`; several From addresses in different domains is
  `permerror` (a known way to confuse which author DMARC checks).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from services.ingress.sender_auth.resolver import BoundedResolver, DnsFailed, DnsTimedOut
from services.ingress.sender_auth.verdict import DkimResult, DmarcResult, SpfResult

POLICY_LABEL = "_dmarc"
VERSION_TAG = "v=dmarc1"


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    return PublicSuffixList()


def load_public_suffix_list() -> None:
    """Parse the Public Suffix List now (at start) rather than in the first message's path:
    ~0.1 s of CPU once per process."""
    _public_suffixes()


def organizational_domain(domain: str) -> str:
    if len(domain) > MAX_DOMAIN_CHARS:  # not a domain; and never let it into the cache
        return domain.lower().rstrip(".")
    return _organizational_domain(domain)


MAX_DOMAIN_CHARS = 255


@functools.lru_cache(maxsize=4096)  # a Public Suffix List walk per message, for the same few domains
def _organizational_domain(domain: str) -> str:
    domain = domain.lower().rstrip(".")
    return _public_suffixes().privatesuffix(domain) or domain


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    identifier, from_domain = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not identifier or not from_domain:
        return False
    if mode == "s":
        return identifier == from_domain
    return organizational_domain(identifier) == organizational_domain(from_domain)


def parse_record(text: str) -> dict[str, str] | None:
    """Tag -> value of a DMARC record, or None when it is not one (`v=DMARC1` first)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, equals, value = part.strip().partition("=")
        if equals:
            tags.setdefault(name.strip().lower(), value.strip())
    if not text.strip().lower().replace(" ", "").startswith(VERSION_TAG):
        return None
    return tags


async def find_policy(resolver: BoundedResolver, from_domain: str) -> tuple[dict[str, str] | None, bool]:
    """(record tags, whether it came from the organizational domain). Both names are asked at
    once: the second is needed whenever the first has no record, and a slow nameserver then
    costs one round trip, not two."""
    org_domain = organizational_domain(from_domain)
    names = {f"{POLICY_LABEL}.{from_domain}", f"{POLICY_LABEL}.{org_domain}"}
    await resolver.fetch_all((name, "TXT") for name in names)
    record = await _record_at(resolver, from_domain)
    if record is not None:
        return record, False
    if org_domain != from_domain:
        return await _record_at(resolver, org_domain), True
    return None, False


async def _record_at(resolver: BoundedResolver, domain: str) -> dict[str, str] | None:
    texts = await resolver.txt_async(f"{POLICY_LABEL}.{domain}")
    records = [parse_record(text.decode("utf-8", "replace")) for text in texts]
    found = [record for record in records if record is not None]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True, slots=True)
class PolicyLookup:
    """The From domain's policy, looked up before SPF and DKIM finish (it needs neither), or
    the DMARC result already decided without them (no From domain, several, DNS trouble)."""

    from_domain: str = ""
    record: dict[str, str] | None = None
    inherited: bool = False
    decided: DmarcResult | None = None


async def lookup_policy(resolver: BoundedResolver, from_domains: list[str]) -> PolicyLookup:
    distinct = sorted(set(from_domains))
    if not distinct or distinct == [""]:
        return PolicyLookup(decided=DmarcResult("none"))
    if len(distinct) > 1 or not distinct[0]:
        return PolicyLookup(decided=DmarcResult("permerror", ",".join(distinct)))
    from_domain = distinct[0]
    try:
        record, inherited = await find_policy(resolver, from_domain)
    except DnsTimedOut:
        return PolicyLookup(decided=DmarcResult("temperror", from_domain, timed_out=True))
    except DnsFailed:
        return PolicyLookup(decided=DmarcResult("temperror", from_domain))
    if record is None:
        return PolicyLookup(decided=DmarcResult("none", from_domain))
    return PolicyLookup(from_domain, record, inherited)


def check_dmarc(policy: PolicyLookup, spf: SpfResult, dkim: list[DkimResult]) -> DmarcResult:
    if policy.decided is not None:
        return policy.decided
    record, from_domain = policy.record or {}, policy.from_domain
    chosen = (record.get("sp") if policy.inherited else None) or record.get("p", "none")
    spf_mode, dkim_mode = record.get("aspf", "r").lower(), record.get("adkim", "r").lower()
    spf_aligned = spf.result == "pass" and aligned(spf.domain, from_domain, spf_mode)
    dkim_aligned = any(item.result == "pass" and aligned(item.domain, from_domain, dkim_mode) for item in dkim)
    return DmarcResult("pass" if spf_aligned or dkim_aligned else "fail", from_domain, chosen.lower())
