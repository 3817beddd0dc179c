"""The tunnel session and challenge checks without sockets, Redis or asyncio: every auth rule,
every outbound assembly rule, in microseconds."""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.tunnel import outbound
from services.tunnel.budget import BudgetLimits, OutboundBudget
from services.tunnel.challenges import ChallengeRecord, check_response, iso_utc_ms, new_challenge
from services.tunnel.session import (
    AckInbound,
    Action,
    Authenticated,
    CheckAuthRate,
    ClaimPersona,
    Close,
    ConsumeChallenge,
    DiscardChallenge,
    EnqueueOutbound,
    IssueChallenge,
    LoadChallenge,
    OutboundDropped,
    RefuseOutbound,
    SendText,
    SessionLimits,
    State,
    TunnelSession,
)
from shared import protocol
from shared.identity import Passport, encode_public_key

RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_KEY = "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkena"
VECTOR_TEXT = "relay-auth:00000000-0000-4000-8000-000000000000:11111111-1111-4111-8111-111111111111"
VECTOR_SIGNATURE = "ZKDuPyQ3RIoOE9Alx2/i1iTyv2hJHemMPkJosXAsMJKRdsVB04Kraymw3PXXcivTGDxoI1kXCBBFc3gpx7LeCQ=="
DOMAIN = "relay.test"
NOW_MS = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now_ms = NOW_MS

    def __call__(self) -> int:
        return self.now_ms


def vector_uuids() -> Any:
    ids = itertools.cycle(["00000000-0000-4000-8000-000000000000", "11111111-1111-4111-8111-111111111111"])
    return lambda: next(ids)


def make_session(clock: Clock | None = None, **limits: Any) -> TunnelSession:
    options: dict[str, Any] = {"mail_domains": (DOMAIN,), "max_message_bytes": 1000, **limits}
    return TunnelSession("socket-1", SessionLimits(**options), clock or Clock(), vector_uuids())


def text(fields: dict[str, Any]) -> str:
    return json.dumps(fields)


def request(key: str = RFC8032_KEY, **extra: Any) -> str:
    return text({"type": "auth_challenge_request", "publicKeyBase32": key, **extra})


def response(challenge_id: str, signature: str, key: str = RFC8032_KEY, **extra: Any) -> str:
    return text(
        {
            "type": "auth_challenge_response",
            "publicKeyBase32": key,
            "challengeId": challenge_id,
            "signatureBase64": signature,
            **extra,
        }
    )


def auth_error(code: str, close_code: int = 4401) -> list[Action]:
    return [SendText(protocol.auth_error(code)), Close(close_code, code)]


def authenticated_session(**limits: Any) -> TunnelSession:
    session = make_session(**limits)
    session.receive_text(request(capabilities=["inbound_ack"]))
    session.receive_text(response("00000000-0000-4000-8000-000000000000", VECTOR_SIGNATURE))
    session.auth_succeeded(RFC8032_KEY, "inbound", None)
    return session


# --- challenges --------------------------------------------------------------------------------


def test_rfc8032_vector_challenge_text_and_signature() -> None:
    passport = Passport.from_seed(RFC8032_SECRET)
    assert passport.persona_key == RFC8032_KEY
    assert passport.sign_base64(VECTOR_TEXT.encode()) == VECTOR_SIGNATURE
    challenge = new_challenge(RFC8032_KEY, NOW_MS, 60, vector_uuids())
    assert challenge.challenge_text == VECTOR_TEXT
    assert check_response(challenge, RFC8032_KEY, VECTOR_SIGNATURE, NOW_MS) is None


def test_issued_challenge_message_matches_protocol() -> None:
    session = make_session()
    [action] = session.receive_text(request(key=f"  {RFC8032_KEY.upper()} "))
    assert isinstance(action, IssueChallenge)
    [reply] = session.challenge_stored(within_rate=True)
    assert isinstance(reply, SendText)
    assert json.loads(reply.text) == {
        "type": "auth_challenge",
        "publicKeyBase32": RFC8032_KEY,
        "challengeId": "00000000-0000-4000-8000-000000000000",
        "challengeText": VECTOR_TEXT,
        "expiresAt": "2023-11-14T22:14:20.000Z",
    }
    assert action.challenge.expires_at_ms == NOW_MS + 60_000


