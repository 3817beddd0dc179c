"""atheris harness: `shared.protocol.decode_frame` over arbitrary bytes.

The only documented failure is `FrameError`; a frame that decodes must re-encode to exactly the
same bytes (the codec neither loses nor invents anything), and an smtp_start body must decode.
"""

from __future__ import annotations

import atheris
from common import main

with atheris.instrument_imports():
    from shared import protocol


def test_one_input(data: bytes) -> None:
    if data[:1] == b"\xff":  # an smtp_start whose body is the rest, nested as deep as its length says
        body = b"[" * (len(data) * 4) + data[1:]
        data = protocol.encode_frame(protocol.FrameType.SMTP_START, "s", body)
    try:
        frame = protocol.decode_frame(data)
    except protocol.FrameError:
        return
    assert protocol.encode_frame(frame.frame_type, frame.stream_id, frame.body) == data
    if frame.frame_type is protocol.FrameType.SMTP_START:
        start = protocol.decode_start_body(frame.body)
        assert isinstance(start.mail_from, str) and isinstance(start.rcpt_to, str)


def seeds() -> list[bytes]:
    start = protocol.SmtpStart("sender@example.com", "recipient@example.com")
    return [
        bytes.fromhex("0103080000000073747265616d2d31"),
        bytes.fromhex("0102080000000573747265616d2d3168656c6c6f"),
        protocol.encode_start("stream-1", start),
        *protocol.encode_message_frames("s", start, b"Subject: x\r\n\r\nhi\r\n"),
    ]


if __name__ == "__main__":
    main(test_one_input, seeds)
