"""Test gateways for the tunnel: a websockets client that authenticates with a `Passport`,
collects inbound frames into messages and sends outbound frames; and `RawWsClient`, a bare
RFC 6455 client that does *not* answer pings by itself, for proving the ping/pong barrier.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from shared import protocol
from shared.identity import Passport
from tests.support.wait import eventually as eventually  # re-exported: its old home

RECEIVE_TIMEOUT_S = 10.0


@dataclass
class InboundMessage:
    stream_id: str
    start: protocol.SmtpStart
    data: bytes
    chunk_sizes: list[int] = field(default_factory=list)


class GatewayClient:
    """One gateway socket. Text messages go to `texts`, frames are assembled into `inbound`."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.texts: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.inbound: asyncio.Queue[InboundMessage] = asyncio.Queue()
        self.raw_texts: list[str] = []
        self._partial: dict[str, InboundMessage] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, url: str, **options: Any) -> GatewayClient:
        ws = await connect(url, open_timeout=10, ping_interval=None, max_size=None, **options)
        return cls(ws)

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                if isinstance(message, str):
                    self.raw_texts.append(message)
                    self.texts.put_nowait(json.loads(message))
                    continue
                frame = protocol.decode_frame(message)
                if frame.frame_type is protocol.FrameType.SMTP_START:
                    self._partial[frame.stream_id] = InboundMessage(
                        frame.stream_id, protocol.decode_start_body(frame.body), b""
                    )
                elif frame.frame_type is protocol.FrameType.SMTP_CHUNK:
                    partial = self._partial[frame.stream_id]
                    partial.data += frame.body
                    partial.chunk_sizes.append(len(frame.body))
                else:
                    self.inbound.put_nowait(self._partial.pop(frame.stream_id))

    # --- sending -----------------------------------------------------------------------------

    async def send_json(self, fields: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(fields))

    async def request_challenge(
        self, persona_key: str, role: str | None = "inbound", capabilities: list[str] | None = None
    ) -> dict[str, Any]:
        request: dict[str, Any] = {"type": "auth_challenge_request", "publicKeyBase32": persona_key}
        if role is not None:
            request["sessionRole"] = role
        if capabilities is not None:
            request["capabilities"] = capabilities
        await self.send_json(request)
        return await self.next_text()

    async def respond(
        self, persona_key: str, challenge_id: str, signature_base64: str, role: str | None = "inbound"
    ) -> dict[str, Any]:
        response: dict[str, Any] = {
            "type": "auth_challenge_response",
            "publicKeyBase32": persona_key,
            "challengeId": challenge_id,
            "signatureBase64": signature_base64,
        }
        if role is not None:
            response["sessionRole"] = role
        await self.send_json(response)
        return await self.next_text()

    async def authenticate(
        self, passport: Passport, role: str = "inbound", capabilities: list[str] | None = None
    ) -> dict[str, Any]:
        challenge = await self.request_challenge(passport.persona_key, role, capabilities)
        assert challenge["type"] == "auth_challenge", challenge
        signature = passport.sign_base64(challenge["challengeText"].encode())
        auth_ok = await self.respond(passport.persona_key, challenge["challengeId"], signature, role)
        assert auth_ok["type"] == "auth_ok", auth_ok
        return auth_ok

    async def ack(self, stream_id: str) -> None:
        await self.send_json({"type": "smtp_ack", "streamId": stream_id})

    async def send_outbound(self, stream_id: str, mail_from: str, rcpt_to: str, message: bytes) -> None:
        for frame in protocol.encode_message_frames(stream_id, protocol.SmtpStart(mail_from, rcpt_to), message):
            await self.ws.send(frame)

    # --- receiving ---------------------------------------------------------------------------

    async def next_text(self, timeout_s: float = RECEIVE_TIMEOUT_S) -> dict[str, Any]:
        return await asyncio.wait_for(self.texts.get(), timeout_s)

    async def next_of_type(self, message_type: str, timeout_s: float = RECEIVE_TIMEOUT_S) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                text = await self.texts.get()
                if text.get("type") == message_type:
                    return text

    async def next_inbound(self, timeout_s: float = RECEIVE_TIMEOUT_S) -> InboundMessage:
        return await asyncio.wait_for(self.inbound.get(), timeout_s)

    async def closed(self, timeout_s: float = RECEIVE_TIMEOUT_S) -> tuple[int | None, str | None]:
        """Wait for the server to close; (close code, reason)."""
        await asyncio.wait_for(asyncio.shield(self._reader), timeout_s)
        await asyncio.wait_for(self.ws.wait_closed(), timeout_s)
        return self.ws.close_code, self.ws.close_reason

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def abort(self) -> None:
        """Drop the TCP connection without a closing handshake, like a crashed gateway."""
        self.ws.transport.abort()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class RawWsClient:
    """A minimal client over a plain TCP stream: nothing is sent unless the test sends it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int, path: str = "/ws") -> RawWsClient:
        reader, writer = await asyncio.open_connection(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RECEIVE_TIMEOUT_S)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, opcode: Opcode, payload: bytes) -> None:
        self.writer.write(Frame(opcode, payload).serialize(mask=True, extensions=[]))
        await self.writer.drain()

    async def send_text(self, text: str) -> None:
        await self.send(Opcode.TEXT, text.encode())

    async def send_binary(self, payload: bytes) -> None:
        await self.send(Opcode.BINARY, payload)

    async def pong(self, payload: bytes) -> None:
        await self.send(Opcode.PONG, payload)

    async def next_frame(self, timeout_s: float = RECEIVE_TIMEOUT_S) -> tuple[Opcode, bytes]:
        """(opcode, payload) of the next frame from the server (unmasked, unfragmented)."""
        async with asyncio.timeout(timeout_s):
            first, second = await self.reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack(">H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack(">Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(length)
        return Opcode(first & 0x0F), payload

    async def next_text(self) -> dict[str, Any]:
        opcode, payload = await self.next_frame()
        assert opcode == Opcode.TEXT, (opcode, payload)
        parsed: dict[str, Any] = json.loads(payload)
        return parsed

    async def authenticate(self, passport: Passport, capabilities: list[str] | None = None) -> dict[str, Any]:
        request: dict[str, Any] = {"type": "auth_challenge_request", "publicKeyBase32": passport.persona_key}
        if capabilities is not None:
            request["capabilities"] = capabilities
        await self.send_text(json.dumps(request))
        challenge = await self.next_text()
        signature = passport.sign_base64(challenge["challengeText"].encode())
        await self.send_text(
            json.dumps(
                {
                    "type": "auth_challenge_response",
                    "publicKeyBase32": passport.persona_key,
                    "challengeId": challenge["challengeId"],
                    "signatureBase64": signature,
                }
            )
        )
        return await self.next_text()

    def close(self) -> None:
        self.writer.transport.abort()


# --- an in-process tunnel for tests ------------------------------------------------------------


class RunningTunnel:
    """`services.tunnel.main.serve` on a free port in the test's own event loop."""

    def __init__(self, redis_url: str, *, rate_clock: Callable[[], float] = time.time, **env: str) -> None:
        from protege_relay.embedded_redis import free_port
        from shared.config import load_config

        self.port = free_port()
        environ = {
            "RELAY_REDIS_URL": redis_url,
            "RELAY_PORT": str(self.port),
            "RELAY_NODE_ID": f"test-node-{self.port}",
            **env,
        }
        self.config = load_config(path=None, environ=environ)
        self.stopping = asyncio.Event()
        self._rate_clock = rate_clock
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> RunningTunnel:
        from services.tunnel.main import serve

        self._task = asyncio.get_running_loop().create_task(
            serve(self.config, self.stopping, rate_clock=self._rate_clock)
        )
        # The port accepts as soon as it is bound, before the server is up: wait for /readyz.
        async with asyncio.timeout(10):
            while True:
                if self._task.done():
                    self._task.result()
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=self._probe_tls())
                except OSError:
                    await asyncio.sleep(0.01)
                    continue
                writer.write(b"GET /readyz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                status_line = await reader.readline()
                writer.close()
                if status_line.startswith(b"HTTP/1.1 200"):
                    return self
                await asyncio.sleep(0.01)

    def _probe_tls(self) -> ssl.SSLContext | None:
        """The readiness probe speaks TLS to a `wss://` tunnel; it checks readiness, not trust."""
        if not self.config.ws.tls.enabled:
            return None
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    async def stop(self) -> None:
        self.stopping.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 20)
