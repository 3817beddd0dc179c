"""MTA-STS policies (RFC 8461): the DNS record, the policy file, and which MX hosts a policy allows.

Pure parsing and matching; `mta_sts_fetch.py` finds, fetches and caches policies, and
`delivery.py` applies them (in `enforce` mode: only listed MX hosts, only over STARTTLS with a
certificate valid for the MX name; otherwise the attempt is deferred).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

MAX_AGE_LIMIT_S = 31_557_600  # RFC 8461 3.2: at most one year
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_KEY = re.compile(r"[A-Za-z0-9_.-]+")


class PolicyError(ValueError):
    """A TXT record or policy file that does not follow RFC 8461."""


class Mode(StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Policy:
    mode: Mode
    max_age_s: int
    mx: tuple[str, ...]  # lowercase patterns, `*.` wildcards kept
    policy_id: str = ""  # the TXT record's `id` when the policy was fetched

    def allows(self, mx_host: str) -> bool:
        """Whether `mx_host` matches one of the `mx` patterns (RFC 8461 4.1)."""
        return any(mx_matches(pattern, mx_host) for pattern in self.mx)


def mx_matches(pattern: str, mx_host: str) -> bool:
    """`mail.example.com` matches itself; `*.example.com` matches exactly one more leftmost label
    (`mx1.example.com`, not `example.com` nor `a.b.example.com`). Case and a final dot do not count."""
    host = mx_host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, parent = host.partition(".")
        return bool(label) and bool(dot) and parent == pattern[2:]
    return host == pattern


def parse_txt(records: list[bytes]) -> str | None:
    """The policy id of the one `v=STSv1` TXT record, or None when there is no usable one (none,
    several, or malformed: RFC 8461 3.1 says to treat those as no policy)."""
    candidates = [record for record in records if record.startswith(b"v=STSv1")]
    if len(candidates) != 1:
        return None
    fields: dict[str, str] = {}
    for part in candidates[0].decode("ascii", "replace").split(";"):
        key, equals, value = part.strip().partition("=")
        if equals:
            fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1":
        return None
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def parse_policy(text: str, policy_id: str = "") -> Policy:
    """The policy file (`key: value` lines, CRLF or LF); raises `PolicyError`."""
    values: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon or not _KEY.fullmatch(key.strip()):
            raise PolicyError(f"malformed line {line[:80]!r}")
        values.setdefault(key.strip(), []).append(value.strip())
    if values.get("version") != ["STSv1"]:
        raise PolicyError("version is not STSv1")
    try:
        mode = Mode(values.get("mode", [""])[0])
    except ValueError:
        raise PolicyError("mode is not enforce, testing or none") from None
    max_age = values.get("max_age", [""])[0]
    if not max_age.isdigit() or len(max_age) > 10:
        raise PolicyError("max_age is not a number of seconds")
    mx = tuple(pattern.lower().rstrip(".") for pattern in values.get("mx", []) if pattern)
    if mode is not Mode.NONE and not mx:
        raise PolicyError("no mx patterns")
    return Policy(mode, min(int(max_age), MAX_AGE_LIMIT_S), mx, policy_id)
