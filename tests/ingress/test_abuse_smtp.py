"""The SMTP abuse suite: each attack is refused with its documented reply (docs/SECURITY.md)
while an honest sender, connected before the attack from another address (127.0.0.2) and
sending throughout it, keeps completing transactions.

The ingress runs in-process against a real redis-server; attackers speak raw bytes over TCP
so they can do what no SMTP library would.
"""

from __future__ import annotations

import re
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from shared import keys
from tests.support.ingress import (
    InProcessIngress,
    address,
    inbox_entries,
    mark_seen,
    new_persona,
    split_trace_header,
)
from tests.support.wait import poll_until

StartIngress = Callable[..., InProcessIngress]
HONEST_IP = "127.0.0.2"
# Not 127.0.0.1: the readiness probe of the test ingress connects from there and may count
# towards that address's connection rate.
ATTACKER_IP = "127.0.0.3"
HONEST_PACING_S = 0.05  # the honest sender's rate, not a synchronisation
DRIP_INTERVAL_S = 0.25  # the slowloris attacker's rate: one byte per interval
MAX_MESSAGE_BYTES = 64 * 1024
MAX_RECIPIENTS = 3
PAUSE_MS = 800  # Redis paused: the greeting waits on the per-IP check, the early bytes arrive first
MAIL_SYNTAX = b"501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"  # aiosmtpd's own reply
RCPT_SYNTAX = b"501 Syntax: RCPT TO: <address> [SP <mail-parameters>]"
SENDER_INVALID = b"553 5.1.7 sender address has invalid characters"
RECIPIENT_INVALID = b"550 5.1.1 relay_rejected_recipient_invalid"
ABUSE_ENV = {
    # the honest sender must not trip the per-IP limits; the flood test lowers them again
    "RELAY_RATE_LIMITS_SMTP_MESSAGES_PER_MINUTE_PER_IP": "100000",
    "RELAY_RATE_LIMITS_SMTP_CONNECTIONS_PER_MINUTE_PER_IP": "100000",
    "RELAY_SMTP_MAX_RECIPIENTS": str(MAX_RECIPIENTS),
    "RELAY_SMTP_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
}


# --- the honest sender ---------------------------------------------------------------------


class HonestSender(threading.Thread):
    """One SMTP session from 127.0.0.2 running transaction after transaction until stopped."""

    def __init__(self, port: int, recipient: str) -> None:
        super().__init__(name="honest-sender", daemon=True)
        self._port = port
        self._recipient = recipient
        self._stopping = threading.Event()
        self.finished: list[tuple[float, int]] = []  # (monotonic end time, DATA reply code)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self._port, timeout=20, source_address=(HONEST_IP, 0)) as client:
                client.ehlo("honest.example")
                number = 0
                while not self._stopping.is_set():
                    number += 1
                    assert client.mail("honest@example.org")[0] == 250
                    assert client.rcpt(self._recipient)[0] == 250
                    code, _ = client.data(f"Subject: honest {number}\r\n\r\nhello\r\n".encode())
                    self.finished.append((time.monotonic(), code))
                    self._stopping.wait(HONEST_PACING_S)
        except BaseException as exc:
            self.error = exc

    def wait_running(self) -> None:
        poll_until(lambda: self.finished or self.error, message="honest sender never got going")
        assert self.error is None, self.error

    def assert_served_since(self, since: float) -> None:
        """At least one transaction completed with 250 after `since` (i.e. during the attack)."""
        poll_until(
            lambda: any(at > since for at, _ in self.finished) or self.error,
            message="honest sender starved during the attack",
        )
        assert self.error is None, self.error

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=20)
        assert self.error is None, self.error
        assert self.finished and all(code == 250 for _, code in self.finished), self.finished


# --- a raw attacker ------------------------------------------------------------------------


class RawClient:
    def __init__(self, port: int, *, read_greeting: bool = True, timeout_s: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s, source_address=(ATTACKER_IP, 0))
        self.reader = self.sock.makefile("rb")
        self.greeting = self.reply() if read_greeting else []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[bytes]:
        lines: list[bytes] = []
        while True:
            line = self.reader.readline()
            assert line, f"connection closed after {lines}"
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return lines

    def command(self, data: bytes) -> bytes:
        self.send(data)
        return self.reply()[-1]

    def closed(self) -> bool:
        return self.reader.readline() == b""

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def ingress_env() -> dict[str, str]:
    return ABUSE_ENV


