"""The DATA phase read in blocks instead of lines, with aiosmtpd 1.4's exact semantics.

aiosmtpd's `smtp_DATA` awaits `readuntil(b"\\r\\n")` once per line (~130 lines for 10 KB) and
logs each one; under load that loop was the largest single item in the ingress profile.
`FastDataSMTP.smtp_DATA` asks the stream for everything up to the next `.\\r\\n` instead
(one C-speed search; a line that merely ends in a dot costs one more call) and checks the
rules on whole blocks with bytes operations. What is kept, byte for byte and reply for reply
(tests/unit/test_data_reader.py runs both against the same inputs):

* the end of data is `.\\r\\n` at the start of a line (after CRLF, or first in the data);
  `\\n.\\n`, `\\r\\n.\\n` and `\\n.\\r\\n` are ordinary data (no SMTP smuggling);
* a line longer than `line_length_limit` (1001 with its CRLF) is `500 Line too long`, more
  data than `data_size_limit` is `552 Too much mail data`; whichever comes first in the stream
  decides, the rest is read to the end marker and discarded, as in aiosmtpd;
* dot-unstuffing removes one leading dot of each line;
* pipelined commands after the end marker stay in the stream for the command loop.

Memory is bounded like aiosmtpd's: at most `data_size_limit` bytes are held, and blocks read
after a refusal are dropped at once. The stream reader keeps its limit (1001): a stretch
without `.\\r\\n` comes as `LimitOverrunError` whose `consumed` is all that is buffered but
the last two bytes (one socket read's worth, since the reader pauses the transport above twice
its limit), read with `read(consumed)`; no private member of the reader is touched.
"""

from __future__ import annotations

import asyncio
import enum

from aiosmtpd.smtp import MISSING, SMTP

END_OF_DATA = b".\r\n"
LINE_START_END = b"\r\n.\r\n"
CRLF = b"\r\n"


class DataState(enum.Enum):
    NOMINAL = enum.auto()
    TOO_LONG = enum.auto()
    TOO_MUCH = enum.auto()


def first_violation(data: bytes, size_limit: int | None, line_limit: int, counted: int = 0) -> DataState:
    """The state aiosmtpd's line loop reaches on `data` after `counted` bytes of complete lines
    (lines as they arrive, so the first offending line decides). Only called when the cheap
    whole-block checks failed.

    aiosmtpd's reader has limit `line_limit`: a line whose content (before CRLF) is longer
    raises LimitOverrunError and is TOO_LONG before its bytes are counted; a shorter line is
    counted first (TOO_MUCH past the size limit) and then TOO_LONG if, with CRLF, it is longer
    than `line_limit`. A last piece without CRLF is a line still arriving: only its length so
    far can already decide (TOO_LONG); it is not counted."""
    pieces = data.split(CRLF)
    for index, piece in enumerate(pieces):
        if len(piece) > line_limit:
            return DataState.TOO_LONG
        if index == len(pieces) - 1:
            break
        counted += len(piece) + 2
        if size_limit and counted > size_limit:
            return DataState.TOO_MUCH
        if len(piece) + 2 > line_limit:
            return DataState.TOO_LONG
    return DataState.NOMINAL


def within_limits(data: bytes, size_limit: int | None, line_limit: int) -> bool:
    """The common case, in C: small enough and no line longer than the limit."""
    if size_limit and len(data) > size_limit:
        return False
    return max(map(len, data.split(CRLF))) + 2 <= line_limit


def unstuff(data: bytes) -> bytes:
    """RFC 5321 §4.5.2: remove the first dot of every line that starts with one."""
    data = data.replace(b"\r\n.", CRLF)
    return data[1:] if data.startswith(b".") else data


class FastDataSMTP(SMTP):
    """aiosmtpd's SMTP with a block-reading DATA phase; everything else is aiosmtpd's."""

    async def smtp_DATA(self, arg: str) -> None:
        if self._decode_data or "DATA" not in self._handle_hooks:
            await super().smtp_DATA(arg)  # text mode / legacy handlers: not ours to speed up
            return
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        result = await self._read_data()
        if result is None:
            return  # connection gone
        if result is DataState.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        if result is DataState.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        assert isinstance(result, bytes)
        original_content = unstuff(result)
        self.envelope.content = original_content
        self.envelope.original_content = original_content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> bytes | DataState | None:
        """The raw (still dot-stuffed) data without the end marker, or the refusal, or None
        when the connection closed first."""
        size_limit, line_limit = self.data_size_limit, self.line_length_limit
        held: list[bytes] = []
        held_bytes = 0
        counted = 0  # bytes of complete lines dropped once the size limit was passed
        state = DataState.NOMINAL
        tail = CRLF  # the data starts at a line start
        reader = self._reader
        while self.transport is not None:
            try:
                block = await reader.readuntil(END_OF_DATA)
                complete = True
            except asyncio.LimitOverrunError as overrun:
                block = await reader.read(overrun.consumed)
                complete = False
            except asyncio.IncompleteReadError:
                block, complete = b"", False
            except asyncio.CancelledError:
                self._writer.close()  # the connection was reset during DATA (as aiosmtpd)
                raise
            if not block:
                self._writer.close()
                return None
            at_end = complete and (tail + block[-5:])[-5:] == LINE_START_END
            tail = (tail + block[-2:])[-2:]
            if state is not DataState.NOMINAL:
                if at_end:
                    return state
                continue
            held.append(block)
            held_bytes += len(block)
            if at_end:
                held[-1] = block[: -len(END_OF_DATA)]  # a copy of this block only, not of the message
                data = b"".join(held)
                held.clear()
                if not counted and within_limits(data, size_limit, line_limit):
                    return data
                verdict = first_violation(data, size_limit, line_limit, counted)
                return DataState.TOO_MUCH if verdict is DataState.NOMINAL else verdict  # NOMINAL: unreachable
            if size_limit and counted + held_bytes > size_limit:
                # Some line breaks a rule; which one first may hang on the line still arriving
                # (TOO_LONG if it grows past the line limit, else TOO_MUCH when it ends): keep
                # only that line, drop what was counted.
                joined = b"".join(held)
                cut = joined.rfind(CRLF) + 2 if CRLF in joined else 0
                state = first_violation(joined[:cut], size_limit, line_limit, counted)
                counted += cut
                held = [joined[cut:]]
                held_bytes = len(held[0])
                if state is DataState.NOMINAL and held_bytes > line_limit:
                    state = DataState.TOO_LONG
                if state is not DataState.NOMINAL:
                    held.clear()
        return None