def test_iso_timestamps_have_milliseconds_and_z() -> None:
    assert iso_utc_ms(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
    assert iso_utc_ms(0) == "1970-01-01T00:00:00.000Z"


def record(**overrides: Any) -> ChallengeRecord:
    fields: dict[str, Any] = {
        "challenge_id": "00000000-0000-4000-8000-000000000000",
        "persona_key": RFC8032_KEY,
        "challenge_text": VECTOR_TEXT,
        "expires_at_ms": NOW_MS + 60_000,
        **overrides,
    }
    return ChallengeRecord(**fields)


@pytest.mark.parametrize(
    ("challenge", "key", "signature", "at_ms", "code"),
    [
        (None, RFC8032_KEY, VECTOR_SIGNATURE, NOW_MS, "challenge_not_found"),
        (record(), Passport.from_seed(b"\x01" * 32).persona_key, VECTOR_SIGNATURE, NOW_MS, "challenge_mismatch"),
        (record(used=True), RFC8032_KEY, VECTOR_SIGNATURE, NOW_MS, "challenge_already_used"),
        (record(), RFC8032_KEY, VECTOR_SIGNATURE, NOW_MS + 60_000, "challenge_expired"),
        (record(), RFC8032_KEY, "", NOW_MS, "invalid_signature_encoding"),
        (record(), RFC8032_KEY, "!!!not base64!!!", NOW_MS, "invalid_signature_encoding"),
        (record(), RFC8032_KEY, base64.b64encode(b"\x00" * 63).decode(), NOW_MS, "invalid_signature"),
        (record(), RFC8032_KEY, base64.b64encode(b"\x00" * 64).decode(), NOW_MS, "invalid_signature"),
        (record(challenge_text=VECTOR_TEXT + "x"), RFC8032_KEY, VECTOR_SIGNATURE, NOW_MS, "invalid_signature"),
        # first failure wins: used and expired and badly signed -> already used
        (record(used=True, expires_at_ms=0), RFC8032_KEY, "", NOW_MS, "challenge_already_used"),
    ],
)
def test_challenge_checks_in_protocol_order(
    challenge: ChallengeRecord | None, key: str, signature: str, at_ms: int, code: str
) -> None:
    assert check_response(challenge, key, signature, at_ms) == code


def test_expiry_uses_the_server_clock_boundary() -> None:
    assert check_response(record(), RFC8032_KEY, VECTOR_SIGNATURE, NOW_MS + 59_999) is None
    assert check_response(record(), RFC8032_KEY, VECTOR_SIGNATURE, NOW_MS + 60_000) == "challenge_expired"


@pytest.mark.parametrize(
    "signature",
    [
        VECTOR_SIGNATURE,
        VECTOR_SIGNATURE.rstrip("="),
        base64.urlsafe_b64encode(base64.b64decode(VECTOR_SIGNATURE)).decode(),
        base64.urlsafe_b64encode(base64.b64decode(VECTOR_SIGNATURE)).decode().rstrip("="),
    ],
)
def test_signature_accepted_padded_unpadded_and_urlsafe(signature: str) -> None:
    assert check_response(record(), RFC8032_KEY, signature, NOW_MS) is None


# --- auth through the session ------------------------------------------------------------------


def verify(session: TunnelSession, message: str, record: ChallengeRecord | None = None) -> list[Action]:
    """Feed a response and report every Redis step as the server would: within the rate, the
    challenge `record` found, consumed; the actions of the last step."""
    actions = session.receive_text(message)
    while actions and isinstance(actions[-1], CheckAuthRate | LoadChallenge | ConsumeChallenge):
        step = actions[-1]
        if isinstance(step, CheckAuthRate):
            actions = session.auth_rate_checked(within_rate=True)
        elif isinstance(step, LoadChallenge):
            actions = session.challenge_loaded(record)
        else:
            actions = session.challenge_consumed(None)
    return actions


def test_response_is_claimed_with_normalized_key_and_role() -> None:
    issued = new_challenge(RFC8032_KEY, NOW_MS, 60, vector_uuids())
    session = make_session()
    session.receive_text(request(sessionRole="outbound"))
    session.challenge_stored(within_rate=True)
    signed = response(issued.challenge_id, VECTOR_SIGNATURE, key=RFC8032_KEY.upper())
    assert verify(session, signed) == [ClaimPersona(RFC8032_KEY, "outbound")]
    assert session.state is State.VERIFYING
    for role, expected in (("outbound", "outbound"), ("anything", "inbound")):
        signed = response(issued.challenge_id, VECTOR_SIGNATURE, sessionRole=role)
        assert verify(make_session(), signed, issued) == [ClaimPersona(RFC8032_KEY, expected)]


def test_verification_steps_in_order_and_auth_ok_starts_serving() -> None:
    """Response -> (rate) -> load -> check -> consume -> claim -> auth_ok + start serving."""
    issued = new_challenge(RFC8032_KEY, NOW_MS, 60, vector_uuids())
    session = make_session()
    assert session.receive_text(response(issued.challenge_id, VECTOR_SIGNATURE)) == [CheckAuthRate()]
    assert session.state is State.VERIFYING
    assert session.auth_rate_checked(within_rate=True) == [LoadChallenge(issued.challenge_id)]
    assert session.challenge_loaded(issued) == [ConsumeChallenge(issued.challenge_id, RFC8032_KEY, NOW_MS)]
    assert session.challenge_consumed(None) == [ClaimPersona(RFC8032_KEY, "inbound")]
    ok, started = session.auth_succeeded(RFC8032_KEY, "inbound", "old-socket")
    assert isinstance(ok, SendText) and json.loads(ok.text)["type"] == "auth_ok"
    assert started == Authenticated(RFC8032_KEY, "inbound", "old-socket")
    assert session.state is State.AUTHENTICATED


@pytest.mark.parametrize("code", ["challenge_already_used", "challenge_expired", "challenge_not_found"])
def test_a_lost_consume_race_refuses_with_its_code(code: str) -> None:
    issued = new_challenge(RFC8032_KEY, NOW_MS, 60, vector_uuids())
    session = make_session()
    session.receive_text(response(issued.challenge_id, VECTOR_SIGNATURE))
    session.auth_rate_checked(within_rate=True)
    session.challenge_loaded(issued)
    assert session.challenge_consumed(code) == auth_error(code)
    assert session.state is State.CLOSED


def test_a_failed_check_never_consumes_the_challenge() -> None:
    issued = new_challenge(RFC8032_KEY, NOW_MS, 60, vector_uuids())
    session = make_session()
    session.receive_text(response(issued.challenge_id, "AAAA"))
    session.auth_rate_checked(within_rate=True)
    assert session.challenge_loaded(issued) == auth_error("invalid_signature")
    session = make_session()
    session.receive_text(response("unknown", VECTOR_SIGNATURE))
    session.auth_rate_checked(within_rate=True)
    assert session.challenge_loaded(None) == auth_error("challenge_not_found")


# --- rule: the auth rate counts a response only if no challenge was requested on the socket ---


def test_a_response_to_a_challenge_requested_here_is_not_counted_again() -> None:
    session = make_session()
    [issue] = session.receive_text(request())
    assert isinstance(issue, IssueChallenge)  # the request is counted (with the store)
    session.challenge_stored(within_rate=True)
    actions = session.receive_text(response(issue.challenge.challenge_id, VECTOR_SIGNATURE))
    assert not any(isinstance(action, CheckAuthRate) for action in actions)
    # ...and the challenge issued here is checked from memory, not loaded back
    assert actions == [ConsumeChallenge(issue.challenge.challenge_id, RFC8032_KEY, NOW_MS)]


def test_a_response_without_a_request_here_is_counted_and_may_be_refused() -> None:
    session = make_session()
    assert session.receive_text(response("elsewhere", VECTOR_SIGNATURE)) == [CheckAuthRate()]
    assert session.auth_rate_checked(within_rate=False) == auth_error("rate_limited", 4408)
    assert session.state is State.CLOSED
    assert session.attempted_key == RFC8032_KEY


def test_a_request_answered_elsewhere_still_skips_the_count_but_loads_the_record() -> None:
    """A challenge requested on this socket and one issued elsewhere answered here: the socket's
    request was counted already; the foreign challenge is read from Redis."""
    foreign = new_challenge(RFC8032_KEY, NOW_MS, 60, lambda: "22222222-2222-4222-8222-222222222222")
    session = make_session()
    session.receive_text(request())
    session.challenge_stored(within_rate=True)
    assert session.receive_text(response(foreign.challenge_id, "sig")) == [LoadChallenge(foreign.challenge_id)]


def test_a_challenge_request_over_the_rate_is_discarded_and_refused_4408() -> None:
    session = make_session()
    [issue] = session.receive_text(request())
    assert isinstance(issue, IssueChallenge)
    assert session.challenge_stored(within_rate=False) == [
        DiscardChallenge(issue.challenge.challenge_id),
        *auth_error("rate_limited", 4408),
    ]


# --- rule: the auth deadline does not fire while a verification runs ------------------------


def test_the_deadline_does_not_cut_a_verification_short() -> None:
    issued = new_challenge(RFC8032_KEY, NOW_MS, 60, vector_uuids())
    for finish in ("ok", "refused"):
        session = make_session()
        session.receive_text(response(issued.challenge_id, VECTOR_SIGNATURE))
        assert session.auth_timed_out() == []  # rate check under way
        session.auth_rate_checked(within_rate=True)
        assert session.auth_timed_out() == []  # loading
        session.challenge_loaded(issued)
        assert session.auth_timed_out() == []  # consuming
        session.challenge_consumed(None)
        assert session.auth_timed_out() == []  # claiming
        assert session.state is State.VERIFYING
        if finish == "ok":
            assert isinstance(session.auth_succeeded(RFC8032_KEY, "inbound", None)[0], SendText)
            assert session.state is State.AUTHENTICATED
        else:
            assert session.auth_failed("too_many_sockets") == auth_error("too_many_sockets", 4408)
            assert session.state is State.CLOSED
        assert session.auth_timed_out() == []


def test_the_deadline_still_fires_before_and_after_a_challenge_is_issued() -> None:
    session = make_session()
    session.receive_text(request())
    assert session.auth_timed_out() == auth_error("auth_timeout")  # challenge being stored
    session = make_session()
    session.receive_text(request())
    session.challenge_stored(within_rate=True)
    assert session.auth_timed_out() == auth_error("auth_timeout")  # waiting for the response
    assert session.challenge_stored(within_rate=True) == []


def test_outcomes_arriving_after_a_close_are_ignored() -> None:
    issued = new_challenge(RFC8032_KEY, NOW_MS, 60, vector_uuids())
    session = make_session()
    session.receive_text(response(issued.challenge_id, VECTOR_SIGNATURE))
    session.auth_failed("invalid_signature")
    assert session.auth_rate_checked(within_rate=True) == []
    assert session.challenge_loaded(issued) == []
    assert session.challenge_consumed(None) == []
    assert session.auth_succeeded(RFC8032_KEY, "inbound", None) == []


def test_input_during_a_verification_is_refused() -> None:
    session = make_session()
    session.receive_text(response("cid", VECTOR_SIGNATURE))
    assert session.receive_text(request()) == auth_error("invalid_message")


@pytest.mark.parametrize(
    "code",
    [
        "challenge_not_found",
        "challenge_mismatch",
        "challenge_already_used",
        "challenge_expired",
        "invalid_signature_encoding",
        "invalid_signature",
    ],
)
def test_every_auth_failure_sends_auth_error_then_closes_4401(code: str) -> None:
    session = make_session()
    session.receive_text(request())
    assert session.auth_failed(code) == auth_error(code)
    assert session.state is State.CLOSED
    assert session.receive_text(request()) == []


def test_rate_limited_closes_4408() -> None:
    session = make_session()
    assert session.auth_failed("rate_limited") == auth_error("rate_limited", 4408)


def test_auth_ok_shape_without_and_with_capabilities() -> None:
    session = make_session()
    session.receive_text(request())
    ok, _ = session.auth_succeeded(RFC8032_KEY, "inbound", "old-socket")
    assert isinstance(ok, SendText)
    assert json.loads(ok.text) == {
        "type": "auth_ok",
        "publicKeyBase32": RFC8032_KEY,
        "emailLocalPart": RFC8032_KEY,
        "sessionRole": "inbound",
        "replacedSocketId": "old-socket",
    }
    assert not session.wants_inbound_ack
    session = make_session()
    session.receive_text(request(capabilities=["inbound_ack", "unknown", 7]))
    ok, _ = session.auth_succeeded(RFC8032_KEY, "outbound", None)
    assert isinstance(ok, SendText)
    assert json.loads(ok.text)["capabilities"] == ["inbound_ack"]
    assert json.loads(ok.text)["sessionRole"] == "outbound"
    assert session.wants_inbound_ack
    session = make_session()
    session.receive_text(request(capabilities=[]))
    ok, _ = session.auth_succeeded(RFC8032_KEY, "inbound", None)
    assert isinstance(ok, SendText) and json.loads(ok.text)["capabilities"] == []


def test_binary_json_before_auth_is_accepted() -> None:
    [action] = make_session().receive_binary(request().encode())
    assert isinstance(action, IssueChallenge)
    assert make_session().receive_binary(b"\xff\xfe") == auth_error("invalid_message")


@pytest.mark.parametrize("length", [0, 1, 8, 51, 53, 56, 64, 103, 104])
def test_keys_of_wrong_length_are_invalid_message(length: int) -> None:
    assert make_session().receive_text(request(key="a" * length)) == auth_error("invalid_message")


@pytest.mark.parametrize(
    "key",
    [
        "1" + RFC8032_KEY[1:],  # '1' is not in the base32 alphabet
        RFC8032_KEY[:-1] + "b",  # non-zero trailing bits: not a canonical 32-byte encoding
        RFC8032_KEY[:-1] + "=",
        RFC8032_KEY[:26] + " " + RFC8032_KEY[27:],
    ],
)
def test_keys_outside_the_alphabet_are_invalid_message(key: str) -> None:
    assert make_session().receive_text(request(key=key)) == auth_error("invalid_message")


def test_valid_random_keys_are_accepted() -> None:
    for seed in range(5):
        key = encode_public_key(Passport.from_seed(bytes([seed]) * 32).public_key)
        [action] = make_session().receive_text(request(key=key))
        assert isinstance(action, IssueChallenge)


@pytest.mark.parametrize(
    "message",
    [
        "",
        "null",
        "42",
        '"auth_challenge_request"',
        "[]",
        "{}",
        '{"type":1}',
        '{"type":"smtp_ack","streamId":"s"}',
        '{"type":"auth_challenge_request","publicKeyBase32":null}',
        '{"type":"auth_challenge_response","publicKeyBase32":"k","challengeId":"c"}',
        '{"type":"auth_challenge_response","publicKeyBase32":"k","challengeId":5,"signatureBase64":"s"}',
    ],
)
def test_malformed_auth_messages_are_invalid_message(message: str) -> None:
    assert make_session().receive_text(message) == auth_error("invalid_message")


# --- after auth --------------------------------------------------------------------------------


def test_text_after_auth() -> None:
    session = authenticated_session()
    assert session.receive_text('{"type":"ping"}') == [SendText('{"type":"pong"}')]
    assert session.receive_text('{"type":"smtp_ack","streamId":"q1.0"}') == [AckInbound("q1.0")]
    assert session.receive_text('{"type":"what"}') == [SendText('{"type":"error","code":"unknown_type"}')]
    assert session.receive_text("nope") == [SendText('{"type":"error","code":"invalid_message"}')]
    assert session.receive_text('{"type":"smtp_ack"}') == [SendText('{"type":"error","code":"invalid_message"}')]
    assert session.receive_text(request()) == [SendText('{"type":"error","code":"already_authenticated"}')]
    assert session.state is State.AUTHENTICATED


def test_invalid_binary_frame_after_auth_closes_4401() -> None:
    assert authenticated_session().receive_binary(b"\x01\x09\x00\x00\x00\x00\x00") == auth_error("invalid_tunnel_frame")


def test_replaced_session_closes_4400_without_auth_error() -> None:
    assert authenticated_session().replaced() == [Close(4400, "replaced_by_new_session")]


# --- outbound assembly -------------------------------------------------------------------------


def frames(stream_id: str, mail_from: str, rcpt_to: str, message: bytes) -> list[bytes]:
    return protocol.encode_message_frames(stream_id, protocol.SmtpStart(mail_from, rcpt_to), message)


def feed(session: TunnelSession, messages: list[bytes]) -> list[Action]:
    return [action for message in messages for action in session.receive_binary(message)]


SENDER = f"{RFC8032_KEY}@{DOMAIN}"


def mail(body: bytes, author: str = SENDER) -> bytes:
    """A message whose header From is `author` (the persona's own address by default)."""
    return f"From: {author}\r\nSubject: test\r\n\r\n".encode() + body


def test_complete_stream_becomes_one_enqueue_action() -> None:
    session = authenticated_session()
    message = mail(b"hi")
    [action] = feed(session, frames("s1", SENDER.upper().replace(DOMAIN.upper(), DOMAIN), "a@example.org", message))
    assert isinstance(action, EnqueueOutbound)
    assert (action.job.persona_key, action.job.stream_id, action.job.rcpt_to, action.job.data) == (
        RFC8032_KEY,
        "s1",
        ["a@example.org"],
        message,
    )
    assert action.job.enqueued_at_ms == NOW_MS


def test_interleaved_streams_are_assembled_separately() -> None:
    session = authenticated_session()
    a, b = frames("a", SENDER, "x@example.org", mail(b"AAAA")), frames("b", SENDER, "y@example.org", mail(b"BB"))
    actions = feed(session, [a[0], b[0], b[1], a[1], a[2], b[2]])
    assert [(x.job.stream_id, x.job.data) for x in actions if isinstance(x, EnqueueOutbound)] == [
        ("a", mail(b"AAAA")),
        ("b", mail(b"BB")),
    ]


@pytest.mark.parametrize(
    ("mail_from", "rcpt_to", "reason"),
    [
        (f"{Passport.from_seed(b'x' * 32).persona_key}@{DOMAIN}", "a@example.org", "sender_not_allowed"),
        (f"{RFC8032_KEY}@other.example", "a@example.org", "sender_not_allowed"),
        (RFC8032_KEY, "a@example.org", "sender_not_allowed"),
        ("", "a@example.org", "sender_not_allowed"),
        (SENDER, "", "invalid_recipient"),
        (SENDER, "a@", "invalid_recipient"),
        (SENDER, "a@b@c", "invalid_recipient"),
        (SENDER, "a@example.org\n", "invalid_recipient"),
        (SENDER, "<a@example.org>>", "invalid_recipient"),
        (SENDER, "a@example.org, b@example.org", "too_many_recipients"),
    ],
)
def test_envelope_refusals(mail_from: str, rcpt_to: str, reason: str) -> None:
    session = authenticated_session()
    assert feed(session, frames("s", mail_from, rcpt_to, b"x")) == [RefuseOutbound("s", reason)]


def test_refusal_text_is_a_failed_delivery_result() -> None:
    assert json.loads(RefuseOutbound("s", "rate_limited").text) == {
        "type": "relay_delivery_result",
        "streamId": "s",
        "status": "failed",
        "error": "rate_limited",
    }


def test_sender_domain_free_when_no_domains_configured() -> None:
    session = authenticated_session(mail_domains=())
    address = f"{RFC8032_KEY}@anything.example"
    [action] = feed(session, frames("s", f"<{address}>", "a@example.org", mail(b"x", address)))
    assert isinstance(action, EnqueueOutbound) and action.job.mail_from == f"{RFC8032_KEY}@anything.example"


def test_chunk_or_end_without_start() -> None:
    session = authenticated_session()
    chunk = protocol.encode_frame(protocol.FrameType.SMTP_CHUNK, "x", b"data")
    end = protocol.encode_frame(protocol.FrameType.SMTP_END, "y")
    assert feed(session, [chunk, end]) == [
        RefuseOutbound("x", "stream_not_started"),
        RefuseOutbound("y", "stream_not_started"),
    ]


def test_too_large_stream_refused_once_and_memory_freed() -> None:
    session = authenticated_session(max_message_bytes=1000)
    messages = frames("big", SENDER, "a@example.org", b"x" * 600)
    more = protocol.encode_frame(protocol.FrameType.SMTP_CHUNK, "big", b"y" * 600)
    actions = feed(session, [*messages[:2], more, more, messages[-1]])
    assert actions == [RefuseOutbound("big", "message_too_large")]
    assert session.open_stream_bytes == 0
    # The same stream id may be started afresh.
    [action] = feed(session, frames("big", SENDER, "a@example.org", mail(b"small")))
    assert isinstance(action, EnqueueOutbound)


def test_exactly_max_bytes_is_accepted() -> None:
    session = authenticated_session(max_message_bytes=1000)
    message = mail(b"x" * (1000 - len(mail(b""))))
    assert len(message) == 1000
    [action] = feed(session, frames("s", SENDER, "a@example.org", message))
    assert isinstance(action, EnqueueOutbound)


def test_unfinished_streams_expire_after_the_timeout() -> None:
    clock = Clock()
    session = make_session(clock, outbound_stream_timeout_ms=1000)
    session.receive_text(request())
    session.auth_succeeded(RFC8032_KEY, "inbound", None)
    start, chunk, _ = frames("slow", SENDER, "a@example.org", b"abc")
    feed(session, [start, chunk])
    assert session.open_stream_bytes == 3
    clock.now_ms += 999
    assert session.expire_streams() == []
    clock.now_ms += 1
    assert session.expire_streams() == [OutboundDropped("slow", "stream_timeout")]
    assert session.open_stream_bytes == 0
    end = protocol.encode_frame(protocol.FrameType.SMTP_END, "slow")
    assert feed(session, [end]) == [RefuseOutbound("slow", "stream_not_started")]


def test_open_streams_per_socket_are_bounded() -> None:
    session = authenticated_session(max_open_streams=2)
    starts = [frames(f"s{n}", SENDER, "a@example.org", b"")[0] for n in range(3)]
    assert feed(session, starts) == [RefuseOutbound("s2", "too_many_streams")]


def test_outbound_helpers() -> None:
    assert outbound.check_sender(f"{RFC8032_KEY}@{DOMAIN}.", RFC8032_KEY, [DOMAIN]) is None
    assert outbound.check_recipient("<a@example.org>") is None
    assert outbound.bare_address(" <a@example.org> ") == "a@example.org"


# --- properties --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=60),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4),
    max_leaves=12,
)
control_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["auth_challenge_request", "auth_challenge_response", "smtp_ack", "ping", "x"])
        | json_values,
    },
    optional={
        "publicKeyBase32": st.sampled_from([RFC8032_KEY, RFC8032_KEY.upper(), ""]) | json_values,
        "challengeId": json_values,
        "signatureBase64": json_values,
        "sessionRole": json_values,
        "capabilities": json_values,
        "streamId": json_values,
    },
)
ALLOWED_ACTIONS = (SendText, Close, IssueChallenge, CheckAuthRate, LoadChallenge, ConsumeChallenge, AckInbound)