@pytest.fixture
def victim(persona: str) -> str:
    """The persona the attacks are aimed at."""
    return persona


@pytest.fixture
def honest_factory(redis_client: redis.Redis) -> Iterator[Callable[[InProcessIngress], HonestSender]]:
    started: list[HonestSender] = []

    def start(ingress: InProcessIngress) -> HonestSender:
        persona_key = new_persona()
        mark_seen(redis_client, persona_key)
        sender = HonestSender(ingress.port, address(persona_key))
        sender.start()
        sender.wait_running()
        started.append(sender)
        return sender

    yield start
    for sender in started:
        sender.stop()


@pytest.fixture
def honest(ingress: InProcessIngress, honest_factory: Callable[[InProcessIngress], HonestSender]) -> HonestSender:
    return honest_factory(ingress)


def begin_transaction(client: RawClient, recipient: str) -> None:
    assert client.command(b"EHLO attacker.example\r\n").startswith(b"250 ")
    assert client.command(b"MAIL FROM:<a@attacker.example>\r\n") == b"250 2.1.0 OK"
    assert client.command(f"RCPT TO:<{recipient}>\r\n".encode()) == b"250 2.1.5 OK"
    assert client.command(b"DATA\r\n").startswith(b"354")


def unstuffed(data: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency removal: a leading dot of each CRLF-delimited line."""
    return re.sub(rb"(\A|\r\n)\.", rb"\1", data)


# --- SMTP smuggling ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\n", b"\r\n.\r", b"\r.\r"],
    ids=["LF.CRLF", "CRLF.LF", "CR.CRLF", "LF.LF", "CRLF.CR", "CR.CR"],
)
def test_smuggled_end_of_data_never_turns_one_message_into_two(
    ingress: InProcessIngress, honest: HonestSender, victim: str, redis_client: redis.Redis, fake_end: bytes
) -> None:
    attack_started = time.monotonic()
    content = (
        b"Subject: one\r\n\r\nfirst part"
        + fake_end
        + b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<"
        + address(victim).encode()
        + b">\r\nDATA\r\n"
        + b"Subject: smuggled\r\nFrom: ceo@victim.example\r\n\r\nsecond\r\n"
    )
    with RawClient(ingress.port) as attacker:
        begin_transaction(attacker, address(victim))
        assert attacker.command(content + b".\r\n").startswith(b"250 2.0.0 queued as ")
        honest.assert_served_since(attack_started)
        # exactly one reply came for all of it: the next one answers our QUIT
        assert attacker.command(b"QUIT\r\n").startswith(b"221")
    [entry] = inbox_entries(redis_client, victim)  # ONE message, the smuggled one inside it
    assert split_trace_header(entry.data)[1] == unstuffed(content)
    assert entry.mail_from == "a@attacker.example"


# --- open relay ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipient", "reply"),
    [
        ("{key}@elsewhere.example", b"550 5.7.1 relay access denied"),
        ("someone@gmail.com", b"550 5.1.1 relay_rejected_recipient_invalid"),
        ("postmaster@relay.test", b"550 5.1.1 relay_rejected_recipient_invalid"),
        ("someone%gmail.com@relay.test", b"550 5.1.1 relay_rejected_recipient_invalid"),
        ("@relay.test:someone@gmail.com", b"550 5.1.1 relay_rejected_recipient_invalid"),
        ('"someone@gmail.com"@relay.test', b"550 5.1.1 relay_rejected_recipient_invalid"),
        ("{key}@relay.test@gmail.com", b"553 5.1.3 Error: malformed address"),  # aiosmtpd's parser
    ],
)
def test_no_recipient_outside_our_personas_is_accepted(
    ingress: InProcessIngress,
    honest: HonestSender,
    victim: str,
    redis_client: redis.Redis,
    recipient: str,
    reply: bytes,
) -> None:
    attack_started = time.monotonic()
    with RawClient(ingress.port) as attacker:
        attacker.command(b"EHLO relay-abuser.example\r\n")
        assert attacker.command(b"MAIL FROM:<spam@attacker.example>\r\n").startswith(b"250")
        assert attacker.command(f"RCPT TO:<{recipient.format(key=victim)}>\r\n".encode()) == reply
        assert attacker.command(b"DATA\r\n").startswith(b"503")  # no recipient, no transaction
        honest.assert_served_since(attack_started)
    assert inbox_entries(redis_client, victim) == []
    assert not redis_client.exists(keys.EGRESS_QUEUE)


def test_without_mail_domains_only_persona_keys_are_accepted_and_only_into_their_inbox(
    start_ingress: StartIngress,
    honest_factory: Callable[[InProcessIngress], HonestSender],
    victim: str,
    redis_client: redis.Redis,
) -> None:
    ingress = start_ingress(RELAY_MAIL_DOMAINS="[]")
    honest = honest_factory(ingress)
    attack_started = time.monotonic()
    with RawClient(ingress.port) as attacker:
        attacker.command(b"EHLO relay-abuser.example\r\n")
        attacker.command(b"MAIL FROM:<spam@attacker.example>\r\n")
        for outside in (b"someone@gmail.com", b"postmaster@localhost", b"root", b"someone@[127.0.0.1]"):
            assert attacker.command(b"RCPT TO:<" + outside + b">\r\n") == b"550 5.1.1 relay_rejected_recipient_invalid"
        # a persona key on any domain is that persona's mail, nobody else's
        assert attacker.command(f"RCPT TO:<{victim}@gmail.com>\r\n".encode()) == b"250 2.1.5 OK"
        attacker.command(b"DATA\r\n")
        assert attacker.command(b"Subject: x\r\n\r\nhi\r\n.\r\n").startswith(b"250 2.0.0")
        honest.assert_served_since(attack_started)
    [entry] = inbox_entries(redis_client, victim)
    assert entry.rcpt_to == f"{victim}@gmail.com"
    assert not redis_client.exists(keys.EGRESS_QUEUE)  # SMTP has no path to the egress queue


# --- slowloris -----------------------------------------------------------------------------


def test_a_client_dripping_one_byte_at_a_time_is_cut_at_the_command_timeout_with_421(
    start_ingress: StartIngress, honest_factory: Callable[[InProcessIngress], HonestSender]
) -> None:
    ingress = start_ingress(RELAY_SMTP_COMMAND_TIMEOUT_SECONDS="1")
    honest = honest_factory(ingress)
    with RawClient(ingress.port) as attacker:
        attack_started = time.monotonic()
        replies = b""
        attacker.sock.settimeout(DRIP_INTERVAL_S)
        for byte in b"EHLO never-ending-" * 10:  # 180 bytes: 45 s at this rate, were it allowed
            try:
                attacker.send(bytes([byte]))
                chunk = attacker.sock.recv(4096)
            except TimeoutError:
                continue  # the server said nothing yet: keep dripping
            except OSError:
                break
            replies += chunk
            if not chunk or replies.endswith(b"\r\n"):
                break
        cut_after_s = time.monotonic() - attack_started
        honest.assert_served_since(attack_started)
    assert replies == b"421 4.4.2 timeout exceeded, closing connection\r\n"
    assert 0.5 < cut_after_s < 3.0  # 1 s from the connection, minus the greeting's own latency


def test_a_client_that_stops_mid_data_is_cut_with_421_and_nothing_is_queued(
    start_ingress: StartIngress,
    honest_factory: Callable[[InProcessIngress], HonestSender],
    victim: str,
    redis_client: redis.Redis,
) -> None:
    ingress = start_ingress(RELAY_SMTP_COMMAND_TIMEOUT_SECONDS="1")
    honest = honest_factory(ingress)
    with RawClient(ingress.port) as attacker:
        begin_transaction(attacker, address(victim))
        attack_started = time.monotonic()
        attacker.send(b"Subject: half\r\n\r\nthe rest never comes")
        assert attacker.reply() == [b"421 4.4.2 timeout exceeded, closing connection"]
        assert attacker.closed()
        assert time.monotonic() - attack_started < 3.0
        honest.assert_served_since(attack_started)
    assert inbox_entries(redis_client, victim) == []


# --- over-long lines -----------------------------------------------------------------------


@pytest.mark.parametrize("length", [600, 5000, 100_000])
def test_an_over_long_command_line_is_500_5_5_2_and_the_session_continues(
    ingress: InProcessIngress, honest: HonestSender, victim: str, redis_client: redis.Redis, length: int
) -> None:
    attack_started = time.monotonic()
    with RawClient(ingress.port) as attacker:
        attacker.command(b"EHLO long.example\r\n")
        line = b"RCPT TO:<" + b"a" * length + b"@relay.test>\r\n"
        assert attacker.command(b"MAIL FROM:<a@long.example>\r\n" + b"")[:3] == b"250"
        assert attacker.command(line) == b"500 5.5.2 command line too long"
        honest.assert_served_since(attack_started)
        # the session goes on: the transaction can still complete
        assert attacker.command(f"RCPT TO:<{address(victim)}>\r\n".encode()) == b"250 2.1.5 OK"
        attacker.command(b"DATA\r\n")
        assert attacker.command(b"Subject: ok\r\n\r\nhi\r\n.\r\n").startswith(b"250 2.0.0")
    assert len(inbox_entries(redis_client, victim)) == 1


def test_an_over_long_data_line_refuses_the_message_with_500_5_5_2_and_the_session_continues(
    ingress: InProcessIngress, honest: HonestSender, victim: str, redis_client: redis.Redis
) -> None:
    attack_started = time.monotonic()
    with RawClient(ingress.port) as attacker:
        begin_transaction(attacker, address(victim))
        too_long = b"Subject: wide\r\n\r\n" + b"x" * 1200 + b"\r\nafter\r\n.\r\n"
        assert attacker.command(too_long) == b"500 5.5.2 message line too long (RFC 5321 4.5.3.1.6)"
        honest.assert_served_since(attack_started)
        assert attacker.command(b"MAIL FROM:<a@attacker.example>\r\n") == b"250 2.1.0 OK"
        assert attacker.command(f"RCPT TO:<{address(victim)}>\r\n".encode()) == b"250 2.1.5 OK"
        attacker.command(b"DATA\r\n")
        assert attacker.command(b"Subject: narrow\r\n\r\n" + b"x" * 998 + b"\r\n.\r\n").startswith(b"250 2.0.0")
    [entry] = inbox_entries(redis_client, victim)
    assert b"Subject: narrow" in entry.data


# --- recipients and size -------------------------------------------------------------------


def test_recipients_beyond_the_cap_get_452_4_5_3(
    ingress: InProcessIngress, honest: HonestSender, redis_client: redis.Redis
) -> None:
    personas = [new_persona() for _ in range(MAX_RECIPIENTS + 2)]
    for persona_key in personas:
        mark_seen(redis_client, persona_key)
    attack_started = time.monotonic()
    with RawClient(ingress.port) as attacker:
        attacker.command(b"EHLO many.example\r\n")
        attacker.command(b"MAIL FROM:<a@many.example>\r\n")
        replies = [attacker.command(f"RCPT TO:<{address(key)}>\r\n".encode()) for key in personas]
        assert replies == [b"250 2.1.5 OK"] * MAX_RECIPIENTS + [b"452 4.5.3 relay_rejected_too_many_recipients"] * 2
        attacker.command(b"DATA\r\n")
        assert attacker.command(b"Subject: x\r\n\r\nhi\r\n.\r\n").startswith(b"250 2.0.0")
        honest.assert_served_since(attack_started)
    assert [len(inbox_entries(redis_client, key)) for key in personas] == [1] * MAX_RECIPIENTS + [0, 0]


def test_oversize_is_552_5_3_4_at_size_and_at_data(
    ingress: InProcessIngress, honest: HonestSender, victim: str, redis_client: redis.Redis
) -> None:
    attack_started = time.monotonic()
    with RawClient(ingress.port) as attacker:
        attacker.command(b"EHLO big.example\r\n")
        declared = f"MAIL FROM:<a@big.example> SIZE={MAX_MESSAGE_BYTES + 1}\r\n".encode()
        assert attacker.command(declared) == b"552 5.3.4 relay_rejected_message_too_large"
        # undeclared: refused only once the data is in (and not kept in memory meanwhile)
        attacker.command(b"MAIL FROM:<a@big.example>\r\n")
        attacker.command(f"RCPT TO:<{address(victim)}>\r\n".encode())
        attacker.command(b"DATA\r\n")
        body = (b"y" * 998 + b"\r\n") * (2 * MAX_MESSAGE_BYTES // 1000)
        assert attacker.command(b"Subject: big\r\n\r\n" + body + b".\r\n") == (
            b"552 5.3.4 relay_rejected_message_too_large"
        )
        honest.assert_served_since(attack_started)
        assert attacker.command(b"NOOP\r\n").startswith(b"250")
    assert inbox_entries(redis_client, victim) == []


# --- NUL and control bytes -----------------------------------------------------------------


def test_nul_bytes_in_commands_are_refused_and_never_echoed(
    ingress: InProcessIngress, honest: HonestSender, victim: str
) -> None:
    attack_started = time.monotonic()
    with RawClient(ingress.port) as attacker:
        attacker.command(b"EHLO nul.example\r\n")
        junk_reply = attacker.command(b"\x00\x00FOO\r\x00\r\n")
        assert junk_reply.startswith(b"500 ")
        assert not re.search(rb"[\x00-\x1f]", junk_reply)
        assert attacker.command(b"MAIL FROM:<a\x00b@nul.example>\r\n") == SENDER_INVALID
        assert attacker.command(b"MAIL FROM:<a@nul.example>\r\n") == b"250 2.1.0 OK"
        rcpt = b"RCPT TO:<" + victim.encode() + b"\x00@relay.test>\r\n"
        assert attacker.command(rcpt) == b"550 5.1.1 relay_rejected_recipient_invalid"
        honest.assert_served_since(attack_started)


def test_nul_bytes_in_data_are_stored_byte_for_byte_as_one_message(
    ingress: InProcessIngress, honest: HonestSender, victim: str, redis_client: redis.Redis
) -> None:
    """8-bit clean: NUL cannot end DATA or start a command; the gateway gets the exact bytes."""
    content = b"Subject: nul\x00inside\r\n\r\nbody\x00\r\n\x00.\r\n"
    attack_started = time.monotonic()
    with RawClient(ingress.port) as attacker:
        begin_transaction(attacker, address(victim))
        assert attacker.command(content + b".\r\n").startswith(b"250 2.0.0")
        honest.assert_served_since(attack_started)
        assert attacker.command(b"QUIT\r\n").startswith(b"221")
    [entry] = inbox_entries(redis_client, victim)
    assert split_trace_header(entry.data)[1] == content


# --- talking before the greeting -----------------------------------------------------------


def test_a_client_talking_before_the_greeting_gets_554_then_503_until_quit(
    ingress: InProcessIngress, honest: HonestSender, victim: str, redis_client: redis.Redis
) -> None:
    """RFC 5321 §4.3.1 / §3.1. Redis is paused for a moment so the greeting (sent after the
    per-IP check) certainly comes after the early bytes: the race is decided, not timed."""
    attack_started = time.monotonic()
    redis_client.client_pause(PAUSE_MS)
    with RawClient(ingress.port, read_greeting=False) as attacker:
        attacker.send(
            b"EHLO early.example\r\nMAIL FROM:<a@early.example>\r\nRCPT TO:<"
            + address(victim).encode()
            + b">\r\nDATA\r\n"
        )
        assert attacker.reply() == [b"554 5.5.1 protocol error: command sent before the greeting"]
        assert [attacker.reply() for _ in range(4)] == [[b"503 5.5.1 bad sequence of commands"]] * 4
        assert attacker.command(b"QUIT\r\n") == b"221 2.0.0 closing connection"
        assert attacker.closed()
    honest.assert_served_since(attack_started)
    assert inbox_entries(redis_client, victim) == []


def test_a_client_that_keeps_talking_after_554_is_disconnected(
    ingress: InProcessIngress, redis_client: redis.Redis
) -> None:
    redis_client.client_pause(PAUSE_MS)
    with RawClient(ingress.port, read_greeting=False) as attacker:
        attacker.send(b"NOOP\r\n" * 12)
        assert attacker.reply()[0].startswith(b"554 5.5.1")
        replies = [attacker.reader.readline() for _ in range(11)]
        assert replies[:10] == [b"503 5.5.1 bad sequence of commands\r\n"] * 10
        assert replies[10] in (b"503 5.5.1 bad sequence of commands\r\n", b"")
        assert attacker.closed()


# --- connection flood ----------------------------------------------------------------------


def test_a_connection_flood_from_one_ip_gets_421_while_another_ip_is_served(
    start_ingress: StartIngress, honest_factory: Callable[[InProcessIngress], HonestSender]
) -> None:
    ingress = start_ingress(RELAY_RATE_LIMITS_SMTP_CONNECTIONS_PER_MINUTE_PER_IP="5")
    honest = honest_factory(ingress)  # its one connection from 127.0.0.2 counts 1 of that IP's 5
    attack_started = time.monotonic()
    flood = [RawClient(ingress.port, read_greeting=False) for _ in range(20)]
    try:
        greetings = [client.reply()[0] for client in flood]
        admitted = [greeting for greeting in greetings if greeting.startswith(b"220 ")]
        refused = [greeting for greeting in greetings if not greeting.startswith(b"220 ")]
        assert len(admitted) == 5
        assert refused == [b"421 4.7.0 relay_rejected_connection_rate_limited"] * 15
        honest.assert_served_since(attack_started)
        # a new connection from the other address is still welcome, mid-flood
        with smtplib.SMTP("127.0.0.1", ingress.port, timeout=10, source_address=(HONEST_IP, 0)) as other:
            assert other.ehlo("other.example")[0] == 250
    finally:
        for client in flood:
            client.close()


# --- header injection through the envelope -------------------------------------------------


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"MAIL FROM:<a@inject.example\rX-Injected: yes>", MAIL_SYNTAX),
        (b"MAIL FROM:a@inject.example\rX-Injected: yes", MAIL_SYNTAX),
        (b"MAIL FROM:<a@inject.example> X=\rX-Injected: yes", MAIL_SYNTAX),
        (b"MAIL FROM:<a\r@inject.example>", SENDER_INVALID),
        (b'MAIL FROM:<"a\rX-Injected: yes"@inject.example>', SENDER_INVALID),
        (b"RCPT TO:<{key}@relay.test\rX-Injected: yes>", RCPT_SYNTAX),
        (b"RCPT TO:<{key}+\rX-Injected:yes@relay.test>", RCPT_SYNTAX),
        (b'RCPT TO:<"{key}\rX-Injected: yes"@relay.test>', RECIPIENT_INVALID),
    ],
)
def test_cr_in_envelope_addresses_is_refused(
    ingress: InProcessIngress,
    honest: HonestSender,
    victim: str,
    redis_client: redis.Redis,
    command: bytes,
    reply: bytes,
) -> None:
    attack_started = time.monotonic()
    with RawClient(ingress.port) as attacker:
        attacker.command(b"EHLO inject.example\r\n")
        if command.startswith(b"RCPT"):
            assert attacker.command(b"MAIL FROM:<a@inject.example>\r\n") == b"250 2.1.0 OK"
        assert attacker.command(command.replace(b"{key}", victim.encode()) + b"\r\n") == reply
        honest.assert_served_since(attack_started)
        assert attacker.command(b"DATA\r\n").startswith(b"503")  # no transaction came of it
    assert inbox_entries(redis_client, victim) == []


def test_line_breaks_in_helo_and_envelope_never_reach_the_stored_headers(
    ingress: InProcessIngress, honest: HonestSender, victim: str, redis_client: redis.Redis
) -> None:
    attack_started = time.monotonic()
    with RawClient(ingress.port) as attacker:
        attacker.command(b"EHLO inject.example\rX-Injected: helo\r\n")
        # a bare LF ends a command line: the rest is a separate (unknown) command, not a header
        attacker.send(b"MAIL FROM:<a@inject.example>\nX-Injected: mail\r\n")
        assert attacker.reply() == [b"250 2.1.0 OK"]
        assert attacker.reply()[0].startswith(b"500 ")
        attacker.send(b"RCPT TO:<" + address(victim).encode() + b">\nX-Injected: rcpt\r\n")
        assert attacker.reply() == [b"250 2.1.5 OK"]
        assert attacker.reply()[0].startswith(b"500 ")
        attacker.command(b"DATA\r\n")
        assert attacker.command(b"Subject: clean\r\n\r\nhi\r\n.\r\n").startswith(b"250 2.0.0")
        honest.assert_served_since(attack_started)
    [entry] = inbox_entries(redis_client, victim)
    trace, original = split_trace_header(entry.data)
    assert original == b"Subject: clean\r\n\r\nhi\r\n"
    assert not re.search(rb"[\r\n]X-Injected", entry.data)  # the HELO text stays inside its line
    assert b"from inject.example_X-Injected:_helo (" in trace
    assert re.fullmatch(rb"Received: from [^\r\n]+\r\n\tby [^\r\n]+\r\n\tfor <[^\r\n]+>; [^\r\n]+\r\n", trace)
    assert (entry.mail_from, entry.rcpt_to) == ("a@inject.example", address(victim))
