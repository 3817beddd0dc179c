"""The SMTP listener: aiosmtpd's protocol on an asyncio server over a socket we bound.

aiosmtpd's thread-based `Controller` cannot share a port between processes, so we run its
`SMTP` protocol on our own `loop.create_server(sock=...)`: the socket is bound by this process
(`shared.listen`, never SO_REUSEPORT) or inherited from the `protege-relay run` supervisor,
which binds it once for all its ingress workers. The subclass adds
three things aiosmtpd has no hook for:

* the per-IP caps checked before the greeting: open connections from one IP in this process
  (`rateLimits.smtpConcurrentConnectionsPerIp`, counted here, no Redis round trip) and the
  connection rate across processes (Redis); a refused client gets `421 4.7.0` instead of
  `220`, then the connection is closed;
* our reply text for aiosmtpd's own size refusals (`552 5.3.4 relay_rejected_message_too_large`
  carries the original's reason token);
* graceful drain: on shutdown an idle connection gets `421 4.3.2` at once; one inside a
  transaction may finish it (up to a bound) and gets the 421 right after its reply.

And the abuse defences of tests/ingress/test_abuse_smtp.py (docs/SECURITY.md):

* early talkers: a client that sends anything before our greeting (RFC 5321 §4.3.1 forbids
  it; spam bots do it) gets `554 5.5.1` instead of `220`, then `503 5.5.1` to every command
  until QUIT (RFC 5321 §3.1), at most `MAX_COMMANDS_AFTER_REFUSAL` of them or the command
  timeout;
* the command timeout (`smtp.commandTimeoutSeconds`, measured from the last complete
  command, so a client dripping one byte at a time gains nothing; it also bounds a whole
  DATA transfer) closes with `421 4.4.2` instead of aiosmtpd's silent close;
* aiosmtpd's line-too-long replies get enhanced status codes (`500 5.5.2`), and control
  characters in any reply line are replaced, so an echoed command cannot put a CR, LF or NUL
  into our reply stream.

These rely on private members of aiosmtpd 1.4 (`_handle_client`, `_smtp_methods`,
`_timeout_cb`, `_reader`); tests cover each, so an upgrade that changes them fails loudly, and
the ingress refuses to start on a release outside the tested range (shared/versions.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, AnyStr

from aiosmtpd.smtp import Envelope, Session

from services.ingress import metrics, policy
from services.ingress.data_reader import FastDataSMTP
from services.ingress.handler import IngressEnvelope, IngressHandler, IngressSession
from shared.config import RateLimitsConfig, SmtpConfig
from shared.logs import get_logger, log

logger = get_logger(__name__)

IDENT = "ESMTP Protege Relay"
AIOSMTPD_SIZE_REFUSALS = (b"552 Error: message size exceeds", b"552 Error: Too much mail data")
AIOSMTPD_COMMAND_LINE_TOO_LONG = b"500 Command line too long"
AIOSMTPD_DATA_LINE_TOO_LONG = b"500 Line too long"
MAX_COMMANDS_AFTER_REFUSAL = 10
_REPLY_CONTROL_CHARS = re.compile(rb"[\x00-\x1f\x7f]")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# `<dot-atom@dot-atom>` then optional blanks, nothing that needs the RFC 5322 parser
_PLAIN_ANGLE_ADDR = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*(?![ \t(])")
DEFAULT_CONNECTIONS_PER_IP = RateLimitsConfig().smtpConcurrentConnectionsPerIp


class IngressSMTP(FastDataSMTP):  # aiosmtpd's SMTP, DATA read in blocks (data_reader.py)
    def __init__(self, handler: IngressHandler, listener: SmtpListener, **options: Any) -> None:
        super().__init__(handler, **options)
        self._ingress_handler = handler
        self._listener = listener
        self._busy = False
        self._registered = False
        self._greeted = False
        self._early_talker = False
        self.client_ip = "unknown"
        self._smtp_methods = {name: self._tracked(method) for name, method in self._smtp_methods.items()}

    # --- lifecycle -------------------------------------------------------------------------

    def _create_session(self) -> Session:
        return IngressSession(self.loop)

    def _create_envelope(self) -> Envelope:
        return IngressEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._registered:  # called again on the same protocol after STARTTLS
            self._registered = True
            peer = transport.get_extra_info("peername")
            self.client_ip = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "unknown")
            self._listener.track(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self in self._listener.connections:
            self._listener.forget(self)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        if not self._greeted:
            self._early_talker = True
        super().data_received(data)

    async def _handle_client(self) -> None:
        try:
            await self._serve_client()
        except asyncio.CancelledError:
            # aiosmtpd cancels this task on EOF but closes the transport only inside its own
            # command loop: a client gone during our pre-greeting checks (a TCP health check
            # connects and closes) would hold its slot and descriptor until the command timeout
            if self.transport is not None:
                self.transport.close()
            raise

    async def _serve_client(self) -> None:
        if self._listener.over_ip_cap(self.client_ip):
            self._ingress_handler.refused_by_protocol(policy.TOO_MANY_CONNECTIONS, self.session)
            self.close_with(policy.TOO_MANY_CONNECTIONS)
            return
        self._busy = True
        try:
            refusal = await self._ingress_handler.admit_connection(self.session)  # type: ignore[arg-type]
        finally:
            self._busy = False
        if refusal is not None:
            self.close_with(refusal)
            return
        if self._reader.at_eof() and self.transport is not None:
            # gone during the check, and the EOF's cancellation was lost (Python 3.11's
            # asyncio.wait_for returns a result that completed as it was cancelled)
            self.transport.close()
            return
        if self._listener.draining:
            self.close_with(policy.SHUTTING_DOWN)
            return
        if self._early_talker:
            self._ingress_handler.refused_by_protocol(policy.EARLY_TALKER, self.session)
            await self._refuse_until_quit(policy.EARLY_TALKER)
            return
        self._greeted = True  # no await before super() writes the 220: nothing can slip in between
        await super()._handle_client()

    async def _refuse_until_quit(self, reply: policy.Reply) -> None:
        """RFC 5321 §3.1: after a 554 greeting, wait for QUIT, answering 503 meanwhile."""
        await self.push(str(reply))
        for _ in range(MAX_COMMANDS_AFTER_REFUSAL):
            try:
                line = await self._reader.readuntil()
            except asyncio.LimitOverrunError as overrun:
                await self._reader.read(overrun.consumed)
                continue
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if line.strip().upper() == b"QUIT":
                self.close_with(policy.CLOSING)
                return
            await self.push(str(policy.BAD_SEQUENCE))
        self.close_with(policy.BAD_SEQUENCE)

    def _timeout_cb(self) -> None:
        """aiosmtpd closes silently; RFC 5321 §4.5.3.2 wants a 421 first."""
        self._ingress_handler.refused_by_protocol(policy.COMMAND_TIMEOUT, self.session)
        self.close_with(policy.COMMAND_TIMEOUT)

    # --- parsing ---------------------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd parses every MAIL/RCPT address with the `email` header parser (and defines
        a class per call): ~10 % of the ingress's CPU under load. A plain `<local@domain>`,
        which is nearly every address, is parsed here with the same result (address, rest
        after the `>` and its blanks); anything else (quotes, comments, literals, 8-bit) still
        goes through aiosmtpd. tests/unit/test_ingress_parsing.py compares the two."""
        match = _PLAIN_ANGLE_ADDR.match(arg)
        if match is None:
            return super()._getaddr(arg)
        address = match.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, arg[match.end() :]

    # --- replies ---------------------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        raw = status.encode("utf-8", "surrogateescape") if isinstance(status, str) else status
        replacement = None
        if raw.startswith(AIOSMTPD_SIZE_REFUSALS):
            replacement = policy.MESSAGE_TOO_LARGE
        elif raw.startswith(AIOSMTPD_COMMAND_LINE_TOO_LONG):
            replacement = policy.COMMAND_LINE_TOO_LONG
        elif raw.startswith(AIOSMTPD_DATA_LINE_TOO_LONG):
            replacement = policy.DATA_LINE_TOO_LONG
        if replacement is not None:
            self._ingress_handler.refused_by_protocol(replacement, self.session)
            raw = str(replacement).encode("ascii")
        # aiosmtpd's push, minus its per-reply debug log; drain() only when something is still
        # buffered (only then can the transport be paused for a client that does not read)
        self._writer.write(_REPLY_CONTROL_CHARS.sub(b"?", raw) + b"\r\n")
        if self._writer.transport.get_write_buffer_size():
            await self._writer.drain()

    def close_with(self, reply: policy.Reply) -> None:
        """Send one final reply and close, without waiting on the client."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"{reply}\r\n".encode("ascii"))  # type: ignore[attr-defined]
            self.transport.close()

    # --- drain -----------------------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        return self._busy or bool(self.envelope is not None and self.envelope.mail_from)

    def close_if_idle(self) -> None:
        if not self.in_transaction:
            self.close_with(policy.SHUTTING_DOWN)

    def _tracked(self, method: Callable[[str | None], Awaitable[None]]) -> Callable[[str | None], Awaitable[None]]:
        """Mark the connection busy while a command runs; when draining, close once idle."""

        async def run(arg: str | None) -> None:
            self._busy = True
            try:
                await method(arg)
            finally:
                self._busy = False
            if isinstance(self.session, IngressSession) and self.session.close_after_reply:
                if self.transport is not None:
                    self.transport.close()  # after the 421 already written (flushed first)
                return
            if self._listener.draining:
                self.close_if_idle()

        return run


class SmtpListener:
    """The listening socket and the live connections, for readiness and graceful drain."""

    def __init__(
        self,
        handler: IngressHandler,
        smtp: SmtpConfig,
        hostname: str,
        tls_context: ssl.SSLContext | None,
        *,
        max_connections_per_ip: int = DEFAULT_CONNECTIONS_PER_IP,
    ) -> None:
        self._handler = handler
        self._smtp = smtp
        self._hostname = hostname
        self._tls_context = tls_context
        self._server: asyncio.Server | None = None
        self.connections: set[IngressSMTP] = set()
        self._max_connections_per_ip = max_connections_per_ip
        self._connections_per_ip: Counter[str] = Counter()
        self.draining = False
        self._all_closed = asyncio.Event()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self, listen_socket: socket.socket) -> None:
        """Accept on `listen_socket` (already bound and listening; see `shared.listen`)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_protocol, sock=listen_socket)

    def _new_protocol(self) -> IngressSMTP:
        return IngressSMTP(
            self._handler,
            self,
            data_size_limit=self._smtp.maxMessageBytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self._hostname,
            ident=IDENT,
            tls_context=self._tls_context,
            require_starttls=False,
            timeout=self._smtp.commandTimeoutSeconds,
            loop=asyncio.get_running_loop(),
        )

    def track(self, connection: IngressSMTP) -> None:
        self.connections.add(connection)
        self._connections_per_ip[connection.client_ip] += 1
        metrics.OPEN_CONNECTIONS.inc()

    def over_ip_cap(self, client_ip: str) -> bool:
        """True when this IP holds more open connections here than allowed (this one included)."""
        return self._connections_per_ip[client_ip] > self._max_connections_per_ip

    def forget(self, connection: IngressSMTP) -> None:
        self.connections.discard(connection)
        self._connections_per_ip[connection.client_ip] -= 1
        if self._connections_per_ip[connection.client_ip] <= 0:
            del self._connections_per_ip[connection.client_ip]
        metrics.OPEN_CONNECTIONS.dec()
        if not self.connections:
            self._all_closed.set()

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting; 421 idle sessions now and the rest once their transaction ends or
        at `timeout_s`. Returns how many connections had to be cut at the deadline."""
        if self._server is None:
            return 0
        self._server.close()
        self.draining = True
        for connection in list(self.connections):
            connection.close_if_idle()
        if self.connections:
            self._all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), timeout=timeout_s)
        cut = list(self.connections)
        for connection in cut:
            connection.close_with(policy.SHUTTING_DOWN)
        if cut:
            log(logger, logging.WARNING, "drain deadline: connections cut", connections=len(cut))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), timeout=1)
        return len(cut)
