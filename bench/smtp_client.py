"""A minimal SMTP client on raw asyncio streams, one command at a time (no pipelining).

The load generators use this rather than aiosmtplib so that the client costs as little CPU
as possible and behaves identically against the relay and against the baseline server.
"""

from __future__ import annotations

import asyncio
import os
import string
from dataclasses import dataclass

LINE_CHARS = 76
_ALPHABET = (string.ascii_letters + string.digits).encode()
_ALPHANUMERIC = bytes(_ALPHABET[i % len(_ALPHABET)] for i in range(256))


class SmtpReplyError(Exception):
    def __init__(self, command: str, code: int, text: str) -> None:
        super().__init__(f"{command}: {code} {text}")
        self.code = code


def make_message(size_bytes: int, headers: dict[str, str] | None = None) -> bytes:
    """A plain-text message of about `size_bytes`, CRLF lines, no line starting with a dot."""
    head = {
        "From": "Bench Sender <bench@sender.bench>",
        "To": "persona@relay.bench",
        "Subject": "relay benchmark",
        "Message-ID": f"<{os.urandom(8).hex()}@sender.bench>",
        **(headers or {}),
    }
    header_bytes = "".join(f"{name}: {value}\r\n" for name, value in head.items()).encode() + b"\r\n"
    body_lines: list[bytes] = []
    remaining = max(0, size_bytes - len(header_bytes))
    while remaining > 0:
        width = min(LINE_CHARS, max(1, remaining - 2))
        body_lines.append(os.urandom(width).translate(_ALPHANUMERIC) + b"\r\n")
        remaining -= width + 2
    return header_bytes + b"".join(body_lines)


@dataclass
class SmtpConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, host: str, port: int, helo: str = "loadgen.bench") -> SmtpConnection:
        reader, writer = await asyncio.open_connection(host, port)
        connection = cls(reader, writer)
        code, text = await connection.read_reply()
        if code != 220:
            raise SmtpReplyError("greeting", code, text)
        await connection.command(f"EHLO {helo}", 250)
        return connection

    async def read_reply(self) -> tuple[int, str]:
        lines: list[bytes] = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                break
        last = lines[-1]
        return int(last[:3]), b"".join(lines).decode(errors="replace").strip()

    async def command(self, line: str, expected: int) -> str:
        self.writer.write(line.encode() + b"\r\n")
        code, text = await self.read_reply()
        if code != expected:
            raise SmtpReplyError(line.split(" ", 1)[0], code, text)
        return text

    async def start_message(self, mail_from: str, rcpt_to: str) -> None:
        """MAIL, RCPT and DATA; the caller then calls `finish_message`."""
        await self.command(f"MAIL FROM:<{mail_from}>", 250)
        await self.command(f"RCPT TO:<{rcpt_to}>", 250)
        await self.command("DATA", 354)

    def write_message(self, message: bytes) -> None:
        """Message bytes (no dot-stuffing needed: make_message never starts a line with '.')."""
        self.writer.write(message + b".\r\n")

    async def end_reply(self) -> str:
        code, text = await self.read_reply()
        if code != 250:
            raise SmtpReplyError("DATA end", code, text)
        return text

    async def quit(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.read_reply(), 2.0)
        except (OSError, ConnectionError, TimeoutError, ValueError):
            pass
        self.writer.close()
