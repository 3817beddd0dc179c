"""The wire codes of shared/codes.py: complete close-code mappings, bytes on the wire equal to
the bare strings they replaced, and docs/PROTOCOL.md and README.md listing exactly these tokens
(a token documented but never sent, or sent but undocumented, fails here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgpack

from shared import protocol
from shared.codes import (
    AUTH_ERROR_CLOSE,
    CLOSE_REASON_CODE,
    PERMANENT,
    AuthError,
    CloseCode,
    CloseReason,
    ControlError,
    DeliveryError,
    OutboundRefusal,
)

REPO = Path(__file__).resolve().parents[2]
PROTOCOL = (REPO / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
README = (REPO / "README.md").read_text(encoding="utf-8")
TOKEN = re.compile(r"`([a-z][a-z0-9_]*)`")


def row(text: str, first_cell: str) -> str:
    [line] = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    return line


def tokens(line: str) -> set[str]:
    return set(TOKEN.findall(line)) - {"error"}


def test_every_code_has_its_close_code() -> None:
    assert set(AUTH_ERROR_CLOSE) == set(AuthError)
    assert set(CLOSE_REASON_CODE) == set(CloseReason)
    assert {code for code in AuthError if AUTH_ERROR_CLOSE[code] is CloseCode.RATE_LIMITED} == {
        AuthError.RATE_LIMITED,
        AuthError.TOO_MANY_SOCKETS,
    }
    assert set(AUTH_ERROR_CLOSE.values()) | set(CLOSE_REASON_CODE.values()) == set(CloseCode)
    assert PERMANENT <= set(DeliveryError)


def test_codes_go_on_the_wire_as_their_bare_strings() -> None:
    assert protocol.auth_error(AuthError.CHALLENGE_NOT_FOUND) == '{"type":"auth_error","code":"challenge_not_found"}'
    assert json.dumps({"c": OutboundRefusal.RATE_LIMITED}) == json.dumps({"c": "rate_limited"})
    assert msgpack.packb(DeliveryError.NXDOMAIN) == msgpack.packb("nxdomain")
    assert protocol.delivery_result("s", sent=False) == (
        '{"type":"relay_delivery_result","streamId":"s","status":"failed","error":"delivery_failed"}'
    )
    assert f"{DeliveryError.SMTP_5XX}: 550 no" == "smtp_5xx: 550 no"
    assert int(CloseCode.AUTH_FAILED) == 4401 and str(CloseReason.REPLACED) == "replaced_by_new_session"


def test_the_protocol_close_table_is_the_codes_module() -> None:
    documented: dict[str, int] = {}
    for line in PROTOCOL.splitlines():
        cells = re.match(r"^\| (\d{4}) \| ([^|]+) \|", line)
        if cells:
            documented.update(dict.fromkeys(TOKEN.findall(cells.group(2)), int(cells.group(1))))
    sent = {str(code): int(close) for table in (AUTH_ERROR_CLOSE, CLOSE_REASON_CODE) for code, close in table.items()}
    assert documented == sent


def test_the_protocol_lists_every_auth_and_control_error() -> None:
    challenge_checks = PROTOCOL[PROTOCOL.index("The response is checked in this order") :].split("\n\n", 1)[0]
    assert tokens(challenge_checks) >= {code for code in AuthError if code.startswith(("challenge_", "invalid_sig"))}
    after_auth = set(re.findall(r'"code":"(\w+)"', row(PROTOCOL, "text after auth")))
    assert after_auth == set(ControlError)


def test_the_outbound_refusals_documented_are_the_ones_sent() -> None:
    assert tokens(row(PROTOCOL, "immediate refusals")) == set(OutboundRefusal)
    assert tokens(row(README, "outbound refusals")) - {"failed"} == set(OutboundRefusal)


def test_the_delivery_errors_documented_are_the_ones_sent() -> None:
    line = row(PROTOCOL, "egress errors")
    assert tokens(line) == set(DeliveryError)
    starred = set(re.findall(r"`([a-z0-9_]+)`\*", line))
    assert starred == set(PERMANENT)
    assert tokens(row(README, "egress error tokens")) <= set(DeliveryError)  # a selection, pointing here
