"""A lean gateway for load: authenticate a persona over the tunnel and read frames.

Speaks PROTOCOL.md A3 exactly as the reference gateway does (websockets client with its
default settings, Ed25519 signature of the challenge text via `shared.identity.Passport`),
without its reconnect and Maildir machinery, so thousands fit in one load-generator process.
"""

from __future__ import annotations

import hashlib
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from shared.identity import Passport
from shared.protocol import decode_control, encode_control, require_str

INBOUND_ACK = "inbound_ack"
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class AuthRefused(Exception):
    pass


def bench_passport(index: int, salt: str = "bench") -> Passport:
    """Deterministic persona keys, so a load generator and the harness agree on addresses."""
    return Passport.from_seed(hashlib.sha256(f"{salt}-{index}".encode()).digest())


async def authenticate(
    connection: ClientConnection, passport: Passport, capabilities: list[str] | None = None
) -> dict[str, Any]:
    """Challenge request, signed response; returns the auth_ok message or raises AuthRefused."""
    request: dict[str, Any] = {
        "type": "auth_challenge_request",
        "publicKeyBase32": passport.persona_key,
        "sessionRole": "inbound",
    }
    if capabilities:
        request["capabilities"] = capabilities
    await connection.send(encode_control(request))
    challenge = await _expect(connection, "auth_challenge")
    challenge_text = require_str(challenge, "challengeText")
    await connection.send(
        encode_control(
            {
                "type": "auth_challenge_response",
                "publicKeyBase32": passport.persona_key,
                "challengeId": require_str(challenge, "challengeId"),
                "signatureBase64": passport.sign_base64(challenge_text.encode()),
                "sessionRole": "inbound",
            }
        )
    )
    return await _expect(connection, "auth_ok")


async def _expect(connection: ClientConnection, message_type: str) -> dict[str, Any]:
    while True:
        raw = await connection.recv()
        if isinstance(raw, bytes):
            continue
        fields = decode_control(raw)
        if fields["type"] == "auth_error":
            raise AuthRefused(str(fields.get("code")))
        if fields["type"] == message_type:
            return fields


async def open_gateway(
    url: str, passport: Passport, capabilities: list[str] | None = None, **connect_kwargs: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    connection = await connect(url, max_size=MAX_MESSAGE_BYTES, open_timeout=30, **connect_kwargs)
    try:
        auth_ok = await authenticate(connection, passport, capabilities)
    except BaseException:
        await connection.close()
        raise
    return connection, auth_ok


def negotiated_extensions(connection: ClientConnection) -> str:
    response = connection.response
    if response is None:
        return ""
    return str(response.headers.get("Sec-WebSocket-Extensions", ""))


def ack_message(stream_id: str) -> str:
    return encode_control({"type": "smtp_ack", "streamId": stream_id})
