"""Figure: accept rate with gateways connected and reading, vs bare aiosmtpd in the same round.

The ingress-rate figure measures SMTP in alone; here the tunnel streams every accepted message
to its gateway while the load runs, so the two share the machine as they do in production.
Also reported: the backlog in the inboxes when the load stopped and how long it took to drain
(target: nothing queued for more than a second), and, as a diagnostic, the same rate with
Redis at `appendfsync always` (every acknowledged write fsynced before the 250: the price of
surviving power loss rather than a process crash).
"""

from __future__ import annotations

import contextlib

from bench.delivering import LoadOutcome, bare_sink, delivering_relay, load_and_drain, smtp_load
from bench.harness import Bench, service_available
from bench.modes import Mode
from bench.report import FigureResult, Target, print_line

FIGURE = "delivering_rate"
TARGET_RATIO = 1.8
DRAIN_TARGET_S = 1.0


@contextlib.contextmanager
def appendfsync(bench: Bench, policy: str):  # type: ignore[no-untyped-def]
    with bench.redis() as client:
        previous = client.config_get("appendfsync")["appendfsync"]
        client.config_set("appendfsync", policy)
    try:
        yield
    finally:
        with bench.redis() as client:
            client.config_set("appendfsync", previous)


def measure(bench: Bench, mode: Mode, workers: int, salt: str) -> LoadOutcome:
    with delivering_relay(bench, workers, salt) as relay:
        return load_and_drain(relay, mode.ingress_connections, mode.ingress_seconds)


def run(bench: Bench, mode: Mode) -> FigureResult:
    workers = max(mode.ingress_worker_counts)
    figure = FigureResult(
        FIGURE,
        "Accept rate, gateways delivering",
        f"{mode.ingress_connections} SMTP sessions (one command at a time), 10 KB unique messages, "
        f"{mode.ingress_seconds:g} s window, into {workers} `protege-relay ingress` process(es) while one "
        "`protege-relay tunnel` streams every message to 10 connected lean gateways (inbound_ack). "
        "Baseline: bare aiosmtpd (one process, default loop), same client, same round. Queued: "
        "entries in the inboxes when the window closed; drain: from then until every inbox was empty.",
    )
    missing = [name for name in ("ingress", "tunnel") if not service_available(name)]
    if missing:
        figure.skipped = f"services not present yet: {', '.join(missing)}"
        return figure
    rate = figure.metric(
        "accept rate, gateways reading",
        "msg/s",
        baseline_name="bare aiosmtpd",
        target=Target("ratio_at_least", TARGET_RATIO),
    )
    queued = figure.metric(
        "queued when the load stopped",
        "messages",
        notes="entries not yet acknowledged by a gateway when the load window closed",
    )
    drain = figure.metric("drain time", "s", target=Target("value_at_most", DRAIN_TARGET_S))
    always = figure.metric(
        "accept rate, appendfsync always",
        "msg/s",
        baseline_name="bare aiosmtpd",
        notes="diagnostic: the same with Redis fsyncing the AOF before answering each write",
    )
    refusals: dict[str, int] = {}
    for round_index in range(mode.rounds):
        with bare_sink(bench) as (_, port):
            baseline = smtp_load(bench, port, ["persona@relay.bench"], mode.ingress_connections, mode.ingress_seconds)
        rate.baseline_rounds.append(float(baseline["rate"]))
        always.baseline_rounds.append(float(baseline["rate"]))
        outcome = measure(bench, mode, workers, f"delivering{round_index}")
        rate.rounds.append(outcome.rate)
        queued.rounds.append(float(outcome.queued_at_stop))
        drain.rounds.append(outcome.drain_s)
        with appendfsync(bench, "always"):
            synced = measure(bench, mode, workers, f"always{round_index}")
        always.rounds.append(synced.rate)
        for outcome_ in (outcome, synced):
            for key, value in outcome_.other.items():
                refusals[key] = refusals.get(key, 0) + value
        print_line(
            f"  round {round_index + 1}: baseline {baseline['rate']:.0f} msg/s, relay {outcome.rate:.0f} msg/s "
            f"({outcome.queued_at_stop} queued at stop, drained in {outcome.drain_s:.2f} s), "
            f"appendfsync always {synced.rate:.0f} msg/s"
        )
    if refusals:
        figure.details["refusals/errors"] = refusals
    bench.flush()
    return figure
