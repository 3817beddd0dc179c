"""Ingress behaviour over real SMTP sessions against a real redis-server (PROTOCOL.md part C).

The ingress runs in-process (its real `serve()` on a background event loop) for speed;
test_ingress_process.py covers the spawned `protege-relay ingress` process.
"""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
import redis

from protege_relay.embedded_redis import EmbeddedRedis
from shared import keys
from shared.wakeup import Wakeup, WakeupKind
from tests.support.clock import ManualClock
from tests.support.ingress import (
    InProcessIngress,
    address,
    inbox_entries,
    mark_seen,
    new_persona,
    open_session,
    send_raw,
    split_trace_header,
)
from tests.support.wait import poll_until

StartIngress = Callable[..., InProcessIngress]
MESSAGE = b"From: a@example.org\r\nTo: b@relay.test\r\nSubject: hello\r\n\r\nbody line\r\n"


def numbered(n: int) -> bytes:
    """A distinct message: the same envelope and bytes again is a retry, stored once."""
    return MESSAGE.replace(b"Subject: hello", f"Subject: hello {n}".encode())


def raw_session(port: int) -> tuple[socket.socket, Any]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, sock.makefile("rb")


def read_reply(reader: Any) -> list[bytes]:
    lines = []
    while True:
        line = reader.readline()
        assert line, "connection closed"
        lines.append(line.rstrip(b"\r\n"))
        if line[3:4] != b"-":
            return lines


# --- EHLO ---------------------------------------------------------------------------------


def test_ehlo_advertises_size_8bitmime_smtputf8_pipelining_enhancedstatuscodes(ingress: InProcessIngress) -> None:
    with open_session(ingress.port) as client:
        assert client.esmtp_features["size"] == str(10 * 1024 * 1024)
        for keyword in ("8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes"):
            assert keyword in client.esmtp_features
        assert "starttls" not in client.esmtp_features
        assert "auth" not in client.esmtp_features


def test_greeting_names_the_configured_hostname(ingress: InProcessIngress) -> None:
    sock, reader = raw_session(ingress.port)
    with sock:
        assert read_reply(reader)[0].startswith(b"220 mx.relay.test ")


# --- accepted and durable -----------------------------------------------------------------


