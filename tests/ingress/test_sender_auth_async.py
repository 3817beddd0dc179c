"""Sender authentication off the critical path: asyncio lookups, many in flight, a TTL cache,
and SPF started at the first accepted RCPT so it overlaps the message upload.

Against the local authoritative test server (tests/support/dns_server.py); the in-process
ingress speaks SMTP over loopback TCP to smtplib.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import time
from collections.abc import Awaitable, Callable, Iterator

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
import redis

from protege_relay.embedded_redis import EmbeddedRedis
from services.ingress.sender_auth.evaluator import PolicyCache, SenderFacts, SpfCache, evaluate_async, evaluate_spf
from services.ingress.sender_auth.resolver import AsyncDns, BoundedResolver, NeedLookup, build_resolver, replay
from services.ingress.sender_auth.spf_prefetch import SpfPrefetch
from shared.attestation import Signal
from tests.support.dns_server import DnsServer
from tests.support.ingress import InProcessIngress, address, inbox_entries, ingress_starter, mark_seen, new_persona
from tests.support.sender_auth import HONEST_IP, SENDER_DOMAIN, dkim_key, message_from, sender_zones, txt
from tests.support.wait import eventually, poll_until

StartIngress = Callable[..., InProcessIngress]
DEADLINE_S = 10.0
POLL_S = 0.05


async def seconds_until_answer(ask: Callable[[], Awaitable[str]], answer: str) -> float:
    """Seconds from now until `ask()` gives `answer`: a cached answer's TTL running out."""
    started = time.monotonic()

    async def answered() -> bool:
        return await ask() == answer

    await eventually(answered, DEADLINE_S, f"never answered {answer!r}", interval_s=POLL_S)
    return time.monotonic() - started


def spf_queries(server: DnsServer, domain: str = SENDER_DOMAIN) -> int:
    return server.queries.count((f"{domain}.", "TXT"))


def test_a_second_message_from_the_same_domain_asks_no_nameserver() -> None:
    signed = dkim_key().sign(message_from(f"alice@{SENDER_DOMAIN}"))

    async def twice(server: DnsServer) -> list[dict[str, Signal]]:
        dns_client = AsyncDns(build_resolver([server.nameserver]))
        facts = SenderFacts(HONEST_IP, "mta.sender.test", f"bounce@{SENDER_DOMAIN}", signed)
        first = await evaluate_async(dns_client, facts, time.monotonic() + 5)
        asked = len(server.queries)
        second = await evaluate_async(dns_client, facts, time.monotonic() + 5)
        assert len(server.queries) == asked, server.queries[asked:]
        print(f"queries: first message {asked}, second 0")
        return [first.signals(), second.signals()]

    with DnsServer(sender_zones()) as server:
        signals = asyncio.run(twice(server))
    assert signals == [{"spf": "pass", "dkim": "pass", "dmarc": "pass"}] * 2


def test_spf_results_are_reused_only_until_their_records_expire() -> None:
    """The SPF result cache answers for the record's TTL (1 s here), then sees the new record."""

    async def before_and_after(server: DnsServer) -> tuple[str, str, float]:
        dns_client = AsyncDns(build_resolver([server.nameserver]))
        cache = SpfCache()

        async def spf() -> str:
            result = await evaluate_spf(
                dns_client, HONEST_IP, f"b@{SENDER_DOMAIN}", "h.test", time.monotonic() + 5, cache
            )
            return result.result

        first = await spf()
        server.set_records(SENDER_DOMAIN, {"TXT": [txt("v=spf1 -all")]})
        cached = await spf()
        return first, cached, await seconds_until_answer(spf, "fail")

    with DnsServer(sender_zones(), ttl_s=1) as server:
        first, cached, seen_after_s = asyncio.run(before_and_after(server))
    print(f"new SPF record seen {seen_after_s:.2f} s after the change (TTL 1 s)")
    assert (first, cached) == ("pass", "pass")
    assert 0.5 < seen_after_s < 3.0


def test_dmarc_policies_are_reused_only_until_their_records_expire() -> None:
    """The policy cache answers for the `_dmarc` record's TTL (1 s here), then sees the new one;
    a DNS failure is never kept (the nameserver gone: temperror, then the record again)."""
    message = message_from(f"alice@{SENDER_DOMAIN}")

    async def before_and_after(server: DnsServer) -> tuple[str, str, float]:
        dns_client = AsyncDns(build_resolver([server.nameserver]))
        cache = PolicyCache()

        async def policy() -> str:
            facts = SenderFacts(HONEST_IP, "h.test", f"b@{SENDER_DOMAIN}", message)
            verdict = await evaluate_async(dns_client, facts, time.monotonic() + 5, policy_cache=cache)
            return verdict.dmarc.policy

        first = await policy()
        server.set_records(f"_dmarc.{SENDER_DOMAIN}", {"TXT": [txt("v=DMARC1; p=none")]})
        cached = await policy()
        return first, cached, await seconds_until_answer(policy, "none")

    with DnsServer(sender_zones(), ttl_s=1) as server:
        first, cached, seen_after_s = asyncio.run(before_and_after(server))
    print(f"new DMARC record seen {seen_after_s:.2f} s after the change (TTL 1 s)")
    assert (first, cached) == ("reject", "reject")
    assert 0.5 < seen_after_s < 3.0


