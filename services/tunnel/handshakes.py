"""TCP connections that have not finished the WebSocket upgrade, capped per peer IP and per
node (`ws.maxPendingHandshakesPerIp`, `ws.maxPendingHandshakes`; issue 9, item 2).

Until the upgrade is done a connection holds the HTTP request being read (websockets allows up
to 128 header lines of 8 KiB) and proves nothing. The count starts when the connection is
made (after the TLS handshake with `wss://`, itself bounded by `ws.handshakeTimeoutMs`) and
ends when the upgrade (or the HTTP response) is done, times out or the connection goes. One
more connection is answered `503` and closed before anything is read from it.

The per-IP cap counts the TCP peer, since no header has been read yet; a peer that is one of
`ws.trustedProxies` carries many clients and is held only by the node cap.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, cast

from websockets.asyncio.server import ServerConnection

from services.tunnel import metrics
from services.tunnel.wsio import CoalescingConnection

TOO_MANY_PENDING = "too_many_pending_handshakes"
_BUSY_BODY = b'{"error":"too_many_pending_handshakes"}'
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class HandshakeGate:
    def __init__(self, per_ip: int, per_node: int, exempt_ip: Any) -> None:
        """`exempt_ip(ip) -> bool`: peers not held to the per-IP cap (trusted proxies)."""
        self.per_ip = per_ip
        self.per_node = per_node
        self._exempt_ip = exempt_ip
        self.by_ip: Counter[str] = Counter()
        self.total = 0

    def admit(self, ip: str) -> bool:
        if self.total >= self.per_node or (self.by_ip[ip] >= self.per_ip and not self._exempt_ip(ip)):
            return False
        self.by_ip[ip] += 1
        self.total += 1
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        self.by_ip[ip] -= 1
        if self.by_ip[ip] <= 0:
            del self.by_ip[ip]


def gated_connection_class(gate: HandshakeGate) -> type[ServerConnection]:
    """A websockets `ServerConnection` (one that coalesces its writes, services/tunnel/wsio.py)
    counted by `gate` until its upgrade is over."""

    class GatedConnection(CoalescingConnection):
        _pending_ip: str | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            ip = str(peer[0]) if peer else ""
            if gate.admit(ip):
                self._pending_ip = ip
                return
            metrics.CONNECTIONS_REFUSED.labels(reason=TOO_MANY_PENDING).inc()
            writer = cast(asyncio.WriteTransport, transport)  # uvloop's is not a subclass
            writer.write(BUSY_RESPONSE)
            writer.close()  # the handshake then ends without a request (websockets aborts)

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            try:
                await super().handshake(*args, **kwargs)
            finally:
                self._handshake_over()

        def connection_lost(self, exc: Exception | None) -> None:
            self._handshake_over()
            super().connection_lost(exc)

        def _handshake_over(self) -> None:
            if self._pending_ip is not None:
                gate.release(self._pending_ip)
                self._pending_ip = None

    return GatedConnection
