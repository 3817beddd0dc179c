"""Opening an authenticated relay session: connect, ask for a challenge, sign it (PROTOCOL.md A3).

Everything that can go wrong is one of three errors the caller acts on: `AuthFailed` (the relay
refused us; `fatal` says whether retrying can ever help), `BadRelayUrl` (the URL cannot be a
relay's WebSocket endpoint: not ws:// or wss://, or the server there answered the upgrade with
an HTTP client error such as 404; retrying cannot help) and `RelayUnreachable` (network,
handshake or protocol trouble; always worth retrying).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from shared.codes import AuthError, CloseCode
from shared.identity import Passport
from shared.protocol import (
    ControlMessageError,
    decode_control,
    encode_control,
    require_str,
)

AUTH_TIMEOUT_S = 10.0
# Our relay chunks at 64 KiB, but the original sends a whole message in one chunk frame.
MAX_INCOMING_MESSAGE_BYTES = 32 * 1024 * 1024

# Refusals that mean our key or our client is wrong: a retry gets the same answer.
FATAL_AUTH_CODES = frozenset(
    {AuthError.INVALID_SIGNATURE, AuthError.INVALID_SIGNATURE_ENCODING, AuthError.INVALID_MESSAGE, "invalid_public_key"}
)  # `invalid_public_key` is not among this relay's codes (shared/codes.py); kept as it was
URL_HINT = "use ws://HOST:PORT/ws (wss:// when the relay serves TLS), e.g. ws://127.0.0.1:8080/ws"
HTTP_TOO_MANY_REQUESTS = 429


class GatewayError(Exception):
    """Base of the errors a gateway session can end with."""


class AuthFailed(GatewayError):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code

    @property
    def fatal(self) -> bool:
        return self.code in FATAL_AUTH_CODES


class RelayUnreachable(GatewayError):
    """Could not reach the relay or it broke off the handshake; try again later."""


class BadRelayUrl(GatewayError):
    """The URL is not a relay's WebSocket endpoint; the message ends with what to use instead."""


def check_relay_url(url: str) -> None:
    """Refuse what can never be a relay endpoint before connecting (BadRelayUrl)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        problem = f"scheme {parts.scheme}:// is not a WebSocket scheme" if parts.scheme else "no ws:// scheme"
        raise BadRelayUrl(f"{url}: {problem}; {URL_HINT}")
    if not parts.hostname:
        raise BadRelayUrl(f"{url}: no host; {URL_HINT}")


@dataclass(frozen=True, slots=True)
class RelaySession:
    connection: ClientConnection
    url: str
    persona_key: str
    email_local_part: str  # the address is <email_local_part>@<a mail domain of the relay>
    session_role: str
    capabilities: frozenset[str]  # what the relay agreed to, from auth_ok
    replaced_socket_id: str | None


async def open_session(
    url: str,
    passport: Passport,
    *,
    session_role: str = "inbound",
    capabilities: Iterable[str] = (),
    timeout_s: float = AUTH_TIMEOUT_S,
) -> RelaySession:
    """Connect to `url` and authenticate as `passport`'s persona, or raise a GatewayError."""
    check_relay_url(url)
    try:
        connection = await connect(url, max_size=MAX_INCOMING_MESSAGE_BYTES, open_timeout=timeout_s)
    except InvalidURI as exc:
        raise BadRelayUrl(f"{url}: {exc}; {URL_HINT}") from None
    except InvalidStatus as exc:
        status = exc.response.status_code
        if 400 <= status < 500 and status != HTTP_TOO_MANY_REQUESTS:
            raise BadRelayUrl(
                f"{url}: the server answered HTTP {status}, not a WebSocket upgrade; {URL_HINT}"
            ) from None
        raise RelayUnreachable(f"HTTP {status} from {url}") from None
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        raise RelayUnreachable(f"{type(exc).__name__}: {exc}") from None
    try:
        async with asyncio.timeout(timeout_s):
            auth_ok = await _authenticate(connection, passport, session_role, list(capabilities))
    except BaseException as exc:
        await connection.close()
        if isinstance(exc, ConnectionClosed):
            raise _close_to_error(exc) from None
        if isinstance(exc, TimeoutError):
            raise RelayUnreachable("authentication timed out") from None
        raise
    echoed = auth_ok.get("capabilities")
    replaced = auth_ok.get("replacedSocketId")
    local_part = auth_ok.get("emailLocalPart")
    return RelaySession(
        connection=connection,
        url=url,
        persona_key=passport.persona_key,
        email_local_part=local_part if isinstance(local_part, str) else passport.persona_key,
        session_role=session_role,
        capabilities=frozenset(c for c in echoed if isinstance(c, str)) if isinstance(echoed, list) else frozenset(),
        replaced_socket_id=replaced if isinstance(replaced, str) else None,
    )


async def _authenticate(
    connection: ClientConnection, passport: Passport, session_role: str, capabilities: list[str]
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "type": "auth_challenge_request",
        "publicKeyBase32": passport.persona_key,
        "sessionRole": session_role,
    }
    if capabilities:
        request["capabilities"] = capabilities
    await connection.send(encode_control(request))
    challenge = await _next_control(connection, "auth_challenge")
    try:
        challenge_id = require_str(challenge, "challengeId")
        challenge_text = require_str(challenge, "challengeText")
    except ControlMessageError:
        raise RelayUnreachable("malformed auth_challenge") from None
    await connection.send(
        encode_control(
            {
                "type": "auth_challenge_response",
                "publicKeyBase32": passport.persona_key,
                "challengeId": challenge_id,
                "signatureBase64": passport.sign_base64(challenge_text.encode("utf-8")),
                "sessionRole": session_role,
            }
        )
    )
    return await _next_control(connection, "auth_ok")


async def _next_control(connection: ClientConnection, expected_type: str) -> dict[str, Any]:
    """The next control message of `expected_type`; auth_error raises, anything else is skipped."""
    while True:
        raw = await connection.recv()
        try:
            fields = decode_control(raw)
        except ControlMessageError:
            continue
        if fields["type"] == "auth_error":
            code = fields.get("code")
            raise AuthFailed(code if isinstance(code, str) else "unknown")
        if fields["type"] == expected_type:
            return fields


def _close_to_error(closed: ConnectionClosed) -> GatewayError:
    received = closed.rcvd
    if received is not None and received.code in (CloseCode.AUTH_FAILED, CloseCode.RATE_LIMITED):
        rate_limited = received.code == CloseCode.RATE_LIMITED
        return AuthFailed(received.reason or (AuthError.RATE_LIMITED if rate_limited else "unknown"))
    return RelayUnreachable(f"connection closed during authentication: {closed}")