def test_a_dmarc_lookup_that_failed_is_not_cached() -> None:
    message = message_from(f"alice@{SENDER_DOMAIN}")
    cache = PolicyCache()

    async def evaluate(server_address: str, budget_s: float) -> str:
        dns_client = AsyncDns(build_resolver([server_address]))
        facts = SenderFacts(HONEST_IP, "h.test", f"b@{SENDER_DOMAIN}", message)
        verdict = await evaluate_async(dns_client, facts, time.monotonic() + budget_s, policy_cache=cache)
        return verdict.dmarc.result

    with DnsServer(sender_zones()) as server:
        nameserver = server.nameserver
    failed = asyncio.run(evaluate(nameserver, 0.3))  # the server is gone: no answer in time
    with DnsServer(sender_zones()) as server:
        answered = asyncio.run(evaluate(server.nameserver, 5))
    assert failed == "temperror"
    assert answered == "pass"  # looked up again (SPF aligned), not the cached failure


def test_concurrent_evaluations_share_one_query_per_name() -> None:
    """Fifty messages at once from one domain: one SPF query on the wire, not fifty."""

    async def many(server: DnsServer) -> list[str]:
        dns_client = AsyncDns(build_resolver([server.nameserver]))
        facts = SenderFacts(HONEST_IP, "mta.sender.test", f"b@{SENDER_DOMAIN}", message_from(f"a@{SENDER_DOMAIN}"))
        verdicts = await asyncio.gather(*(evaluate_async(dns_client, facts, time.monotonic() + 5) for _ in range(50)))
        return [verdict.signals()["spf"] for verdict in verdicts]

    with DnsServer(sender_zones()) as server:
        results = asyncio.run(many(server))
        assert spf_queries(server) == 1
    assert results == ["pass"] * 50


def test_silent_dns_holds_many_evaluations_for_one_budget_not_a_queue_of_them() -> None:
    """With a nameserver that never answers, 40 evaluations at once all end at the budget.
    (Eight threads each waiting on sequential lookups took 40 / 8 budgets.)"""
    budget_s = 1.0

    async def many(server: DnsServer) -> tuple[float, list[dict[str, Signal]]]:
        dns_client = AsyncDns(build_resolver([server.nameserver]))
        started = time.monotonic()
        verdicts = await asyncio.gather(
            *(
                evaluate_async(
                    dns_client,
                    SenderFacts(HONEST_IP, "h.test", f"b@d{index}.test", message_from(f"a@d{index}.test")),
                    started + budget_s,
                )
                for index in range(40)
            )
        )
        return time.monotonic() - started, [verdict.signals() for verdict in verdicts]

    zones = {f"d{index}.test": {"TXT": [txt("v=spf1 -all")]} for index in range(40)}
    with DnsServer(zones, silent=set(zones)) as server:
        elapsed_s, signals = asyncio.run(many(server))
    print(f"40 evaluations against a silent nameserver, budget {budget_s} s: {elapsed_s:.2f} s")
    assert elapsed_s < budget_s * 2.5
    assert all(signal == {"spf": "unknown", "dkim": "unknown", "dmarc": "unknown"} for signal in signals)


def test_replay_runs_a_blocking_check_until_it_missed_no_name() -> None:
    """A check that needs b's address only after a's: two fetch rounds, then the answer."""

    async def chained(server: DnsServer, dns_client: AsyncDns) -> tuple[str, int]:
        resolver = BoundedResolver(dns_client, time.monotonic() + 5)
        runs = 0

        def check() -> str:
            nonlocal runs
            runs += 1
            try:
                first = resolver.txt("a.test")[0].decode()
                return str(resolver.resolve(first, "A")[0])
            except NeedLookup:
                return "incomplete"

        return await replay(resolver, check), runs

    async def twice(server: DnsServer) -> list[tuple[str, int]]:
        dns_client = AsyncDns(build_resolver([server.nameserver]))
        return [await chained(server, dns_client), await chained(server, dns_client)]

    zones = {"a.test": {"TXT": [txt("b.test")]}, "b.test": {"A": ["192.0.2.7"]}}
    with DnsServer(zones) as server:
        # the second evaluation finds both names in the process's cache: one run, no replay
        assert asyncio.run(twice(server)) == [("192.0.2.7", 3), ("192.0.2.7", 1)]


# --- over SMTP -------------------------------------------------------------------------------


@pytest.fixture
def start_ingress(redis_server: EmbeddedRedis) -> Iterator[StartIngress]:
    yield from ingress_starter(redis_server)


