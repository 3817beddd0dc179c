"""atheris harness: `shared.protocol.decode_control` over arbitrary text and bytes.

The only documented failure is `ControlMessageError` (the tunnel answers it with
`invalid_message`); a message that decodes is a dict with a string `type` and survives
`encode_control` -> `decode_control` unchanged.
"""

from __future__ import annotations

import atheris
from common import main

with atheris.instrument_imports():
    from shared import protocol


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    as_bytes = provider.ConsumeBool()
    depth = provider.ConsumeIntInRange(0, 3000) if provider.ConsumeIntInRange(0, 3) == 0 else 0
    message: str | bytes = provider.ConsumeBytes(len(data)) if as_bytes else provider.ConsumeUnicode(len(data))
    if depth:  # deep nesting: coverage cannot guide the fuzzer into json's C scanner
        opener = '{"type":' + '{"a":' * depth if provider.ConsumeBool() else "[" * depth
        message = opener.encode() + message if isinstance(message, bytes) else opener + message
    try:
        fields = protocol.decode_control(message)
    except protocol.ControlMessageError:
        return
    assert isinstance(fields, dict) and isinstance(fields["type"], str)
    try:
        text = protocol.encode_control(fields)
    except UnicodeEncodeError:
        # JSON may spell lone surrogates (\ud800); they cannot be UTF-8. Whoever echoes a decoded
        # field must therefore not echo it raw (fuzz_session checks the tunnel never does).
        return
    assert protocol.decode_control(text) == fields


def seeds() -> list[bytes]:
    messages = [
        '{"type":"auth_challenge_request","publicKeyBase32":"25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkena"}',
        '{"type":"smtp_ack","streamId":"q1.0"}',
        '{"type":"ping"}',
        '{"type":"auth_challenge_response","publicKeyBase32":"k","challengeId":"c","signatureBase64":"s"}',
    ]
    return [b"\x00\x01" + message.encode() for message in messages]


if __name__ == "__main__":
    main(test_one_input, seeds)