@settings(max_examples=300, deadline=None)
@given(st.one_of(control_like.map(json.dumps), st.text(max_size=200), json_values.map(json.dumps)))
def test_parser_never_raises_before_or_after_auth(message: str) -> None:
    for session in (make_session(), authenticated_session()):
        actions = session.receive_text(message)
        assert actions and all(isinstance(action, ALLOWED_ACTIONS) for action in actions)
        if any(isinstance(action, Close) for action in actions):
            assert actions == auth_error("invalid_message")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_binary_never_raises_before_or_after_auth(message: bytes) -> None:
    for session in (make_session(), authenticated_session()):
        actions = session.receive_binary(message)
        for action in actions:
            assert isinstance(action, (*ALLOWED_ACTIONS, RefuseOutbound, EnqueueOutbound, OutboundDropped))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80), st.text(max_size=100))
def test_check_response_never_raises(signature: bytes, signature_text: str) -> None:
    for candidate in (base64.b64encode(signature).decode(), signature_text):
        assert check_response(record(), RFC8032_KEY, candidate, NOW_MS) in (
            None,
            "invalid_signature_encoding",
            "invalid_signature",
        )


# --- auth deadline -----------------------------------------------------------------------------


def test_auth_timeout_is_an_auth_error_with_4401_only_before_auth() -> None:
    session = make_session()
    assert session.auth_timed_out() == auth_error("auth_timeout")
    assert session.state is State.CLOSED
    assert session.auth_timed_out() == []
    assert authenticated_session().auth_timed_out() == []


