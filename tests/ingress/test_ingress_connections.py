"""The per-IP cap on concurrent SMTP connections (`rateLimits.smtpConcurrentConnectionsPerIp`).

The connection *rate* limit alone let one address hold `rate x commandTimeoutSeconds / 60`
idle sessions; the cap bounds what one IP holds open in one ingress process, and refuses the
one over it with `421 4.7.0` before the greeting, while other addresses are served.
"""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Callable

import redis
from prometheus_client import REGISTRY

from shared.config import RateLimitsConfig
from tests.support.ingress import (
    InProcessIngress,
    address,
    inbox_entries,
    mark_seen,
    new_persona,
)
from tests.support.wait import poll_until

StartIngress = Callable[..., InProcessIngress]
CAP = 3
REFUSAL = b"421 4.7.0 relay_rejected_too_many_connections\r\n"
MESSAGE = b"Subject: capped\r\n\r\nfrom the other address\r\n"


def connect(port: int, source_ip: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source_ip, 0))


def first_reply(sock: socket.socket) -> bytes:
    """The greeting line, or the refusal followed by the server closing the connection."""
    reader = sock.makefile("rb")
    line: bytes = reader.readline()
    return line


def hold(port: int) -> socket.socket:
    """A greeted connection, kept open. Retried: the server forgets a connection we closed a
    moment ago (the start-up port probe, an earlier test step) asynchronously."""

    def attempt() -> socket.socket | None:
        sock = connect(port)
        if first_reply(sock).startswith(b"220 "):
            return sock
        sock.close()
        return None

    held: socket.socket = poll_until(attempt, timeout_s=5, message="no slot for a first connection")
    return held


def refusals() -> float:
    return (
        REGISTRY.get_sample_value("relay_ingress_rejections_total", {"reason": "too_many_connections", "code": "421"})
        or 0.0
    )


def test_the_default_cap_is_20_per_ip() -> None:
    assert RateLimitsConfig().smtpConcurrentConnectionsPerIp == 20  # DESIGN.md: per-IP inbound connections 20


def test_one_ip_over_the_cap_gets_421_before_the_greeting_and_another_ip_is_served(
    start_ingress: StartIngress, redis_client: redis.Redis
) -> None:
    ingress = start_ingress(RELAY_RATE_LIMITS_SMTP_CONCURRENT_CONNECTIONS_PER_IP=str(CAP))
    persona = new_persona()
    mark_seen(redis_client, persona)
    refused_before = refusals()
    held = [hold(ingress.port) for _ in range(CAP)]
    try:
        over = connect(ingress.port)
        with over:
            assert first_reply(over) == REFUSAL
            assert over.recv(1) == b""  # closed after the refusal
        assert refusals() - refused_before == 1

        # another address holds nothing here: greeted, and its mail goes through
        other = connect(ingress.port, "127.0.0.2")
        with other:
            assert first_reply(other).startswith(b"220 ")
        code, _ = send_raw_from_other_ip(ingress.port, persona)
        assert code == 250
        assert len(inbox_entries(redis_client, persona)) == 1
    finally:
        closing = held.pop()
        closing.close()

    # one held connection closed: the IP is under the cap again
    poll_until(lambda: greeted(ingress.port), timeout_s=10, message="a freed slot was not reused")
    for sock in held:
        sock.close()


def test_refused_connections_do_not_take_a_slot(start_ingress: StartIngress) -> None:
    """A refused connection is closed at once, so a burst over the cap cannot lock the IP out."""
    ingress = start_ingress(RELAY_RATE_LIMITS_SMTP_CONCURRENT_CONNECTIONS_PER_IP="1")
    with hold(ingress.port):
        for _ in range(5):
            with connect(ingress.port) as over:
                assert first_reply(over) == REFUSAL
    poll_until(lambda: greeted(ingress.port), timeout_s=10, message="IP still locked out after closing")


def greeted(port: int) -> bool:
    with connect(port) as sock:
        return first_reply(sock).startswith(b"220 ")


def send_raw_from_other_ip(port: int, persona: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0)) as client:
        client.ehlo("other.example")
        assert client.mail("s@example.org")[0] == 250
        assert client.rcpt(address(persona))[0] == 250
        return client.data(MESSAGE)


def test_clients_that_leave_before_the_greeting_free_their_slot(start_ingress: StartIngress) -> None:
    """Connect-and-close (TCP health checks, scanners) while the ingress checks the rate in Redis:
    aiosmtpd's EOF cancellation must not leave the connection open until the command timeout
    (before the fix about half of these stayed open for `commandTimeoutSeconds`)."""
    ingress = start_ingress(RELAY_RATE_LIMITS_SMTP_CONCURRENT_CONNECTIONS_PER_IP=str(CAP))
    for attempt in range(30):
        sock = connect(ingress.port)
        time.sleep(attempt % 3 / 1000)  # 0-2 ms: the EOF lands before, during or after the check
        sock.close()
    held = [hold(ingress.port) for _ in range(CAP)]  # within hold()'s 5 s, not the 300 s timeout
    try:
        with connect(ingress.port) as over:
            assert first_reply(over) == REFUSAL
    finally:
        for sock in held:
            sock.close()
    poll_until(
        lambda: REGISTRY.get_sample_value("relay_ingress_open_connections") == 0,
        timeout_s=5,
        message="connections still counted open after every client left",
    )
