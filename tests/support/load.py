"""Load for the multi-node and fault tests: SMTP senders that count only what got `250`, and
a fleet of asyncio gateways that record every inbound stream id before acknowledging it.

Every message carries a token header, so the books can be checked end to end:
- sent: tokens answered `250` (a `4xx` or a dropped connection is retried, as an MTA does);
- received: tokens the gateways hold, with every stream id they arrived under;
- lost: sent tokens never received (must be 0);
- duplicates: deliveries beyond the first; each must repeat the same stream id (the relay's
  redelivery), never a second stream id for one token (a second acceptance).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from shared import protocol
from shared.identity import Passport
from tests.support.cluster import soak_factor

TOKEN_HEADER = "X-Load-Token"
STREAM_HEADER = "X-Load-Stream"
_TOKEN = re.compile(rb"^X-Load-Token: (\S+)\r?$", re.MULTILINE)
_STREAM = re.compile(rb"^X-Load-Stream: (\S+)\r?$", re.MULTILINE)
_QUEUED = re.compile(r"queued as (\S+)")

SMTP_TIMEOUT_S = 15.0
RETRY_DELAY_S = 0.1  # an MTA's retry interval, shortened
RECONNECT_DELAY_S = 0.1
AUTH_TIMEOUT_S = 10.0
INBOUND_ACK = "inbound_ack"


def token_of(message: bytes) -> str | None:
    match = _TOKEN.search(message)
    return match.group(1).decode() if match else None


def stream_header_of(message: bytes) -> str | None:
    match = _STREAM.search(message)
    return match.group(1).decode() if match else None


def make_message(token: str, size_bytes: int = 600, extra_headers: dict[str, str] | None = None) -> bytes:
    """A CRLF text message of about `size_bytes` carrying `token`; no line starts with a dot."""
    headers = {"From": "load@sender.test", "Subject": f"load {token}", TOKEN_HEADER: token, **(extra_headers or {})}
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode() + b"\r\n"
    line = b"the quick brown fox jumps over the lazy dog 0123456789\r\n"
    body = line * max(1, (size_bytes - len(head)) // len(line))
    return head + body


# --- SMTP ------------------------------------------------------------------------------------


class SmtpReply(Exception):
    def __init__(self, step: str, code: int, text: str) -> None:
        super().__init__(f"{step}: {code} {text}")
        self.step, self.code, self.text = step, code, text


class _Smtp:
    """One SMTP client connection on asyncio streams, one command at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> _Smtp:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), SMTP_TIMEOUT_S)
        connection = cls(reader, writer)
        await connection.expect("greeting", None, 220)
        await connection.expect("EHLO", "EHLO load.test", 250)
        return connection

    async def reply(self) -> tuple[int, str]:
        lines: list[bytes] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), SMTP_TIMEOUT_S)
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), b"".join(lines).decode(errors="replace").strip()

    async def expect(self, step: str, command: str | None, expected: int) -> str:
        if command is not None:
            self.writer.write(command.encode() + b"\r\n")
        code, text = await self.reply()
        if code != expected:
            raise SmtpReply(step, code, text)
        return text

    def close(self) -> None:
        self.writer.transport.abort()


@dataclass
class SendLedger:
    """What the senders know: which tokens were accepted (250) and what else happened."""

    accepted: dict[str, str] = field(default_factory=dict)  # token -> queue id
    temporary: Counter[str] = field(default_factory=Counter)  # "<step> <code>" -> count
    rejected: dict[str, str] = field(default_factory=dict)  # token -> permanent reply
    connection_errors: int = 0
    ambiguous: set[str] = field(default_factory=set)  # the reply to the final dot never came
    refused_after_data: set[str] = field(default_factory=set)  # a 4xx to the final dot, then retried
    attempts: int = 0

    @property
    def stream_ids(self) -> dict[str, str]:
        """Expected inbound stream id (one recipient per message) -> token."""
        return {f"{queue_id}.0": token for token, queue_id in self.accepted.items()}


@dataclass(frozen=True)
class Outgoing:
    token: str
    mail_from: str
    rcpt_to: str
    message: bytes
    port_index: int


