"""Line endings for the wire: gateways often hand us bare LF, SMTP and DKIM need CRLF.

Dot-stuffing is deliberately not done here: aiosmtplib does it while sending, and DKIM signs
the unstuffed message.
"""

from __future__ import annotations


def normalize_line_endings(message: bytes) -> bytes:
    r"""Every bare LF and bare CR becomes CRLF; existing CRLF pairs are kept as they are.

    Three `bytes.replace` passes (CRLF to LF, CR to LF, LF to CRLF) split the message into line
    endings exactly as the regex `\r\n|\r|\n` would, at a third of its cost or less.
    """
    return lf_line_endings(message).replace(b"\n", b"\r\n")


def lf_line_endings(message: bytes) -> bytes:
    """The same line breaks as `normalize_line_endings` (CRLF, bare CR, bare LF: one each),
    each written as LF: for code that looks for them, such as the end of a header section."""
    return message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
