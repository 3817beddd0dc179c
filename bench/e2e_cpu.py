"""Figure: CPU per delivered message over the whole inbound path vs the bare aiosmtpd sink.

Every round: the bare aiosmtpd sink takes 10 SMTP sessions of 10 KB unique messages for the
window and its CPU time (/proc utime + stime) over the messages it answered 250 is the
baseline; then the relay (one tunnel, N ingress processes, 10 connected gateways with
inbound_ack) takes the same load from the same client, and the CPU time of every relay process
and redis-server from just before the load until every inbox is empty, over the messages the
gateways received, is the value. Lower is better; the target is the original relay's 0.7x.
"""

from __future__ import annotations

from bench.delivering import PERSONAS, bare_sink, cpu_seconds, delivering_relay, smtp_load
from bench.harness import Bench, service_available
from bench.modes import Mode
from bench.report import FigureResult, Target, print_line

FIGURE = "e2e_cpu"
SESSIONS = 10
TARGET_RATIO = 0.7
US_PER_S = 1e6


def run(bench: Bench, mode: Mode) -> FigureResult:
    workers = max(mode.ingress_worker_counts)
    figure = FigureResult(
        FIGURE,
        "CPU per delivered message",
        f"{SESSIONS} SMTP sessions, 10 KB unique messages, {mode.ingress_seconds:g} s of load; relay: "
        f"one `protege-relay tunnel`, {workers} ingress process(es), {PERSONAS} personas with connected "
        "lean gateways (inbound_ack); CPU (/proc utime+stime) of every relay process and redis-server "
        "from the start of the load until every inbox is empty, over the messages the gateways "
        "received. Baseline: the bare aiosmtpd sink's CPU per accepted message, same client, same round.",
    )
    missing = [name for name in ("ingress", "tunnel") if not service_available(name)]
    if missing:
        figure.skipped = f"services not present yet: {', '.join(missing)}"
        return figure
    metric = figure.metric(
        "CPU per message, relay processes + Redis",
        "us/msg",
        baseline_name="bare aiosmtpd sink CPU per message",
        target=Target("ratio_at_most", TARGET_RATIO),
    )
    parts: dict[str, list[float]] = {}
    for round_index in range(mode.rounds):
        with bare_sink(bench) as (sink, port):
            before = cpu_seconds(sink.pid)
            result = smtp_load(bench, port, ["persona@relay.bench"], SESSIONS, mode.ingress_seconds)
            baseline = (cpu_seconds(sink.pid) - before) / int(result["accepted"]) * US_PER_S
        metric.baseline_rounds.append(baseline)
        with delivering_relay(bench, workers, f"e2e{round_index}") as relay:
            pids = relay.cpu_pids
            names = [child.name for child in relay.services] + ["redis-server"]
            before_each = [cpu_seconds(pid) for pid in pids]
            smtp_load(bench, relay.smtp_port, relay.recipients, SESSIONS, mode.ingress_seconds)
            relay.wait_drained()
            delivered = relay.status().get("delivered", 0)
            spent = [cpu_seconds(pid) - start for pid, start in zip(pids, before_each, strict=True)]
        if not delivered:
            raise RuntimeError("the gateways received nothing")
        value = sum(spent) / delivered * US_PER_S
        metric.rounds.append(value)
        by_name: dict[str, float] = {}
        for name, seconds in zip(names, spent, strict=True):
            by_name[name] = by_name.get(name, 0.0) + seconds / delivered * US_PER_S
        for name, us in by_name.items():
            parts.setdefault(name, []).append(us)
        print_line(
            f"  round {round_index + 1}: baseline {baseline:.0f} us/msg, relay {value:.0f} us/msg "
            f"({delivered} delivered)"
        )
    figure.details["us per message by process (per round)"] = {
        name: [round(v) for v in values] for name, values in parts.items()
    }
    bench.flush()
    return figure
