"""Prometheus metrics of the ingress (served on `/metrics` of its health port)."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Counter("relay_ingress_connections_total", "SMTP connections accepted by the listener")
OPEN_CONNECTIONS = Gauge(
    "relay_ingress_open_connections", "SMTP connections currently open", multiprocess_mode="livesum"
)
MESSAGES_ACCEPTED = Counter("relay_ingress_messages_accepted_total", "Messages answered 250 after a confirmed enqueue")
RECIPIENTS_ACCEPTED = Counter(
    "relay_ingress_recipients_accepted_total", "Inbox entries written (one per accepted recipient)"
)
BYTES_ACCEPTED = Counter(
    "relay_ingress_bytes_accepted_total", "Message bytes accepted, trace header excluded, per message"
)
DUPLICATES = Counter(
    "relay_ingress_duplicates_total",
    "Messages answered 250 with the queue id of an earlier acceptance of the same envelope and "
    "bytes (a retry after a lost reply), nothing stored again",
)
REJECTIONS = Counter(
    "relay_ingress_rejections_total",
    "Refusals by reason (PROTOCOL.md part C) and SMTP reply code (4xx: the sender retries; 5xx: it bounces)",
    ["reason", "code"],
)
ENQUEUE_SECONDS = Histogram(
    "relay_ingress_enqueue_seconds",
    "Time of the idempotent write (WATCH + MULTI/EXEC per persona) that makes a message durable",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SENDER_AUTH = Counter(
    "relay_ingress_sender_auth_total",
    "Sender authentication outcomes per mechanism, as attestation signals",
    ["mechanism", "signal"],
)


# `.labels()` parses its keywords and takes a lock on every call; a label set's child never
# changes, so each one used is looked up once. Label values come from fixed sets (refusal
# reasons and codes, sender-auth mechanisms and signals), so the caches stay small.


@functools.cache
def rejections(reason: str, code: int) -> Counter:
    return REJECTIONS.labels(reason=reason, code=str(code))


@functools.cache
def sender_auth(mechanism: str, signal: str) -> Counter:
    return SENDER_AUTH.labels(mechanism=mechanism, signal=signal)
