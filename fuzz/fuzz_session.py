"""atheris harness: the sans-I/O `TunnelSession` fed arbitrary sequences of messages and of
outcomes the server may report (challenge stored, auth rate, challenge loaded and consumed, auth
ok/failed, refusals, timeouts, replacement, time passing).

No exception is documented here: whatever a gateway sends, the session must answer with actions.
Invariants checked after every step:
- a `Close` is the last action and leaves the session CLOSED; a CLOSED session ignores input;
- every text the server would send is JSON and encodable as UTF-8 (a WebSocket text frame);
- an `EnqueueOutbound` carries the persona's own address, one recipient, no control characters
  and no more than `max_message_bytes`; buffered outbound bytes stay bounded.
"""

from __future__ import annotations

import itertools
import json

import atheris
from common import main

with atheris.instrument_imports():
    from services.tunnel import outbound
    from services.tunnel.challenges import new_challenge
    from services.tunnel.session import (
        Close,
        EnqueueOutbound,
        RefuseOutbound,
        SendText,
        SessionLimits,
        State,
        TunnelSession,
    )
    from shared import protocol

PERSONA_KEY = "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkena"
LIMITS = SessionLimits(
    challenge_ttl_s=60, max_message_bytes=2048, outbound_stream_timeout_ms=1000, mail_domains=(), max_open_streams=4
)
STREAM_IDS = ["a", "b", "c", "d", "e", "\u00e9"]
ADDRESSES = [
    f"{PERSONA_KEY}@relay.test",
    f"<{PERSONA_KEY}@relay.test>",
    f"{PERSONA_KEY}@relay.test\r\nRSET",
    "someone@example.org",
    "a@b, c@d",
    "",
]
CODES = ["invalid_signature", "rate_limited", "challenge_expired"]
CONTROL_TYPES = ["auth_challenge_request", "auth_challenge_response", "smtp_ack", "ping", "pong", "other"]
CONTROL_FIELDS = ["publicKeyBase32", "challengeId", "signatureBase64", "sessionRole", "capabilities", "streamId"]


def control_from(provider: atheris.FuzzedDataProvider) -> str:
    """A JSON object of the protocol's types and fields, with values picked or arbitrary."""
    fields: dict[str, object] = {"type": provider.PickValueInList(CONTROL_TYPES)}
    for name in CONTROL_FIELDS:
        choice = provider.ConsumeIntInRange(0, 5)
        if choice == 1:
            fields[name] = PERSONA_KEY.upper() if provider.ConsumeBool() else PERSONA_KEY
        elif choice == 2:
            fields[name] = provider.ConsumeUnicode(provider.ConsumeIntInRange(0, 60))
        elif choice == 3:
            fields[name] = provider.PickValueInList(["outbound", "inbound", "inbound_ack", None, 7, [], {}])
        elif choice == 4:
            fields[name] = ["inbound_ack", provider.ConsumeUnicode(8), 3]
    return json.dumps(fields)


def frame_from(provider: atheris.FuzzedDataProvider) -> bytes:
    frame_type = protocol.FrameType(provider.ConsumeIntInRange(1, 3))
    stream_id = provider.PickValueInList(STREAM_IDS)
    if frame_type is protocol.FrameType.SMTP_START:
        pick = provider.ConsumeBool()
        mail_from = provider.PickValueInList(ADDRESSES) if pick else provider.ConsumeUnicodeNoSurrogates(40)
        rcpt_to = provider.PickValueInList(ADDRESSES) if pick else provider.ConsumeUnicodeNoSurrogates(40)
        body = protocol.encode_start_body(protocol.SmtpStart(mail_from, rcpt_to))
    else:
        body = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 1500))
    return protocol.encode_frame(frame_type, stream_id, body)


def step(session: TunnelSession, provider: atheris.FuzzedDataProvider, clock: list[int]) -> list[object]:
    operation = provider.ConsumeIntInRange(0, 15)
    if operation == 12:
        return list(session.challenge_stored(provider.ConsumeBool()))
    if operation == 13:
        return list(session.auth_rate_checked(provider.ConsumeBool()))
    if operation == 14:
        challenge_id = provider.PickValueInList(["00000000-0000-4000-8000-000000000000", "other"])
        found = new_challenge(PERSONA_KEY, clock[0], 60, lambda: challenge_id) if provider.ConsumeBool() else None
        return list(session.challenge_loaded(found))
    if operation == 15:
        return list(session.challenge_consumed(provider.PickValueInList([None, *CODES])))
    if operation == 0:
        return list(session.receive_text(provider.ConsumeUnicode(provider.ConsumeIntInRange(0, 400))))
    if operation == 11:
        message = control_from(provider)
        if provider.ConsumeBool():
            return list(session.receive_text(message))
        return list(session.receive_binary(message.encode()))
    if operation == 1:
        return list(session.receive_binary(provider.ConsumeBytes(provider.ConsumeIntInRange(0, 400))))
    if operation in (2, 3):
        return list(session.receive_binary(frame_from(provider)))
    if operation == 4:
        role = "outbound" if provider.ConsumeBool() else "inbound"
        return list(session.auth_succeeded(PERSONA_KEY, role, None))
    if operation == 5:
        return list(session.auth_failed(provider.PickValueInList(CODES)))
    if operation == 6:
        return list(session.expire_streams())
    if operation == 7:
        return list(session.replaced()) if provider.ConsumeIntInRange(0, 7) == 0 else []
    if operation == 8:
        clock[0] += provider.ConsumeIntInRange(0, 2000)
        return []
    if operation == 9:
        return list(session.auth_timed_out()) if provider.ConsumeIntInRange(0, 7) == 0 else []
    text = provider.ConsumeUnicodeNoSurrogates(80)
    return list(session.outbound_refused(provider.PickValueInList(STREAM_IDS), text or "rate_limited"))


def check(session: TunnelSession, actions: list[object], was_closed: bool) -> None:
    if was_closed:
        assert not [a for a in actions if not isinstance(a, Close)], actions
    for index, action in enumerate(actions):
        if isinstance(action, SendText | RefuseOutbound):
            json.loads(action.text.encode("utf-8"))
        if isinstance(action, Close):
            assert index == len(actions) - 1 and session.state is State.CLOSED, actions
        if isinstance(action, EnqueueOutbound):
            job = action.job
            assert job.persona_key == session.persona_key == PERSONA_KEY
            assert outbound.check_sender(job.mail_from, PERSONA_KEY, []) is None
            assert len(job.rcpt_to) == 1 and outbound.check_recipient(job.rcpt_to[0]) is None
            assert not outbound.has_control_characters(job.mail_from + job.rcpt_to[0])
            assert len(job.data) <= LIMITS.max_message_bytes
    assert session.open_stream_bytes <= LIMITS.max_open_streams * LIMITS.max_message_bytes


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    clock = [0]
    counter = itertools.count()
    session = TunnelSession(
        "socket-1", LIMITS, lambda: clock[0], new_uuid=lambda: f"00000000-0000-4000-8000-{next(counter):012d}"
    )
    for _ in range(provider.ConsumeIntInRange(1, 32)):
        was_closed = session.state is State.CLOSED
        check(session, step(session, provider, clock), was_closed)


def seeds() -> list[bytes]:
    return []


if __name__ == "__main__":
    main(test_one_input, seeds)
