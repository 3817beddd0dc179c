"""SMTP delivery attempts against real local MX sinks, resolved through a real local DNS server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import trustme

from services.egress.delivery import Deliverer, SmtpSettings
from services.egress.mx import MxResolver
from services.egress.outcome import Disposition
from services.egress.smtp_pool import SmtpPool
from tests.support.dns_server import DnsServer
from tests.support.mx_sink import HangingServer, MxSink

MESSAGE = b"From: p@relay.test\r\nTo: user@example.test\r\nSubject: hi\r\n\r\nhello\r\n.dot line\r\n"


def deliverer(
    dns_server: DnsServer,
    smtp_port: int,
    *,
    timeout_s: float = 5,
    verify: bool = False,
    pool: SmtpPool | None = None,
    allow_private: bool = True,  # the sinks listen on loopback
) -> Deliverer:
    resolver = MxResolver(nameservers=[dns_server.nameserver], smtp_port=smtp_port, lifetime_s=2)
    settings = SmtpSettings(
        "egress.relay.test", timeout_s, timeout_s, verify_tls=verify, allow_private_destinations=allow_private
    )
    return Deliverer(resolver, settings, pool)


async def test_message_is_sent_to_the_preferred_mx(dns_server: DnsServer, smtp_port: int) -> None:
    with MxSink("127.0.0.2", smtp_port) as mx1, MxSink("127.0.0.3", smtp_port) as mx2:
        report = await deliverer(dns_server, smtp_port).deliver(
            "example.test", "p@relay.test", ["user@example.test"], MESSAGE
        )
    outcome = report.outcomes["user@example.test"]
    [received] = mx1.received()
    assert outcome.disposition is Disposition.SENT and outcome.message_id == received.queue_id
    assert (outcome.smtp_code, outcome.enhanced_code) == (250, "2.0.0")
    assert received.data == MESSAGE
    assert (received.mail_from, received.rcpt_tos, received.helo) == (
        "p@relay.test",
        ["user@example.test"],
        "egress.relay.test",
    )
    assert mx2.received() == [] and report.host == "mx1.example.test"


async def test_null_sender_is_sent_as_empty_reverse_path(dns_server: DnsServer, smtp_port: int) -> None:
    with MxSink("127.0.0.2", smtp_port) as mx1:
        report = await deliverer(dns_server, smtp_port).deliver("example.test", "", ["user@example.test"], MESSAGE)
    assert report.outcomes["user@example.test"].sent
    assert mx1.received()[0].mail_from == "<>"


async def test_unreachable_first_mx_falls_through_to_the_second(dns_server: DnsServer, smtp_port: int) -> None:
    with MxSink("127.0.0.3", smtp_port) as mx2:  # nothing listens on 127.0.0.2
        report = await deliverer(dns_server, smtp_port).deliver(
            "example.test", "p@relay.test", ["user@example.test"], MESSAGE
        )
    assert report.outcomes["user@example.test"].sent
    assert len(mx2.received()) == 1 and report.host == "mx2.example.test"
    assert report.skipped == ["mx1.example.test[127.0.0.2]:connection_failed"]


async def test_no_reachable_mx_is_a_temporary_connection_failure(dns_server: DnsServer, smtp_port: int) -> None:
    report = await deliverer(dns_server, smtp_port).deliver("example.test", "p@relay.test", ["u@example.test"], MESSAGE)
    outcome = report.outcomes["u@example.test"]
    assert (outcome.disposition, outcome.error) == (Disposition.TEMPORARY, "connection_failed")
    assert report.connections == 2


async def test_hanging_mx_times_out_and_the_next_one_is_used(dns_server: DnsServer, smtp_port: int) -> None:
    with HangingServer("127.0.0.2", smtp_port) as hanging, MxSink("127.0.0.3", smtp_port) as mx2:
        started = time.monotonic()
        report = await deliverer(dns_server, smtp_port, timeout_s=1).deliver(
            "example.test", "p@relay.test", ["user@example.test"], MESSAGE
        )
        elapsed = time.monotonic() - started
    assert report.outcomes["user@example.test"].sent and len(mx2.received()) == 1
    assert hanging.connections and elapsed < 4


async def test_5xx_recipient_refusal_is_permanent(dns_server: DnsServer, smtp_port: int) -> None:
    with MxSink("127.0.0.2", smtp_port, rcpt_reply="550 5.1.1 user unknown") as mx1:
        report = await deliverer(dns_server, smtp_port).deliver(
            "example.test", "p@relay.test", ["nobody@example.test"], MESSAGE
        )
    outcome = report.outcomes["nobody@example.test"]
    assert (outcome.disposition, outcome.smtp_code, outcome.enhanced_code, outcome.error) == (
        Disposition.PERMANENT,
        550,
        "5.1.1",
        "smtp_5xx: 550 5.1.1 user unknown",
    )
    assert mx1.received() == []


async def test_4xx_at_data_is_temporary(dns_server: DnsServer, smtp_port: int) -> None:
    with MxSink("127.0.0.2", smtp_port, data_replies=["451 4.3.0 try again later"]) as mx1:
        report = await deliverer(dns_server, smtp_port).deliver(
            "example.test", "p@relay.test", ["user@example.test"], MESSAGE
        )
    outcome = report.outcomes["user@example.test"]
    assert (outcome.disposition, outcome.smtp_code) == (Disposition.TEMPORARY, 451)
    assert mx1.data_payloads == [MESSAGE] and mx1.received() == []


async def test_recipients_of_one_domain_share_one_transaction(dns_server: DnsServer, smtp_port: int) -> None:
    refusals = {"gone@example.test": "550 5.1.1 no such user"}
    with MxSink("127.0.0.2", smtp_port, rcpt_replies=refusals) as mx1:
        report = await deliverer(dns_server, smtp_port).deliver(
            "example.test", "p@relay.test", ["a@example.test", "gone@example.test", "b@example.test"], MESSAGE
        )
    [received] = mx1.received()
    assert received.rcpt_tos == ["a@example.test", "b@example.test"]
    assert report.connections == 1
    assert [report.outcomes[r].disposition for r in ("a@example.test", "gone@example.test", "b@example.test")] == [
        Disposition.SENT,
        Disposition.PERMANENT,
        Disposition.SENT,
    ]


async def test_starttls_is_used_when_offered(dns_server: DnsServer, smtp_port: int, ca: trustme.CA) -> None:
    with MxSink("127.0.0.2", smtp_port, tls_cert=ca.issue_cert("someone-else.test")) as mx1:
        report = await deliverer(dns_server, smtp_port).deliver(
            "example.test", "p@relay.test", ["user@example.test"], MESSAGE
        )
    assert report.outcomes["user@example.test"].sent and report.tls
    assert mx1.received()[0].tls and mx1.received()[0].data == MESSAGE


async def test_verified_tls_checks_the_mx_name(
    dns_server: DnsServer, smtp_port: int, ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    with (
        MxSink("127.0.0.2", smtp_port, tls_cert=ca.issue_cert("wrong-name.test")) as mx1,
        MxSink("127.0.0.3", smtp_port, tls_cert=ca.issue_cert("mx2.example.test")) as mx2,
    ):
        report = await deliverer(dns_server, smtp_port, verify=True).deliver(
            "example.test", "p@relay.test", ["user@example.test"], MESSAGE
        )
    assert report.outcomes["user@example.test"].sent
    assert mx1.received() == [] and mx2.received()[0].tls
    assert report.skipped == ["mx1.example.test[127.0.0.2]:tls_failed"]


# --- cached connections (SmtpPool) -----------------------------------------------------------


async def send_n(sender: Deliverer, count: int) -> list[bool]:
    sent = []
    for index in range(count):
        report = await sender.deliver("example.test", "p@relay.test", [f"u{index}@example.test"], MESSAGE)
        sent.append(report.outcomes[f"u{index}@example.test"].sent)
    return sent


async def test_messages_to_one_host_share_a_cached_connection(dns_server: DnsServer, smtp_port: int) -> None:
    pool = SmtpPool(idle_s=30, max_uses=100)
    sender = deliverer(dns_server, smtp_port, pool=pool)
    with MxSink("127.0.0.2", smtp_port) as mx1:
        assert await send_n(sender, 3) == [True, True, True]
        assert pool.idle_count() == 1
        await sender.close()
        assert pool.idle_count() == 0
    received = mx1.received()
    assert [m.rcpt_tos for m in received] == [["u0@example.test"], ["u1@example.test"], ["u2@example.test"]]
    assert len({m.peer for m in received}) == 1 and all(m.data == MESSAGE for m in received)


async def test_without_a_pool_every_message_has_its_own_connection(dns_server: DnsServer, smtp_port: int) -> None:
    with MxSink("127.0.0.2", smtp_port) as mx1:
        assert await send_n(deliverer(dns_server, smtp_port), 2) == [True, True]
    assert len({m.peer for m in mx1.received()}) == 2


async def test_cached_connection_refused_at_mail_is_replaced_by_a_new_one(
    dns_server: DnsServer, smtp_port: int
) -> None:
    sender = deliverer(dns_server, smtp_port, pool=SmtpPool(idle_s=30, max_uses=100))
    with (
        MxSink("127.0.0.2", smtp_port, reused_mail_reply="421 4.4.2 idle too long") as mx1,
        MxSink("127.0.0.3", smtp_port) as mx2,
    ):
        assert await send_n(sender, 2) == [True, True]
        await sender.close()
    first, second = mx1.received()
    assert first.peer != second.peer and mx2.received() == []  # same host again, not the next MX


async def test_connection_closed_by_the_server_while_cached_is_not_used(dns_server: DnsServer, smtp_port: int) -> None:
    sender = deliverer(dns_server, smtp_port, pool=SmtpPool(idle_s=30, max_uses=100))
    with MxSink("127.0.0.2", smtp_port) as mx1:
        assert await send_n(sender, 1) == [True]
        mx1.drop_connections()
        assert await send_n(sender, 1) == [True]
        await sender.close()
    assert len({m.peer for m in mx1.received()}) == 2


async def test_idle_connection_expires_and_uses_are_capped(dns_server: DnsServer, smtp_port: int) -> None:
    pool = SmtpPool(idle_s=0.2, max_uses=2)
    sender = deliverer(dns_server, smtp_port, pool=pool)
    with MxSink("127.0.0.2", smtp_port) as mx1:
        assert await send_n(sender, 3) == [True, True, True]  # uses: a, a (retired), b
        deadline = time.monotonic() + 5
        while pool.idle_count():
            assert time.monotonic() < deadline, "idle connection not expired"
            await asyncio.sleep(0.05)
        assert await send_n(sender, 1) == [True]  # c: b expired
        await sender.close()
    peers = [m.peer for m in mx1.received()]
    assert peers[0] == peers[1] and len(set(peers)) == 3


async def test_connection_is_not_cached_after_a_refused_message(dns_server: DnsServer, smtp_port: int) -> None:
    pool = SmtpPool(idle_s=30, max_uses=100)
    sender = deliverer(dns_server, smtp_port, pool=pool)
    with MxSink("127.0.0.2", smtp_port, data_replies=["554 5.6.0 rejected"]) as mx1:
        assert await send_n(sender, 1) == [False]
        assert pool.idle_count() == 0
        assert await send_n(sender, 1) == [True]
        await sender.close()
    assert len(mx1.data_payloads) == 2


async def test_cached_tls_connection_stays_tls(dns_server: DnsServer, smtp_port: int, ca: trustme.CA) -> None:
    sender = deliverer(dns_server, smtp_port, pool=SmtpPool(idle_s=30, max_uses=100))
    with MxSink("127.0.0.2", smtp_port, tls_cert=ca.issue_cert("mx1.example.test")) as mx1:
        first = await sender.deliver("example.test", "p@relay.test", ["a@example.test"], MESSAGE)
        second = await sender.deliver("example.test", "p@relay.test", ["b@example.test"], MESSAGE)
        await sender.close()
    assert first.tls and second.tls
    received = mx1.received()
    assert all(m.tls for m in received) and received[0].peer == received[1].peer
