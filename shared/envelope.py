"""Rules for SMTP envelope addresses that both directions enforce."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def has_control_characters(address: str) -> bool:
    """CR, LF, NUL or any other control character: envelope smuggling, refused wherever it is."""
    return _CONTROL.search(address) is not None
