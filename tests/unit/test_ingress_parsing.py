"""The ingress's own fast paths give exactly aiosmtpd's results (services/ingress/server.py).

They replace aiosmtpd code that dominated the ingress's profile under load, so each is
compared with the aiosmtpd code it stands in for, on chosen edge cases and generated input.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingress.server import IngressSMTP

# a bare instance: _getaddr reads only `local_part_limit`
PARSER = IngressSMTP.__new__(IngressSMTP)


def both(arg: str, local_part_limit: int = 0) -> tuple[object, object]:
    PARSER.local_part_limit = local_part_limit
    return outcome(IngressSMTP._getaddr, arg), outcome(SMTP._getaddr, arg)


def outcome(getaddr: Callable[[IngressSMTP, str], object], arg: str) -> object:
    """The result, or the exception's type (aiosmtpd raises IndexError on a lone `<`)."""
    try:
        return getaddr(PARSER, arg)
    except Exception as exc:  # compared, not hidden
        return type(exc)


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b>",
        "<a@b> SIZE=100 BODY=8BITMIME",
        "<a@b>  \tSIZE=1",
        "<a@b>SIZE=1",
        "<a@b>(comment) X",
        "<a@b> (comment) X",
        "<a.b.c+tag@x-y.example>",
        "<a..b@c>",
        "<.a@b>",
        "<a.@b>",
        "<a@b.>",
        "<a@.b>",
        "<a@[192.0.2.1]>",
        '<"quoted local"@b>',
        "<@route:a@b>",
        "<>",
        "<a>",
        "<a@b",
        "a@b",
        " <a@b>",
        "<a@b> ",
        "<a@b>\r\n",
        "<a b@c>",
        "<ü@example.org>",
        "<a@exämple.org>",
        "<a@b>>",
        "<<a@b>>",
        "<a@b><c@d>",
        "<a@b c>",
        "<a(x)@b>",
        "<a@b(x)>",
        "",
        "<25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkena+news@relay.test>",
    ],
)
def test_address_parsing_matches_aiosmtpd(arg: str) -> None:
    fast, reference = both(arg)
    assert fast == reference


def test_the_local_part_limit_applies_on_the_fast_path_too() -> None:
    assert both("<abcdef@b>", local_part_limit=5) == ((None, None), (None, None))
    assert both("<abcde@b>", local_part_limit=5)[0] == ("abcde@b", "")


ADDRESS_CHARS = st.sampled_from(list('ab.@<>+-_ ()\t"[]:=Z9!#~\\,;ü'))


@settings(max_examples=3000, deadline=None)
@given(st.text(ADDRESS_CHARS, max_size=24))
def test_generated_addresses_parse_as_aiosmtpd_parses_them(arg: str) -> None:
    fast, reference = both(arg)
    assert fast == reference


@settings(max_examples=1000, deadline=None)
@given(st.text(ADDRESS_CHARS, max_size=10), st.text(ADDRESS_CHARS, max_size=10), st.text(ADDRESS_CHARS, max_size=10))
def test_generated_angle_addresses_parse_as_aiosmtpd_parses_them(local: str, domain: str, rest: str) -> None:
    fast, reference = both(f"<{local}@{domain}>{rest}")
    assert fast == reference