class SmtpLoad:
    """Senders on `concurrency` connections; message n goes to `ports[n % len(ports)]`."""

    def __init__(self, ports: list[int], concurrency: int = 8, deadline_s: float = 90.0 * soak_factor()) -> None:
        self.ports = ports
        self.concurrency = concurrency
        self.deadline_s = deadline_s
        self.ledger = SendLedger()
        self.on_accepted: Callable[[int], None] = lambda count: None

    @staticmethod
    def plan(
        recipients: list[str], count: int, prefix: str = "t", size_of: Callable[[int], int] = lambda index: 600
    ) -> list[Outgoing]:
        """`count` messages round-robin over `recipients`; message n is about `size_of(n)` bytes."""
        run = os.urandom(3).hex()
        return [
            Outgoing(
                token=(token := f"{prefix}{run}-{index:06d}"),
                mail_from="load@sender.test",
                rcpt_to=recipients[index % len(recipients)],
                message=make_message(token, size_of(index)),
                port_index=index,
            )
            for index in range(count)
        ]

    async def send(self, outgoing: list[Outgoing]) -> SendLedger:
        queue: asyncio.Queue[Outgoing] = asyncio.Queue()
        for item in outgoing:
            queue.put_nowait(item)
        deadline = time.monotonic() + self.deadline_s
        await asyncio.gather(*(self._worker(queue, deadline) for _ in range(self.concurrency)))
        return self.ledger

    async def _worker(self, queue: asyncio.Queue[Outgoing], deadline: float) -> None:
        connections: dict[int, _Smtp] = {}
        try:
            while not queue.empty():
                item = queue.get_nowait()
                while item.token not in self.ledger.accepted and item.token not in self.ledger.rejected:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"SMTP load unfinished at the deadline: {self.ledger.temporary}")
                    port = self.ports[item.port_index % len(self.ports)]
                    await self._attempt(item, port, connections)
        finally:
            for connection in connections.values():
                connection.close()

    async def _attempt(self, item: Outgoing, port: int, connections: dict[int, _Smtp]) -> None:
        ledger = self.ledger
        ledger.attempts += 1
        data_sent = False
        try:
            connection = connections.get(port)
            if connection is None:
                connection = connections[port] = await _Smtp.open(port)
            await connection.expect("MAIL", f"MAIL FROM:<{item.mail_from}>", 250)
            await connection.expect("RCPT", f"RCPT TO:<{item.rcpt_to}>", 250)
            await connection.expect("DATA", "DATA", 354)
            connection.writer.write(item.message + b".\r\n")
            data_sent = True
            text = await connection.expect("DATA-end", None, 250)
        except SmtpReply as reply:
            if reply.code >= 500:
                ledger.rejected[item.token] = f"{reply.step} {reply.code} {reply.text}"
                raise AssertionError(f"permanent SMTP refusal for {item.token}: {reply}") from None
            ledger.temporary[f"{reply.step} {reply.code}"] += 1
            if reply.step == "DATA-end":
                ledger.refused_after_data.add(item.token)
            await self._reset(port, connections, closed=reply.code == 421)
            await asyncio.sleep(RETRY_DELAY_S)
            return
        except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            ledger.connection_errors += 1
            if data_sent:
                ledger.ambiguous.add(item.token)
            dropped = connections.pop(port, None)
            if dropped is not None:
                dropped.close()
            await asyncio.sleep(RETRY_DELAY_S)
            return
        match = _QUEUED.search(text)
        assert match is not None, text
        ledger.accepted[item.token] = match.group(1)
        self.on_accepted(len(ledger.accepted))

    async def _reset(self, port: int, connections: dict[int, _Smtp], closed: bool) -> None:
        connection = connections.get(port)
        if connection is None:
            return
        if not closed:
            with contextlib.suppress(Exception):
                await connection.expect("RSET", "RSET", 250)
                return
        connections.pop(port, None)
        connection.close()


# --- gateways --------------------------------------------------------------------------------


@dataclass
class OutboundSend:
    stream_id: str
    mail_from: str
    rcpt_to: str
    message: bytes
    sent_on: int = -1  # the socket generation the frames last went out on
    times_sent: int = 0