@pytest.mark.parametrize(
    ("mail_from", "rcpt_to", "reason"),
    [
        (f"{RFC8032_KEY}@evil.example\r\nRSET", "a@example.org", "sender_not_allowed"),
        (f"{RFC8032_KEY}@anything.example\r\n", "a@example.org", "sender_not_allowed"),
        (f"{RFC8032_KEY}@anything.example\0", "a@example.org", "sender_not_allowed"),
        (f"{RFC8032_KEY}@any thing.example", "a@example.org", "sender_not_allowed"),
        (f"{RFC8032_KEY}@anything.example>", "a@example.org", "sender_not_allowed"),
        (f"{RFC8032_KEY}@", "a@example.org", "sender_not_allowed"),
        (f"{RFC8032_KEY}@anything.example", "a@example.org\0", "invalid_recipient"),
        (f"{RFC8032_KEY}@anything.example", "a@example.org\x01", "invalid_recipient"),
        (f"{RFC8032_KEY}@anything.example", "a@example.org\rDATA", "invalid_recipient"),
    ],
)
def test_envelope_smuggling_is_refused_even_without_mail_domains(mail_from: str, rcpt_to: str, reason: str) -> None:
    """With no mail domains configured the sender's domain is free, but never a place to hide
    CR, LF, NUL or other SMTP syntax."""
    session = authenticated_session(mail_domains=())
    assert feed(session, frames("s", mail_from, rcpt_to, b"x")) == [RefuseOutbound("s", reason)]


