"""Local MX hosts for egress tests: real SMTP servers (aiosmtpd, in a thread) that record what
they receive and misbehave on request, plus a server that accepts TCP and never speaks.

Every sink can bind any loopback address (127.0.0.2, 127.0.0.3, ...) on a shared port, since
the egress connects to every MX on the one `egress.smtpPort`; Linux routes all of
127.0.0.0/8 to lo.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

_QUEUE_IDS = itertools.count(1)


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # exactly as received, after dot-unstuffing, CRLF kept
    tls: bool
    helo: str
    queue_id: str
    peer: str = ""  # the client's address and port: equal for messages sent on one connection


class _Handler:
    def __init__(self, sink: MxSink) -> None:
        self._sink = sink

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        sink = self._sink
        with sink.lock:
            sink.connections[str(session.peer)] = server
            reused = any(message.peer == str(session.peer) for message in sink.messages)
        if reused and sink.reused_mail_reply is not None:
            return sink.reused_mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self._sink.rcpt_replies.get(address.lower(), self._sink.rcpt_reply)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sink = self._sink
        content = envelope.original_content or b""
        with sink.lock:
            sink.data_payloads.append(content)
            hold = sink.hold_data > 0
            if hold:
                sink.hold_data -= 1
            reply = sink.data_replies.pop(0) if sink.data_replies else None
        if hold:
            sink.holding.set()
            await asyncio.get_running_loop().run_in_executor(None, sink.released.wait)
        if reply is not None:
            return reply
        queue_id = f"SINK{next(_QUEUE_IDS):06d}"
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=content,
            tls=session.ssl is not None,
            helo=session.host_name or "",
            queue_id=queue_id,
            peer=str(session.peer),
        )
        with sink.lock:
            sink.messages.append(message)
        return f"250 2.0.0 Ok: queued as {queue_id}"


class _CountingController(Controller):
    """Counts TCP connections as they are accepted, before any SMTP is spoken."""

    def __init__(self, sink: MxSink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink

    def factory(self) -> SMTP:
        with self._sink.lock:
            self._sink.accepted += 1
        return super().factory()  # type: ignore[no-untyped-call, no-any-return]


class MxSink:
    """An SMTP server recording messages. Behaviour knobs (all optional):

    - `rcpt_reply`: reply every RCPT with this (e.g. "550 5.1.1 user unknown");
      `rcpt_replies`: the same per recipient address.
    - `data_replies`: replies used for the first DATA commands, one each (e.g. two
      "451 4.3.0 try again later"), after which messages are accepted.
    - `hold_data`: how many DATA commands to hold (content recorded, no reply) until `release()`.
    - `tls_cert`: offer STARTTLS with this trustme certificate.
    - `reused_mail_reply`: reply MAIL FROM with this on a connection that already carried a
      message (e.g. "421 4.4.2 idle too long"), as a server closing a cached connection does.
    `drop_connections()` closes every client connection from the server side; `accepted` counts
    TCP connections accepted (the probe of "no connection attempt").
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        rcpt_reply: str | None = None,
        rcpt_replies: dict[str, str] | None = None,
        data_replies: Iterable[str] = (),
        hold_data: int = 0,
        tls_cert: trustme.LeafCert | None = None,
        reused_mail_reply: str | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.rcpt_reply = rcpt_reply
        self.rcpt_replies = {address.lower(): reply for address, reply in (rcpt_replies or {}).items()}
        self.data_replies = list(data_replies)
        self.hold_data = hold_data
        self.reused_mail_reply = reused_mail_reply
        self.connections: dict[str, SMTP] = {}  # peer -> session, from its first MAIL FROM
        self.accepted = 0
        self.lock = threading.Lock()
        self.messages: list[ReceivedMessage] = []
        self.data_payloads: list[bytes] = []
        self.holding = threading.Event()
        self.released = threading.Event()
        kwargs: dict[str, Any] = {"enable_SMTPUTF8": True}
        if tls_cert is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_cert.configure_cert(context)
            kwargs.update(tls_context=context, require_starttls=False)
        self._controller = _CountingController(self, _Handler(self), hostname=host, port=port, **kwargs)

    def start(self) -> MxSink:
        self._controller.start()
        with self.lock:
            self.accepted = 0  # start() itself connects once to see that the server is up
        return self

    def stop(self) -> None:
        self.released.set()
        self._controller.stop()

    def release(self) -> None:
        self.released.set()

    def __enter__(self) -> MxSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def drop_connections(self) -> None:
        with self.lock:
            sessions = list(self.connections.values())
        loop = self._controller.loop
        for session in sessions:
            if session.transport is not None:
                loop.call_soon_threadsafe(session.transport.close)

    def received(self) -> list[ReceivedMessage]:
        with self.lock:
            return list(self.messages)


class HangingServer:
    """Accepts TCP connections and never sends a byte: a greeting timeout for the client."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self.host, self.port = host, self._listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="hanging-smtp")

    def start(self) -> HangingServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):  # wakes the accept now rather than at its 0.2 s timeout
            socket.create_connection((self.host, self.port), timeout=1).close()
        self._thread.join(timeout=2)
        for connection in self.connections:
            connection.close()
        self._listener.close()

    def __enter__(self) -> HangingServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                connection, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections.append(connection)


__all__ = ["HangingServer", "MxSink", "ReceivedMessage"]