def test_accepted_message_is_in_the_inbox_with_only_a_received_header_prepended(
    ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    code, reply = send_raw(ingress.port, "sender@example.org", [address(persona)], MESSAGE)

    assert code == 250
    assert reply.startswith(b"2.0.0 queued as q")
    queue_id = reply.decode().rsplit(" ", 1)[1]
    [entry] = inbox_entries(redis_client, persona)
    assert entry.queue_id == queue_id
    assert entry.recipient_index == 0
    assert entry.stream_id == f"{queue_id}.0"
    assert entry.mail_from == "sender@example.org"
    assert entry.rcpt_to == address(persona)
    assert entry.client_ip == "127.0.0.1"
    assert abs(entry.received_at_ms - time.time() * 1000) < 60_000
    header, original = split_trace_header(entry.data)
    assert original == MESSAGE
    assert header.startswith(b"Received: from sender.example (")
    assert b"[127.0.0.1])\r\n\tby mx.relay.test with ESMTP id " + queue_id.encode() + b"\r\n" in header
    assert f"\tfor <{address(persona)}>; ".encode() in header
    assert int(cast(bytes, redis_client.get(keys.inbox_bytes(persona)))) == len(entry.data)


def test_queue_id_is_q_plus_lowercase_base32_and_stream_id_fits_64_bytes(
    ingress: InProcessIngress, persona: str
) -> None:
    _, reply = send_raw(ingress.port, "s@example.org", [address(persona)], MESSAGE)
    queue_id = reply.decode().rsplit(" ", 1)[1]
    assert queue_id[0] == "q"
    assert set(queue_id[1:]) <= set("abcdefghijklmnopqrstuvwxyz234567")
    assert len(f"{queue_id}.999".encode()) <= 64


def test_dot_stuffed_lines_and_crlf_are_stored_as_the_sender_meant_them(
    ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    message = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n\r\nend\r\n"
    code, _ = send_raw(ingress.port, "s@example.org", [address(persona)], message)  # smtplib stuffs
    assert code == 250
    [entry] = inbox_entries(redis_client, persona)
    assert split_trace_header(entry.data)[1] == message


def test_plus_tag_is_kept_in_rcpt_to_and_routes_to_the_base_key(
    ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    tagged = address(persona, tag="newsletters")
    code, _ = send_raw(ingress.port, "s@example.org", [tagged], MESSAGE)
    assert code == 250
    [entry] = inbox_entries(redis_client, persona)
    assert entry.rcpt_to == tagged


def test_uppercase_key_and_domain_route_to_the_persona(
    ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    shouting = f"{persona.upper()}@RELAY.TEST"
    code, _ = send_raw(ingress.port, "s@example.org", [shouting], MESSAGE)
    assert code == 250
    assert inbox_entries(redis_client, persona)[0].rcpt_to == shouting


def test_null_sender_is_stored_as_empty_mail_from(
    ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    code, _ = send_raw(ingress.port, "<>", [address(persona)], MESSAGE)
    assert code == 250
    assert inbox_entries(redis_client, persona)[0].mail_from == ""


def test_two_personas_in_one_transaction_get_one_entry_each_with_the_same_queue_id(
    ingress: InProcessIngress, redis_client: redis.Redis
) -> None:
    first, second = new_persona(), new_persona()
    mark_seen(redis_client, first)
    mark_seen(redis_client, second)

    code, reply = send_raw(ingress.port, "s@example.org", [address(first), address(second, "x")], MESSAGE)

    assert code == 250
    queue_id = reply.decode().rsplit(" ", 1)[1]
    [entry_one] = inbox_entries(redis_client, first)
    [entry_two] = inbox_entries(redis_client, second)
    assert (entry_one.queue_id, entry_one.recipient_index) == (queue_id, 0)
    assert (entry_two.queue_id, entry_two.recipient_index) == (queue_id, 1)
    assert split_trace_header(entry_one.data)[1] == split_trace_header(entry_two.data)[1] == MESSAGE
    # each copy's trace header names only its own recipient (no Bcc leak)
    assert address(second, "x").encode() not in entry_one.data
    assert address(first).encode() not in entry_two.data


def test_two_addresses_of_the_same_persona_give_two_entries(
    ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    code, _ = send_raw(ingress.port, "s@example.org", [address(persona, "a"), address(persona, "b")], MESSAGE)
    assert code == 250
    entries = inbox_entries(redis_client, persona)
    assert [(entry.recipient_index, entry.rcpt_to) for entry in entries] == [
        (0, address(persona, "a")),
        (1, address(persona, "b")),
    ]
    assert int(cast(bytes, redis_client.get(keys.inbox_bytes(persona)))) == sum(len(entry.data) for entry in entries)


def test_eight_bit_and_smtputf8_message_is_stored_byte_for_byte(
    ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    message = "From: José <josé@exämple.org>\r\nSubject: grüße\r\n\r\nÆØÅ 日本語\r\n".encode()
    with open_session(ingress.port) as client:
        code, reply = client.mail("josé@exämple.org", ["SMTPUTF8", "BODY=8BITMIME"])
        assert code == 250, reply
        code, reply = client.rcpt(address(persona, "ünïcode"))
        assert code == 250, reply
        code, reply = client.data(message)
    assert code == 250, reply
    [entry] = inbox_entries(redis_client, persona)
    assert entry.mail_from == "josé@exämple.org"
    assert entry.rcpt_to == address(persona, "ünïcode")
    header, original = split_trace_header(entry.data)
    assert original == message
    assert b" with UTF8SMTP id " in header


def test_owner_node_is_woken_after_the_message_is_queued(
    ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    redis_client.set(keys.owner(persona), b"tunnel-7", ex=30)
    pubsub = redis_client.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(keys.node_channel("tunnel-7"))
    poll_until(lambda: pubsub.get_message(timeout=0.1), message="no subscribe confirmation")

    code, _ = send_raw(ingress.port, "s@example.org", [address(persona)], MESSAGE)

    assert code == 250
    message = poll_until(lambda: pubsub.get_message(timeout=0.1), message="no wake-up published")
    assert Wakeup.decode(message["data"]) == Wakeup(WakeupKind.INBOX, persona)
    pubsub.close()


# --- RCPT refusals (PROTOCOL.md part C) ---------------------------------------------------


@pytest.mark.parametrize(
    "recipient",
    ["no-at-sign", "notakey@relay.test", "{key}", "{short}@relay.test", "{key}x@relay.test", "{key_bad}@relay.test"],
)
def test_recipient_that_is_not_a_key_address_is_550_5_1_1(
    ingress: InProcessIngress, persona: str, recipient: str
) -> None:
    recipient = recipient.format(short=persona[:-1], key=persona, key_bad=persona[:-1] + "1")
    with open_session(ingress.port) as client:
        client.mail("s@example.org")
        assert client.rcpt(recipient) == (550, b"5.1.1 relay_rejected_recipient_invalid")


def test_recipient_on_an_unconfigured_domain_is_550_5_7_1(ingress: InProcessIngress, persona: str) -> None:
    with open_session(ingress.port) as client:
        client.mail("s@example.org")
        assert client.rcpt(address(persona, domain="elsewhere.example")) == (550, b"5.7.1 relay access denied")


def test_any_domain_is_accepted_when_none_is_configured(
    start_ingress: StartIngress, persona: str, redis_client: redis.Redis
) -> None:
    ingress = start_ingress(RELAY_MAIL_DOMAINS="[]")
    code, _ = send_raw(ingress.port, "s@example.org", [address(persona, domain="anything.example")], MESSAGE)
    assert code == 250
    assert len(inbox_entries(redis_client, persona)) == 1


def test_persona_never_seen_is_450_4_2_1(ingress: InProcessIngress) -> None:
    with open_session(ingress.port) as client:
        client.mail("s@example.org")
        assert client.rcpt(address(new_persona())) == (450, b"4.2.1 relay_rejected_recipient_not_connected")


def test_inbox_at_message_cap_is_452_4_2_2(
    start_ingress: StartIngress, persona: str, redis_client: redis.Redis
) -> None:
    ingress = start_ingress(RELAY_QUEUE_MAX_MESSAGES="2")
    for n in range(2):
        assert send_raw(ingress.port, "s@example.org", [address(persona)], numbered(n))[0] == 250
    with open_session(ingress.port) as client:
        client.mail("s@example.org")
        assert client.rcpt(address(persona)) == (452, b"4.2.2 mailbox full")
    assert len(inbox_entries(redis_client, persona)) == 2


def test_inbox_at_byte_cap_is_452_4_2_2(start_ingress: StartIngress, persona: str, redis_client: redis.Redis) -> None:
    ingress = start_ingress(RELAY_QUEUE_MAX_BYTES="1000")
    redis_client.set(keys.inbox_bytes(persona), 1000)
    with open_session(ingress.port) as client:
        client.mail("s@example.org")
        assert client.rcpt(address(persona)) == (452, b"4.2.2 mailbox full")


def test_recipient_beyond_max_recipients_is_452_4_5_3_and_the_others_are_delivered(
    start_ingress: StartIngress, redis_client: redis.Redis
) -> None:
    ingress = start_ingress(RELAY_SMTP_MAX_RECIPIENTS="1")
    first, second = new_persona(), new_persona()
    mark_seen(redis_client, first)
    mark_seen(redis_client, second)
    with open_session(ingress.port) as client:
        client.mail("s@example.org")
        assert client.rcpt(address(first))[0] == 250
        assert client.rcpt(address(second)) == (452, b"4.5.3 relay_rejected_too_many_recipients")
        assert client.data(MESSAGE)[0] == 250
    assert len(inbox_entries(redis_client, first)) == 1
    assert inbox_entries(redis_client, second) == []


# --- size ---------------------------------------------------------------------------------


def test_mail_size_parameter_over_the_limit_is_552_5_3_4(ingress: InProcessIngress) -> None:
    with open_session(ingress.port) as client:
        code, reply = client.mail("s@example.org", [f"SIZE={11 * 1024 * 1024}"])
    assert (code, reply) == (552, b"5.3.4 relay_rejected_message_too_large")


def test_nine_mib_message_is_accepted_and_eleven_mib_is_refused_at_data(
    ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    line = b"x" * 998 + b"\r\n"
    nine_mib = b"Subject: big\r\n\r\n" + line * (9 * 1024 * 1024 // len(line))
    eleven_mib = b"Subject: bigger\r\n\r\n" + line * (11 * 1024 * 1024 // len(line))

    assert send_raw(ingress.port, "s@example.org", [address(persona)], nine_mib)[0] == 250
    # no SIZE= declared, so only DATA can refuse it
    assert send_raw(ingress.port, "s@example.org", [address(persona)], eleven_mib) == (
        552,
        b"5.3.4 relay_rejected_message_too_large",
    )
    [entry] = inbox_entries(redis_client, persona)
    assert split_trace_header(entry.data)[1] == nine_mib


# --- rate limits --------------------------------------------------------------------------


def test_connections_over_the_per_ip_rate_get_421_4_7_0_as_greeting(start_ingress: StartIngress) -> None:
    ingress = start_ingress(RELAY_RATE_LIMITS_SMTP_CONNECTIONS_PER_MINUTE_PER_IP="3")
    for _ in range(3):
        with open_session(ingress.port) as client:
            assert client.noop()[0] == 250
    sock, reader = raw_session(ingress.port)
    with sock:
        assert read_reply(reader) == [b"421 4.7.0 relay_rejected_connection_rate_limited"]
        assert reader.readline() == b""  # closed by the server


def test_the_next_minute_window_admits_again(start_ingress: StartIngress, rate_clock: ManualClock) -> None:
    """The window is cut from the service's clock (injected here), not read anew by each check."""
    ingress = start_ingress(RELAY_RATE_LIMITS_SMTP_CONNECTIONS_PER_MINUTE_PER_IP="2")
    for _ in range(2):
        with open_session(ingress.port) as client:
            assert client.noop()[0] == 250
    rate_clock.advance(60)
    for _ in range(2):  # a third and fourth connection: the limit is per window
        with open_session(ingress.port) as client:
            assert client.noop()[0] == 250
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP("127.0.0.1", ingress.port, timeout=10)
    assert refused.value.smtp_code == 421


def test_deny_window_keeps_refusing_after_the_minute_window_changes(
    start_ingress: StartIngress, redis_client: redis.Redis
) -> None:
    ingress = start_ingress(RELAY_RATE_LIMITS_SMTP_CONNECTIONS_PER_MINUTE_PER_IP="1")
    redis_client.set(keys.deny("smtp_conn", "127.0.0.1"), b"1", px=60_000)  # as set by an earlier flood
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP("127.0.0.1", ingress.port, timeout=10)
    assert refused.value.smtp_code == 421
    redis_client.delete(keys.deny("smtp_conn", "127.0.0.1"))
    redis_client.delete(*cast(list[bytes], redis_client.keys("relay:rate:smtp_conn:*")))
    with open_session(ingress.port) as client:
        assert client.noop()[0] == 250


def test_messages_over_the_per_ip_rate_get_451_4_7_0_at_data(
    start_ingress: StartIngress, persona: str, redis_client: redis.Redis
) -> None:
    ingress = start_ingress(RELAY_RATE_LIMITS_SMTP_MESSAGES_PER_MINUTE_PER_IP="2")
    with open_session(ingress.port) as client:
        for n in range(2):
            client.mail("s@example.org")
            client.rcpt(address(persona))
            assert client.data(numbered(n))[0] == 250
        client.mail("s@example.org")
        client.rcpt(address(persona))
        assert client.data(numbered(2)) == (451, b"4.7.0 relay_rejected_rate_limited")
    assert len(inbox_entries(redis_client, persona)) == 2
    assert cast(int, redis_client.pttl(keys.deny("smtp_msg", "127.0.0.1"))) > 0


# --- Redis unavailable --------------------------------------------------------------------


@pytest.mark.own_redis  # kills or restarts Redis
def test_redis_down_at_rcpt_is_451_4_3_0(ingress: InProcessIngress, persona: str, redis_server: EmbeddedRedis) -> None:
    with open_session(ingress.port) as client:
        client.mail("s@example.org")
        redis_server.kill()
        assert client.rcpt(address(persona)) == (451, b"4.3.0 temporary failure, try again later")


@pytest.mark.own_redis  # kills or restarts Redis
def test_redis_down_at_end_of_data_is_451_4_3_0_never_250(
    start_ingress: StartIngress, persona: str, redis_server: EmbeddedRedis
) -> None:
    ingress = start_ingress(RELAY_REDIS_FAILOVER_WAIT_MS="1000")  # 451 after 1 s of retries, not 10
    with open_session(ingress.port) as client:
        client.mail("s@example.org")
        assert client.rcpt(address(persona))[0] == 250
        redis_server.kill()
        assert client.data(MESSAGE) == (451, b"4.3.0 temporary failure, try again later")
        # and the session is still usable: the sender may retry later on a new transaction
        assert client.rset()[0] == 250


# --- hostile input ------------------------------------------------------------------------


def test_smtp_smuggling_sequences_do_not_end_the_message(
    ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    """CVE-2023-51764 style: `\\n.\\r\\n` and `\\r\\n.\\n` are not end-of-data (aiosmtpd >= 1.4.5)."""
    smuggled = (
        b"Subject: one\r\n\r\nfirst part\n.\r\nMAIL FROM:<evil@example.org>\r\n"
        b"RCPT TO:<" + address(persona).encode() + b">\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nsecond\r\n.\nmore\r\n"
    )
    sock, reader = raw_session(ingress.port)
    with sock:
        read_reply(reader)
        sock.sendall(b"EHLO smuggler.example\r\n")
        read_reply(reader)
        sock.sendall(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<" + address(persona).encode() + b">\r\nDATA\r\n")
        assert read_reply(reader)[0].startswith(b"250")
        assert read_reply(reader)[0].startswith(b"250")
        assert read_reply(reader)[0].startswith(b"354")
        sock.sendall(smuggled + b".\r\n")
        assert read_reply(reader)[0].startswith(b"250 2.0.0 queued as ")
        sock.sendall(b"QUIT\r\n")
        assert read_reply(reader)[0].startswith(b"221")
    [entry] = inbox_entries(redis_client, persona)  # ONE message, the smuggled part inside it
    # the line `.\nmore` starts with a dot, which dot-unstuffing removes (RFC 5321 4.5.2)
    assert split_trace_header(entry.data)[1] == smuggled.replace(b"\r\n.\nmore", b"\r\n\nmore")
    assert b"MAIL FROM:<evil@example.org>" in entry.data


def test_junk_nul_bytes_and_overlong_lines_leave_the_server_working(
    ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    sock, reader = raw_session(ingress.port)
    with sock:
        read_reply(reader)
        for junk in (
            b"\x00\x00\x00\r\n",
            b"HELO\x00x\r\n",
            b"A" * 5000 + b"\r\n",
            b"\xff\xfe\r\n",
            b"MAIL FROM:<\x00>\r\n",
            b"EHLO " + b"h" * 2000 + b"\r\n",
        ):
            sock.sendall(junk)
            assert read_reply(reader)[0][:1] in (b"5", b"2")
    # a fresh client still gets served
    assert send_raw(ingress.port, "s@example.org", [address(persona)], MESSAGE)[0] == 250
    assert len(inbox_entries(redis_client, persona)) == 1


def test_eight_bit_garbage_in_addresses_is_refused_not_crashed(ingress: InProcessIngress, persona: str) -> None:
    sock, reader = raw_session(ingress.port)
    with sock:
        read_reply(reader)
        sock.sendall(b"EHLO x\r\n")
        read_reply(reader)
        sock.sendall(b"MAIL FROM:<\xff\xfe@example.org>\r\n")
        assert read_reply(reader)[0].startswith(b"553 5.1.7")
        sock.sendall(b"MAIL FROM:<ok@example.org>\r\n")
        assert read_reply(reader)[0].startswith(b"250")
        sock.sendall(b"RCPT TO:<" + persona.encode() + b"+\xff@relay.test>\r\n")
        assert read_reply(reader)[0] == b"550 5.1.1 relay_rejected_recipient_invalid"


# --- drain --------------------------------------------------------------------------------


def test_stop_lets_an_open_transaction_finish_and_tells_idle_sessions_421(
    ingress: InProcessIngress, persona: str, redis_client: redis.Redis
) -> None:
    idle = open_session(ingress.port)
    busy = open_session(ingress.port)
    busy.mail("s@example.org")
    busy.rcpt(address(persona))

    ingress.request_stop()

    assert idle.getreply() == (421, b"4.3.2 service shutting down, try again later")
    with pytest.raises(OSError):  # the listener is closed: no new sessions
        socket.create_connection(("127.0.0.1", ingress.port), timeout=2).close()
    code, _ = busy.data(MESSAGE)
    assert code == 250
    assert busy.getreply()[0] == 421  # then the session is closed for the shutdown
    poll_until(lambda: ingress.stopped, message="ingress did not finish draining")
    assert len(inbox_entries(redis_client, persona)) == 1