@dataclass
class FleetGateway:
    """One persona's gateway: an inbound socket (announcing `inbound_ack`) on node
    `start_index`, moving on to the next node whenever its socket closes."""

    passport: Passport
    start_index: int
    ws: ClientConnection | None = None
    generation: int = 0
    node_index: int = 0
    connects: list[str] = field(default_factory=list)
    closes: Counter[str] = field(default_factory=Counter)
    auth_failures: Counter[str] = field(default_factory=Counter)
    deliveries: list[tuple[str, str | None]] = field(default_factory=list)  # (stream id, token)
    results: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    outbound: dict[str, OutboundSend] = field(default_factory=dict)
    dropped_before_ack: list[str] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    partial: dict[str, bytearray] = field(default_factory=dict)

    @property
    def persona_key(self) -> str:
        return self.passport.persona_key


class GatewayFleet:
    """Gateways for many personas in this process, round-robin over the tunnel nodes.

    `drop_before_ack(gateway, stream_id)` returning True makes that gateway record the message
    and then drop its socket without acknowledging it (a crash between smtp_end and the ack).
    """

    def __init__(
        self,
        urls: list[str],
        passports: list[Passport],
        *,
        drop_before_ack: Callable[[FleetGateway, str], bool] | None = None,
        on_chunk: Callable[[FleetGateway, str], None] | None = None,
    ) -> None:
        self.urls = urls
        self.gateways = [FleetGateway(passport, index) for index, passport in enumerate(passports)]
        self.drop_before_ack = drop_before_ack
        self.on_chunk = on_chunk  # (gateway, stream id) on every smtp_chunk: a hook to act mid-stream
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, timeout_s: float = 30.0) -> GatewayFleet:
        """Connect every gateway (again, after `stop`: what they hold and sent is kept)."""
        self._stopping = False
        for gateway in self.gateways:
            gateway.node_index = gateway.start_index
            self._tasks.append(asyncio.get_running_loop().create_task(self._run(gateway)))
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(gateway.connected.wait() for gateway in self.gateways))
        return self

    async def stop(self) -> None:
        self._stopping = True
        for gateway in self.gateways:
            if gateway.ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(gateway.ws.close(), 2)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _run(self, gateway: FleetGateway) -> None:
        while not self._stopping:
            url = self.urls[gateway.node_index % len(self.urls)]
            try:
                await self._session(gateway, url)
            except (OSError, ConnectionClosed, InvalidHandshake, InvalidStatus, TimeoutError) as exc:
                gateway.closes[type(exc).__name__] += 1
            except Exception as exc:  # a bug in what the relay sent: recorded, the test fails on it
                gateway.closes[f"error {exc!r}"] += 1
            finally:
                gateway.ws = None
                gateway.connected.clear()
            gateway.node_index += 1
            await asyncio.sleep(RECONNECT_DELAY_S)

    async def _session(self, gateway: FleetGateway, url: str) -> None:
        ws = await connect(url, open_timeout=5, ping_interval=None, max_size=None, close_timeout=2)
        try:
            if not await self._authenticate(gateway, ws):
                return
            gateway.generation += 1
            gateway.ws = ws
            gateway.connects.append(url)
            gateway.connected.set()
            await self._resend_pending(gateway)
            async for message in ws:
                if isinstance(message, str):
                    self._on_text(gateway, message)
                elif not await self._on_frame(gateway, ws, message):
                    return
            gateway.closes[f"close {ws.close_code}"] += 1
        finally:
            gateway.partial.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)

    async def _authenticate(self, gateway: FleetGateway, ws: ClientConnection) -> bool:
        key = gateway.persona_key
        await ws.send(
            json.dumps(
                {
                    "type": "auth_challenge_request",
                    "publicKeyBase32": key,
                    "sessionRole": "inbound",
                    "capabilities": [INBOUND_ACK],
                }
            )
        )
        challenge = json.loads(await asyncio.wait_for(ws.recv(), AUTH_TIMEOUT_S))
        if challenge.get("type") != "auth_challenge":
            gateway.auth_failures[str(challenge.get("code"))] += 1
            return False
        signature = gateway.passport.sign_base64(challenge["challengeText"].encode())
        await ws.send(
            json.dumps(
                {
                    "type": "auth_challenge_response",
                    "publicKeyBase32": key,
                    "challengeId": challenge["challengeId"],
                    "signatureBase64": signature,
                    "sessionRole": "inbound",
                }
            )
        )
        reply = json.loads(await asyncio.wait_for(ws.recv(), AUTH_TIMEOUT_S))
        if reply.get("type") != "auth_ok":
            gateway.auth_failures[str(reply.get("code"))] += 1
            return False
        return True

    # --- inbound -----------------------------------------------------------------------------

    async def _on_frame(self, gateway: FleetGateway, ws: ClientConnection, message: bytes) -> bool:
        """Assemble streams; False when the socket was dropped on purpose."""
        partial = gateway.partial
        frame = protocol.decode_frame(message)
        if frame.frame_type is protocol.FrameType.SMTP_START:
            partial[frame.stream_id] = bytearray()
            return True
        if frame.frame_type is protocol.FrameType.SMTP_CHUNK:
            partial[frame.stream_id] += frame.body
            if self.on_chunk is not None:
                self.on_chunk(gateway, frame.stream_id)
            return True
        data = bytes(partial.pop(frame.stream_id))
        gateway.deliveries.append((frame.stream_id, token_of(data)))  # stored before the ack
        if self.drop_before_ack is not None and self.drop_before_ack(gateway, frame.stream_id):
            gateway.dropped_before_ack.append(frame.stream_id)
            ws.transport.abort()
            return False
        await ws.send(json.dumps({"type": "smtp_ack", "streamId": frame.stream_id}))
        return True

    def _on_text(self, gateway: FleetGateway, text: str) -> None:
        fields = json.loads(text)
        if fields.get("type") == "relay_delivery_result":
            gateway.results[fields["streamId"]].append(fields)

    # --- outbound ----------------------------------------------------------------------------

    async def send_outbound(self, gateway: FleetGateway, send: OutboundSend) -> None:
        """Send now if connected; a send interrupted by a socket close goes again (same stream
        id, so the relay deduplicates) once the gateway is connected again."""
        gateway.outbound[send.stream_id] = send
        await self._send_frames(gateway, send)

    async def _send_frames(self, gateway: FleetGateway, send: OutboundSend) -> None:
        async with gateway.send_lock:
            ws, generation = gateway.ws, gateway.generation
            if ws is None or send.sent_on == generation:
                return
            start = protocol.SmtpStart(send.mail_from, send.rcpt_to)
            try:
                for frame in protocol.encode_message_frames(send.stream_id, start, send.message):
                    await ws.send(frame)
            except ConnectionClosed:
                return
            send.sent_on = generation
            send.times_sent += 1

    async def _resend_pending(self, gateway: FleetGateway) -> None:
        for send in list(gateway.outbound.values()):
            if send.stream_id not in gateway.results:
                await self._send_frames(gateway, send)

    # --- the books ---------------------------------------------------------------------------

    def deliveries(self) -> list[tuple[str, str | None]]:
        return list(itertools.chain.from_iterable(gateway.deliveries for gateway in self.gateways))

    def received_count(self) -> int:
        return len({stream_id for gateway in self.gateways for stream_id, _ in gateway.deliveries})

    def results(self) -> dict[str, list[dict[str, Any]]]:
        merged: dict[str, list[dict[str, Any]]] = {}
        for gateway in self.gateways:
            merged.update(gateway.results)
        return merged

    def connects(self) -> int:
        return sum(len(gateway.connects) for gateway in self.gateways)