def test_spf_is_looked_up_during_the_transaction_before_the_message_arrives(
    start_ingress: StartIngress, redis_client: redis.Redis
) -> None:
    persona = new_persona()
    mark_seen(redis_client, persona)
    with DnsServer(sender_zones()) as server:
        ingress = start_ingress(
            RELAY_SMTP_EVALUATE_SENDER_AUTH="true", RELAY_SMTP_AUTH_NAMESERVERS=json.dumps([server.nameserver])
        )
        with smtplib.SMTP("127.0.0.1", ingress.port, timeout=30) as client:
            client.ehlo("mta.sender.test")
            assert client.mail(f"bounce@{SENDER_DOMAIN}")[0] == 250
            assert spf_queries(server) == 0  # not at MAIL FROM: a refused RCPT costs no DNS
            assert client.rcpt(address(persona))[0] == 250
            poll_until(lambda: spf_queries(server) == 1, DEADLINE_S, message="SPF not asked before DATA")
            code, _ = client.data(message_from(f"alice@{SENDER_DOMAIN}"))
        assert code == 250
        assert spf_queries(server) == 1
    [entry] = inbox_entries(redis_client, persona)
    assert b"\tspf=pass smtp.mailfrom=bounce@sender.test;\r\n" in entry.data


def test_a_new_transaction_with_another_sender_gets_its_own_spf(
    start_ingress: StartIngress, redis_client: redis.Redis
) -> None:
    persona = new_persona()
    mark_seen(redis_client, persona)
    zones = sender_zones()
    zones["other.test"] = {"TXT": [txt("v=spf1 -all")]}
    with DnsServer(zones) as server:
        ingress = start_ingress(
            RELAY_SMTP_EVALUATE_SENDER_AUTH="true", RELAY_SMTP_AUTH_NAMESERVERS=json.dumps([server.nameserver])
        )
        with smtplib.SMTP("127.0.0.1", ingress.port, timeout=30) as client:
            client.ehlo("mta.sender.test")
            assert client.mail(f"bounce@{SENDER_DOMAIN}")[0] == 250
            assert client.rcpt(address(persona))[0] == 250
            assert client.rset()[0] == 250
            assert client.mail("x@other.test")[0] == 250
            assert client.rcpt(address(persona))[0] == 250
            code, _ = client.data(message_from("x@other.test"))
        assert code == 250
    [entry] = inbox_entries(redis_client, persona)
    assert b"\tspf=fail smtp.mailfrom=x@other.test;\r\n" in entry.data


def test_a_lookup_heavy_spf_record_is_bounded_while_an_honest_sender_is_evaluated() -> None:
    """Hostile: SPF with the most DNS mechanisms pyspf allows and more, each an MX of ten hosts.
    Twenty such evaluations run beside an honest one; all end, the honest one passes."""
    hostile: dict[str, dict[str, list[str]]] = {
        "evil.test": {"TXT": [txt(" ".join(["v=spf1", *(f"mx:m{i}.evil.test" for i in range(12)), "-all"]))]}
    }
    for i in range(12):
        hostile[f"m{i}.evil.test"] = {"MX": [f"10 h{i}-{j}.evil.test." for j in range(10)]}
        for j in range(10):
            hostile[f"h{i}-{j}.evil.test"] = {"A": ["192.0.2.99"]}
    zones = {**sender_zones(), **hostile}

    async def attack(server: DnsServer) -> tuple[dict[str, Signal], list[str], float, int]:
        dns_client = AsyncDns(build_resolver([server.nameserver]))
        started = time.monotonic()
        honest = evaluate_async(
            dns_client,
            SenderFacts(HONEST_IP, "h.test", f"b@{SENDER_DOMAIN}", message_from(f"a@{SENDER_DOMAIN}")),
            started + 5,
        )
        evil = [
            evaluate_spf(dns_client, HONEST_IP, f"x{index}@evil.test", "h.test", started + 5) for index in range(20)
        ]
        honest_task = asyncio.ensure_future(honest)  # scheduled first, as before the flood
        honest_verdict, evil_results = await asyncio.gather(honest_task, asyncio.gather(*evil))
        return (
            honest_verdict.signals(),
            [result.result for result in evil_results],
            time.monotonic() - started,
            dns_client.queries,
        )

    with DnsServer(zones) as server:
        honest, evil, elapsed_s, queries = asyncio.run(attack(server))
    print(f"20 lookup-heavy SPF evaluations + 1 honest: {elapsed_s:.2f} s, {queries} DNS queries, results {set(evil)}")
    assert honest == {"spf": "pass", "dkim": "unknown", "dmarc": "pass"}
    assert set(evil) <= {"permerror", "fail", "temperror"}
    assert queries < 200  # shared and cached across the twenty, not 20 x the record's fan-out


def test_spf_prefetch_reads_the_next_names_from_the_record() -> None:
    record = dns.rdata.from_text(
        dns.rdataclass.IN,
        dns.rdatatype.TXT,
        txt("v=spf1 include:_spf.a.test a a:b.test/24 mx:c.test exists:%{i}.x.test ip4:192.0.2.0/24 redirect=d.test"),
    )
    assert SpfPrefetch("192.0.2.1")("s.test", "TXT", [record]) == [
        ("_spf.a.test", "TXT"),
        ("s.test", "A"),
        ("b.test", "A"),
        ("c.test", "MX"),
        ("d.test", "TXT"),
    ]
    assert SpfPrefetch("2001:db8::1")("s.test", "TXT", [record])[1] == ("s.test", "AAAA")
