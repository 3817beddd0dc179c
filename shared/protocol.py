"""Tunnel wire format: binary SMTP frames and JSON control messages (PROTOCOL.md A3, A4, A7, B).

Pure functions over bytes and dicts, no I/O, so the tunnel, the reference gateway and the
tests share exactly one codec.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from shared.codes import AuthError, DeliveryError

FRAME_VERSION = 1
FRAME_HEADER_BYTES = 7
MAX_STREAM_ID_BYTES = 255
MAX_CHUNK_BYTES = 64 * 1024

_HEADER = struct.Struct(">BBBI")


class FrameType(IntEnum):
    SMTP_START = 1
    SMTP_CHUNK = 2
    SMTP_END = 3


class FrameError(ValueError):
    """A binary message that is not a valid tunnel frame."""


@dataclass(frozen=True, slots=True)
class Frame:
    frame_type: FrameType
    stream_id: str
    body: bytes


@dataclass(frozen=True, slots=True)
class SmtpStart:
    """The envelope carried by an smtp_start frame."""

    mail_from: str
    rcpt_to: str
    auth_attestation: dict[str, str] | None = None


def encode_frame(frame_type: FrameType, stream_id: str, body: bytes | bytearray | memoryview = b"") -> bytes:
    """One frame. `body` may be a memoryview slice of the stored message: it is copied once,
    straight into the frame."""
    stream_id_bytes = stream_id.encode("utf-8")
    if len(stream_id_bytes) > MAX_STREAM_ID_BYTES:
        raise FrameError("stream id longer than 255 bytes")
    header = _HEADER.pack(FRAME_VERSION, int(frame_type), len(stream_id_bytes), len(body))
    return b"".join((header, stream_id_bytes, body))


def decode_frame(message: bytes) -> Frame:
    if len(message) < FRAME_HEADER_BYTES:
        raise FrameError("frame shorter than its header")
    version, type_code, stream_id_len, body_len = _HEADER.unpack_from(message)
    if version != FRAME_VERSION:
        raise FrameError(f"unsupported frame version {version}")
    if len(message) != FRAME_HEADER_BYTES + stream_id_len + body_len:
        raise FrameError("frame length does not match its header")
    try:
        frame_type = FrameType(type_code)
    except ValueError:
        raise FrameError(f"unknown frame type {type_code}") from None
    try:
        stream_id = message[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + stream_id_len].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("stream id is not UTF-8") from None
    body = message[FRAME_HEADER_BYTES + stream_id_len :]
    if frame_type is FrameType.SMTP_START:
        decode_start_body(body)
    return Frame(frame_type, stream_id, bytes(body))


def encode_start_body(start: SmtpStart) -> bytes:
    """Compact JSON with the original's key order: mailFrom, rcptTo, then authAttestation."""
    fields: dict[str, Any] = {"mailFrom": start.mail_from, "rcptTo": start.rcpt_to}
    if start.auth_attestation is not None:
        fields["authAttestation"] = start.auth_attestation
    return compact_json(fields)


def decode_start_body(body: bytes) -> SmtpStart:
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deeply nested JSON
        raise FrameError("smtp_start body is not JSON") from None
    if not isinstance(fields, dict):
        raise FrameError("smtp_start body is not a JSON object")
    mail_from, rcpt_to = fields.get("mailFrom"), fields.get("rcptTo")
    if not isinstance(mail_from, str) or not isinstance(rcpt_to, str):
        raise FrameError("smtp_start needs string mailFrom and rcptTo")
    attestation = fields.get("authAttestation")
    return SmtpStart(mail_from, rcpt_to, attestation if isinstance(attestation, dict) else None)


def encode_start(stream_id: str, start: SmtpStart) -> bytes:
    return encode_frame(FrameType.SMTP_START, stream_id, encode_start_body(start))


def encode_message_frames(stream_id: str, start: SmtpStart, message: bytes) -> list[bytes]:
    """smtp_start, the message in chunks of at most 64 KiB (always at least one), smtp_end."""
    view = memoryview(message)
    chunks = [bytes(view[i : i + MAX_CHUNK_BYTES]) for i in range(0, len(message), MAX_CHUNK_BYTES)]
    return [
        encode_start(stream_id, start),
        *(encode_frame(FrameType.SMTP_CHUNK, stream_id, chunk) for chunk in chunks or [b""]),
        encode_frame(FrameType.SMTP_END, stream_id),
    ]


# --- JSON control messages -------------------------------------------------------------------


class ControlMessageError(ValueError):
    """A text message that is not a well-formed control message (wire code invalid_message)."""


def compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_control(fields: dict[str, Any]) -> str:
    return compact_json(fields).decode("utf-8")


def decode_control(message: str | bytes) -> dict[str, Any]:
    """Parse a JSON object with a string `type`; anything else is invalid_message."""
    try:
        fields = json.loads(message)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deeply nested JSON
        raise ControlMessageError("not JSON") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("type"), str):
        raise ControlMessageError("not a JSON object with a string type")
    return fields


def require_str(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str):
        raise ControlMessageError(f"missing or non-string field {name}")
    return value


def auth_error(code: AuthError) -> str:
    return encode_control({"type": "auth_error", "code": code})


def delivery_result(
    stream_id: str,
    *,
    sent: bool,
    message_id: str | None = None,
    error: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """relay_delivery_result: compatible fields first, PROTOCOL.md B extras after."""
    fields: dict[str, Any] = {"type": "relay_delivery_result", "streamId": stream_id}
    if sent:
        fields.update(status="sent", messageId=message_id)
    else:
        fields.update(status="failed", error=error or DeliveryError.DELIVERY_FAILED)
    if extra:
        fields.update(extra)
    return encode_control(fields)