DEEP_JSON = "[" * 100_000


def test_deeply_nested_json_is_invalid_not_a_recursion_error() -> None:
    assert make_session().receive_text(DEEP_JSON) == auth_error("invalid_message")
    assert make_session().receive_binary(('{"type":' + DEEP_JSON).encode()) == auth_error("invalid_message")
    session = authenticated_session()
    assert session.receive_text(DEEP_JSON) == [SendText('{"type":"error","code":"invalid_message"}')]
    deep_start = protocol.encode_frame(protocol.FrameType.SMTP_START, "s", DEEP_JSON.encode())
    assert session.receive_binary(deep_start) == auth_error("invalid_tunnel_frame")


# --- outbound assembly budget (services/tunnel/budget.py) --------------------------------------


def budgeted_session(per_persona: int, clock: Clock | None = None) -> tuple[TunnelSession, OutboundBudget]:
    budget = OutboundBudget(BudgetLimits(per_persona=per_persona, per_ip=10 * per_persona, per_node=10 * per_persona))
    session = make_session(clock or Clock(), outbound_stream_timeout_ms=1000)
    session.receive_text(request())
    session.auth_succeeded(RFC8032_KEY, "inbound", None)
    session.allowance = budget.allowance(RFC8032_KEY, "192.0.2.1")
    return session, budget


