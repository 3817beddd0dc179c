"""Frame codec and control messages: PROTOCOL.md A4 and its normative test vectors."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.codes import AuthError
from shared.protocol import (
    MAX_CHUNK_BYTES,
    ControlMessageError,
    FrameError,
    FrameType,
    SmtpStart,
    auth_error,
    decode_control,
    decode_frame,
    delivery_result,
    encode_frame,
    encode_message_frames,
    encode_start,
)


def test_smtp_end_vector_is_byte_exact() -> None:
    assert encode_frame(FrameType.SMTP_END, "stream-1").hex() == "0103080000000073747265616d2d31"


def test_smtp_chunk_vector_is_byte_exact() -> None:
    encoded = encode_frame(FrameType.SMTP_CHUNK, "stream-1", b"hello")
    assert encoded.hex() == "0102080000000573747265616d2d3168656c6c6f"


def test_smtp_start_vector_is_byte_exact() -> None:
    body = b'{"mailFrom":"sender@example.com","rcptTo":"recipient@example.com"}'
    encoded = encode_start("stream-1", SmtpStart("sender@example.com", "recipient@example.com"))
    assert len(encoded) == 81
    assert encoded[:7].hex() == "01010800000042"
    assert encoded == bytes.fromhex("01010800000042") + b"stream-1" + body


def test_vectors_decode_back() -> None:
    frame = decode_frame(bytes.fromhex("0102080000000573747265616d2d3168656c6c6f"))
    assert (frame.frame_type, frame.stream_id, frame.body) == (FrameType.SMTP_CHUNK, "stream-1", b"hello")


def test_start_body_keeps_key_order_with_attestation() -> None:
    attestation = {"keyId": "k", "payloadBase64": "cA==", "signatureBase64": "c2ln"}
    encoded = encode_start("s", SmtpStart("", "r@x", attestation))
    body = decode_frame(encoded).body
    assert body.startswith(b'{"mailFrom":"","rcptTo":"r@x","authAttestation":{')
    assert list(json.loads(body)) == ["mailFrom", "rcptTo", "authAttestation"]


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x01\x02\x00\x00\x00",  # shorter than the header
        bytes.fromhex("0203080000000073747265616d2d31"),  # version 2
        bytes.fromhex("0104080000000073747265616d2d31"),  # type 4
        bytes.fromhex("0100080000000073747265616d2d31"),  # type 0
        bytes.fromhex("0103080000000073747265616d2d31") + b"x",  # longer than header says
        bytes.fromhex("0102080000000573747265616d2d3168656c6c"),  # body one byte short
        bytes.fromhex("01030200000000") + b"\xff\xfe",  # stream id not UTF-8
        encode_frame(FrameType.SMTP_START, "s", b"[1,2]"),  # start body not an object
        encode_frame(FrameType.SMTP_START, "s", b'{"mailFrom":1,"rcptTo":"a"}'),
        encode_frame(FrameType.SMTP_START, "s", b'{"mailFrom":"a"}'),
        encode_frame(FrameType.SMTP_START, "s", b"\xff{"),
    ],
)
def test_invalid_frames_are_refused_with_frame_error(message: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frame(message)


def test_stream_id_over_255_bytes_cannot_be_encoded() -> None:
    with pytest.raises(FrameError):
        encode_frame(FrameType.SMTP_END, "x" * 256)
    assert decode_frame(encode_frame(FrameType.SMTP_END, "x" * 255)).stream_id == "x" * 255


def test_message_is_chunked_at_64_kib_and_reassembles() -> None:
    message = bytes(range(256)) * 1000  # 256,000 bytes
    frames = [decode_frame(f) for f in encode_message_frames("q1.0", SmtpStart("a@b", "c@d"), message)]
    assert frames[0].frame_type is FrameType.SMTP_START
    assert frames[-1].frame_type is FrameType.SMTP_END
    chunks = frames[1:-1]
    assert all(f.frame_type is FrameType.SMTP_CHUNK and len(f.body) <= MAX_CHUNK_BYTES for f in chunks)
    assert len(chunks) == 4
    assert b"".join(f.body for f in chunks) == message


def test_empty_message_still_sends_one_chunk() -> None:
    frames = [decode_frame(f) for f in encode_message_frames("q1.0", SmtpStart("", "c@d"), b"")]
    assert [f.frame_type for f in frames] == [FrameType.SMTP_START, FrameType.SMTP_CHUNK, FrameType.SMTP_END]


@given(
    frame_type=st.sampled_from([FrameType.SMTP_CHUNK, FrameType.SMTP_END]),
    stream_id=st.text(max_size=60).filter(lambda s: len(s.encode()) <= 255),
    body=st.binary(max_size=2048),
)
def test_encode_decode_round_trip(frame_type: FrameType, stream_id: str, body: bytes) -> None:
    frame = decode_frame(encode_frame(frame_type, stream_id, body))
    assert (frame.frame_type, frame.stream_id, frame.body) == (frame_type, stream_id, body)


@given(st.binary(max_size=512))
def test_parser_only_ever_raises_frame_error(message: bytes) -> None:
    try:
        frame = decode_frame(message)
    except FrameError:
        return
    version, _, id_len, body_len = struct.unpack(">BBBI", message[:7])
    assert version == 1 and len(message) == 7 + id_len + body_len and frame.body == message[7 + id_len :]


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_control_parser_only_ever_raises_control_message_error(message: str | bytes) -> None:
    try:
        fields = decode_control(message)
    except ControlMessageError:
        return
    assert isinstance(fields, dict) and isinstance(fields["type"], str)


@pytest.mark.parametrize("message", ["", "null", "[]", '{"type":1}', "{", '"auth"', b"\xff\xfe"])
def test_malformed_control_messages_are_invalid(message: str | bytes) -> None:
    with pytest.raises(ControlMessageError):
        decode_control(message)


def test_delivery_results_have_the_compatible_shape() -> None:
    assert json.loads(delivery_result("s1", sent=True, message_id="abc")) == {
        "type": "relay_delivery_result",
        "streamId": "s1",
        "status": "sent",
        "messageId": "abc",
    }
    assert json.loads(delivery_result("s1", sent=True)) == {
        "type": "relay_delivery_result",
        "streamId": "s1",
        "status": "sent",
        "messageId": None,
    }
    failed = json.loads(delivery_result("s2", sent=False, error="sender_not_allowed", extra={"permanent": True}))
    assert failed == {
        "type": "relay_delivery_result",
        "streamId": "s2",
        "status": "failed",
        "error": "sender_not_allowed",
        "permanent": True,
    }


def test_auth_error_message() -> None:
    assert json.loads(auth_error(AuthError.CHALLENGE_EXPIRED)) == {"type": "auth_error", "code": "challenge_expired"}
