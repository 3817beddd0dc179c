"""Figure: accept rate with sender authentication on and slow DNS, vs the same relay with it off.

The setup of `delivering_rate` (N ingress processes, one tunnel, 10 connected gateways, 50
sessions of 10 KB unique messages), run twice per round: once with `smtp.evaluateSenderAuth`
off (the baseline) and once with it on, its nameserver a local authoritative server in the
bench that answers every query 50 ms late (`bench.dns_slow`). The sender's domain publishes
SPF (`ip4:127.0.0.1 -all`, so SPF passes) and DMARC (`p=reject`); the messages carry no DKIM
signature. Records have a 300 s TTL and negative answers the zone's SOA minimum, as usual on
the Internet, so what a resolver may cache it may cache here too.
"""

from __future__ import annotations

import json

from bench.delivering import delivering_relay, load_and_drain
from bench.harness import Bench, free_port, service_available
from bench.modes import Mode
from bench.report import FigureResult, Target, print_line

FIGURE = "sender_auth_rate"
TARGET_RATIO = 0.9
DNS_DELAY_MS = 50
SENDER_DOMAIN = "sender.bench"
RECORDS = (
    (SENDER_DOMAIN, "TXT", '"v=spf1 ip4:127.0.0.1 -all"'),
    (f"_dmarc.{SENDER_DOMAIN}", "TXT", '"v=DMARC1; p=reject"'),
)


def run(bench: Bench, mode: Mode) -> FigureResult:
    workers = max(mode.ingress_worker_counts)
    figure = FigureResult(
        FIGURE,
        "Accept rate, sender auth on, DNS 50 ms",
        f"{mode.ingress_connections} SMTP sessions, 10 KB unique messages, {mode.ingress_seconds:g} s "
        f"window, {workers} ingress process(es), tunnel and 10 connected gateways; "
        f"`smtp.evaluateSenderAuth` on with a local nameserver answering every query after "
        f"{DNS_DELAY_MS} ms (SPF and DMARC records of the sender's domain, 300 s TTL). Baseline: "
        "the same relay with sender auth off, same client, same round.",
    )
    missing = [name for name in ("ingress", "tunnel") if not service_available(name)]
    if missing:
        figure.skipped = f"services not present yet: {', '.join(missing)}"
        return figure
    metric = figure.metric(
        "accept rate, sender auth on",
        "msg/s",
        baseline_name="same relay, sender auth off",
        target=Target("ratio_at_least", TARGET_RATIO),
    )
    dns_port = free_port()
    record_args = [part for record in RECORDS for part in ("--record", *record)]
    dns_server = bench.start_program(
        "bench.dns_slow", ["--port", str(dns_port), "--delay-ms", str(DNS_DELAY_MS), *record_args], ready_port=dns_port
    )
    auth_env = {
        "RELAY_SMTP_EVALUATE_SENDER_AUTH": "true",
        "RELAY_SMTP_AUTH_NAMESERVERS": json.dumps([f"127.0.0.1:{dns_port}"]),
    }
    refusals: dict[str, int] = {}
    for round_index in range(mode.rounds):
        with delivering_relay(bench, workers, f"authoff{round_index}") as relay:
            off = load_and_drain(relay, mode.ingress_connections, mode.ingress_seconds)
        with delivering_relay(bench, workers, f"authon{round_index}", **auth_env) as relay:
            on = load_and_drain(relay, mode.ingress_connections, mode.ingress_seconds)
        metric.baseline_rounds.append(off.rate)
        metric.rounds.append(on.rate)
        for key, value in on.other.items():
            refusals[key] = refusals.get(key, 0) + value
        print_line(
            f"  round {round_index + 1}: sender auth off {off.rate:.0f} msg/s, on {on.rate:.0f} msg/s "
            f"({on.queued_at_stop} queued at stop, drained in {on.drain_s:.2f} s)"
        )
    if refusals:
        figure.details["refusals/errors with sender auth on"] = refusals
    bench.stop(dns_server)
    bench.flush()
    return figure