@dataclass(frozen=True)
class Books:
    sent: int
    received: int
    lost: list[str]
    duplicates: int
    split_tokens: dict[str, set[str]]  # token -> several stream ids (a second acceptance)
    unexpected: list[str]  # received tokens that never got a 250
    mismatched: list[str]  # stream ids that arrived carrying another token than accepted

    def line(self) -> str:
        return f"sent={self.sent} received={self.received} lost={len(self.lost)} duplicates={self.duplicates}"

    def assert_clean(self, ambiguous: set[str] | None = None) -> None:
        ambiguous = ambiguous or set()
        assert not self.lost, f"{len(self.lost)} accepted messages never reached a gateway: {self.lost[:10]}"
        assert not self.mismatched, f"stream ids carrying the wrong message: {self.mismatched[:10]}"
        unexplained_splits = {t: s for t, s in self.split_tokens.items() if t not in ambiguous}
        assert not unexplained_splits, f"one message under several stream ids: {unexplained_splits}"
        unexplained = [token for token in self.unexpected if token not in ambiguous]
        assert not unexplained, f"messages delivered that were never accepted: {unexplained[:10]}"


@dataclass(frozen=True)
class OutboundBooks:
    sent: int
    received: int  # distinct outbound streams the MX holds
    lost: list[str]
    duplicates: int  # copies at the MX beyond the first, all of an outbound stream id
    foreign: list[str | None]  # MX messages that are no outbound stream of ours
    missing_results: list[str]
    failed_results: list[dict[str, Any]]

    def line(self) -> str:
        return f"sent={self.sent} received={self.received} lost={len(self.lost)} duplicates={self.duplicates}"

    def assert_clean(self) -> None:
        assert not self.lost, f"outbound streams that never reached the MX: {self.lost[:10]}"
        assert not self.foreign, f"MX messages that are no outbound stream: {self.foreign[:10]}"
        assert not self.missing_results, f"outbound streams without a result: {self.missing_results[:10]}"
        assert not self.failed_results, f"failed results: {self.failed_results[:5]}"


