"""Several WebSocket messages in one socket write.

An inbound message is at least three tunnel frames (smtp_start, smtp_chunk..., smtp_end), each
its own binary WebSocket message (PROTOCOL.md A4). `ServerConnection.send` writes each message
with its own `transport.write`, and uvloop sends at once when its buffer is empty, so a small
mail cost three send syscalls. `send_binary_messages` frames every message with websockets'
own protocol (`send_binary`, masking, extensions, state checks and the write limit's drain all
unchanged) inside one `send_context`, and `CoalescingConnection.send_data` hands what that
produced to the transport in one `writelines` (one writev): one write per message, or per
block of a streamed body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from websockets.asyncio.server import ServerConnection
from websockets.protocol import SEND_EOF

BytesLike = bytes | bytearray | memoryview


class CoalescingConnection(ServerConnection):
    """A websockets server connection whose pending writes leave in one `writelines`."""

    def send_data(self) -> None:
        writes = self.protocol.data_to_send()
        end = writes.index(SEND_EOF) if SEND_EOF in writes else len(writes)
        if end:
            self.transport.writelines(writes[:end])
        if end < len(writes):
            # As websockets' own send_data: half-close when possible (no TLS), else close.
            if self.transport.can_write_eof():
                with contextlib.suppress(Exception):  # uvloop can raise RuntimeError here
                    self.transport.write_eof()
            else:
                self.transport.close()


async def send_binary_messages(ws: ServerConnection, messages: Sequence[BytesLike]) -> None:
    """Send `messages` as that many binary WebSocket messages, in order, framed in one go: one
    socket write on a `CoalescingConnection`, one per message on any other connection. Like
    `ws.send`, it waits for a fragmented message in progress and raises `ConnectionClosed`."""
    while ws.send_in_progress is not None:
        await asyncio.shield(ws.send_in_progress)
    async with ws.send_context():
        for message in messages:
            ws.protocol.send_binary(message)
