"""Line endings for the wire: gateways often hand us bare LF, SMTP and DKIM need CRLF.

Dot-stuffing is deliberately not done here: aiosmtplib does it while sending, and DKIM signs
the unstuffed message.
"""

from __future__ import annotations

import re

_ANY_LINE_ENDING = re.compile(rb"\r\n|\r|\n")


def normalize_line_endings(message: bytes) -> bytes:
    """Every bare LF and bare CR becomes CRLF; existing CRLF pairs are kept as they are."""
    return _ANY_LINE_ENDING.sub(b"\r\n", message)
