"""The block-reading DATA phase answers and stores exactly what aiosmtpd's line loop does.

Differential: the same bytes go over loopback TCP to a stock aiosmtpd `SMTP` and to
`FastDataSMTP` (same handler, same limits); the reply transcripts and the stored contents
must be identical. Inputs mix ordinary lines, dot-stuffed lines, lone dots without CRLF, bare
CR / LF (the SMTP smuggling shapes `\\n.\\n`, `\\r\\n.\\n`, `\\n.\\r\\n`), lines around the
1001-byte limit, data past the size limit, pipelined commands after the end marker, and the
whole split into arbitrary TCP writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.ingress.data_reader import DataState, FastDataSMTP, first_violation, unstuff

SIZE_LIMIT = 2500
READ_TIMEOUT_S = 10.0

PIECES = [
    b"hello world",
    b".",
    b"..",
    b". ",
    b"\r\n",
    b"\r\n",
    b"\r\n",
    b"\r",
    b"\n",
    b"\n.\n",
    b"\r\n.\n",
    b"\n.\r\n",
    b".\r\n",
    b"x" * 997,
    b"y" * 998,
    b"z" * 999,
    b"w" * 1000,
    b"v" * 1001,
    b"u" * 1500,
]


class Capture:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.contents.append(bytes(envelope.original_content or b""))
        return "250 stored"


@contextlib.asynccontextmanager
async def server(kind: type[SMTP], size_limit: int | None) -> AsyncIterator[tuple[int, Capture]]:
    capture = Capture()
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(
        lambda: kind(capture, hostname="diff.test", data_size_limit=size_limit, decode_data=False),
        "127.0.0.1",
        0,
    )
    try:
        yield listener.sockets[0].getsockname()[1], capture
    finally:
        listener.close()


async def transcript(port: int, payload: bytes, splits: list[int]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    received = b""
    async with asyncio.timeout(READ_TIMEOUT_S):
        while b"\r\n354 " not in received:
            received += await reader.read(4096)
        position = 0
        with contextlib.suppress(ConnectionError):  # the server may hang up on junk: compared too
            for split in [*sorted(splits), len(payload)]:
                writer.write(payload[position:split])
                await writer.drain()
                await asyncio.sleep(0)
                position = max(position, split)
            writer.write(b"NOOP\r\nQUIT\r\n")
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(4096):
                received += chunk
    writer.close()
    return received


async def compare(payload: bytes, splits: list[int], size_limit: int | None) -> tuple[bytes, list[bytes]]:
    async with server(SMTP, size_limit) as (stock_port, stock), server(FastDataSMTP, size_limit) as (fast_port, fast):
        expected = await transcript(stock_port, payload, splits)
        got = await transcript(fast_port, payload, splits)
    assert got == expected
    assert fast.contents == stock.contents
    return got, fast.contents


def message(pieces: list[bytes]) -> bytes:
    data = b"".join(pieces)
    return data + (b".\r\n" if not data or data.endswith(b"\r\n") else b"\r\n.\r\n")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(st.sampled_from(PIECES), max_size=12),
    splits=st.lists(st.integers(min_value=0, max_value=6000), max_size=4),
    limited=st.booleans(),
)
def test_random_data_gets_the_same_replies_and_content(pieces: list[bytes], splits: list[int], limited: bool) -> None:
    asyncio.run(compare(message(pieces), splits, SIZE_LIMIT if limited else None))


@pytest.mark.parametrize(
    ("payload", "expect_reply", "expect_content"),
    [
        (b".\r\n", b"250 stored", b""),
        (b"..\r\n.\r\n", b"250 stored", b".\r\n"),
        (b"a\r\n..b\r\n.\r\n", b"250 stored", b"a\r\n.b\r\n"),
        (b"a\n.\nb\r\n.\r\n", b"250 stored", b"a\n.\nb\r\n"),  # bare-LF dot is data, not the end
        (b"x" * 1000 + b"\r\n.\r\n", b"500 Line too long", None),
        (b"x" * 999 + b"\r\n.\r\n", b"250 stored", b"x" * 999 + b"\r\n"),
        ((b"y" * 500 + b"\r\n") * 6 + b".\r\n", b"552 Error: Too much mail data", None),
    ],
)
def test_known_cases(payload: bytes, expect_reply: bytes, expect_content: bytes | None) -> None:
    replies, contents = asyncio.run(compare(payload, [], SIZE_LIMIT))
    assert expect_reply in replies
    assert contents == ([] if expect_content is None else [expect_content])


def test_a_large_message_in_many_writes_with_a_pipelined_command_after_the_dot() -> None:
    rng = random.Random(11)
    lines = [b"." * rng.randint(0, 2) + bytes(rng.choices(b"abc .\r", k=rng.randint(0, 200))) for _ in range(3000)]
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]  # as a client must
    payload = message([line + b"\r\n" for line in stuffed])
    splits = sorted(rng.sample(range(len(payload)), 40))
    replies, contents = asyncio.run(compare(payload, splits, None))
    assert replies.count(b"250 stored") == 1 and b"221 " in replies
    print(f"{len(payload)} bytes in {len(splits) + 1} writes: identical replies and content")
    assert len(contents[0]) > 100_000


def test_first_violation_follows_the_stream_order() -> None:
    long_line = b"x" * 1500 + b"\r\n"
    assert first_violation(long_line + b"y" * 3000, 2000, 1001) is DataState.TOO_LONG
    assert first_violation(b"y" * 900 + b"\r\n" + b"y" * 900 + b"\r\n" + long_line, 1500, 1001) is DataState.TOO_MUCH
    assert first_violation(b"a\r\nb\r\n", 10, 1001) is DataState.NOMINAL
    assert unstuff(b"..a\r\n.b\r\n...\r\n") == b".a\r\nb\r\n..\r\n"
