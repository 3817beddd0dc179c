"""Which names an SPF evaluation will ask next, read from the answers it already has.

pyspf looks names up one at a time and stops at the first one not fetched (resolver.py's
`replay`), so a record with twelve `mx:` terms would take twelve replays, each running pyspf
again from the top — CPU quadratic in the record's fan-out, which a hostile sender chooses.
Reading the record ourselves gives the next names at once: `include:` and `redirect=` targets
(TXT), `a` (A or AAAA, by the client's address family), `mx` (MX, then the exchanges' A or
AAAA). They are fetched concurrently with the name that named them, so a typical record is
evaluated in two runs and a hostile one in a few, whatever its fan-out, and an include chain
costs one DNS round trip per level instead of one per name.

Only a warm-up: pyspf still decides what it looks up and what the answers mean. Terms with
macros (`%{...}`) are skipped, and at most `MAX_NAMES` names per evaluation are fetched this
way (pyspf itself stops after 10 DNS mechanisms and 10 MX hosts each).
"""

from __future__ import annotations

import re

import dns.rdata

MAX_NAMES = 128  # what pyspf itself may need: 10 DNS terms, 10 MX hosts each, the record
MAX_TERMS = 10  # RFC 7208 §4.6.4: ten DNS-querying terms per evaluation
MAX_MX_HOSTS = 10
_TERM = re.compile(r"^[+\-~?]?(include|a|mx|exists)(?::([^/]+))?(?:/\S*)?$", re.IGNORECASE)
_REDIRECT = re.compile(r"^redirect=(\S+)$", re.IGNORECASE)
SPF_VERSION = "v=spf1"

Name = tuple[str, str]


class SpfPrefetch:
    """Called with each answer an SPF evaluation fetched; returns the names to fetch with it."""

    def __init__(self, client_ip: str) -> None:
        self._address_type = "AAAA" if ":" in client_ip else "A"
        self._budget = MAX_NAMES

    def __call__(self, name: str, rtype: str, records: list[dns.rdata.Rdata]) -> list[Name]:
        if self._budget <= 0:
            return []
        if rtype == "TXT":
            found = self._from_record(name, records)
        elif rtype == "MX":
            hosts = sorted(records, key=lambda record: record.preference)[:MAX_MX_HOSTS]  # type: ignore[attr-defined]
            found = [(record.exchange.to_text(omit_final_dot=True), self._address_type) for record in hosts]  # type: ignore[attr-defined]
        else:
            found = []
        found = found[: self._budget]
        self._budget -= len(found)
        return found

    def _from_record(self, domain: str, records: list[dns.rdata.Rdata]) -> list[Name]:
        texts = [b"".join(record.strings).decode("utf-8", "replace") for record in records]  # type: ignore[attr-defined]
        spf = [text for text in texts if text.lower().startswith(SPF_VERSION)]
        if len(spf) != 1:
            return []  # none or several: pyspf's "none" / permerror, nothing more to ask
        names: list[Name] = []
        for term in spf[0].split()[1:]:
            if "%" in term:
                continue
            mechanism = _TERM.match(term)
            if mechanism is not None:
                kind, target = mechanism.group(1).lower(), mechanism.group(2) or domain
                rtype = {"include": "TXT", "a": self._address_type, "mx": "MX", "exists": "A"}[kind]
                names.append((target, rtype))
            elif (redirect := _REDIRECT.match(term)) is not None:
                names.append((redirect.group(1), "TXT"))
            if len(names) >= MAX_TERMS:
                break
        return names