def test_a_chunk_over_the_budget_fails_its_stream_outbound_busy_and_gives_its_bytes_back() -> None:
    session, budget = budgeted_session(per_persona=1000)
    a, b = (
        frames("a", SENDER, "x@example.org", mail(b"x" * 600)),
        frames("b", SENDER, "y@example.org", mail(b"y" * 600)),
    )
    actions = feed(session, [a[0], b[0], a[1], b[1], b[1], b[2], a[2]])
    assert actions[0] == RefuseOutbound("b", "outbound_busy")  # once, however many frames follow
    [queued] = actions[1:]
    assert isinstance(queued, EnqueueOutbound) and queued.size_bytes == len(mail(b"x" * 600))
    assert budget.total == queued.size_bytes  # held until the server has queued the job
    session.allowance.give(queued.size_bytes)
    assert (budget.total, dict(budget.by_persona), dict(budget.by_ip)) == (0, {}, {})


def test_refused_expired_and_replaced_streams_give_their_bytes_back() -> None:
    clock = Clock()
    session, budget = budgeted_session(per_persona=10_000, clock=clock)
    spoofed = frames("spoof", SENDER, "a@example.org", mail(b"x", "postmaster@relay.test"))
    assert feed(session, spoofed) == [RefuseOutbound("spoof", "header_from_not_allowed")]
    assert budget.total == 0
    feed(session, frames("slow", SENDER, "a@example.org", b"abc")[:2])
    assert budget.total == 3
    clock.now_ms += 1000
    assert session.expire_streams() == [OutboundDropped("slow", "stream_timeout")]
    assert budget.total == 0
    feed(session, frames("open", SENDER, "a@example.org", b"abcd")[:2])
    assert budget.total == 4
    session.replaced()
    assert budget.total == 0


def test_budget_is_per_persona_per_ip_and_per_node() -> None:
    budget = OutboundBudget(BudgetLimits(per_persona=10, per_ip=15, per_node=20))
    assert budget.take("p1", "ip1", 10) and not budget.take("p1", "ip2", 1)  # persona full
    assert budget.take("p2", "ip1", 5) and not budget.take("p3", "ip1", 1)  # ip1 full
    assert budget.take("p3", "ip2", 5) and not budget.take("p4", "ip3", 1)  # node full
    allowance = budget.allowance("p4", "ip3")
    budget.give("p1", "ip1", 10)
    assert allowance.take(4) and allowance.held == 4
    allowance.give(100)  # never more than it took
    assert allowance.held == 0 and budget.total == 10
