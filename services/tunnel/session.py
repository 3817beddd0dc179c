"""One tunnel socket's protocol state, without sockets or asyncio (STYLE.md, like websockets'
own `protocol.py`).

`TunnelSession` consumes the messages a gateway sends and returns *actions* for the server to
carry out, in order. Steps that need Redis are split in two: the session returns an action
(`IssueChallenge`, `CheckAuthRate`, `LoadChallenge`, `ConsumeChallenge`, `ClaimPersona`,
`EnqueueOutbound`) and the server reports the outcome back as an event (`challenge_stored`,
`auth_rate_checked`, `challenge_loaded`, `challenge_consumed`, `auth_succeeded`/`auth_failed`,
`outbound_refused`), which returns the next actions. Every auth, text and assembly rule of
PROTOCOL.md A3, A4, A6 and B is decided here, once, so each can be tested without a socket.

Verifying a challenge response is a state of its own (`VERIFYING`, from the response to auth_ok
or the refusal): the server reads nothing else meanwhile, and the auth deadline does not cut
it short (it ends in auth_ok or a refusal anyway, and cutting it would strand a persona claim).

Choices the protocol leaves open:
- Malformed JSON after auth gets `{"type":"error","code":"invalid_message"}` and the socket stays
  open (as unknown types do); only an invalid *binary* frame closes it (A4).
- Auth messages after auth get `{"type":"error","code":"already_authenticated"}`.
- `sessionRole` of the response wins over the request's (the original reads the response's).
- Frames of a refused outbound stream (too large, over a budget) are ignored until its
  smtp_end, so the gateway gets exactly one result for it.
- The bytes of unfinished outbound streams are taken from a node-wide budget (`allowance`,
  services/tunnel/budget.py) and given back when a stream ends in any way; a queued stream's
  bytes are given back by the server once the job is queued (`EnqueueOutbound.size_bytes`).
- A socket that has not authenticated `ws.authTimeoutMs` after the upgrade gets auth_error
  `auth_timeout` and close 4401: A3 makes every auth failure auth_error + 4401, so an unmodified
  gateway treats it like any refused attempt and reconnects. (A silent TCP connection that never
  completes the upgrade is closed earlier, by the handshake timeout, with no WebSocket code.)
- A challenge is bound to the persona key, not to the socket or node that issued it (as in the
  original): the response may arrive on another socket, even on another tunnel node (the record
  is in Redis). Binding adds nothing: only the key's holder can sign the challenge text, and it
  is still single-use and expires.
- The per-IP auth rate counts attempts, not messages: a challenge request is counted; its
  response is counted only when no challenge was requested on this socket (a response to a
  challenge issued elsewhere), so an honest request + response costs one attempt.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.tunnel import header_from, outbound
from services.tunnel.challenges import ChallengeRecord, check_response, iso_utc_ms, new_challenge, normalize_key
from shared import protocol
from shared.codes import (
    AUTH_ERROR_CLOSE,
    CLOSE_REASON_CODE,
    NAMES_EXPECTED_SENDER,
    AuthError,
    CloseReason,
    ControlError,
    OutboundRefusal,
)
from shared.identity import is_public_key
from shared.payloads import OutboundJob

ROLE_INBOUND = "inbound"
ROLE_OUTBOUND = "outbound"
CAPABILITY_INBOUND_ACK = "inbound_ack"
SUPPORTED_CAPABILITIES = (CAPABILITY_INBOUND_ACK,)

MAX_OPEN_STREAMS = 8
MAX_REFUSED_STREAMS_REMEMBERED = 64


class State(enum.Enum):
    UNAUTHENTICATED = "unauthenticated"
    VERIFYING = "verifying"  # a challenge response is being checked (Redis steps under way)
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendText:
    text: str


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class IssueChallenge:
    """Count the attempt in the per-IP auth rate and store `challenge` (one round trip); then
    report `challenge_stored(within_rate)`."""

    challenge: ChallengeRecord


@dataclass(frozen=True, slots=True)
class DiscardChallenge:
    """Delete a stored challenge whose request was refused (it can never be answered)."""

    challenge_id: str


@dataclass(frozen=True, slots=True)
class CheckAuthRate:
    """Count the attempt in the per-IP auth rate; then report `auth_rate_checked(within_rate)`."""


@dataclass(frozen=True, slots=True)
class LoadChallenge:
    """Read the challenge record (issued on another socket or node); then report
    `challenge_loaded(record)` (None when there is none)."""

    challenge_id: str


@dataclass(frozen=True, slots=True)
class ConsumeChallenge:
    """Mark the challenge used, atomically re-checking it; then report `challenge_consumed(code)`
    (None when it was ours to use)."""

    challenge_id: str
    persona_key: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class ClaimPersona:
    """Take `persona_key` for this socket (an outbound-role slot, ownership in Redis); then report
    `auth_succeeded(persona_key, role, replaced_socket_id)` or `auth_failed(code)`."""

    persona_key: str
    role: str


@dataclass(frozen=True, slots=True)
class Authenticated:
    """auth_ok has been sent: start serving the persona on this socket."""

    persona_key: str
    role: str
    replaced_socket_id: str | None


@dataclass(frozen=True, slots=True)
class AckInbound:
    stream_id: str


@dataclass(frozen=True, slots=True)
class EnqueueOutbound:
    """Check the persona's outbound rate, then queue `job` (a refusal: `outbound_refused`);
    then give `size_bytes` back to the allowance."""

    job: OutboundJob
    size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class RefuseOutbound:
    """Answer the outbound stream at once with a failed result carrying `reason`."""

    stream_id: str
    reason: str
    # sender_not_allowed: the address this persona may use (a detail for the reader, not part
    # of the refusal's identity, hence not compared)
    expected_sender: str | None = field(default=None, compare=False)

    @property
    def text(self) -> str:
        extra = {"expectedSender": self.expected_sender} if self.expected_sender else None
        return protocol.delivery_result(self.stream_id, sent=False, error=self.reason, extra=extra)


@dataclass(frozen=True, slots=True)
class OutboundDropped:
    """An outbound stream was given up (for logs and metrics; nothing is sent)."""

    stream_id: str
    reason: str


Action = (
    SendText
    | Close
    | IssueChallenge
    | DiscardChallenge
    | CheckAuthRate
    | LoadChallenge
    | ConsumeChallenge
    | ClaimPersona
    | Authenticated
    | AckInbound
    | EnqueueOutbound
    | RefuseOutbound
    | OutboundDropped
)


@dataclass(frozen=True, slots=True)
class SessionLimits:
    challenge_ttl_s: int = 60
    max_message_bytes: int = 10 * 1024 * 1024
    outbound_stream_timeout_ms: int = 60_000
    mail_domains: tuple[str, ...] = ()
    max_open_streams: int = MAX_OPEN_STREAMS


class ByteAllowance(Protocol):
    """This socket's share of the node's outbound assembly budget."""

    def take(self, size: int) -> bool: ...

    def give(self, size: int) -> None: ...


class _Unlimited:
    def take(self, size: int) -> bool:
        return True

    def give(self, size: int) -> None:
        return None


@dataclass(frozen=True, slots=True)
class _Verification:
    """The challenge response being verified (state VERIFYING)."""

    challenge_id: str
    persona_key: str  # normalised
    signature_base64: str
    role: str


@dataclass(slots=True)
class _OutboundStream:
    start: protocol.SmtpStart
    started_at_ms: int
    chunks: list[bytes] = field(default_factory=list)
    size_bytes: int = 0


class TunnelSession:
    """The protocol state of one tunnel socket: auth (A3), control messages (B) and outbound
    stream assembly (A6), as actions for the I/O layer (services/tunnel/connection.py) to carry
    out. It owns no socket, task or clock of its own, so every rule is testable in memory."""

    def __init__(
        self,
        socket_id: str,
        limits: SessionLimits,
        clock_ms: Callable[[], int],
        new_uuid: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self.socket_id = socket_id
        self.limits = limits
        self.state = State.UNAUTHENTICATED
        self.persona_key: str | None = None
        self.role = ROLE_INBOUND
        self.capabilities: tuple[str, ...] = ()
        self._clock_ms = clock_ms
        self._new_uuid = new_uuid
        self._requested_capabilities: list[str] | None = None
        self._requested_role: str | None = None
        # A challenge request was counted in the auth rate: the response is not counted again.
        self._challenge_requested = False
        self._pending_challenge: tuple[ChallengeRecord, str] | None = None  # (record, auth_challenge)
        # The challenge stored for this socket: its response (almost always sent here) is checked
        # without reading the record back; `ConsumeChallenge` still decides used/expired in Redis.
        self._issued: ChallengeRecord | None = None
        self._verification: _Verification | None = None
        self._at_ms = 0  # the server clock the response is judged at (check and consume alike)
        self.attempted_key: str | None = None  # the persona an auth attempt named (for logs)
        self._streams: dict[str, _OutboundStream] = {}
        self._refused_streams: dict[str, None] = {}
        self.allowance: ByteAllowance = _Unlimited()  # set by the server at auth

    @property
    def authenticated(self) -> bool:
        return self.state is State.AUTHENTICATED

    @property
    def wants_inbound_ack(self) -> bool:
        return CAPABILITY_INBOUND_ACK in self.capabilities

    @property
    def open_outbound_streams(self) -> int:
        """Outbound messages begun and not finished: dropped if the socket closes now."""
        return len(self._streams)

    # --- input -------------------------------------------------------------------------------

    def receive_text(self, text: str) -> list[Action]:
        """A text message: an auth message before auth_ok, a control message (B) after."""
        if self.state is State.UNAUTHENTICATED:
            return self._receive_auth_message(text)
        if self.state is State.AUTHENTICATED:
            return self._receive_control(text)
        if self.state is State.VERIFYING:  # the server reads nothing until the verification ends
            return self._fail(AuthError.INVALID_MESSAGE)
        return []

    def receive_binary(self, message: bytes) -> list[Action]:
        """A binary message: JSON auth before auth_ok (A3 allows it), a tunnel frame (A4) after."""
        if self.state is State.VERIFYING:
            return self._fail(AuthError.INVALID_MESSAGE)
        if self.state is State.UNAUTHENTICATED:
            try:
                text = message.decode("utf-8")
            except UnicodeDecodeError:
                return self._fail(AuthError.INVALID_MESSAGE)
            return self._receive_auth_message(text)
        if self.state is State.AUTHENTICATED:
            try:
                frame = protocol.decode_frame(message)
            except protocol.FrameError:
                return self._fail(AuthError.INVALID_TUNNEL_FRAME)
            return self._receive_frame(frame)
        return []

    # --- outcomes reported by the server -----------------------------------------------------

    def challenge_stored(self, within_rate: bool) -> list[Action]:
        """Outcome of `IssueChallenge`: send the challenge, or refuse the attempt (4408)."""
        pending, self._pending_challenge = self._pending_challenge, None
        if self.state is not State.UNAUTHENTICATED or pending is None:
            return []
        challenge, reply = pending
        if not within_rate:
            return [DiscardChallenge(challenge.challenge_id), *self._fail(AuthError.RATE_LIMITED)]
        self._issued = challenge
        return [SendText(reply)]

    def auth_rate_checked(self, within_rate: bool) -> list[Action]:
        """Outcome of `CheckAuthRate`: go on verifying, or refuse the attempt (4408)."""
        if self.state is not State.VERIFYING:
            return []
        if not within_rate:
            return self._fail(AuthError.RATE_LIMITED)
        return self._find_challenge()

    def challenge_loaded(self, record: ChallengeRecord | None) -> list[Action]:
        """Outcome of `LoadChallenge` (or the challenge issued here): check the response
        against it in the protocol's order, then have it consumed."""
        verification = self._verification
        if self.state is not State.VERIFYING or verification is None:
            return []
        code = check_response(record, verification.persona_key, verification.signature_base64, self._at_ms)
        if code is not None:
            return self._fail(code)
        return [ConsumeChallenge(verification.challenge_id, verification.persona_key, self._at_ms)]

    def challenge_consumed(self, code: AuthError | None) -> list[Action]:
        """Outcome of `ConsumeChallenge`: the challenge was ours (claim the persona) or a
        concurrent use, expiry or deletion won (refuse with its code)."""
        verification = self._verification
        if self.state is not State.VERIFYING or verification is None:
            return []
        if code is not None:
            return self._fail(code)
        return [ClaimPersona(verification.persona_key, verification.role)]

    def auth_failed(self, code: AuthError) -> list[Action]:
        """The server refused the attempt (e.g. `too_many_sockets` at `ClaimPersona`)."""
        return self._fail(code)

    def auth_timed_out(self) -> list[Action]:
        """The auth deadline passed: refuse if the socket is still unauthenticated. A
        verification under way is left to finish (it ends in auth_ok or a refusal)."""
        if self.state is not State.UNAUTHENTICATED:
            return []
        return self._fail(AuthError.AUTH_TIMEOUT)

    def auth_succeeded(self, persona_key: str, role: str, replaced_socket_id: str | None) -> list[Action]:
        """Outcome of `ClaimPersona`: send auth_ok, then start serving."""
        if self.state not in (State.UNAUTHENTICATED, State.VERIFYING):
            return []
        self.state = State.AUTHENTICATED
        self._verification = None
        self.persona_key = persona_key
        self.role = role
        fields: dict[str, Any] = {
            "type": "auth_ok",
            "publicKeyBase32": persona_key,
            "emailLocalPart": persona_key,
            "sessionRole": self.role,
            "replacedSocketId": replaced_socket_id,
        }
        if self._requested_capabilities is not None:
            self.capabilities = tuple(c for c in SUPPORTED_CAPABILITIES if c in self._requested_capabilities)
            fields["capabilities"] = list(self.capabilities)
        return [SendText(protocol.encode_control(fields)), Authenticated(persona_key, role, replaced_socket_id)]

    def outbound_refused(self, stream_id: str, reason: OutboundRefusal) -> list[Action]:
        if self.state is not State.AUTHENTICATED:
            return []
        return [RefuseOutbound(stream_id, reason)]

    def replaced(self) -> list[Action]:
        """Another socket took this persona: close without auth_error (PROTOCOL.md A3)."""
        self.state = State.CLOSED
        self._drop_all_streams()
        return [Close(CLOSE_REASON_CODE[CloseReason.REPLACED], CloseReason.REPLACED)]

    def expire_streams(self) -> list[Action]:
        """Drop outbound streams unfinished after the timeout, freeing their memory."""
        deadline_ms = self._clock_ms() - self.limits.outbound_stream_timeout_ms
        expired = [sid for sid, stream in self._streams.items() if stream.started_at_ms <= deadline_ms]
        for stream_id in expired:
            self._drop_stream(stream_id)
        return [OutboundDropped(stream_id, "stream_timeout") for stream_id in expired]

    @property
    def open_stream_bytes(self) -> int:
        return sum(stream.size_bytes for stream in self._streams.values())

    # --- auth --------------------------------------------------------------------------------

    def _fail(self, code: AuthError) -> list[Action]:
        """auth_error then close; nothing once closed (a Redis step may finish after a deadline)."""
        if self.state is State.CLOSED:
            return []
        self.state = State.CLOSED
        self._verification = None
        self._drop_all_streams()
        return [SendText(protocol.auth_error(code)), Close(AUTH_ERROR_CLOSE[code], code)]

    def _receive_auth_message(self, text: str) -> list[Action]:
        try:
            fields = protocol.decode_control(text)
            message_type = fields["type"]
            if message_type == "auth_challenge_request":
                return self._challenge_request(fields)
            if message_type == "auth_challenge_response":
                return self._challenge_response(fields)
        except protocol.ControlMessageError:
            pass
        return self._fail(AuthError.INVALID_MESSAGE)

    def _challenge_request(self, fields: dict[str, Any]) -> list[Action]:
        persona_key = normalize_key(protocol.require_str(fields, "publicKeyBase32"))
        if not is_public_key(persona_key):
            raise protocol.ControlMessageError("invalid public key")
        self._requested_role = _role(fields.get("sessionRole"))
        capabilities = fields.get("capabilities")
        if isinstance(capabilities, list):
            self._requested_capabilities = [c for c in capabilities if isinstance(c, str)]
        self.attempted_key = persona_key
        challenge = new_challenge(persona_key, self._clock_ms(), self.limits.challenge_ttl_s, self._new_uuid)
        reply = protocol.encode_control(
            {
                "type": "auth_challenge",
                "publicKeyBase32": persona_key,
                "challengeId": challenge.challenge_id,
                "challengeText": challenge.challenge_text,
                "expiresAt": iso_utc_ms(challenge.expires_at_ms),
            }
        )
        self._challenge_requested = True
        self._pending_challenge = (challenge, reply)
        return [IssueChallenge(challenge)]

    def _challenge_response(self, fields: dict[str, Any]) -> list[Action]:
        persona_key = normalize_key(protocol.require_str(fields, "publicKeyBase32"))
        challenge_id = protocol.require_str(fields, "challengeId")
        signature = protocol.require_str(fields, "signatureBase64")
        requested = fields.get("sessionRole")
        role = _role(requested) if isinstance(requested, str) else self._requested_role or ROLE_INBOUND
        self.state = State.VERIFYING
        self._verification = _Verification(challenge_id, persona_key, signature, role)
        self.attempted_key = persona_key
        if not self._challenge_requested:  # not counted yet: a response is an attempt of its own
            return [CheckAuthRate()]
        return self._find_challenge()

    def _find_challenge(self) -> list[Action]:
        """The challenge issued here is checked from memory; any other is loaded from Redis."""
        assert self._verification is not None
        self._at_ms = self._clock_ms()
        challenge_id = self._verification.challenge_id
        if self._issued is not None and self._issued.challenge_id == challenge_id:
            return self.challenge_loaded(self._issued)
        return [LoadChallenge(challenge_id)]

    # --- text after auth (PROTOCOL.md B) -----------------------------------------------------

    def _receive_control(self, text: str) -> list[Action]:
        try:
            fields = protocol.decode_control(text)
            message_type = fields["type"]
            if message_type == "smtp_ack":
                return [AckInbound(protocol.require_str(fields, "streamId"))]
        except protocol.ControlMessageError:
            return [_error(ControlError.INVALID_MESSAGE)]
        if message_type == "ping":
            return [SendText(protocol.encode_control({"type": "pong"}))]
        if message_type in ("auth_challenge_request", "auth_challenge_response"):
            return [_error(ControlError.ALREADY_AUTHENTICATED)]
        return [_error(ControlError.UNKNOWN_TYPE)]

    # --- outbound assembly (PROTOCOL.md A6) --------------------------------------------------

    def _receive_frame(self, frame: protocol.Frame) -> list[Action]:
        actions: list[Action] = list(self.expire_streams())
        stream_id = frame.stream_id
        if frame.frame_type is protocol.FrameType.SMTP_START:
            self._refused_streams.pop(stream_id, None)
            self._drop_stream(stream_id)
            if len(self._streams) >= self.limits.max_open_streams:
                return [*actions, *self._refuse(stream_id, OutboundRefusal.TOO_MANY_STREAMS)]
            start = protocol.decode_start_body(frame.body)
            self._streams[stream_id] = _OutboundStream(start, self._clock_ms())
            return actions
        if stream_id in self._refused_streams:
            if frame.frame_type is protocol.FrameType.SMTP_END:
                del self._refused_streams[stream_id]
            return actions
        stream = self._streams.get(stream_id)
        if stream is None:
            return [*actions, RefuseOutbound(stream_id, OutboundRefusal.STREAM_NOT_STARTED)]
        if frame.frame_type is protocol.FrameType.SMTP_CHUNK:
            size = len(frame.body)
            refusal = None
            if stream.size_bytes + size > self.limits.max_message_bytes:
                refusal = OutboundRefusal.MESSAGE_TOO_LARGE
            elif not self.allowance.take(size):
                refusal = OutboundRefusal.OUTBOUND_BUSY
            if refusal is not None:
                self._drop_stream(stream_id)
                return [*actions, *self._refuse(stream_id, refusal)]
            stream.size_bytes += size
            stream.chunks.append(frame.body)
            return actions
        del self._streams[stream_id]
        return [*actions, *self._finish(stream_id, stream)]

    def _drop_stream(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self.allowance.give(stream.size_bytes)

    def _drop_all_streams(self) -> None:
        for stream_id in list(self._streams):
            self._drop_stream(stream_id)

    def _refuse(self, stream_id: str, reason: OutboundRefusal) -> list[Action]:
        self._refused_streams[stream_id] = None
        while len(self._refused_streams) > MAX_REFUSED_STREAMS_REMEMBERED:
            del self._refused_streams[next(iter(self._refused_streams))]
        return [RefuseOutbound(stream_id, reason)]

    def _finish(self, stream_id: str, stream: _OutboundStream) -> list[Action]:
        """Envelope, then header From/Sender; the stream's bytes stay taken until queued."""
        assert self.persona_key is not None
        domains = list(self.limits.mail_domains)
        data = b"".join(stream.chunks)
        stream.chunks.clear()
        refusal = (
            outbound.check_sender(stream.start.mail_from, self.persona_key, domains)
            or outbound.check_recipient(stream.start.rcpt_to)
            or header_from.check_header_from(data, self.persona_key, domains)
        )
        if refusal is not None:
            self.allowance.give(stream.size_bytes)
            wrong_sender = refusal in NAMES_EXPECTED_SENDER
            expected = outbound.expected_sender(self.persona_key, domains) if wrong_sender else None
            return [RefuseOutbound(stream_id, refusal, expected)]
        job = OutboundJob(
            persona_key=self.persona_key,
            stream_id=stream_id,
            mail_from=outbound.bare_address(stream.start.mail_from),
            rcpt_to=[outbound.bare_address(stream.start.rcpt_to)],
            data=data,
            enqueued_at_ms=self._clock_ms(),
        )
        return [EnqueueOutbound(job, stream.size_bytes)]


def _role(value: object) -> str:
    return ROLE_OUTBOUND if value == ROLE_OUTBOUND else ROLE_INBOUND


def _error(code: ControlError) -> SendText:
    return SendText(protocol.encode_control({"type": "error", "code": code}))