def reconcile_outbound(
    sends: list[OutboundSend], mx_messages: list[bytes], results: dict[str, list[dict[str, Any]]]
) -> OutboundBooks:
    """Outbound streams (each message carries its stream id in a header) against the MX."""
    stream_ids = {send.stream_id for send in sends}
    at_mx = Counter(stream_header_of(message) for message in mx_messages)
    return OutboundBooks(
        sent=len(stream_ids),
        received=len(stream_ids & set(at_mx)),
        lost=sorted(stream_ids - set(at_mx)),
        duplicates=sum(count - 1 for stream_id, count in at_mx.items() if stream_id in stream_ids),
        foreign=[stream_id for stream_id in at_mx if stream_id not in stream_ids],
        missing_results=sorted(stream_ids - results.keys()),
        failed_results=[results[sid][0] for sid in stream_ids & results.keys() if results[sid][0]["status"] != "sent"],
    )


def outbound_sends(gateways: list[FleetGateway], count: int, domain: str, remote_domain: str) -> list[OutboundSend]:
    """`count` outbound streams round-robin over the gateways, bare-LF as a gateway writes them,
    each carrying its stream id so that a copy at the MX can be traced to it."""
    sends = []
    for index in range(count):
        gateway = gateways[index % len(gateways)]
        stream_id = str(uuid.uuid4())
        sender = f"{gateway.persona_key}@{domain}"
        headers = {"From": sender, STREAM_HEADER: stream_id}
        message = make_message(f"out-{index:05d}", extra_headers=headers).replace(b"\r\n", b"\n")
        sends.append(OutboundSend(stream_id, sender, f"user{index}@{remote_domain}", message))
    return sends


def reconcile(ledger: SendLedger, deliveries: list[tuple[str, str | None]]) -> Books:
    """Check the gateways' deliveries against the senders' 250s (see the module docstring)."""
    expected = ledger.stream_ids
    streams_of: dict[str, set[str]] = defaultdict(set)
    seen: Counter[str] = Counter()
    mismatched: list[str] = []
    for stream_id, token in deliveries:
        seen[stream_id] += 1
        if token is not None:
            streams_of[token].add(stream_id)
        if stream_id in expected and expected[stream_id] != token:
            mismatched.append(stream_id)
    received_tokens = set(streams_of)
    return Books(
        sent=len(ledger.accepted),
        received=len(received_tokens & set(ledger.accepted)),
        lost=sorted(set(ledger.accepted) - received_tokens),
        duplicates=sum(count - 1 for count in seen.values()),
        split_tokens={token: ids for token, ids in streams_of.items() if len(ids) > 1},
        unexpected=sorted(received_tokens - set(ledger.accepted)),
        mismatched=mismatched,
    )


__all__ = [
    "Books",
    "FleetGateway",
    "GatewayFleet",
    "OutboundBooks",
    "OutboundSend",
    "SendLedger",
    "SmtpLoad",
    "make_message",
    "outbound_sends",
    "reconcile",
    "reconcile_outbound",
    "stream_header_of",
    "token_of",
]
