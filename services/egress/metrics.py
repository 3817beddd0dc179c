"""Prometheus metrics of the egress service (exposed on `egress.httpPort` at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS = Counter(
    "relay_egress_jobs_total",
    "Delivery job runs by how they ended",
    ["outcome"],  # sent | failed_permanent | failed_temporary | retry | duplicate | invalid
)
ATTEMPT_SECONDS = Histogram(
    "relay_egress_attempt_seconds",
    "Duration of one delivery attempt (DNS, SMTP) for one job",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
SMTP_SESSIONS = Counter(
    "relay_egress_smtp_sessions_total",
    "SMTP sessions that reached MAIL FROM, by whether STARTTLS was in use",
    ["tls"],
)
JOBS_IN_PROGRESS = Gauge(
    "relay_egress_jobs_in_progress", "Delivery jobs running in this process", multiprocess_mode="livesum"
)
SMTP_CONNECTIONS = Counter(
    "relay_egress_smtp_connections_total",
    "SMTP transactions by whether they opened a new connection or reused a cached one",
    ["connection"],  # new | reused
)
DESTINATIONS_REFUSED = Counter(
    "relay_egress_destinations_refused_total",
    "MX addresses not connected to because they are not public destinations (loopback, private, ...)",
)
DSNS = Counter(
    "relay_egress_dsns_total",
    "Delivery status notifications put into a persona's inbox",
    ["action", "result"],  # failed | delayed; stored | duplicate (a re-run found it stored)
)
MTA_STS_FETCHES = Counter(
    "relay_egress_mta_sts_fetches_total",
    "MTA-STS policy fetches (a new or changed policy id), by result",
    ["result"],  # ok | failed
)
MTA_STS_VIOLATIONS = Counter(
    "relay_egress_mta_sts_violations_total",
    "MX hosts that did not meet their domain's MTA-STS policy, by policy mode and reason",
    ["mode", "reason"],  # enforce (host skipped) | testing (reported, delivered anyway)
)
